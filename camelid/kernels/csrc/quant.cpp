// Block-quantized matrix products: GGUF Q4_0 / Q4_1 / Q8_0 weights x Q8 activations.
//
// For output n of row m, block j: an exact integer dot product s = sum_i wq[n][32j+i] * aq[m][32j+i],
// then in float32:  Q4_0  acc = fma(float(s - 8 sa), d_n * da, acc)             (w = d (q - 8))
//                   Q4_1  acc = fma(float(s), d_n * da, acc); acc = fma(m_n, da * sa, acc)
//                   Q8_0  acc = fma(float(s), d_n * da, acc)                     (w = d q)
// with da, sa the activation block's scale and code sum. Every path below does exactly this, so
// they agree to the bit (see kernels.h). The layout is llama.cpp-like in spirit (rows interleaved
// so that one broadcast activation word feeds 16 rows: no horizontal sums), our own in detail.
#include "kernels.h"
#include "codes.h"

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace camelid {

int block_bytes(int qtype) {
  switch (qtype) {
    case Q4_0: return 32 + 256;
    case Q4_1: return 64 + 256;
    case Q8_0: return 32 + 512;
    case Q5_0: return 32 + 256 + 64;
    case Q5_1: return 64 + 256 + 64;
    case Q4_K: return 2368;
    case Q6_K: return 3360;
  }
  return 0;
}

int block_inputs(int qtype) { return qtype == Q4_K || qtype == Q6_K ? 256 : 32; }

float f16_to_f32(uint16_t h) {  // exact, any CPU
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400));
    bits = sign | uint32_t(112 - e) << 23 | (man & 0x3ff) << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The portable and AVX2 paths read Q8 codes as signed (no offset); the AVX-512 path's are w + 128.

// ---------------------------------------------------------------------------------------- portable

static void quantize_rows_scalar(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* s) {
  const int64_t J = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < J; ++j) {
      const float* xb = x + m * K + 32 * j;
      float amax = 0.f;
      bool finite = true;
      for (int i = 0; i < 32; ++i) {
        amax = std::max(amax, std::fabs(xb[i]));
        finite = finite && std::isfinite(xb[i]);
      }
      const float dj = amax / 127.f, id = dj != 0.f ? 1.f / dj : 0.f;
      int32_t sum = 0;
      int8_t* qb = q + m * K + 32 * j;
      for (int i = 0; i < 32; ++i) {
        const int v = finite ? int(std::nearbyint(xb[i] * id)) : 0;
        qb[i] = int8_t(v);
        sum += v;
      }
      d[m * J + j] = finite ? dj : NAN;
      s[m * J + j] = sum;
    }
  }
}

// The scalar kernel reads the packed layout back per (row, input) and does the same sums.
static inline int code_of(int qtype, const uint8_t* codes, int r, int i) {
  if (qtype == Q8_0) return int8_t(codes[64 * (i / 4) + 4 * r + (i % 4)]);
  const int half = i / 16, k = i % 16;  // input k (< 16) low nibble, 16 + k high nibble
  const uint8_t b = codes[64 * (k / 4) + 4 * r + (k % 4)];
  const int low = half ? b >> 4 : b & 15;
  if (!five_bit(qtype)) return low;
  return low | ((codes[256 + 4 * r + i % 4] >> (i / 4)) & 1) << 4;
}

float weight_value(int qtype, const uint8_t* b, int r, int k) {
  if (qtype == Q4_K || qtype == Q6_K) return kquant_value(qtype, b, r, k);
  uint16_t dh, mh = 0;
  std::memcpy(&dh, b + 2 * r, 2);
  if (has_min(qtype)) std::memcpy(&mh, b + 32 + 2 * r, 2);
  const float d = f16_to_f32(dh);
  const int q = code_of(qtype, b + hdr_of(qtype), r, k);
  return has_min(qtype) ? d * float(q) + f16_to_f32(mh) : d * float(q - corr_of(qtype));
}

