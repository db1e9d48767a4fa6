// Unpacking a 32-weight tile block's codes (kernels.h's layout) into 8 vectors of 4-input
// groups, group g = inputs 4g..4g+3 of every row: shared by the 4-bit / 5-bit kernels
// (quant.cpp), the K-quants (kquant.cpp) and the AMX path (amx.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace camelid {

#define CAMELID_AVX2 __attribute__((target("avx2,fma,f16c")))
#define CAMELID_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

// Nibbles (Q4 layout) of 8 rows, half h of the tile: 4 chunks of 64 B, low nibble group c, high c + 4.
CAMELID_AVX2 static inline void nibbles_avx2(const uint8_t* codes, int h, __m256i* wv) {
  const __m256i m4 = _mm256_set1_epi8(0x0f);
  for (int c = 0; c < 4; ++c) {
    const __m256i x = _mm256_loadu_si256((const __m256i*)(codes + 64 * c + 32 * h));
    wv[c] = _mm256_and_si256(x, m4);
    wv[c + 4] = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
  }
}

// Q5's fifth bits: bit g of the 64-byte plane is group g's, moved to bit 4.
CAMELID_AVX2 static inline void fifth_bits_avx2(const uint8_t* plane, int h, __m256i* wv) {
  const __m256i bit4 = _mm256_set1_epi8(0x10), x = _mm256_loadu_si256((const __m256i*)(plane + 32 * h));
  wv[0] = _mm256_or_si256(wv[0], _mm256_and_si256(_mm256_slli_epi16(x, 4), bit4));
  wv[1] = _mm256_or_si256(wv[1], _mm256_and_si256(_mm256_slli_epi16(x, 3), bit4));
  wv[2] = _mm256_or_si256(wv[2], _mm256_and_si256(_mm256_slli_epi16(x, 2), bit4));
  wv[3] = _mm256_or_si256(wv[3], _mm256_and_si256(_mm256_slli_epi16(x, 1), bit4));
  wv[4] = _mm256_or_si256(wv[4], _mm256_and_si256(x, bit4));
  wv[5] = _mm256_or_si256(wv[5], _mm256_and_si256(_mm256_srli_epi16(x, 1), bit4));
  wv[6] = _mm256_or_si256(wv[6], _mm256_and_si256(_mm256_srli_epi16(x, 2), bit4));
  wv[7] = _mm256_or_si256(wv[7], _mm256_and_si256(_mm256_srli_epi16(x, 3), bit4));
}

CAMELID_AVX512 static inline void nibbles_avx512(const uint8_t* codes, __m512i* wv) {
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  for (int c = 0; c < 4; ++c) {
    const __m512i x = _mm512_loadu_si512(codes + 64 * c);
    wv[c] = _mm512_and_si512(x, m4);
    wv[c + 4] = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
  }
}

CAMELID_AVX512 static inline void fifth_bits_avx512(const uint8_t* plane, __m512i* wv) {
  const __m512i bit4 = _mm512_set1_epi8(0x10), x = _mm512_loadu_si512(plane);
  wv[0] = _mm512_or_si512(wv[0], _mm512_and_si512(_mm512_slli_epi16(x, 4), bit4));
  wv[1] = _mm512_or_si512(wv[1], _mm512_and_si512(_mm512_slli_epi16(x, 3), bit4));
  wv[2] = _mm512_or_si512(wv[2], _mm512_and_si512(_mm512_slli_epi16(x, 2), bit4));
  wv[3] = _mm512_or_si512(wv[3], _mm512_and_si512(_mm512_slli_epi16(x, 1), bit4));
  wv[4] = _mm512_or_si512(wv[4], _mm512_and_si512(x, bit4));
  wv[5] = _mm512_or_si512(wv[5], _mm512_and_si512(_mm512_srli_epi16(x, 1), bit4));
  wv[6] = _mm512_or_si512(wv[6], _mm512_and_si512(_mm512_srli_epi16(x, 2), bit4));
  wv[7] = _mm512_or_si512(wv[7], _mm512_and_si512(_mm512_srli_epi16(x, 3), bit4));
}

}  // namespace camelid
