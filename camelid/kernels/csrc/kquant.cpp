// K-quant matrix products: GGUF Q4_K / Q6_K weights (super-blocks of 256) x Q8 activations.
//
// Tiles: camelid/kernels/kquants.py and kernels.h. For output n of row m, 32-block j of the
// activations (scale da, code sum sa, and for Q6_K the code sums sa16 of its two halves):
//   Q4_K  acc = fma(float(s), (d_n * sc_nj) * da, acc); acc = fma(-(dmin_n * mn_nj), da * sa, acc)
//   Q6_K  s' = sc_n,2j (s_lo - 32 sa16_lo) + sc_n,2j+1 (s_hi - 32 sa16_hi)   (int32)
//         acc = fma(float(s'), d_n * da, acc)
// with s (s_lo, s_hi) the exact integer dot products of the weights' codes and the activations'
// codes over the block (its halves). d * sc and dmin * mn are exact in float32 (11 + 8 bits). Every
// path does exactly this, so they agree to the bit, at any batch size.
#include "kernels.h"
#include "codes.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace camelid {

constexpr int Q4K_BB = 2368, Q6K_BB = 3360;  // tile bytes per super-block

static inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return f16_to_f32(h);
}

// The code of input i (< 32) of row r in a 32-block's nibble tile (Q4_0's layout).
static inline int nibble_at(const uint8_t* codes, int r, int i) {
  const int k = i % 16;
  const uint8_t b = codes[64 * (k / 4) + 4 * r + k % 4];
  return i < 16 ? b & 15 : b >> 4;
}

// Q6_K's code of input i of row r: the low nibble, and 2 high bits from plane p = g / 4 (g = i / 4).
static inline int q6_at(const uint8_t* block, int r, int i) {
  const int g = i / 4, p = g / 4, u = g % 4;
  return nibble_at(block, r, i) | ((block[256 + 64 * p + 4 * r + i % 4] >> (2 * u)) & 3) << 4;
}

float kquant_value(int qtype, const uint8_t* sb, int r, int k) {
  if (qtype == Q4_K) {
    const int j = k / 32;
    const float scale = half_at(sb + 2 * r) * float(sb[64 + 16 * j + r]);
    const float low = half_at(sb + 32 + 2 * r) * float(sb[192 + 16 * j + r]);
    return scale * float(nibble_at(sb + 320 + 256 * j, r, k % 32)) - low;
  }
  const float scale = half_at(sb + 2 * r) * float(int8_t(sb[32 + 16 * (k / 16) + r]));
  return scale * float(q6_at(sb + 288 + 384 * (k / 32), r, k % 32) - 32);
}

// ---------------------------------------------------------------------------------------- portable

