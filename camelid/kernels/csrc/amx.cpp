// AMX-INT8 products (Intel Sapphire Rapids and later) for the 32-weight block formats: the integer
// dot products of one tile block (16 output rows x 32 inputs) for up to 16 activation rows in one
// TDPBSSD (signed activations x Q8_0's codes, or Q4_0 / Q5_0's unpacked as q - 8 / q - 16) or
// TDPBSUD (Q4_1 / Q5_1's unsigned codes), then the same
// float32 epilogue as the AVX-512 path (quant.cpp), in the same order. The integer sums are exact
// on both, so AMX and AVX-512 give the same bits, and a row's result still never depends on its
// batch: which path runs (by row count) changes nothing.
//
// The B tile of a block is its codes as 8 rows of 64 bytes, row g = the 4-input group g of the 16
// output rows: byte 4n + i = input 4g + i of row n. That is the tiles' own layout (kernels.h): Q8_0
// loads straight from the weights, Q4 / Q5 unpack their nibbles (and fifth bits) once per call.
#include "kernels.h"
#include "codes.h"

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

// tmm0-3: C (mr x 16 int32) of four blocks; tmm4, tmm5: A (mr x 32 int8); tmm6, tmm7: B (8 x 64).
AMX_TARGET static void configure(int mr) {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t : {0, 1, 2, 3}) c.rows[t] = uint8_t(mr), c.colsb[t] = 64;
  for (int t : {4, 5}) c.rows[t] = uint8_t(mr), c.colsb[t] = 32;
  for (int t : {6, 7}) c.rows[t] = 8, c.colsb[t] = 64;
  asm volatile("" : : "r"(&c) : "memory");  // gcc 12 drops the stores ldtilecfg reads without this
  _tile_loadconfig(&c);
}

// One block's codes as the 8 B-tile rows (Q4 / Q5): as quant.cpp's AVX-512 unpacking.
template <int QT>
AMX_TARGET static void unpack(const uint8_t* codes, uint8_t* out) {
  __m512i wv[8];
  nibbles_avx512(codes, wv);
  if (five_bit(QT)) fifth_bits_avx512(codes + 256, wv);
  if (corr_of(QT)) {  // Q4_0 / Q5_0: the signed codes q - 8 / q - 16, so the dot needs no correction
    const __m512i c = _mm512_set1_epi8(char(corr_of(QT)));
    for (int g = 0; g < 8; ++g) wv[g] = _mm512_sub_epi8(wv[g], c);
  }
  for (int g = 0; g < 8; ++g) _mm512_storeu_si512(out + 64 * g, wv[g]);
}

// Signed codes (Q8_0, and Q4_0 / Q5_0 as unpacked) take TDPBSSD, unsigned ones (Q4_1 / Q5_1) TDPBSUD.
template <int QT>
constexpr bool signed_codes() { return QT == Q8_0 || corr_of(QT) != 0; }

// The AVX-512 path's float32 epilogue for block j of MR rows, from the block's integer sums.
// dsa: da * float(sa) per row and block (the driver's, so the loop broadcasts it from memory).
// The weights of block j + 8 are fetched meanwhile: the tile loads would otherwise wait on them.
template <int QT, int MR>
AMX_TARGET static inline void epilogue(const uint8_t* b, const int32_t* sums, const float* d, const float* dsa,
                                       int64_t J, int64_t j, __m512* acc) {
  if (QT == Q8_0)  // (the other formats' codes were read by unpack)
    for (int l = 0; l < bb_of(QT); l += 64) _mm_prefetch((const char*)(b + 8 * bb_of(QT) + l), _MM_HINT_T0);
  const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)b));
  __m512 mw = _mm512_setzero_ps();
  if (has_min(QT)) mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(b + 32)));
  for (int r = 0; r < MR; ++r) {
    const __m512i si = _mm512_load_si512(sums + 16 * r);  // the exact dot sum (q - corr) a
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(si), _mm512_mul_ps(dw, _mm512_set1_ps(d[r * J + j])), acc[r]);
    if (has_min(QT)) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(dsa[r * J + j]), acc[r]);
  }
}

