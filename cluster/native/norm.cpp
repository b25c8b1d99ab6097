// RMSNorm on CPU: the native twin of cluster.layers.rms_norm, one pass per row instead of the
// six elementwise ops (and their temporaries) of the PyTorch version. Row i of x [N, D] uses
// weight row i % W, so one call also normalises every q and k head with its own weight.
// The order of roundings is transformers': normalise in float, round to x's dtype, then scale.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

namespace {

template <typename T>
void rms_norm_impl(const T* x, const T* w, T* y, int64_t rows, int64_t dim, int64_t wrows, float eps) {
  // Threads only pay off past a few tens of thousands of elements.
  at::parallel_for(0, rows, std::max<int64_t>(64, 32768 / std::max<int64_t>(dim, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * dim;
      const T* wr = w + (r % wrows) * dim;
      T* yr = y + r * dim;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < dim; ++c) {
        const float v = static_cast<float>(xr[c]);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
#pragma omp simd
      for (int64_t c = 0; c < dim; ++c) {
        const T normed = static_cast<T>(static_cast<float>(xr[c]) * inv);
        yr[c] = static_cast<T>(static_cast<float>(wr[c]) * static_cast<float>(normed));
      }
    }
  });
}

}  // namespace

// x [..., D] (any leading shape), weight [W, D] or [D] -> same shape as x.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  const int64_t dim = x.size(-1);
  TORCH_CHECK(weight.size(-1) == dim && weight.dim() <= 2, "rms_norm: weight must be [D] or [W, D]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: x and weight dtypes differ");
  auto xc = x.contiguous();
  auto w = weight.contiguous();
  const int64_t rows = dim ? xc.numel() / dim : 0, wrows = w.dim() == 2 ? w.size(0) : 1;
  TORCH_CHECK(wrows > 0 && rows % wrows == 0, "rms_norm: rows do not cycle through the weight rows");
  auto y = torch::empty_like(xc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_impl<scalar_t>(xc.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), rows, dim, wrows,
                            static_cast<float>(eps));
  });
  return y;
}