static void kgemm_scalar(int qtype, const uint8_t* w, int64_t S, int64_t t0, int64_t t1, int64_t N, const int8_t* q,
                         const float* d, const int32_t* s, const int32_t* s16, int64_t M, float* y, int64_t ldy) {
  const int BB = qtype == Q4_K ? Q4K_BB : Q6K_BB;
  const int64_t K = 256 * S, J = 8 * S;
  for (int64_t t = t0; t < t1; ++t) {
    const int nvalid = int(std::min<int64_t>(TILE, N - TILE * t));
    for (int64_t m = 0; m < M; ++m) {
      for (int r = 0; r < nvalid; ++r) {
        float acc = 0.f;
        for (int64_t jj = 0; jj < J; ++jj) {
          const uint8_t* sb = w + (t * S + jj / 8) * BB;
          const int j = int(jj % 8);
          const int8_t* a = q + m * K + 32 * jj;
          const float da = d[m * J + jj];
          if (qtype == Q4_K) {
            int32_t dot = 0;
            for (int i = 0; i < 32; ++i) dot += nibble_at(sb + 320 + 256 * j, r, i) * a[i];
            const float dw = half_at(sb + 2 * r) * float(sb[64 + 16 * j + r]);
            const float mneg = -(half_at(sb + 32 + 2 * r) * float(sb[192 + 16 * j + r]));
            acc = std::fma(float(dot), dw * da, acc);
            acc = std::fma(mneg, da * float(s[m * J + jj]), acc);
          } else {
            int32_t lo = 0, hi = 0;
            for (int i = 0; i < 16; ++i) lo += q6_at(sb + 288 + 384 * j, r, i) * a[i];
            for (int i = 16; i < 32; ++i) hi += q6_at(sb + 288 + 384 * j, r, i) * a[i];
            const int32_t sca = int8_t(sb[32 + 16 * (2 * j) + r]), scb = int8_t(sb[32 + 16 * (2 * j + 1) + r]);
            const int32_t si = sca * (lo - 32 * s16[m * 2 * J + 2 * jj]) + scb * (hi - 32 * s16[m * 2 * J + 2 * jj + 1]);
            acc = std::fma(float(si), half_at(sb + 2 * r) * da, acc);
          }
        }
        y[m * ldy + TILE * t + r] = acc;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------- AVX2

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

AVX2_TARGET static inline void q6_codes_avx2(const uint8_t* block, int h, __m256i* wv) {
  nibbles_avx2(block, h, wv);
  const __m256i m = _mm256_set1_epi8(0x30);
  for (int p = 0; p < 2; ++p) {
    const __m256i x = _mm256_loadu_si256((const __m256i*)(block + 256 + 64 * p + 32 * h));
    wv[4 * p + 0] = _mm256_or_si256(wv[4 * p + 0], _mm256_and_si256(_mm256_slli_epi16(x, 4), m));
    wv[4 * p + 1] = _mm256_or_si256(wv[4 * p + 1], _mm256_and_si256(_mm256_slli_epi16(x, 2), m));
    wv[4 * p + 2] = _mm256_or_si256(wv[4 * p + 2], _mm256_and_si256(x, m));
    wv[4 * p + 3] = _mm256_or_si256(wv[4 * p + 3], _mm256_and_si256(_mm256_srli_epi16(x, 2), m));
  }
}

// sum over groups [g0, g0 + 4) of codes (unsigned, < 64) x activation words (signed)
AVX2_TARGET static inline __m256i dot4_avx2(const __m256i* wv, const int32_t* a, int g0) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  for (int g = g0; g < g0 + 4; ++g)
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(wv[g], _mm256_set1_epi32(a[g])), ones));
  return acc;
}

template <int QT, int MR>
AVX2_TARGET static void ktile_avx2(const uint8_t* w, int64_t S, const int8_t* q, const float* d, const int32_t* s,
                                   const int32_t* s16, int64_t K, float* y, int64_t ldy, int nvalid) {
  constexpr int BB = QT == Q4_K ? Q4K_BB : Q6K_BB;
  const int64_t J = 8 * S;
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int h = 0; h < 2; ++h) {
    __m256 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t sbi = 0; sbi < S; ++sbi) {
      const uint8_t* sb = w + sbi * BB;
      const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sb + 16 * h)));
      for (int j = 0; j < 8; ++j) {
        const int64_t jj = 8 * sbi + j;
        __m256i wv[8];
        if (QT == Q4_K) {
          const __m256 dmv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sb + 32 + 16 * h)));
          const __m256 dw = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                                  _mm_loadl_epi64((const __m128i*)(sb + 64 + 16 * j + 8 * h)))));
          const __m256 mneg = _mm256_xor_ps(sign, _mm256_mul_ps(dmv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                                                   _mm_loadl_epi64((const __m128i*)(sb + 192 + 16 * j + 8 * h))))));
          nibbles_avx2(sb + 320 + 256 * j, h, wv);
          for (int r = 0; r < MR; ++r) {
            const int32_t* a = (const int32_t*)(q + r * K + 32 * jj);
            const __m256i si = _mm256_add_epi32(dot4_avx2(wv, a, 0), dot4_avx2(wv, a, 4));
            const float da = d[r * J + jj];
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), _mm256_mul_ps(dw, _mm256_set1_ps(da)), acc[r]);
            acc[r] = _mm256_fmadd_ps(mneg, _mm256_set1_ps(da * float(s[r * J + jj])), acc[r]);
          }
        } else {
          const __m256i sca = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(sb + 32 + 32 * j + 8 * h)));
          const __m256i scb = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(sb + 48 + 32 * j + 8 * h)));
          q6_codes_avx2(sb + 288 + 384 * j, h, wv);
          for (int r = 0; r < MR; ++r) {
            const int32_t* a = (const int32_t*)(q + r * K + 32 * jj);
            const int32_t* a16 = s16 + r * 2 * J + 2 * jj;
            const __m256i lo = _mm256_sub_epi32(dot4_avx2(wv, a, 0), _mm256_set1_epi32(32 * a16[0]));
            const __m256i hi = _mm256_sub_epi32(dot4_avx2(wv, a, 4), _mm256_set1_epi32(32 * a16[1]));
            const __m256i si = _mm256_add_epi32(_mm256_mullo_epi32(sca, lo), _mm256_mullo_epi32(scb, hi));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), _mm256_mul_ps(dv, _mm256_set1_ps(d[r * J + jj])), acc[r]);
          }
        }
      }
    }
    const int lo = 8 * h, n = std::min(8, nvalid - lo);
    for (int r = 0; r < MR; ++r) {
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, acc[r]);
      if (n > 0) std::memcpy(y + r * ldy + lo, tmp, 4 * n);
    }
  }
}