static void qgemm_scalar(int qtype, const uint8_t* w, int64_t J, int64_t t0, int64_t t1, int64_t N,
                         const int8_t* q, const float* d, const int32_t* s, int64_t M, float* y, int64_t ldy) {
  const int BB = block_bytes(qtype), hdr = hdr_of(qtype), corr = corr_of(qtype);
  const int64_t K = 32 * J;
  for (int64_t t = t0; t < t1; ++t) {
    const int nvalid = int(std::min<int64_t>(TILE, N - TILE * t));
    for (int64_t m = 0; m < M; ++m) {
      for (int r = 0; r < nvalid; ++r) {
        float acc = 0.f;
        for (int64_t j = 0; j < J; ++j) {
          const uint8_t* b = w + (t * J + j) * BB;
          uint16_t dh, mh = 0;
          std::memcpy(&dh, b + 2 * r, 2);
          if (has_min(qtype)) std::memcpy(&mh, b + 32 + 2 * r, 2);
          const int8_t* a = q + m * K + 32 * j;
          int32_t dot = 0;
          for (int i = 0; i < 32; ++i) dot += code_of(qtype, b + hdr, r, i) * a[i];
          const float da = d[m * J + j];
          const int32_t sa = s[m * J + j];
          acc = std::fma(float(dot - corr * sa), f16_to_f32(dh) * da, acc);
          if (has_min(qtype)) acc = std::fma(f16_to_f32(mh), da * float(sa), acc);
        }
        y[m * ldy + TILE * t + r] = acc;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------- AVX2

#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

AVX2_TARGET static void quantize_rows_avx2(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* s) {
  const int64_t J = K / 32;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < J; ++j) {
      const float* xb = x + m * K + 32 * j;
      __m256 v[4], mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
      for (int c = 0; c < 4; ++c) {
        v[c] = _mm256_loadu_ps(xb + 8 * c);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v[c], absmask));
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v[c], v[c]), _mm256_setzero_ps(), _CMP_UNORD_Q));
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float amax = _mm_cvtss_f32(h);
      const bool finite = _mm256_movemask_ps(bad) == 0;
      const float dj = amax / 127.f, id = dj != 0.f && finite ? 1.f / dj : 0.f;
      const __m256 vid = _mm256_set1_ps(id);
      __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], vid)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], vid));
      __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], vid)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], vid));
      if (!finite) i0 = i1 = i2 = i3 = _mm256_setzero_si256();
      __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_hadd_epi32(s4, s4);
      s4 = _mm_hadd_epi32(s4, s4);
      const __m256i p = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3)), perm);
      _mm256_storeu_si256((__m256i*)(q + m * K + 32 * j), p);
      d[m * J + j] = finite ? dj : NAN;
      s[m * J + j] = _mm_cvtsi128_si32(s4);
    }
  }
}

// MR activation rows x one tile (two halves of 8 rows each).
template <int QT, int MR>
AVX2_TARGET static void tile_avx2(const uint8_t* w, int64_t J, const int8_t* q, const float* d, const int32_t* s,
                                  int64_t K, float* y, int64_t ldy, int nvalid) {
  constexpr int BB = bb_of(QT), HDR = hdr_of(QT), CORR = corr_of(QT);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    __m256 acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < J; ++j) {
      const uint8_t* b = w + j * BB;
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(b + 16 * h)));
      __m256 mw = _mm256_setzero_ps();
      if (has_min(QT)) mw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(b + 32 + 16 * h)));
      __m256i wv[8];
      if (QT == Q8_0) {
        for (int g = 0; g < 8; ++g) wv[g] = _mm256_loadu_si256((const __m256i*)(b + HDR + 64 * g + 32 * h));
      } else {
        nibbles_avx2(b + HDR, h, wv);
        if (five_bit(QT)) fifth_bits_avx2(b + HDR + 256, h, wv);
      }
      for (int r = 0; r < MR; ++r) {
        const int32_t* a = (const int32_t*)(q + r * K + 32 * j);
        __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
        for (int g = 0; g < 8; g += 2) {
          const __m256i a0 = _mm256_set1_epi32(a[g]), a1 = _mm256_set1_epi32(a[g + 1]);
          __m256i p0, p1;
          if (QT == Q8_0) {  // |w| <= 128 as unsigned, the sign moved onto the activation
            p0 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv[g], wv[g]), _mm256_sign_epi8(a0, wv[g]));
            p1 = _mm256_maddubs_epi16(_mm256_sign_epi8(wv[g + 1], wv[g + 1]), _mm256_sign_epi8(a1, wv[g + 1]));
          } else {
            p0 = _mm256_maddubs_epi16(wv[g], a0);
            p1 = _mm256_maddubs_epi16(wv[g + 1], a1);
          }
          acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(p0, ones));
          acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(p1, ones));
        }
        __m256i si = _mm256_add_epi32(acc0, acc1);
        const float da = d[r * J + j];
        const int32_t sa = s[r * J + j];
        if (CORR) si = _mm256_sub_epi32(si, _mm256_set1_epi32(CORR * sa));  // Q8_0: signed codes, none
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(si), _mm256_mul_ps(dw, _mm256_set1_ps(da)), acc[r]);
        if (has_min(QT)) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(da * float(sa)), acc[r]);
      }
    }
    const int lo = 8 * h, n = std::min(8, nvalid - lo);
    for (int r = 0; r < MR; ++r) {
      if (n == 8) {
        _mm256_storeu_ps(y + r * ldy + lo, acc[r]);
      } else if (n > 0) {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, acc[r]);
        std::memcpy(y + r * ldy + lo, tmp, 4 * n);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------- AVX-512

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

AVX512_TARGET static void quantize_rows_avx512(const float* x, int64_t M, int64_t K, int8_t* q, float* d,
                                               int32_t* s) {
  const int64_t J = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < J; ++j) {
      const float* xb = x + m * K + 32 * j;
      const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const __mmask16 bad = _mm512_cmp_ps_mask(_mm512_sub_ps(v0, v0), _mm512_setzero_ps(), _CMP_UNORD_Q) |
                            _mm512_cmp_ps_mask(_mm512_sub_ps(v1, v1), _mm512_setzero_ps(), _CMP_UNORD_Q);
      const bool finite = bad == 0;
      const float dj = amax / 127.f, id = dj != 0.f && finite ? 1.f / dj : 0.f;
      const __m512 vid = _mm512_set1_ps(id);
      __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid)), i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
      if (!finite) i0 = i1 = _mm512_setzero_si512();
      _mm_storeu_si128((__m128i*)(q + m * K + 32 * j), _mm512_cvtsepi32_epi8(i0));
      _mm_storeu_si128((__m128i*)(q + m * K + 32 * j + 16), _mm512_cvtsepi32_epi8(i1));
      d[m * J + j] = finite ? dj : NAN;
      s[m * J + j] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    }
  }
}

