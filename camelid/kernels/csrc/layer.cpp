// One decoder layer of a decode step (a few new tokens per row: T = 1, or speculative
// verification's T draft tokens), in one call. Rows of x are (batch row b, query t), b-major:
//
//   h = rmsnorm(x) -> q|k|v = h Wqkv^T -> RoPE(q, k) -> k, v into the cache at slots[t] ->
//   attention of each query over its row's keys [key_start[b], slots[t]] -> x += o Wo^T ->
//   h = rmsnorm(x) -> g|u = h Wgu^T -> x += (silu(g) * u) Wd^T
//
// The products go through the block-quantized or tiled-float kernels (quant.cpp, dense.cpp); the
// rest is plain C++ whose float operations are fixed (no fma contraction, fixed partial-sum
// order), so a row's result depends on nothing but that row and its cache: batch-invariant, and
// the same on every instruction set. camelid/core/model.py calls it where the model and the step
// allow (camelid.kernels.fused_decode_ok), and runs the PyTorch layer otherwise.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

namespace camelid {

// The team's barrier inside a step (~10 per layer). Not `#pragma omp barrier`: libgomp throttles
// its spinning to ~nothing once the process holds more OpenMP threads than cores (another thread's
// team counts, e.g. the caller's main thread when the engine steps in its own thread), and then
// every barrier sleeps on a futex: measured 15.6 ms a step instead of 3.7 on the default model
// (2 threads). This one spins (pause), yielding after a while so an oversubscribed machine still
// moves. Sense by phase: the last thread in resets the count, then publishes the next phase with
// release order; the others acquire it, so every write before the barrier is seen after it.
struct SpinBarrier {
  std::atomic<int> arrived{0};
  std::atomic<int> phase{0};
  int n = 1;

  void wait() {
    const int ph = phase.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      arrived.store(0, std::memory_order_relaxed);
      phase.store(ph + 1, std::memory_order_release);
      return;
    }
    for (int64_t spins = 0; phase.load(std::memory_order_acquire) == ph; ++spins) {
#if defined(__x86_64__) || defined(__i386__)
      _mm_pause();
#endif
      if (spins > (1 << 14)) std::this_thread::yield();
    }
  }
};

// `camelid bench --profile`: wall time of the step's stages, as thread 0 sees them between the
// team's barriers (a stage lasts until its slowest thread is done). Off: one relaxed load a stage.
enum Stage { ST_MATMUL = 0, ST_ATTENTION = 1, ST_OTHER = 2, ST_COUNT = 3 };
static std::atomic<bool> profiling{false};
static double stage_ns[ST_COUNT] = {0, 0, 0};
static double profiled_calls = 0;

struct StageClock {  // used by thread 0 only
  bool on = profiling.load(std::memory_order_relaxed);
  std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
  void lap(Stage s) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    stage_ns[s] += std::chrono::duration<double, std::nano>(now - last).count();
    last = now;
  }
};

// on: start counting from zero; off: stop. Returns [matmul, attention, other] ns and the calls so far.
static std::vector<double> layer_profile(bool on) {
  std::vector<double> out(stage_ns, stage_ns + ST_COUNT);
  out.push_back(profiled_calls);
  if (on) {
    std::fill(stage_ns, stage_ns + ST_COUNT, 0.0);
    profiled_calls = 0;
  }
  profiling.store(on);
  return out;
}

constexpr int F32_TILES = 0, BF16_TILES = 30;  // weight kinds besides the GGML block types

static void check_weight(const at::Tensor& w, int64_t kind, int64_t n, int64_t K, const char* what) {
  const int64_t T = (n + TILE - 1) / TILE;
  if (kind == F32_TILES || kind == BF16_TILES) {
    TORCH_CHECK(w.scalar_type() == (kind == F32_TILES ? at::kFloat : at::kBFloat16) && w.dim() == 3 &&
                    w.is_contiguous() && w.size(0) == T && w.size(1) == K && w.size(2) == TILE,
                "camelid::decode_layer: ", what, " must be tiled [", T, ", ", K, ", 16], got ", w.sizes());
  } else {
    TORCH_CHECK(block_bytes(int(kind)) > 0 && w.scalar_type() == at::kByte && w.dim() == 3 && w.is_contiguous() &&
                    w.size(0) == T && w.size(1) * block_inputs(int(kind)) == K && w.size(2) == block_bytes(int(kind)),
                "camelid::decode_layer: ", what, " must be GGML type ", kind, " tiles [", T, ", ",
                K / block_inputs(int(kind)), ", ",
                block_bytes(int(kind)), "], got ", w.sizes());
  }
}

