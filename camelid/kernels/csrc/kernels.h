// camelid's CPU kernels: shared declarations.
//
// Every kernel exists three times, for three instruction sets chosen at run time (isa()):
//   2  AVX-512 (F, BW, VL, DQ, VNNI)   vpdpbusd integer dot products, 16 lanes
//   1  AVX2 + FMA + F16C               maddubs/madd integer dot products, 8 lanes
//   0  portable C++                    the fallback, and the reference the others are tested against
//   3  AVX-512 + AMX-INT8              tile matrix multiplies for products of AMX_ROWS rows or more
//                                      (amx.cpp); everything else as level 2
// The three perform the same integer and float32 operations in the same order for every output
// (an integer dot product per 32-weight block, then float fma's over the blocks in order), so they
// give the same bits, and so does any batch size: row m of a product never depends on the others.
#pragma once

#include <cstdint>

namespace camelid {

enum Isa : int { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AMX = 3 };
int isa();                 // the level in use (the best the CPU has, unless forced)
int best_isa();            // the best the CPU has
void force_isa(int level); // tests: run a lower path (clamped to what the CPU has)

// GGML type ids of the block formats with kernels.
enum QType : int { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q6_K = 14 };

// Repacked weight layout (camelid/kernels/__init__.py builds it from the file's blocks): tiles of
// 16 output rows; tile t, block j (32 inputs) is BB bytes:
//   Q4_0  d[16] f16 | codes 256 B                BB = 288
//   Q4_1  d[16] f16 | m[16] f16 | codes 256 B    BB = 320
//   Q8_0  d[16] f16 | codes 512 B                BB = 544
//   Q5_0  d[16] f16 | codes 256 B | fifth bits 64 B         BB = 352
//   Q5_1  d[16] f16 | m[16] f16 | codes 256 B | fifth bits  BB = 384
// Q4 codes: 4 chunks of 64 B; chunk c, byte 4r+i = the file's byte 4c+i of row r (low nibble:
// input 4c+i, high nibble: input 16+4c+i). Q8 codes: 8 chunks of 64 B; chunk g, byte 4r+i =
// int8 weight of row r, input 4g+i. Q5 fifth bits: byte 4r+i, bit g = input 4g+i of row r.
// Q4_K / Q6_K tiles hold one super-block of 256 inputs: camelid/kernels/kquants.py has their layout.
constexpr int TILE = 16;
int block_bytes(int qtype);   // bytes of a tile block (16 rows x block_inputs), 0: no kernel
int block_inputs(int qtype);  // 32, or 256 for the K-quants

// Per format: bytes of a tile block, bytes of scales before the codes, an m (offset) per row, a
// fifth code bit (Q5: a 64-byte plane after the nibbles, byte 4r+i bit g = input 4g+i of row r),
// and the code offset taken off the dot product (w = d (q - corr)). The portable and AVX2 paths
// read Q8 codes as signed (no offset); the AVX-512 path's are w + 128.
inline constexpr int bb_of(int qt) {
  return qt == Q4_0 ? 288 : qt == Q4_1 ? 320 : qt == Q5_0 ? 352 : qt == Q5_1 ? 384 : 544;
}
inline constexpr int hdr_of(int qt) { return qt == Q4_1 || qt == Q5_1 ? 64 : 32; }
inline constexpr bool has_min(int qt) { return qt == Q4_1 || qt == Q5_1; }
inline constexpr bool five_bit(int qt) { return qt == Q5_0 || qt == Q5_1; }
inline constexpr int corr_of(int qt) { return qt == Q4_0 ? 8 : qt == Q5_0 ? 16 : 0; }

// AMX (amx.cpp): the 32-weight block formats, for at least amx_rows(qtype) activation rows. Below
// that the AVX-512 path is as fast or faster (bench: AMX/AVX-512 at 576 -> 1536, 2 threads, on a
// Sapphire Rapids: Q8_0 1.2x at 8 rows, 1.6x at 16; Q4_0 0.85x at 8, 1.3x at 16, 1.7x at 512).
inline constexpr int amx_rows(int qtype) { return qtype == Q8_0 ? 8 : 16; }
bool amx_usable();
void qgemm_amx(int qtype, const uint8_t* w, int64_t J, int64_t t0, int64_t t1, int64_t N, const int8_t* q,
               const float* d, const int32_t* s, int64_t M, float* y, int64_t ldy);
float f16_to_f32(uint16_t h);  // exact, on any CPU

// Activations quantized per block of 32 (ggml's Q8 form): q int8 [K], d float [K/32] (amax/127),
// s int32 [K/32] (sum of the block's codes). A block holding NaN or Inf gets d = NaN.
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* s, int level);

// The K-quants' activations, as ggml quantizes them for Q4_K / Q6_K dot products (its Q8_K): one
// scale per 256, d = max / -127 with max the element of largest |x| (codes round-half-even(x / d),
// at most 127), written into the same arrays (d repeated over the 8 blocks of 32, s per 32).
// Portable C++ on every path (cheap beside the products), so every path agrees.
void quantize_rows_k(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* s);
inline constexpr bool k_activations(int qtype) { return qtype == Q4_K || qtype == Q6_K; }

// y[m, n] (ldy floats per row) for rows m of the quantized activations, tiles [t0, t1);
// J tile blocks per row (K / block_inputs). The K-quants go to kgemm_tiles (kquant.cpp).
void qgemm_tiles(int qtype, const uint8_t* w, int64_t J, int64_t t0, int64_t t1, int64_t N,
                 const int8_t* q, const float* d, const int32_t* s, int64_t M, float* y, int64_t ldy, int level);

void kgemm_tiles(int qtype, const uint8_t* w, int64_t S, int64_t t0, int64_t t1, int64_t N, const int8_t* q,
                 const float* d, const int32_t* s, int64_t M, float* y, int64_t ldy, int level);
float kquant_value(int qtype, const uint8_t* superblock_tile, int r, int k);  // weight (r, k) of a K-quant tile block
float weight_value(int qtype, const uint8_t* tile_block, int r, int k);       // weight (r, k) of any tile block

// Rows [0, M) in steps of the widest row kernel that fits: step(m, mr) with mr <= maxmr.
template <class Step>
inline void for_row_steps(int64_t M, int maxmr, Step&& step) {
  for (int64_t m = 0; m < M;) {
    const int mr = int(M - m < maxmr ? M - m : maxmr);
    step(m, mr);
    m += mr;
  }
}

// Float weights, tiles of 16 rows: element [t][k][r] = W[16t + r][k], f32 or bf16 (uint16).
// Per output the sum runs in 4 interleaved partial sums (k mod 4), combined (p0 + p1) + (p2 + p3).
void dgemm_tiles(bool bf16, const void* w, int64_t K, int64_t t0, int64_t t1, int64_t N,
                 const float* x, int64_t M, float* y, int64_t ldy, int level);

}  // namespace camelid