// MR activation rows x one tile. The integer sum of a row's block starts at the code offset's
// term (-CORR sa: exact, the same integer as subtracting it after), and the per-row block terms
// are read from memory as broadcasts (`c`: -CORR sa, `dsa`: da * float(sa), made once per call by
// the driver), so the loop's vector ports do the dot products and three float ops per row. One
// dependency chain per row from 4 rows (8 chains hide vpdpbusd's latency), two below.
#ifndef PREFETCH
#define PREFETCH 8
#endif
template <int QT, int MR>
AVX512_TARGET static void tile_avx512(const uint8_t* w, int64_t J, const int8_t* q, const float* d,
                                      const int32_t* c, const float* dsa, int64_t K, float* y, int64_t ldy,
                                      int nvalid) {
  constexpr int BB = bb_of(QT), HDR = hdr_of(QT), CORR = QT == Q8_0 ? 128 : corr_of(QT);
  constexpr int CH = MR <= 2 ? 2 : 1;  // chains per row
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < J; ++j) {
    const uint8_t* b = w + j * BB;
    if (MR >= 1)  // compute-bound here: fetch ahead, so the weights stream while the dots run
      for (int l = 0; l < BB; l += 64) _mm_prefetch((const char*)(b + PREFETCH * BB + l), _MM_HINT_T0);
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)b));
    __m512 mw = _mm512_setzero_ps();
    if (has_min(QT)) mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(b + 32)));
    __m512i wv[8];
    if (QT == Q8_0) {  // w + 128 as unsigned; the dot then carries 128 * sa, taken off by c
      for (int g = 0; g < 8; ++g) wv[g] = _mm512_xor_si512(_mm512_loadu_si512(b + HDR + 64 * g), flip);
    } else {
      nibbles_avx512(b + HDR, wv);
      if (five_bit(QT)) fifth_bits_avx512(b + HDR + 256, wv);
    }
    // the rows' chains side by side (vpdpbusd's latency x throughput wants ~10 in flight)
    __m512i si[MR * CH];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      si[r * CH] = CORR ? _mm512_set1_epi32(c[r * J + j]) : _mm512_setzero_si512();
      if (CH == 2) si[r * CH + 1] = _mm512_setzero_si512();
    }
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g)
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const int32_t* a = (const int32_t*)(q + r * K + 32 * j);
        si[r * CH + g % CH] = _mm512_dpbusd_epi32(si[r * CH + g % CH], wv[g], _mm512_set1_epi32(a[g]));
      }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512i sr = CH == 2 ? _mm512_add_epi32(si[r * CH], si[r * CH + 1]) : si[r * CH];
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sr), _mm512_mul_ps(dw, _mm512_set1_ps(d[r * J + j])), acc[r]);
      if (has_min(QT)) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(dsa[r * J + j]), acc[r]);
    }
  }
  const __mmask16 keep = nvalid >= 16 ? __mmask16(0xffff) : __mmask16((1u << nvalid) - 1);
  for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * ldy, keep, acc[r]);
}

// ---------------------------------------------------------------------------------------- drivers

