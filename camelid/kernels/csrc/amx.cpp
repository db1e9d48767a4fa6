// AMX-INT8 products (Intel Sapphire Rapids and later) for the 32-weight block formats: the integer
// dot products of one tile block (16 output rows x 32 inputs) for up to 16 activation rows in one
// TDPBSUD (signed activations x unsigned codes) or TDPBSSD (Q8_0's signed codes), then the same
// float32 epilogue as the AVX-512 path (quant.cpp), in the same order. The integer sums are exact
// on both, so AMX and AVX-512 give the same bits, and a row's result still never depends on its
// batch: which path runs (by row count) changes nothing.
//
// The B tile of a block is its codes as 8 rows of 64 bytes, row g = the 4-input group g of the 16
// output rows: byte 4n + i = input 4g + i of row n. That is the tiles' own layout (kernels.h): Q8_0
// loads straight from the weights, Q4 / Q5 unpack their nibbles (and fifth bits) once per call.
#include "kernels.h"

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

namespace camelid {

bool amx_usable() {  // the CPU has AMX-INT8 and Linux grants this process the tile state
  static const bool ok = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8")) return false;
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

#define AMX_TARGET \
  __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tmm0, tmm1: C (mr x 16 int32) of two blocks; tmm2, tmm3: their A (mr x 32 int8); tmm4, tmm5: B.
AMX_TARGET static void configure(int mr) {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t : {0, 1}) c.rows[t] = uint8_t(mr), c.colsb[t] = 64;
  for (int t : {2, 3}) c.rows[t] = uint8_t(mr), c.colsb[t] = 32;
  for (int t : {4, 5}) c.rows[t] = 8, c.colsb[t] = 64;
  asm volatile("" : : "r"(&c) : "memory");  // gcc 12 drops the stores ldtilecfg reads without this
  _tile_loadconfig(&c);
}

// One block's codes as the 8 B-tile rows (Q4 / Q5): as quant.cpp's AVX-512 unpacking.
template <int QT>
AMX_TARGET static void unpack(const uint8_t* codes, uint8_t* out) {
  const __m512i m4 = _mm512_set1_epi8(0x0f), bit4 = _mm512_set1_epi8(0x10);
  __m512i wv[8];
  for (int c = 0; c < 4; ++c) {
    const __m512i x = _mm512_loadu_si512(codes + 64 * c);
    wv[c] = _mm512_and_si512(x, m4);
    wv[c + 4] = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
  }
  if (QT == Q5_0 || QT == Q5_1) {
    const __m512i x = _mm512_loadu_si512(codes + 256);
    wv[0] = _mm512_or_si512(wv[0], _mm512_and_si512(_mm512_slli_epi16(x, 4), bit4));
    wv[1] = _mm512_or_si512(wv[1], _mm512_and_si512(_mm512_slli_epi16(x, 3), bit4));
    wv[2] = _mm512_or_si512(wv[2], _mm512_and_si512(_mm512_slli_epi16(x, 2), bit4));
    wv[3] = _mm512_or_si512(wv[3], _mm512_and_si512(_mm512_slli_epi16(x, 1), bit4));
    wv[4] = _mm512_or_si512(wv[4], _mm512_and_si512(x, bit4));
    wv[5] = _mm512_or_si512(wv[5], _mm512_and_si512(_mm512_srli_epi16(x, 1), bit4));
    wv[6] = _mm512_or_si512(wv[6], _mm512_and_si512(_mm512_srli_epi16(x, 2), bit4));
    wv[7] = _mm512_or_si512(wv[7], _mm512_and_si512(_mm512_srli_epi16(x, 3), bit4));
  }
  for (int g = 0; g < 8; ++g) _mm512_storeu_si512(out + 64 * g, wv[g]);
}

// The AVX-512 path's float32 epilogue for block j of MR rows, from the block's integer sums.
template <int QT, int MR>
AMX_TARGET static inline void epilogue(const uint8_t* b, const int32_t* sums, const float* d, const int32_t* s,
                                       int64_t J, int64_t j, __m512* acc) {
  const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)b));
  __m512 mw = _mm512_setzero_ps();
  if (has_min(QT)) mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(b + 32)));
  for (int r = 0; r < MR; ++r) {
    __m512i si = _mm512_load_si512(sums + 16 * r);
    const float da = d[r * J + j];
    const int32_t sa = s[r * J + j];
    if (corr_of(QT)) si = _mm512_sub_epi32(si, _mm512_set1_epi32(corr_of(QT) * sa));
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), _mm512_mul_ps(dw, _mm512_set1_ps(da)), acc[r]);
    if (has_min(QT)) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(da * float(sa)), acc[r]);
  }
}