// ---------------------------------------------------------------------------------------- AVX-512

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

AVX512_TARGET static inline __m512i dot4_avx512(const __m512i* wv, const int32_t* a, int g0) {
  __m512i acc0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[g0], _mm512_set1_epi32(a[g0]));
  __m512i acc1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[g0 + 1], _mm512_set1_epi32(a[g0 + 1]));
  acc0 = _mm512_dpbusd_epi32(acc0, wv[g0 + 2], _mm512_set1_epi32(a[g0 + 2]));
  acc1 = _mm512_dpbusd_epi32(acc1, wv[g0 + 3], _mm512_set1_epi32(a[g0 + 3]));
  return _mm512_add_epi32(acc0, acc1);
}

template <int QT, int MR>
AVX512_TARGET static void ktile_avx512(const uint8_t* w, int64_t S, const int8_t* q, const float* d, const int32_t* s,
                                       const int32_t* s16, int64_t K, float* y, int64_t ldy, int nvalid) {
  constexpr int BB = QT == Q4_K ? Q4K_BB : Q6K_BB;
  const int64_t J = 8 * S;
  const __m512 sign = _mm512_set1_ps(-0.f);
  const __m512i m = _mm512_set1_epi8(0x30);
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t sbi = 0; sbi < S; ++sbi) {
    const uint8_t* sb = w + sbi * BB;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sb));
    for (int j = 0; j < 8; ++j) {
      const int64_t jj = 8 * sbi + j;
      __m512i wv[8];
      if (QT == Q4_K) {
        const __m512 dmv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sb + 32)));
        const __m512 dw = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                                _mm_loadu_si128((const __m128i*)(sb + 64 + 16 * j)))));
        const __m512 mneg = _mm512_xor_ps(sign, _mm512_mul_ps(dmv, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                                 _mm_loadu_si128((const __m128i*)(sb + 192 + 16 * j))))));
        nibbles_avx512(sb + 320 + 256 * j, wv);
        for (int r = 0; r < MR; ++r) {
          const int32_t* a = (const int32_t*)(q + r * K + 32 * jj);
          const __m512i si = _mm512_add_epi32(dot4_avx512(wv, a, 0), dot4_avx512(wv, a, 4));
          const float da = d[r * J + jj];
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), _mm512_mul_ps(dw, _mm512_set1_ps(da)), acc[r]);
          acc[r] = _mm512_fmadd_ps(mneg, _mm512_set1_ps(da * float(s[r * J + jj])), acc[r]);
        }
      } else {
        const __m512i sca = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(sb + 32 + 32 * j)));
        const __m512i scb = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(sb + 48 + 32 * j)));
        const uint8_t* block = sb + 288 + 384 * j;
        nibbles_avx512(block, wv);
        for (int p = 0; p < 2; ++p) {
          const __m512i x = _mm512_loadu_si512(block + 256 + 64 * p);
          wv[4 * p + 0] = _mm512_or_si512(wv[4 * p + 0], _mm512_and_si512(_mm512_slli_epi16(x, 4), m));
          wv[4 * p + 1] = _mm512_or_si512(wv[4 * p + 1], _mm512_and_si512(_mm512_slli_epi16(x, 2), m));
          wv[4 * p + 2] = _mm512_or_si512(wv[4 * p + 2], _mm512_and_si512(x, m));
          wv[4 * p + 3] = _mm512_or_si512(wv[4 * p + 3], _mm512_and_si512(_mm512_srli_epi16(x, 2), m));
        }
        for (int r = 0; r < MR; ++r) {
          const int32_t* a = (const int32_t*)(q + r * K + 32 * jj);
          const int32_t* a16 = s16 + r * 2 * J + 2 * jj;
          const __m512i lo = _mm512_sub_epi32(dot4_avx512(wv, a, 0), _mm512_set1_epi32(32 * a16[0]));
          const __m512i hi = _mm512_sub_epi32(dot4_avx512(wv, a, 4), _mm512_set1_epi32(32 * a16[1]));
          const __m512i si = _mm512_add_epi32(_mm512_mullo_epi32(sca, lo), _mm512_mullo_epi32(scb, hi));
          acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), _mm512_mul_ps(dv, _mm512_set1_ps(d[r * J + jj])), acc[r]);
        }
      }
    }
  }
  const __mmask16 keep = nvalid >= 16 ? __mmask16(0xffff) : __mmask16((1u << nvalid) - 1);
  for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * ldy, keep, acc[r]);
}