#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// exp(x) from mul/add/bit operations only (Cody-Waite reduction, degree-6 polynomial, ~2 ulp),
// so the vectorized clones and the portable one give the same bits. NaN stays NaN.
static inline float fexp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504f + 12582912.0f;  // round(x / ln 2) by the 1.5 * 2^23 trick
  const float n = t - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = (p * r) * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &t, 4);  // t's low mantissa bits hold n + 2^22 + 2^23 as an integer
  bits = (bits - 0x4B400000 + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

CLONES static void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.f + fexp(-g[i])) * u[i];
}

// n query heads that share one KV head (GQA) over keys [k0, k1]: for each head h,
// softmax(q_h k^T * scale) v into y_h. q and y: n heads of D floats each, consecutive; sc:
// n * (k1 + 1) floats. Each key and value row is read once for the n heads; every head's own
// operations (and their order) are those of one head alone, so grouping changes no bit.
CLONES static void attend_group_portable(int n, const float* q, const float* kb, const float* vb, int64_t k0,
                                         int64_t k1, int64_t D, float scale, float* sc, float* y) {
  const int64_t S = k1 + 1;
  float mx[16];
  for (int h = 0; h < n; ++h) mx[h] = -INFINITY;
  for (int64_t s = k0; s <= k1; ++s) {
    const float* k = kb + s * D;
    for (int h = 0; h < n; ++h) {
      const float* qh = q + h * D;
      float p[16] = {0};
      for (int64_t i = 0; i < D; i += 16)
        for (int l = 0; l < 16; ++l) p[l] = p[l] + qh[i + l] * k[i + l];
      for (int w = 8; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) p[l] = p[l] + p[l + w];
      sc[h * S + s] = p[0] * scale;
      mx[h] = sc[h * S + s] > mx[h] ? sc[h * S + s] : mx[h];
    }
  }
  for (int h = 0; h < n; ++h)
    for (int64_t s = k0; s <= k1; ++s) sc[h * S + s] = fexp(sc[h * S + s] - mx[h]);
  float sum[16];
  for (int h = 0; h < n; ++h) sum[h] = 0.f;
  for (int64_t i = 0; i < n * D; ++i) y[i] = 0.f;
  for (int64_t s = k0; s <= k1; ++s) {
    const float* v = vb + s * D;
    for (int h = 0; h < n; ++h) {
      sum[h] = sum[h] + sc[h * S + s];
      for (int64_t i = 0; i < D; ++i) y[h * D + i] = y[h * D + i] + sc[h * S + s] * v[i];
    }
  }
  for (int h = 0; h < n; ++h) {
    const float inv = 1.f / sum[h];
    for (int64_t i = 0; i < D; ++i) y[h * D + i] = y[h * D + i] * inv;
  }
}

// The same operations as attend_group_portable, 16 lanes at a time (same lane sums, same tree,
// mul then add, the same exp), so the bits agree with it.
#define AVX512_TARGET __attribute__((target("avx512f,avx512dq,avx2,fma")))

AVX512_TARGET static inline __m512 fexp16(__m512 x) {
  x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ), x, _mm512_set1_ps(-87.0f));
  x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(88.0f), _CMP_GT_OQ), x, _mm512_set1_ps(88.0f));
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 t = _mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), magic);
  const __m512 n = _mm512_sub_ps(t, magic);
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B400000)), _mm512_set1_epi32(127)),
      23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// y = sum_t p[t] v_t / sum_t p[t] over keys [k0, k1], y in DV registers of 16 (head_dim 16 DV): the
// portable loop's operations in its order (mul then add per key, the sum in key order).
template <int DV>
AVX512_TARGET static void weigh_values(const float* p, const float* vb, int64_t k0, int64_t k1, float* y) {
  constexpr int64_t D = 16 * DV;
  __m512 acc[DV];
  for (int i = 0; i < DV; ++i) acc[i] = _mm512_setzero_ps();
  float sum = 0.f;
  for (int64_t t = k0; t <= k1; ++t) {
    for (int l = 0; l < DV; l += 4) _mm_prefetch((const char*)(vb + (t + 8) * D + 16 * l), _MM_HINT_T0);
    sum = sum + p[t];
    const __m512 w = _mm512_set1_ps(p[t]);
    for (int i = 0; i < DV; ++i) acc[i] = _mm512_add_ps(acc[i], _mm512_mul_ps(w, _mm512_loadu_ps(vb + t * D + 16 * i)));
  }
  const __m512 inv = _mm512_set1_ps(1.f / sum);
  for (int i = 0; i < DV; ++i) _mm512_storeu_ps(y + 16 * i, _mm512_mul_ps(acc[i], inv));
}

AVX512_TARGET static void weigh_values_any(const float* p, const float* vb, int64_t k0, int64_t k1, int64_t D,
                                           float* y) {
  float sum = 0.f;
  for (int64_t i = 0; i < D; i += 16) _mm512_storeu_ps(y + i, _mm512_setzero_ps());
  for (int64_t t = k0; t <= k1; ++t) {
    sum = sum + p[t];
    const __m512 w = _mm512_set1_ps(p[t]);
    for (int64_t i = 0; i < D; i += 16)
      _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_loadu_ps(y + i), _mm512_mul_ps(w, _mm512_loadu_ps(vb + t * D + i))));
  }
  const __m512 inv = _mm512_set1_ps(1.f / sum);
  for (int64_t i = 0; i < D; i += 16) _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(y + i), inv));
}