// MR (<= 16) activation rows x one weight tile, the tile's B rows ready in `codes` (64-byte rows).
template <int QT, int MR>
AMX_TARGET static void rows_amx(const uint8_t* w, const uint8_t* codes, int64_t cstride, int64_t J, const int8_t* q,
                                const float* d, const int32_t* s, int64_t K, float* y, int64_t ldy, int nvalid) {
  constexpr int BB = bb_of(QT);
  alignas(64) int32_t c0[16 * 16], c1[16 * 16];
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < J; j += 2) {
    const bool two = j + 1 < J;
    _tile_zero(0);
    _tile_loadd(2, q + 32 * j, K);
    _tile_loadd(4, codes + j * cstride, 64);
    if (QT == Q8_0) _tile_dpbssd(0, 2, 4); else _tile_dpbsud(0, 2, 4);
    if (two) {
      _tile_zero(1);
      _tile_loadd(3, q + 32 * (j + 1), K);
      _tile_loadd(5, codes + (j + 1) * cstride, 64);
      if (QT == Q8_0) _tile_dpbssd(1, 3, 5); else _tile_dpbsud(1, 3, 5);
    }
    _tile_stored(0, c0, 64);
    epilogue<QT, MR>(w + j * BB, c0, d, s, J, j, acc);
    if (two) {
      _tile_stored(1, c1, 64);
      epilogue<QT, MR>(w + (j + 1) * BB, c1, d, s, J, j + 1, acc);
    }
  }
  const __mmask16 keep = nvalid >= 16 ? __mmask16(0xffff) : __mmask16((1u << nvalid) - 1);
  for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * ldy, keep, acc[r]);
}

using RowsFn = void (*)(const uint8_t*, const uint8_t*, int64_t, int64_t, const int8_t*, const float*,
                        const int32_t*, int64_t, float*, int64_t, int);

template <int QT, int... MR>
static constexpr std::array<RowsFn, sizeof...(MR) + 1> rows_table(std::integer_sequence<int, MR...>) {
  return {nullptr, rows_amx<QT, MR + 1>...};
}

template <int QT>
AMX_TARGET static void qgemm_amx_t(const uint8_t* w, int64_t J, int64_t t0, int64_t t1, int64_t N, const int8_t* q,
                                   const float* d, const int32_t* s, int64_t M, float* y, int64_t ldy) {
  constexpr int BB = bb_of(QT), HDR = hdr_of(QT);
  static constexpr auto fns = rows_table<QT>(std::make_integer_sequence<int, 16>{});
  const int64_t K = 32 * J;
  std::vector<uint8_t> unpacked(QT == Q8_0 ? 0 : J * 512);
  int configured = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = w + t * J * BB;
    const uint8_t* codes = wt + HDR;  // Q8_0: the tile's own codes, BB bytes apart
    int64_t cstride = BB;
    if (QT != Q8_0) {
      for (int64_t j = 0; j < J; ++j) unpack<QT>(wt + j * BB + HDR, unpacked.data() + 512 * j);
      codes = unpacked.data(), cstride = 512;
    }
    const int nvalid = int(std::min<int64_t>(TILE, N - TILE * t));
    for (int64_t m = 0; m < M; m += 16) {
      const int mr = int(std::min<int64_t>(16, M - m));
      if (mr != configured) configure(mr), configured = mr;
      fns[mr](wt, codes, cstride, J, q + m * K, d + m * J, s + m * J, K, y + m * ldy + TILE * t, ldy, nvalid);
    }
  }
  if (configured) _tile_release();
}

void qgemm_amx(int qtype, const uint8_t* w, int64_t J, int64_t t0, int64_t t1, int64_t N, const int8_t* q,
               const float* d, const int32_t* s, int64_t M, float* y, int64_t ldy) {
  switch (qtype) {
    case Q4_0: return qgemm_amx_t<Q4_0>(w, J, t0, t1, N, q, d, s, M, y, ldy);
    case Q4_1: return qgemm_amx_t<Q4_1>(w, J, t0, t1, N, q, d, s, M, y, ldy);
    case Q5_0: return qgemm_amx_t<Q5_0>(w, J, t0, t1, N, q, d, s, M, y, ldy);
    case Q5_1: return qgemm_amx_t<Q5_1>(w, J, t0, t1, N, q, d, s, M, y, ldy);
    case Q8_0: return qgemm_amx_t<Q8_0>(w, J, t0, t1, N, q, d, s, M, y, ldy);
  }
}

}  // namespace camelid
