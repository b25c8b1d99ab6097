// Fused MoE experts on CPU: the native twin of cluster.experts' LocalExperts (same layout:
// w_gate_up [E, H, 2I], w_down [E, I, H], input-major).
//
// Why: at decode a layer's experts each see a handful of rows, so the work is streaming every
// expert's weights once. Padded batched matmuls stream them but compute on padding; per-expert
// matmuls pay a call each. Here each expert gathers its rows and multiplies them with the
// register-blocked matmul of gemm.h while its weights pass through cache once (at prefill sizes
// that matmul also beats MKL's on this project's CPUs); experts run in parallel on torch's own
// thread pool. Every (token, slot) pair's output lands in its own row and a token sums its k
// rows in a fixed order, so results do not depend on the thread count. Intermediates are
// rounded to the model's dtype where the PyTorch path rounds them.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

#include "gemm.h"

namespace {

using q3native::gemm;

template <typename T>
inline float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

template <typename T>
void moe_impl(const T* x, const int64_t* ids, const T* weights, const T* w_gu, const T* w_dn, T* out,
              int64_t tokens, int64_t k, int64_t experts, int64_t hidden, int64_t inter) {
  const int64_t pairs = tokens * k;
  std::vector<int64_t> start(experts + 1, 0), order(pairs);  // pairs sorted by expert (stable)
  for (int64_t p = 0; p < pairs; ++p) start[ids[p] + 1]++;
  for (int64_t e = 0; e < experts; ++e) start[e + 1] += start[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < pairs; ++p) order[fill[ids[p]]++] = p;
  }
  std::vector<float> pair_out(pairs * hidden);
  at::parallel_for(0, experts, 1, [&](int64_t e0, int64_t e1) {
    std::vector<float> xs, gu, act, y;
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t m = start[e + 1] - start[e];
      if (m == 0) continue;
      xs.resize(m * hidden); gu.resize(m * 2 * inter); act.resize(m * inter); y.resize(m * hidden);
      for (int64_t r = 0; r < m; ++r) {
        const T* src = x + (order[start[e] + r] / k) * hidden;
        for (int64_t c = 0; c < hidden; ++c) xs[r * hidden + c] = static_cast<float>(src[c]);
      }
      gemm(w_gu + e * hidden * 2 * inter, hidden, 2 * inter, xs.data(), m, gu.data());
      for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < inter; ++c) {
          const float g = round_to<T>(gu[r * 2 * inter + c]);
          const float u = round_to<T>(gu[r * 2 * inter + inter + c]);
          act[r * inter + c] = round_to<T>(round_to<T>(g / (1.f + std::exp(-g))) * u);
        }
      gemm(w_dn + e * inter * hidden, inter, hidden, act.data(), m, y.data());
      for (int64_t r = 0; r < m; ++r) {
        float* dst = pair_out.data() + order[start[e] + r] * hidden;
        for (int64_t c = 0; c < hidden; ++c) dst[c] = round_to<T>(y[r * hidden + c]);
      }
    }
  });
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      T* o = out + t * hidden;
      for (int64_t c = 0; c < hidden; ++c) {
        float s = 0.f;
        for (int64_t j = 0; j < k; ++j) s += static_cast<float>(weights[t * k + j]) * pair_out[(t * k + j) * hidden + c];
        o[c] = static_cast<T>(s);
      }
    }
  });
}

}  // namespace

// x [T, H], ids [T, k] (int64), weights [T, k], w_gate_up [E, H, 2I], w_down [E, I, H] -> [T, H]
torch::Tensor moe_experts(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor w_gate_up,
                          torch::Tensor w_down) {
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && weights.sizes() == ids.sizes(), "moe_experts: x [T, H], ids/weights [T, k]");
  TORCH_CHECK(ids.scalar_type() == torch::kLong, "moe_experts: ids must be int64");
  TORCH_CHECK(w_gate_up.dim() == 3 && w_down.dim() == 3 && w_gate_up.size(1) == x.size(1) &&
              w_down.size(1) * 2 == w_gate_up.size(2) && w_down.size(2) == x.size(1) && w_down.size(0) == w_gate_up.size(0),
              "moe_experts: w_gate_up [E, H, 2I], w_down [E, I, H]");
  TORCH_CHECK(w_gate_up.scalar_type() == x.scalar_type() && w_down.scalar_type() == x.scalar_type(), "moe_experts: dtypes differ");
  x = x.contiguous(); ids = ids.contiguous(); weights = weights.to(x.scalar_type()).contiguous();
  w_gate_up = w_gate_up.contiguous(); w_down = w_down.contiguous();
  auto out = torch::empty_like(x);
  const int64_t tokens = x.size(0), hidden = x.size(1), k = ids.size(1);
  const int64_t experts = w_gate_up.size(0), inter = w_down.size(1);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t p = 0; p < tokens * k; ++p)
    TORCH_CHECK(id[p] >= 0 && id[p] < experts, "moe_experts: expert id ", id[p], " outside [0, ", experts, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_experts", [&] {
    moe_impl<scalar_t>(x.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), weights.data_ptr<scalar_t>(),
                       w_gate_up.data_ptr<scalar_t>(), w_down.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                       tokens, k, experts, hidden, inter);
  });
  return out;
}