// Lane sums of q . k (lane l: dims l, l + 16, ...: the portable loop's p[l]), mul then add.
AVX512_TARGET static inline __m512 lane_sums(const float* qh, const float* k, int64_t D) {
  __m512 p = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; i += 16) p = _mm512_add_ps(p, _mm512_mul_ps(_mm512_loadu_ps(qh + i), _mm512_loadu_ps(k + i)));
  return p;
}

// The lane sums of 16 keys -> their 16 dot products, each by the portable tree (p[l] + p[l + 8],
// then + 4, + 2, + 1): the same adds on the same pairs, four levels of shuffles for 16 keys at a
// time instead of a horizontal reduction per key.
AVX512_TARGET static inline __m512 reduce16(__m512* P) {
  __m512 Q[8], R[4], S2[2];
  for (int m = 0; m < 8; ++m)  // lanes l + (l + 8): keys 2m | 2m + 1, 8 lanes each
    Q[m] = _mm512_add_ps(_mm512_shuffle_f32x4(P[2 * m], P[2 * m + 1], 0x44), _mm512_shuffle_f32x4(P[2 * m], P[2 * m + 1], 0xee));
  for (int i = 0; i < 4; ++i)  // + 4: 128-bit lane k holds key 4i + k
    R[i] = _mm512_add_ps(_mm512_shuffle_f32x4(Q[2 * i], Q[2 * i + 1], 0x88), _mm512_shuffle_f32x4(Q[2 * i], Q[2 * i + 1], 0xdd));
  for (int u = 0; u < 2; ++u)  // + 2
    S2[u] = _mm512_add_ps(_mm512_shuffle_ps(R[2 * u], R[2 * u + 1], 0x44), _mm512_shuffle_ps(R[2 * u], R[2 * u + 1], 0xee));
  // + 1: element 4k + e is key 4e + k; put key j at j
  const __m512 t = _mm512_add_ps(_mm512_shuffle_ps(S2[0], S2[1], 0x88), _mm512_shuffle_ps(S2[0], S2[1], 0xdd));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, t);
}

AVX512_TARGET static void attend_group_avx512(int n, const float* q, const float* kb, const float* vb, int64_t k0,
                                              int64_t k1, int64_t D, float scale, float* sc, float* y) {
  const int64_t S = k1 + 1;
  float mx[16];
  const __m512 vs = _mm512_set1_ps(scale);
  for (int h = 0; h < n; ++h) {
    const float* qh = q + h * D;
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    int64_t s = k0;
    for (; s + 16 <= k1 + 1; s += 16) {  // 16 keys at a time
      __m512 P[16];
      for (int e = 0; e < 16; ++e) {
        if (h == 0) _mm_prefetch((const char*)(kb + (s + 16 + e) * D), _MM_HINT_T0);
        P[e] = lane_sums(qh, kb + (s + e) * D, D);
      }
      const __m512 v = _mm512_mul_ps(reduce16(P), vs);
      _mm512_storeu_ps(sc + h * S + s, v);
      vmax = _mm512_max_ps(v, vmax);  // a NaN score is passed over, as the scalar compare does
    }
    float m = _mm512_reduce_max_ps(vmax);
    for (; s <= k1; ++s) {
      const __m512 p = lane_sums(qh, kb + s * D, D);
      __m256 p8 = _mm256_add_ps(_mm512_castps512_ps256(p), _mm512_extractf32x8_ps(p, 1));  // lanes l + (l + 8)
      __m128 p4 = _mm_add_ps(_mm256_castps256_ps128(p8), _mm256_extractf128_ps(p8, 1));
      __m128 p2 = _mm_add_ps(p4, _mm_movehl_ps(p4, p4));
      __m128 p1 = _mm_add_ss(p2, _mm_shuffle_ps(p2, p2, 1));
      const float v = _mm_cvtss_f32(p1) * scale;
      sc[h * S + s] = v;
      m = v > m ? v : m;
    }
    mx[h] = m;
  }
  for (int h = 0; h < n; ++h) {
    float* sh = sc + h * S;
    int64_t s = k0;
    for (; s + 16 <= k1 + 1; s += 16)
      _mm512_storeu_ps(sh + s, fexp16(_mm512_sub_ps(_mm512_loadu_ps(sh + s), _mm512_set1_ps(mx[h]))));
    for (; s <= k1; ++s) sh[s] = fexp(sh[s] - mx[h]);
  }
  for (int h = 0; h < n; ++h) {  // the values: each head's row of y in registers (head_dim 64 or 128)
    const float* sh = sc + h * S;
    float* yh = y + h * D;
    if (D == 64) weigh_values<4>(sh, vb, k0, k1, yh);
    else if (D == 128) weigh_values<8>(sh, vb, k0, k1, yh);
    else weigh_values_any(sh, vb, k0, k1, D, yh);
  }
}

