// Float-weight matrix products: float32 or bfloat16 weights in tiles of 16 rows, float32
// activations and accumulation. Output (m, n) = (p0 + p1) + (p2 + p3), p_i = fma-chain over the
// inputs k = i mod 4 in order: the same operations on every path and at every batch size.
#include "kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace camelid {

static inline float weight_at(bool bf16, const void* w, int64_t idx) {
  if (!bf16) return static_cast<const float*>(w)[idx];
  const uint32_t bits = uint32_t(static_cast<const uint16_t*>(w)[idx]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static void dgemm_scalar(bool bf16, const void* w, int64_t K, int64_t t0, int64_t t1, int64_t N, const float* x,
                         int64_t M, float* y, int64_t ldy) {
  for (int64_t t = t0; t < t1; ++t) {
    const int nvalid = int(std::min<int64_t>(TILE, N - TILE * t));
    for (int64_t m = 0; m < M; ++m) {
      for (int r = 0; r < nvalid; ++r) {
        float p[4] = {0.f, 0.f, 0.f, 0.f};
        for (int64_t k = 0; k < K; ++k)
          p[k & 3] = std::fma(weight_at(bf16, w, (t * K + k) * TILE + r), x[m * K + k], p[k & 3]);
        y[m * ldy + TILE * t + r] = (p[0] + p[1]) + (p[2] + p[3]);
      }
    }
  }
}

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

template <bool BF16>
AVX2_TARGET static inline __m256 load8(const void* w, int64_t idx) {
  if (!BF16) return _mm256_loadu_ps(static_cast<const float*>(w) + idx);
  const __m128i h = _mm_loadu_si128((const __m128i*)(static_cast<const uint16_t*>(w) + idx));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <bool BF16, int MR>
AVX2_TARGET static void tile_avx2(const void* w, int64_t K, const float* x, float* y, int64_t ldy, int nvalid) {
  for (int h = 0; h < 2; ++h) {
    __m256 p[4][MR];
    for (int i = 0; i < 4; ++i)
      for (int r = 0; r < MR; ++r) p[i][r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      for (int i = 0; i < 4; ++i) {
        const __m256 wv = load8<BF16>(w, (k + i) * TILE + 8 * h);
        for (int r = 0; r < MR; ++r) p[i][r] = _mm256_fmadd_ps(wv, _mm256_set1_ps(x[r * K + k + i]), p[i][r]);
      }
    }
    for (int i = 0; k < K; ++k, ++i) {
      const __m256 wv = load8<BF16>(w, k * TILE + 8 * h);
      for (int r = 0; r < MR; ++r) p[i][r] = _mm256_fmadd_ps(wv, _mm256_set1_ps(x[r * K + k]), p[i][r]);
    }
    const int lo = 8 * h, n = std::min(8, nvalid - lo);
    for (int r = 0; r < MR; ++r) {
      const __m256 v = _mm256_add_ps(_mm256_add_ps(p[0][r], p[1][r]), _mm256_add_ps(p[2][r], p[3][r]));
      if (n == 8) {
        _mm256_storeu_ps(y + r * ldy + lo, v);
      } else if (n > 0) {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, v);
        std::memcpy(y + r * ldy + lo, tmp, 4 * n);
      }
    }
  }
}

template <bool BF16>
AVX512_TARGET static inline __m512 load16(const void* w, int64_t idx) {
  if (!BF16) return _mm512_loadu_ps(static_cast<const float*>(w) + idx);
  const __m256i h = _mm256_loadu_si256((const __m256i*)(static_cast<const uint16_t*>(w) + idx));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <bool BF16, int MR>
AVX512_TARGET static void tile_avx512(const void* w, int64_t K, const float* x, float* y, int64_t ldy,
                                      int nvalid) {
  __m512 p[4][MR];
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < MR; ++r) p[i][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    for (int i = 0; i < 4; ++i) {
      const __m512 wv = load16<BF16>(w, (k + i) * TILE);
      for (int r = 0; r < MR; ++r) p[i][r] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[r * K + k + i]), p[i][r]);
    }
  }
  for (int i = 0; k < K; ++k, ++i) {
    const __m512 wv = load16<BF16>(w, k * TILE);
    for (int r = 0; r < MR; ++r) p[i][r] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[r * K + k]), p[i][r]);
  }
  const __mmask16 keep = nvalid >= 16 ? __mmask16(0xffff) : __mmask16((1u << nvalid) - 1);
  for (int r = 0; r < MR; ++r)
    _mm512_mask_storeu_ps(y + r * ldy, keep,
                          _mm512_add_ps(_mm512_add_ps(p[0][r], p[1][r]), _mm512_add_ps(p[2][r], p[3][r])));
}

using Tile = void (*)(const void*, int64_t, const float*, float*, int64_t, int);

template <bool BF16>
static void dgemm_simd(const void* w, int64_t K, int64_t t0, int64_t t1, int64_t N, const float* x, int64_t M,
                       float* y, int64_t ldy, int level) {
  static const Tile wide[] = {nullptr, tile_avx512<BF16, 1>, tile_avx512<BF16, 2>, tile_avx512<BF16, 3>,
                              tile_avx512<BF16, 4>};
  static const Tile narrow[] = {nullptr, tile_avx2<BF16, 1>, tile_avx2<BF16, 2>};
  const Tile* fns = level >= ISA_AVX512 ? wide : narrow;
  const int maxmr = level >= ISA_AVX512 ? 4 : 2;
  const int64_t esize = BF16 ? 2 : 4;
  for (int64_t t = t0; t < t1; ++t) {
    const void* wt = static_cast<const char*>(w) + t * K * TILE * esize;
    const int nvalid = int(std::min<int64_t>(TILE, N - TILE * t));
    for_row_steps(M, maxmr, [&](int64_t m, int mr) { fns[mr](wt, K, x + m * K, y + m * ldy + TILE * t, ldy, nvalid); });
  }
}

void dgemm_tiles(bool bf16, const void* w, int64_t K, int64_t t0, int64_t t1, int64_t N, const float* x, int64_t M,
                 float* y, int64_t ldy, int level) {
  if (level == ISA_SCALAR) return dgemm_scalar(bf16, w, K, t0, t1, N, x, M, y, ldy);
  if (bf16) return dgemm_simd<true>(w, K, t0, t1, N, x, M, y, ldy, level);
  dgemm_simd<false>(w, K, t0, t1, N, x, M, y, ldy, level);
}

}  // namespace camelid