// ---------------------------------------------------------------------------------------- driver

using KTile = void (*)(const uint8_t*, int64_t, const int8_t*, const float*, const int32_t*, const int32_t*, int64_t,
                       float*, int64_t, int);

template <int QT>
static void kgemm_simd(const uint8_t* w, int64_t S, int64_t t0, int64_t t1, int64_t N, const int8_t* q, const float* d,
                       const int32_t* s, const int32_t* s16, int64_t M, float* y, int64_t ldy, int level) {
  constexpr int BB = QT == Q4_K ? Q4K_BB : Q6K_BB;
  static const KTile wide[] = {nullptr, ktile_avx512<QT, 1>, ktile_avx512<QT, 2>, ktile_avx512<QT, 3>,
                               ktile_avx512<QT, 4>};
  static const KTile narrow[] = {nullptr, ktile_avx2<QT, 1>, ktile_avx2<QT, 2>};
  const KTile* fns = level >= ISA_AVX512 ? wide : narrow;
  const int maxmr = level >= ISA_AVX512 ? 4 : 2;
  const int64_t K = 256 * S, J = 8 * S;
  for (int64_t t = t0; t < t1; ++t) {
    const int nvalid = int(std::min<int64_t>(TILE, N - TILE * t));
    for_row_steps(M, maxmr, [&](int64_t m, int mr) {
      fns[mr](w + t * S * BB, S, q + m * K, d + m * J, s + m * J, s16 + m * 2 * J, K, y + m * ldy + TILE * t, ldy,
              nvalid);
    });
  }
}

void kgemm_tiles(int qtype, const uint8_t* w, int64_t S, int64_t t0, int64_t t1, int64_t N, const int8_t* q,
                 const float* d, const int32_t* s, int64_t M, float* y, int64_t ldy, int level) {
  std::vector<int32_t> s16;  // Q6_K: the activations' code sums per 16 inputs
  if (qtype == Q6_K) {
    const int64_t K = 256 * S;
    s16.resize(M * K / 16);
    for (int64_t i = 0; i < M * K / 16; ++i) {
      int32_t sum = 0;
      for (int k = 0; k < 16; ++k) sum += q[16 * i + k];
      s16[i] = sum;
    }
  }
  if (level == ISA_SCALAR) return kgemm_scalar(qtype, w, S, t0, t1, N, q, d, s, s16.data(), M, y, ldy);
  if (qtype == Q4_K) return kgemm_simd<Q4_K>(w, S, t0, t1, N, q, d, s, s16.data(), M, y, ldy, level);
  kgemm_simd<Q6_K>(w, S, t0, t1, N, q, d, s, s16.data(), M, y, ldy, level);
}

}  // namespace camelid