static void attend_group(int level, int n, const float* q, const float* kb, const float* vb, int64_t k0, int64_t k1,
                         int64_t D, float scale, float* sc, float* y) {
  if (level >= ISA_AVX512) return attend_group_avx512(n, q, kb, vb, k0, k1, D, scale, sc, y);
  attend_group_portable(n, q, kb, vb, k0, k1, D, scale, sc, y);
}

CLONES static void rmsnorm(const float* x, const float* w, float eps, int64_t C, float* out) {
  float p[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= C; i += 16)
    for (int l = 0; l < 16; ++l) p[l] = p[l] + x[i + l] * x[i + l];
  for (int l = 0; i < C; ++i, ++l) p[l] = p[l] + x[i] * x[i];
  for (int w2 = 8; w2 > 0; w2 /= 2)
    for (int l = 0; l < w2; ++l) p[l] = p[l] + p[l + w2];
  const float r = 1.f / std::sqrt(p[0] / float(C) + eps);
  for (int64_t c = 0; c < C; ++c) out[c] = w[c] * (x[c] * r);
}

// HF's rotation: pair (i, i + D/2); out = x * cos + rotate_half(x) * sin, as apply_rope rounds it.
static void rope(float* x, const float* cos, const float* sin, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] + (-b) * sin[i];
    x[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

// ---------------------------------------------------------------------------------------- the step

static bool is_block(int64_t kind) { return kind != F32_TILES && kind != BF16_TILES; }

// A product's weights: one tensor, or several side by side (q, k, v of other formats; gate, up),
// each part writing its outputs at `offset` of the product's n.
struct Part {
  const at::Tensor* w;
  int64_t kind, n, offset;
};
struct Product {
  std::vector<Part> parts;
  int64_t n = 0, tiles = 0;
  bool b32 = false, bk = false;  // some part needs the activations quantized per 32 / per 256 (K-quants)
  void add(const at::Tensor* w, int64_t kind, int64_t np) {
    parts.push_back(Part{w, kind, np, n});
    n += np, tiles += w->size(0);
    bk = bk || k_activations(int(kind));
    b32 = b32 || (is_block(kind) && !k_activations(int(kind)));
  }
};

// What one layer reads: its products and its KV cache.
struct Layer {
  const float *ln1, *ln2;
  Product p[4];  // qkv, o, gate_up, down
  void *kc, *vc;  // float32, bfloat16 (a bfloat16 model's cache) or float16 (half the bytes)
};

// What the KV cache holds. Attention computes in float32 either way: a head's half-precision keys
// and values are widened (exactly) into a float32 buffer once for the query heads that share them.
enum CacheKind { CACHE_F32 = 0, CACHE_BF16 = 1, CACHE_F16 = 2 };

// bfloat16 <-> float32 as torch converts: round to nearest even, NaN kept quiet.
static inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
static inline float from_bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A new key or value row into a half-precision cache, rounded to nearest even as torch's .to()
// rounds (vcvtps2ph with that rounding gives the same halves; a NaN stays a NaN).
AVX512_TARGET static void narrow_f16_avx512(const float* src, int64_t n, uint16_t* d) {
  int64_t e = 0;
  for (; e + 16 <= n; e += 16)
    _mm256_storeu_si256((__m256i*)(d + e), _mm512_cvtps_ph(_mm512_loadu_ps(src + e), _MM_FROUND_TO_NEAREST_INT));
  for (; e < n; ++e) d[e] = c10::detail::fp16_ieee_from_fp32_value(src[e]);
}

static void narrow_row(int kind, const float* src, int64_t n, void* dst, int level) {
  uint16_t* d = static_cast<uint16_t*>(dst);
  if (kind == CACHE_BF16)
    for (int64_t e = 0; e < n; ++e) d[e] = to_bf16(src[e]);
  else if (level >= ISA_AVX512)
    narrow_f16_avx512(src, n, d);
  else
    for (int64_t e = 0; e < n; ++e) d[e] = c10::detail::fp16_ieee_from_fp32_value(src[e]);
}

AVX512_TARGET static void widen_avx512(int kind, const uint16_t* s, int64_t n, float* d) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256((const __m256i*)(s + i));
    _mm512_storeu_ps(d + i, kind == CACHE_F16 ? _mm512_cvtph_ps(h)
                                              : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
  for (; i < n; ++i) d[i] = kind == CACHE_F16 ? f16_to_f32(s[i]) : from_bf16(s[i]);
}

// Half-precision cache rows -> float32 (exact on every path, so every path sees the same keys).
static void widen(int kind, const uint16_t* s, int64_t n, float* d, int level) {
  if (level >= ISA_AVX512) return widen_avx512(kind, s, n, d);
  for (int64_t i = 0; i < n; ++i) d[i] = kind == CACHE_F16 ? f16_to_f32(s[i]) : from_bf16(s[i]);
}

// Quantized activation rows: codes, scales and code sums per block of 32.
struct Acts {
  int8_t* q;
  float* d;
  int32_t* s;
};

// The thread's share [g0, g1) of a product's tiles (all parts in a row). x is float32 rows
// (dense kinds) or the rows already quantized (block kinds: a32, or ak for the K-quants).
static void product_part(const Product& p, const float* x, const Acts& a32, const Acts& ak, int64_t M, int64_t K,
                         float* y, int tid, int nth, int level) {
  const int64_t g0 = p.tiles * tid / nth, g1 = p.tiles * (tid + 1) / nth;
  int64_t base = 0;
  for (const Part& part : p.parts) {
    const int64_t T = part.w->size(0), t0 = std::max<int64_t>(g0 - base, 0), t1 = std::min<int64_t>(g1 - base, T);
    base += T;
    if (t0 >= t1) continue;
    if (!is_block(part.kind))
      dgemm_tiles(part.kind == BF16_TILES, part.w->data_ptr(), K, t0, t1, part.n, x, M, y + part.offset, p.n, level);
    else {
      const Acts& a = k_activations(int(part.kind)) ? ak : a32;
      qgemm_tiles(int(part.kind), part.w->data_ptr<uint8_t>(), K / block_inputs(int(part.kind)), t0, t1, part.n, a.q,
                  a.d, a.s, M, y + part.offset, p.n, level);
    }
  }
}

// Every decoder layer of a step in one call and one OpenMP team: each product's tiles are split
// over the threads, and so are the rows of the row-wise work and the (row, head) pairs of the
// attention, with a barrier between stages. Which thread
// computes an output never changes how it is computed, so the result is the same for any thread
// count, as it is for any batch.
static at::Tensor decode_layers(const at::Tensor& x_in, at::TensorList ln1, at::TensorList ln2, double eps,
                                at::TensorList wqkv, at::IntArrayRef kqkv, at::IntArrayRef qkv_parts,
                                at::TensorList wo, at::IntArrayRef ko, at::TensorList wgu, at::IntArrayRef kgu,
                                at::IntArrayRef gu_parts, at::TensorList wd, at::IntArrayRef kd,
                                at::TensorList kc, at::TensorList vc, const at::Tensor& slots,
                                const at::Tensor& key_start, const at::Tensor& cos, const at::Tensor& sin, int64_t H,
                                int64_t Hkv, int64_t inter, double scale, const std::optional<at::Tensor>& blocks,
                                int64_t block_size) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2 && x_in.is_contiguous(),
              "camelid::decode_layers: x must be contiguous float32 [B * T, C]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.numel() > 0 &&
                  key_start.scalar_type() == at::kLong && key_start.dim() == 1,
              "camelid::decode_layers: slots [T] and key_start [B] must be int64");
  const int64_t L = int64_t(ln1.size());
  TORCH_CHECK(L > 0 && int64_t(ln2.size()) == L && int64_t(wo.size()) == L && int64_t(wd.size()) == L &&
                  int64_t(kc.size()) == L && int64_t(vc.size()) == L && int64_t(ko.size()) == L &&
                  int64_t(kd.size()) == L && int64_t(qkv_parts.size()) == L && int64_t(gu_parts.size()) == L,
              "camelid::decode_layers: every list needs one entry per layer");
  int64_t nq = 0, ng = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(qkv_parts[l] == 1 || qkv_parts[l] == 3, "camelid::decode_layers: q/k/v come in 1 or 3 parts");
    TORCH_CHECK(gu_parts[l] == 1 || gu_parts[l] == 2, "camelid::decode_layers: gate/up come in 1 or 2 parts");
    nq += qkv_parts[l], ng += gu_parts[l];
  }
  TORCH_CHECK(int64_t(wqkv.size()) == nq && int64_t(kqkv.size()) == nq && int64_t(wgu.size()) == ng &&
                  int64_t(kgu.size()) == ng,
              "camelid::decode_layers: the q/k/v and gate/up lists need the parts their counts say");
  // A paged cache (blocks given): layer tensors [NB, Hkv, block_size, D]; row b's slot s holds its token
  // s - key_start[b], in block blocks[b][(s - key_start[b]) / block_size] at offset (s - key_start[b]) % block_size.
  const bool paged = blocks.has_value();
  const int64_t B = key_start.numel(), T = slots.numel(), R = x_in.size(0), C = x_in.size(1), D = cos.size(-1);
  TORCH_CHECK(R == B * T, "camelid::decode_layers: x has ", R, " rows, not batch ", B, " x ", T, " queries");
  TORCH_CHECK(!paged || (blocks->scalar_type() == at::kLong && blocks->dim() == 2 && blocks->size(0) == B &&
                         blocks->is_contiguous() && block_size > 0 && kc[0].dim() == 4 && kc[0].size(2) == block_size),
              "camelid::decode_layers: a paged cache needs int64 blocks [B, n] and layers [NB, Hkv, block_size, D]");
  const int64_t NB = kc[0].size(0), nbt = paged ? blocks->size(1) : 0;
  const int64_t* bt = paged ? blocks->data_ptr<int64_t>() : nullptr;
  const int64_t S = paged ? nbt * block_size : kc[0].size(2);  // the slots a row can address
  TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && D % 16 == 0 && D > 0, "camelid::decode_layers: heads ", H, "/",
              Hkv, " and head_dim ", D, " (a multiple of 16) do not fit");
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sl[t] >= 0 && (paged || sl[t] < S), "camelid::decode_layers: slot ", sl[t], " outside the cache's ", S);
  const int64_t* ks = key_start.data_ptr<int64_t>();
  if (paged)
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(ks[b] >= 0, "camelid::decode_layers: a paged row's key_start must be >= 0");
      for (int64_t t = 0; t < T; ++t)
        TORCH_CHECK(sl[t] - ks[b] < S, "camelid::decode_layers: row ", b, "'s slot ", sl[t], " is past its blocks");
      for (int64_t j = 0; j < nbt; ++j)
        TORCH_CHECK(bt[b * nbt + j] >= 0 && bt[b * nbt + j] < NB, "camelid::decode_layers: block ", bt[b * nbt + j],
                    " outside the cache's ", NB);
    }
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == R * D && sin.numel() == R * D,
              "camelid::decode_layers: cos/sin must be contiguous float32 [B * T, head_dim]");
  const int64_t nqkv = (H + 2 * Hkv) * D;
  const at::ScalarType cache_type = kc[0].scalar_type();
  TORCH_CHECK(cache_type == at::kFloat || cache_type == at::kBFloat16 || cache_type == at::kHalf,
              "camelid::decode_layers: the KV cache must be float32, bfloat16 or float16, got ", cache_type);
  const int cache_kind = cache_type == at::kFloat ? CACHE_F32 : cache_type == at::kBFloat16 ? CACHE_BF16 : CACHE_F16;
  std::vector<Layer> layers(L);
  int64_t iq = 0, ig = 0;  // the next q/k/v and gate/up part
  for (int64_t l = 0; l < L; ++l) {
    for (const at::Tensor* t : {&kc[l], &vc[l]})
      TORCH_CHECK(t->scalar_type() == kc[0].scalar_type() && t->is_contiguous() && t->dim() == 4 &&
                      t->size(0) == (paged ? NB : B) && t->size(1) == Hkv && t->size(3) == D &&
                      t->size(2) == (paged ? block_size : S),
                  "camelid::decode_layers: layer ", l, "'s KV cache must be contiguous ", kc[0].scalar_type(),
                  paged ? " [NB, Hkv, block_size, D]" : " [B, Hkv, S, D]");
    TORCH_CHECK(ln1[l].scalar_type() == at::kFloat && ln1[l].numel() == C && ln1[l].is_contiguous() &&
                    ln2[l].scalar_type() == at::kFloat && ln2[l].numel() == C && ln2[l].is_contiguous(),
                "camelid::decode_layers: layer ", l, "'s norm weights must be float32 [C]");
    Layer& ly = layers[l];
    ly.ln1 = ln1[l].data_ptr<float>(), ly.ln2 = ln2[l].data_ptr<float>();
    ly.kc = kc[l].data_ptr(), ly.vc = vc[l].data_ptr();
    const std::vector<int64_t> qkv_n = qkv_parts[l] == 1 ? std::vector<int64_t>{nqkv}
                                                         : std::vector<int64_t>{H * D, Hkv * D, Hkv * D};
    const std::vector<int64_t> gu_n = gu_parts[l] == 1 ? std::vector<int64_t>{2 * inter}
                                                       : std::vector<int64_t>{inter, inter};
    for (int64_t n : qkv_n) {
      check_weight(wqkv[iq], kqkv[iq], n, C, "qkv");
      ly.p[0].add(&wqkv[iq], kqkv[iq], n), ++iq;
    }
    check_weight(wo[l], ko[l], C, H * D, "o");
    ly.p[1].add(&wo[l], ko[l], C);
    for (int64_t n : gu_n) {
      check_weight(wgu[ig], kgu[ig], n, C, "gate_up");
      ly.p[2].add(&wgu[ig], kgu[ig], n), ++ig;
    }
    check_weight(wd[l], kd[l], C, inter, "down");
    ly.p[3].add(&wd[l], kd[l], C);
  }
  const int level = isa();
  const float fe = float(eps), fs = float(scale);
  at::Tensor out = x_in.clone();
  float* x = out.data_ptr<float>();
  const int64_t wide = std::max({C, inter, H * D});
  std::vector<float> h(R * wide), qkv(R * nqkv), att(R * H * D), o(R * C), gu(R * 2 * inter), qd(R * wide / 32);
  std::vector<int8_t> q(R * wide);
  std::vector<int32_t> qs(R * wide / 32);
  std::vector<int8_t> qk(R * wide);  // the K-quants' activations
  std::vector<float> qdk(R * wide / 32);
  std::vector<int32_t> qsk(R * wide / 32);
  const Acts a32{q.data(), qd.data(), qs.data()}, ak{qk.data(), qdk.data(), qsk.data()};
  int64_t last = 0;
  for (int64_t t = 0; t < T; ++t) last = std::max(last, sl[t]);
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  const int64_t G = H / Hkv;
  // the element offset of row b's slot s, KV head j, in a layer's cache
  auto where = [&](int64_t b, int64_t j, int64_t s) -> int64_t {
    if (!paged) return ((b * Hkv + j) * S + s) * D;
    const int64_t tok = s - ks[b];
    return ((bt[b * nbt + tok / block_size] * Hkv + j) * block_size + tok % block_size) * D;
  };
  const int nth = std::max(1, std::min(at::get_num_threads(), 64));

  // rows [i0, i1) of a product's input, quantized as its block weights need
  auto prep = [&](const float* src, int64_t K, const Product& p, int64_t i0, int64_t i1) {
    if (i1 <= i0) return;
    const int64_t o = i0 * K, od = i0 * (K / 32);
    if (p.b32) quantize_rows(src + o, i1 - i0, K, a32.q + o, a32.d + od, a32.s + od, level);
    if (p.bk) quantize_rows_k(src + o, i1 - i0, K, ak.q + o, ak.d + od, ak.s + od);
  };
  SpinBarrier barrier;
