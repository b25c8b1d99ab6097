// The register-blocked matmul shared by the native kernels: y [m, N] = x [m, K] @ w [K, N], with
// x in float and w input-major ([K, N] row-major, float / bfloat16 / half).
//
// Why hand-written: on this project's CPU machines (AMD EPYC with AVX-512) MKL, which PyTorch
// calls for float matmuls, runs a generic code path at a third or less of the peak, and small
// decode-sized matmuls pay its call overhead on top. Here each MR-row x NB-column output block
// keeps its 2 * MR vector accumulators in registers for the whole K loop; every weight row
// segment that is loaded feeds MR rows. Written with GCC/Clang vector extensions, not
// intrinsics, and sized to the register file the build targets (-march=native): AVX-512 has 32
// 16-float registers, so 8 rows x 32 columns (16 accumulators); AVX2 has 16 8-float registers,
// so 6 rows x 16 columns (12 accumulators). The AVX-512 shape on AVX2 spills its accumulators
// on every step and ran 6-20x slower than MKL.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace q3native {

#if defined(__AVX512F__)
constexpr int VW = 16;      // floats per vector register
constexpr int MR = 8;       // rows per block
#else
constexpr int VW = 8;
constexpr int MR = 6;
#endif
constexpr int64_t NB = 2 * VW;  // output columns per block: two vectors per row

typedef float vec __attribute__((vector_size(VW * sizeof(float))));

template <typename W>
inline vec vload(const W* p) {
  vec v;
  if constexpr (std::is_same_v<W, float>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int i = 0; i < VW; ++i) v[i] = static_cast<float>(p[i]);
  }
  return v;
}

// y[r, 0:NB] = x[r, :] @ w[:, 0:NB] for R rows; w points at the block's first column, rows of
// w are `ldw` apart, rows of x `ldx` apart, rows of y `ldy` apart.
template <int R, typename W>
inline void block(const W* w, int64_t K, int64_t ldw, const float* x, int64_t ldx, float* y, int64_t ldy) {
  vec lo[R], hi[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) { lo[r] = vec{}; hi[r] = vec{}; }
  for (int64_t c = 0; c < K; ++c) {
    const vec w0 = vload(w + c * ldw), w1 = vload(w + c * ldw + VW);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * ldx + c];
      lo[r] += xv * w0;
      hi[r] += xv * w1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    std::memcpy(y + r * ldy, &lo[r], sizeof(vec));
    std::memcpy(y + r * ldy + VW, &hi[r], sizeof(vec));
  }
}

// Rows [0, m) of one NB-column block, MR rows at a time.
template <typename W>
inline void column_block(const W* w, int64_t K, int64_t ldw, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy) {
  int64_t r = 0;
  for (; r + MR <= m; r += MR) block<MR>(w, K, ldw, x + r * ldx, ldx, y + r * ldy, ldy);
  const float* xr = x + r * ldx;
  float* yr = y + r * ldy;
  switch (m - r) {  // the remainder, m - r < MR
    case 7: if constexpr (MR > 7) block<7>(w, K, ldw, xr, ldx, yr, ldy); break;
    case 6: if constexpr (MR > 6) block<6>(w, K, ldw, xr, ldx, yr, ldy); break;
    case 5: block<5>(w, K, ldw, xr, ldx, yr, ldy); break;
    case 4: block<4>(w, K, ldw, xr, ldx, yr, ldy); break;
    case 3: block<3>(w, K, ldw, xr, ldx, yr, ldy); break;
    case 2: block<2>(w, K, ldw, xr, ldx, yr, ldy); break;
    case 1: block<1>(w, K, ldw, xr, ldx, yr, ldy); break;
    default: break;
  }
}

// Columns [n0, n1) of y [m, N] = x [m, K] @ w [K, N]; n0 is a multiple of NB. A last partial
// block is computed on a zero-padded copy of its weight columns.
template <typename W>
void gemm_columns(const W* w, int64_t K, int64_t N, const float* x, int64_t m, float* y, int64_t n0, int64_t n1) {
  const int64_t full = n0 + (n1 - n0) / NB * NB;
  for (int64_t n = n0; n < full; n += NB) column_block(w + n, K, N, x, K, m, y + n, N);
  if (full < n1) {
    const int64_t tail = n1 - full;
    float* wpad = new float[K * NB]();
    float* ypad = new float[m * NB];
    for (int64_t c = 0; c < K; ++c)
      for (int64_t j = 0; j < tail; ++j) wpad[c * NB + j] = static_cast<float>(w[c * N + full + j]);
    column_block(wpad, K, NB, x, K, m, ypad, NB);
    for (int64_t r = 0; r < m; ++r) std::memcpy(y + r * N + full, ypad + r * NB, tail * sizeof(float));
    delete[] wpad;
    delete[] ypad;
  }
}

// y [m, N] = x [m, K] @ w [K, N], single-threaded.
template <typename W>
inline void gemm(const W* w, int64_t K, int64_t N, const float* x, int64_t m, float* y) {
  gemm_columns(w, K, N, x, m, y, 0, N);
}

}  // namespace q3native