// Blocks j, j + 1 (if `two`) into C tiles CA, CB (A from tmm4 / tmm5, B from tmm6 / tmm7), and
// their sums through memory into the epilogue. Macros, not templates: gcc's tile intrinsics paste
// their register numbers into the assembly text.
#define CAMELID_DP(C, A, B) \
  do { if (signed_codes<QT>()) _tile_dpbssd(C, A, B); else _tile_dpbsud(C, A, B); } while (0)
#define CAMELID_ISSUE(CA, CB, j, two)                  \
  do {                                                 \
    _tile_zero(CA);                                    \
    _tile_loadd(4, q + 32 * (j), K);                   \
    _tile_loadd(6, codes + (j) * cstride, 64);         \
    CAMELID_DP(CA, 4, 6);                              \
    if (two) {                                         \
      _tile_zero(CB);                                  \
      _tile_loadd(5, q + 32 * ((j) + 1), K);           \
      _tile_loadd(7, codes + ((j) + 1) * cstride, 64); \
      CAMELID_DP(CB, 5, 7);                            \
    }                                                  \
  } while (0)
#define CAMELID_DRAIN(CA, CB, j, two)                                                     \
  do {                                                                                    \
    _tile_stored(CA, c, 64);                                                              \
    if (two) _tile_stored(CB, c + 256, 64);                                               \
    epilogue<QT, MR>(w + (j) * bb_of(QT), c, d, dsa, J, (j), acc);                          \
    if (two) epilogue<QT, MR>(w + ((j) + 1) * bb_of(QT), c + 256, d, dsa, J, (j) + 1, acc); \
  } while (0)

// MR (<= 16) activation rows x one weight tile, the tile's B rows ready in `codes` (64-byte rows).
// Software-pipelined: the tile unit multiplies blocks j + 2, j + 3 while the vector units run the
// epilogue of blocks j, j + 1 (C tiles tmm0-1 and tmm2-3 in turn).
template <int QT, int MR>
AMX_TARGET static void rows_amx(const uint8_t* w, const uint8_t* codes, int64_t cstride, int64_t J, const int8_t* q,
                                const float* d, const float* dsa, int64_t K, float* y, int64_t ldy, int nvalid) {
  alignas(64) int32_t c[2 * 256];
  __m512 acc[MR];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  CAMELID_ISSUE(0, 1, 0, J > 1);
  for (int64_t j = 0; j < J; j += 4) {
    if (j + 2 < J) CAMELID_ISSUE(2, 3, j + 2, j + 3 < J);
    CAMELID_DRAIN(0, 1, j, j + 1 < J);
    if (j + 2 >= J) break;
    if (j + 4 < J) CAMELID_ISSUE(0, 1, j + 4, j + 5 < J);
    CAMELID_DRAIN(2, 3, j + 2, j + 3 < J);
  }
  const __mmask16 keep = nvalid >= 16 ? __mmask16(0xffff) : __mmask16((1u << nvalid) - 1);
  for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * ldy, keep, acc[r]);
}

using RowsFn = void (*)(const uint8_t*, const uint8_t*, int64_t, int64_t, const int8_t*, const float*,
                        const float*, int64_t, float*, int64_t, int);

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
  std::vector<float> dsa(has_min(QT) ? M * J : 0);
  for (int64_t i = 0; i < int64_t(dsa.size()); ++i) dsa[i] = d[i] * float(s[i]);
  int configured = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const uint8_t* wt = w + t * J * BB;
    const uint8_t* codes = wt + HDR;  // Q8_0: the tile's own codes, BB bytes apart
    int64_t cstride = BB;
    if (QT != Q8_0) {
      for (int64_t j = 0; j < J; ++j) {
        for (int l = 0; l < BB; l += 64) _mm_prefetch((const char*)(wt + (j + 8) * BB + l), _MM_HINT_T0);
        unpack<QT>(wt + j * BB + HDR, unpacked.data() + 512 * j);
      }
      codes = unpacked.data(), cstride = 512;
    }
    const int nvalid = int(std::min<int64_t>(TILE, N - TILE * t));
    for (int64_t m = 0; m < M; m += 16) {
      const int mr = int(std::min<int64_t>(16, M - m));
      if (mr != configured) configure(mr), configured = mr;
      fns[mr](wt, codes, cstride, J, q + m * K, d + m * J, dsa.data() + (has_min(QT) ? m * J : 0), K, y + m * ldy + TILE * t,
              ldy, nvalid);
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