#pragma omp parallel num_threads(nth)
  {
    const int tid = omp_get_thread_num(), team = omp_get_num_threads();
    if (tid == 0) barrier.n = team;  // the team OpenMP gave (at most nth)
#pragma omp barrier
    std::vector<float> sc(std::min<int64_t>(G, 16) * (last + 1));
    std::vector<float> kf(cache_kind != CACHE_F32 || paged ? (last + 1) * D : 0), vf(kf.size());
    StageClock clock;
    clock.on = clock.on && tid == 0;
    if (clock.on) profiled_calls += 1;
    const int64_t r0 = R * tid / team, r1 = R * (tid + 1) / team;  // this thread's rows for row-wise work
    for (int64_t l = 0; l < L; ++l) {
      const Layer& ly = layers[l];
      for (int64_t i = r0; i < r1; ++i) rmsnorm(x + i * C, ly.ln1, fe, C, h.data() + i * C);
      prep(h.data(), C, ly.p[0], r0, r1);
      barrier.wait();
      clock.lap(ST_OTHER);
      product_part(ly.p[0], h.data(), a32, ak, R, C, qkv.data(), tid, team, level);
      barrier.wait();
      clock.lap(ST_MATMUL);
      for (int64_t i = r0; i < r1; ++i) {  // every row's k, v into the cache before any row attends
        const int64_t b = i / T, slot = sl[i % T];
        float* r = qkv.data() + i * nqkv;
        for (int64_t j = 0; j < H + Hkv; ++j) rope(r + j * D, cs + i * D, sn + i * D, D);  // q heads, then k
        for (int64_t j = 0; j < Hkv && !(paged && slot < ks[b]); ++j) {  // a paged padding row has no slot
          const int64_t at = where(b, j, slot);
          if (cache_kind != CACHE_F32) {
            narrow_row(cache_kind, r + (H + j) * D, D, static_cast<uint16_t*>(ly.kc) + at, level);
            narrow_row(cache_kind, r + (H + Hkv + j) * D, D, static_cast<uint16_t*>(ly.vc) + at, level);
          } else {
            std::copy_n(r + (H + j) * D, D, static_cast<float*>(ly.kc) + at);
            std::copy_n(r + (H + Hkv + j) * D, D, static_cast<float*>(ly.vc) + at);
          }
        }
      }
      barrier.wait();
      clock.lap(ST_OTHER);
      // this thread's (row, query head) pairs, heads that share a KV head taken together
      for (int64_t ih = R * H * tid / team, end = R * H * (tid + 1) / team; ih < end;) {
        // query row i = (b, t) sees keys [key_start[b], slot[t]]
        const int64_t i = ih / H, hd = ih % H, b = i / T, slot = sl[i % T], kv = hd / G, k0 = ks[b];
        const int n = int(std::min({end, i * H + (kv + 1) * G, ih + 16}) - ih);  // at most 16 at a time
        float* y = att.data() + (i * H + hd) * D;
        if (k0 > slot) {  // a row with no keys (padding only): its output is never read
          std::fill_n(y, n * D, 0.f);
        } else {
          const float *kh, *vh;
          if (paged) {  // this head's keys and values [k0, slot], block by block, as float32 (exact)
            for (int64_t s0 = k0; s0 <= slot;) {
              const int64_t at = where(b, kv, s0), n_s = std::min(slot + 1 - s0, block_size - (s0 - k0) % block_size);
              if (cache_kind != CACHE_F32) {
                widen(cache_kind, static_cast<const uint16_t*>(ly.kc) + at, n_s * D, kf.data() + s0 * D, level);
                widen(cache_kind, static_cast<const uint16_t*>(ly.vc) + at, n_s * D, vf.data() + s0 * D, level);
              } else {
                std::copy_n(static_cast<const float*>(ly.kc) + at, n_s * D, kf.data() + s0 * D);
                std::copy_n(static_cast<const float*>(ly.vc) + at, n_s * D, vf.data() + s0 * D);
              }
              s0 += n_s;
            }
            kh = kf.data(), vh = vf.data();
          } else if (cache_kind != CACHE_F32) {  // this head's keys and values [k0, slot] as float32 (exact)
            const int64_t head = (b * Hkv + kv) * S * D;
            const uint16_t *ksrc = static_cast<const uint16_t*>(ly.kc) + head, *vsrc = static_cast<const uint16_t*>(ly.vc) + head;
            widen(cache_kind, ksrc + k0 * D, (slot + 1 - k0) * D, kf.data() + k0 * D, level);
            widen(cache_kind, vsrc + k0 * D, (slot + 1 - k0) * D, vf.data() + k0 * D, level);
            kh = kf.data(), vh = vf.data();
          } else {
            const int64_t head = (b * Hkv + kv) * S * D;
            kh = static_cast<const float*>(ly.kc) + head, vh = static_cast<const float*>(ly.vc) + head;
          }
          attend_group(level, n, qkv.data() + i * nqkv + hd * D, kh, vh, k0, slot, D, fs, sc.data(), y);
        }
        ih += n;
      }
      barrier.wait();
      clock.lap(ST_ATTENTION);
      prep(att.data(), H * D, ly.p[1], r0, r1);
      barrier.wait();
      clock.lap(ST_OTHER);
      product_part(ly.p[1], att.data(), a32, ak, R, H * D, o.data(), tid, team, level);
      barrier.wait();
      clock.lap(ST_MATMUL);
      for (int64_t i = r0; i < r1; ++i) {
        for (int64_t c = 0; c < C; ++c) x[i * C + c] = x[i * C + c] + o[i * C + c];
        rmsnorm(x + i * C, ly.ln2, fe, C, h.data() + i * C);
      }
      prep(h.data(), C, ly.p[2], r0, r1);
      barrier.wait();
      clock.lap(ST_OTHER);
      product_part(ly.p[2], h.data(), a32, ak, R, C, gu.data(), tid, team, level);
      barrier.wait();
      clock.lap(ST_MATMUL);
      for (int64_t i = r0; i < r1; ++i)
        silu_mul(gu.data() + i * 2 * inter, gu.data() + i * 2 * inter + inter, inter, h.data() + i * inter);
      prep(h.data(), inter, ly.p[3], r0, r1);
      barrier.wait();
      clock.lap(ST_OTHER);
      product_part(ly.p[3], h.data(), a32, ak, R, inter, o.data(), tid, team, level);
      barrier.wait();
      clock.lap(ST_MATMUL);
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t c = 0; c < C; ++c) x[i * C + c] = x[i * C + c] + o[i * C + c];
      barrier.wait();
      clock.lap(ST_OTHER);
    }
  }
  return out;
}

}  // namespace camelid

TORCH_LIBRARY_FRAGMENT(camelid, m) {
  m.def("decode_layers(Tensor x, Tensor[] ln1, Tensor[] ln2, float eps, Tensor[] wqkv, int[] kqkv, int[] qkv_parts, "
        "Tensor[] wo, int[] ko, Tensor[] wgu, int[] kgu, int[] gu_parts, Tensor[] wd, int[] kd, Tensor(a!)[] kc, "
        "Tensor(b!)[] vc, Tensor slots, "
        "Tensor key_start, Tensor cos, Tensor sin, int heads, int kv_heads, int inter, float scale, "
        "Tensor? blocks=None, int block_size=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(camelid, CPU, m) { m.impl("decode_layers", &camelid::decode_layers); }

TORCH_LIBRARY_FRAGMENT(camelid, m) { m.def("layer_profile(bool on) -> float[]", &camelid::layer_profile); }
