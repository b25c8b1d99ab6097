// Linear layers on CPU with input-major weights: y = x @ w_t (+ bias), the native twin of
// cluster.layers' Linear (see gemm.h for why a hand-written matmul). Decode-sized inputs are
// split over output columns, large ones (prefill) over row chunks that stay in cache while the
// weight columns stream past.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <optional>

#include "gemm.h"

namespace {

constexpr int64_t ROW_CHUNK = 64;

template <typename W>
void linear_impl(const W* w, const float* x, float* y, int64_t m, int64_t K, int64_t N) {
  if (m >= 2 * ROW_CHUNK) {
    at::parallel_for(0, (m + ROW_CHUNK - 1) / ROW_CHUNK, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t r0 = c * ROW_CHUNK, rows = std::min(ROW_CHUNK, m - r0);
        q3native::gemm_columns(w, K, N, x + r0 * K, rows, y + r0 * N, 0, N);
      }
    });
  } else {
    const int64_t blocks = (N + q3native::NB - 1) / q3native::NB;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      q3native::gemm_columns(w, K, N, x, m, y, b0 * q3native::NB, std::min(b1 * q3native::NB, N));
    });
  }
}

}  // namespace

// x [..., K], w_t [K, N], bias [N] or None -> [..., N] in x's dtype.
torch::Tensor linear(torch::Tensor x, torch::Tensor w_t, std::optional<torch::Tensor> bias) {
  TORCH_CHECK(w_t.dim() == 2 && x.size(-1) == w_t.size(0), "linear: x [..., K] and w_t [K, N] do not match");
  TORCH_CHECK(w_t.scalar_type() == x.scalar_type(), "linear: x and w_t dtypes differ");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == w_t.size(1)), "linear: bias must be [N]");
  const int64_t K = w_t.size(0), N = w_t.size(1);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  auto x2 = x.reshape({-1, K}).to(torch::kFloat).contiguous();
  const int64_t m = x2.size(0);
  w_t = w_t.contiguous();
  auto y = torch::empty({m, N}, x2.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w_t.scalar_type(), "linear", [&] {
    linear_impl<scalar_t>(w_t.data_ptr<scalar_t>(), x2.data_ptr<float>(), y.data_ptr<float>(), m, K, N);
  });
  if (bias) y.add_(bias->to(torch::kFloat));
  return y.to(x.scalar_type()).view(out_sizes);
}
