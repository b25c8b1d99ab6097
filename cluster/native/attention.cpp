// Paged decode attention on CPU: the native twin of cluster.attention's decode path.
//
// Why: the PyTorch path first copies every sequence's KV blocks into one padded tensor
// (index_select) and then attends over the copy, so the cache is read, written and read again.
// Here each (sequence, kv head) walks its block table and reads keys and values in place, once.
// The query heads sharing a kv head are handled together, so each key is loaded once for all
// of them. Work is spread over torch's own thread pool.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Calls fn(p, row) for each cached token p < len: `row` is the token's cache row (keys of every
// kv head, then values), found through the sequence's block table.
template <typename T, typename Fn>
inline void for_each_token(const T* cache, const int64_t* table, int64_t len, int64_t block_size, int64_t row, Fn&& fn) {
  for (int64_t b0 = 0; b0 < len; b0 += block_size) {
    const T* base = cache + table[b0 / block_size] * block_size * row;
    const int64_t n = std::min(block_size, len - b0);
    for (int64_t t = 0; t < n; ++t) fn(b0 + t, base + t * row);
  }
}

// One (sequence, kv head): the `group` query heads that share it, over `len` cached tokens.
// DIM > 0 fixes the head size at compile time (the common sizes), 0 reads it from `dim`.
template <typename T, int DIM>
void attend_one(const float* qf, const T* cache, const int64_t* table, int64_t len, int64_t group, int64_t dim,
                int64_t row, int64_t key_off, int64_t val_off, int64_t block_size, float* scores, float* acc) {
  const int64_t d = DIM > 0 ? DIM : dim;
  for_each_token(cache, table, len, block_size, row, [&](int64_t p, const T* token) {
    const T* key = token + key_off;
    for (int64_t j = 0; j < group; ++j) {
      const float* qj = qf + j * d;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < d; ++c) dot += qj[c] * static_cast<float>(key[c]);
      scores[j * len + p] = dot;
    }
  });
  for (int64_t j = 0; j < group; ++j) {
    float* sj = scores + j * len;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < len; ++p) mx = std::max(mx, sj[p]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < len; ++p) { sj[p] = std::exp(sj[p] - mx); sum += sj[p]; }
    const float inv = 1.f / sum;
    for (int64_t p = 0; p < len; ++p) sj[p] *= inv;
  }
  for_each_token(cache, table, len, block_size, row, [&](int64_t p, const T* token) {
    const T* val = token + val_off;
    for (int64_t j = 0; j < group; ++j) {
      const float pj = scores[j * len + p];
      float* aj = acc + j * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) aj[c] += pj * static_cast<float>(val[c]);
    }
  });
}

template <typename T>
void decode_impl(const T* q, const T* cache, const int64_t* tables, const int64_t* lens, T* out, int64_t seqs,
                 int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size, int64_t width, float scale) {
  const int64_t group = heads / kv_heads;
  const int64_t row = 2 * kv_heads * dim;  // one token's keys then values
  at::parallel_for(0, seqs * kv_heads, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> qf, scores, acc;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t s = w / kv_heads, h = w % kv_heads, len = lens[s];
      qf.resize(group * dim); scores.resize(group * len); acc.assign(group * dim, 0.f);
      const T* qs = q + (s * heads + h * group) * dim;
      for (int64_t c = 0; c < group * dim; ++c) qf[c] = static_cast<float>(qs[c]) * scale;
      auto run = [&](auto fixed) {
        attend_one<T, decltype(fixed)::value>(qf.data(), cache, tables + s * width, len, group, dim, row, h * dim,
                                              (kv_heads + h) * dim, block_size, scores.data(), acc.data());
      };
      if (dim == 64) run(std::integral_constant<int, 64>{});
      else if (dim == 128) run(std::integral_constant<int, 128>{});
      else run(std::integral_constant<int, 0>{});
      T* o = out + (s * heads + h * group) * dim;
      for (int64_t c = 0; c < group * dim; ++c) o[c] = static_cast<T>(acc[c]);
    }
  });
}

}  // namespace

// q [D, H, d]; kv_cache [blocks, block_size, 2*KV, d] (keys then values); block_tables [D, W];
// context_lens [D] -> [D, H, d]
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_tables,
                                     torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 4 && block_tables.dim() == 2 && context_lens.dim() == 1,
              "paged_decode_attention: q [D, H, d], kv_cache [blocks, block_size, 2*KV, d], tables [D, W], lens [D]");
  TORCH_CHECK(kv_cache.size(3) == q.size(2) && q.size(1) % (kv_cache.size(2) / 2) == 0 && kv_cache.size(2) % 2 == 0,
              "paged_decode_attention: head shapes do not match");
  TORCH_CHECK(block_tables.size(0) == q.size(0) && context_lens.size(0) == q.size(0), "paged_decode_attention: batch sizes differ");
  TORCH_CHECK(kv_cache.is_contiguous() && q.scalar_type() == kv_cache.scalar_type(), "paged_decode_attention: cache layout/dtype");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && context_lens.scalar_type() == torch::kLong,
              "paged_decode_attention: tables and lens must be int64");
  q = q.contiguous(); block_tables = block_tables.contiguous(); context_lens = context_lens.contiguous();
  const int64_t* table = block_tables.data_ptr<int64_t>();
  const int64_t* len = context_lens.data_ptr<int64_t>();
  const int64_t width = block_tables.size(1), block_size = kv_cache.size(1), blocks = kv_cache.size(0);
  for (int64_t s = 0; s < q.size(0); ++s) {
    TORCH_CHECK(len[s] >= 1 && len[s] <= width * block_size, "paged_decode_attention: context length ", len[s], " does not fit the block table");
    for (int64_t b = 0; b < (len[s] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(table[s * width + b] >= 0 && table[s * width + b] < blocks, "paged_decode_attention: block id ", table[s * width + b], " outside the cache");
  }
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    decode_impl<scalar_t>(q.data_ptr<scalar_t>(), kv_cache.data_ptr<scalar_t>(), block_tables.data_ptr<int64_t>(),
                          context_lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), q.size(0), q.size(1),
                          kv_cache.size(2) / 2, q.size(2), kv_cache.size(1), block_tables.size(1), static_cast<float>(scale));
  });
  return out;
}