void quantize_rows_k(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* s) {
  const int64_t J = K / 32;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < K / 256; ++b) {
      const float* xb = x + m * K + 256 * b;
      float amax = 0.f, peak = 0.f;
      bool finite = true;
      for (int i = 0; i < 256; ++i) {
        const float ax = std::fabs(xb[i]);
        if (ax > amax) amax = ax, peak = xb[i];
        finite = finite && std::isfinite(xb[i]);
      }
      const float iscale = amax != 0.f && finite ? -127.f / peak : 0.f;
      const float db = !finite ? NAN : amax != 0.f ? 1.f / iscale : 0.f;
      int8_t* qb = q + m * K + 256 * b;
      for (int j = 0; j < 8; ++j) {
        int32_t sum = 0;
        for (int i = 32 * j; i < 32 * j + 32; ++i) {
          const int v = finite ? std::min(127, int(std::nearbyint(iscale * xb[i]))) : 0;
          qb[i] = int8_t(v);
          sum += v;
        }
        d[m * J + 8 * b + j] = db;
        s[m * J + 8 * b + j] = sum;
      }
    }
  }
}

void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* s, int level) {
  if (level >= ISA_AVX512) return quantize_rows_avx512(x, M, K, q, d, s);
  if (level >= ISA_AVX2) return quantize_rows_avx2(x, M, K, q, d, s);
  quantize_rows_scalar(x, M, K, q, d, s);
}

using Tile = void (*)(const uint8_t*, int64_t, const int8_t*, const float*, const int32_t*, int64_t, float*, int64_t,
                     int);
using Tile512 = void (*)(const uint8_t*, int64_t, const int8_t*, const float*, const int32_t*, const float*, int64_t,
                        float*, int64_t, int);

template <int QT, int... MR>
static constexpr std::array<Tile512, sizeof...(MR) + 1> wide_tiles(std::integer_sequence<int, MR...>) {
  return {nullptr, tile_avx512<QT, MR + 1>...};
}

template <int QT>
static void qgemm_simd(const uint8_t* w, int64_t J, int64_t t0, int64_t t1, int64_t N, const int8_t* q,
                       const float* d, const int32_t* s, int64_t M, float* y, int64_t ldy, int level) {
  constexpr int BB = bb_of(QT), CORR = QT == Q8_0 ? 128 : corr_of(QT);
  if (level >= ISA_AMX && M >= amx_rows(QT)) return qgemm_amx(QT, w, J, t0, t1, N, q, d, s, M, y, ldy);
  const int64_t K = 32 * J;
  if (level >= ISA_AVX512) {
    static constexpr auto wide = wide_tiles<QT>(std::make_integer_sequence<int, 8>());
    thread_local std::vector<int32_t> c;
    thread_local std::vector<float> dsa;
    c.resize(M * J);
    dsa.resize(M * J);
    for (int64_t i = 0; i < M * J; ++i) c[i] = -CORR * s[i], dsa[i] = d[i] * float(s[i]);
    for (int64_t t = t0; t < t1; ++t) {
      const int nvalid = int(std::min<int64_t>(TILE, N - TILE * t));
      for_row_steps(M, 8, [&](int64_t m, int mr) {
        wide[mr](w + t * J * BB, J, q + m * K, d + m * J, c.data() + m * J, dsa.data() + m * J, K,
                 y + m * ldy + TILE * t, ldy, nvalid);
      });
    }
    return;
  }
  static const Tile narrow[] = {nullptr, tile_avx2<QT, 1>, tile_avx2<QT, 2>};
  for (int64_t t = t0; t < t1; ++t) {
    const int nvalid = int(std::min<int64_t>(TILE, N - TILE * t));
    for_row_steps(M, 2, [&](int64_t m, int mr) {
      narrow[mr](w + t * J * BB, J, q + m * K, d + m * J, s + m * J, K, y + m * ldy + TILE * t, ldy, nvalid);
    });
  }
}

void qgemm_tiles(int qtype, const uint8_t* w, int64_t J, int64_t t0, int64_t t1, int64_t N, const int8_t* q,
                 const float* d, const int32_t* s, int64_t M, float* y, int64_t ldy, int level) {
  if (qtype == Q4_K || qtype == Q6_K) return kgemm_tiles(qtype, w, J, t0, t1, N, q, d, s, M, y, ldy, level);
  if (level == ISA_SCALAR) return qgemm_scalar(qtype, w, J, t0, t1, N, q, d, s, M, y, ldy);
  switch (qtype) {
    case Q4_0: return qgemm_simd<Q4_0>(w, J, t0, t1, N, q, d, s, M, y, ldy, level);
    case Q4_1: return qgemm_simd<Q4_1>(w, J, t0, t1, N, q, d, s, M, y, ldy, level);
    case Q8_0: return qgemm_simd<Q8_0>(w, J, t0, t1, N, q, d, s, M, y, ldy, level);
    case Q5_0: return qgemm_simd<Q5_0>(w, J, t0, t1, N, q, d, s, M, y, ldy, level);
    case Q5_1: return qgemm_simd<Q5_1>(w, J, t0, t1, N, q, d, s, M, y, ldy, level);
  }
}

}  // namespace camelid
