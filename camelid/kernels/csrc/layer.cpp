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
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace camelid {

constexpr int F32_TILES = 0, BF16_TILES = 30;  // weight kinds besides the GGML block types

static void check_weight(const at::Tensor& w, int64_t kind, int64_t n, int64_t K, const char* what) {
  const int64_t T = (n + TILE - 1) / TILE;
  if (kind == F32_TILES || kind == BF16_TILES) {
    TORCH_CHECK(w.scalar_type() == (kind == F32_TILES ? at::kFloat : at::kBFloat16) && w.dim() == 3 &&
                    w.is_contiguous() && w.size(0) == T && w.size(1) == K && w.size(2) == TILE,
                "camelid::decode_layer: ", what, " must be tiled [", T, ", ", K, ", 16], got ", w.sizes());
  } else {
    TORCH_CHECK(block_bytes(int(kind)) > 0 && w.scalar_type() == at::kByte && w.dim() == 3 && w.is_contiguous() &&
                    w.size(0) == T && w.size(1) * 32 == K && w.size(2) == block_bytes(int(kind)),
                "camelid::decode_layer: ", what, " must be GGML type ", kind, " tiles [", T, ", ", K / 32, ", ",
                block_bytes(int(kind)), "], got ", w.sizes());
  }
}

// y [M, n] = x [M, K] @ W^T through the kernel for the weight's kind.
static void linear(const at::Tensor& w, int64_t kind, int64_t n, const float* x, int64_t M, int64_t K, float* y,
                   int level) {
  const int64_t T = w.size(0);
  if (kind == F32_TILES || kind == BF16_TILES) {
    const void* wp = w.data_ptr();
    at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
      dgemm_tiles(kind == BF16_TILES, wp, K, b, e, n, x, M, y, n, level);
    });
    return;
  }
  const int64_t J = K / 32;
  std::vector<int8_t> q(M * K);
  std::vector<float> d(M * J);
  std::vector<int32_t> s(M * J);
  quantize_rows(x, M, K, q.data(), d.data(), s.data(), level);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    qgemm_tiles(int(kind), wp, J, b, e, n, q.data(), d.data(), s.data(), M, y, n, level);
  });
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

// One query head over keys [k0, k1]: softmax(q k^T * scale) v, into y [D]. sc: k1 + 1 floats.
CLONES static void attend_head(const float* q, const float* kb, const float* vb, int64_t k0, int64_t k1, int64_t D,
                               float scale, float* sc, float* y) {
  float mx = -INFINITY;
  for (int64_t s = k0; s <= k1; ++s) {
    const float* k = kb + s * D;
    float p[16] = {0};
    for (int64_t i = 0; i < D; i += 16)
      for (int l = 0; l < 16; ++l) p[l] = p[l] + q[i + l] * k[i + l];
    for (int w = 8; w > 0; w /= 2)
      for (int l = 0; l < w; ++l) p[l] = p[l] + p[l + w];
    sc[s] = p[0] * scale;
    mx = sc[s] > mx ? sc[s] : mx;
  }
  for (int64_t s = k0; s <= k1; ++s) sc[s] = fexp(sc[s] - mx);
  float sum = 0.f;
  for (int64_t i = 0; i < D; ++i) y[i] = 0.f;
  for (int64_t s = k0; s <= k1; ++s) {
    sum = sum + sc[s];
    const float* v = vb + s * D;
    for (int64_t i = 0; i < D; ++i) y[i] = y[i] + sc[s] * v[i];
  }
  const float inv = 1.f / sum;
  for (int64_t i = 0; i < D; ++i) y[i] = y[i] * inv;
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

static at::Tensor decode_layer(const at::Tensor& x_in, const at::Tensor& ln1, const at::Tensor& ln2, double eps,
                               const at::Tensor& wqkv, int64_t kqkv, const at::Tensor& wo, int64_t ko,
                               const at::Tensor& wgu, int64_t kgu, const at::Tensor& wd, int64_t kd,
                               const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& slots,
                               const at::Tensor& key_start,
                               const at::Tensor& cos, const at::Tensor& sin, int64_t H, int64_t Hkv,
                               int64_t inter, double scale) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() == 2 && x_in.is_contiguous(),
              "camelid::decode_layer: x must be contiguous float32 [B, C]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.numel() > 0 &&
                  key_start.scalar_type() == at::kLong && key_start.dim() == 1,
              "camelid::decode_layer: slots [T] and key_start [B] must be int64");
  const int64_t B = key_start.numel(), T = slots.numel(), R = x_in.size(0), C = x_in.size(1), D = cos.size(-1),
                S = kc.size(2);
  TORCH_CHECK(R == B * T, "camelid::decode_layer: x has ", R, " rows, not batch ", B, " x ", T, " queries");
  TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0 && D % 16 == 0 && D > 0, "camelid::decode_layer: heads ", H, "/",
              Hkv, " and head_dim ", D, " (a multiple of 16) do not fit");
  for (const at::Tensor* t : {&kc, &vc})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 4 && t->size(0) == B &&
                    t->size(1) == Hkv && t->size(3) == D && t->size(2) == S,
                "camelid::decode_layer: the KV cache must be contiguous float32 [B, Hkv, S, D]");
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(sl[t] >= 0 && sl[t] < S, "camelid::decode_layer: slot ", sl[t], " outside the cache's ", S);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == R * D && sin.numel() == R * D,
              "camelid::decode_layer: cos/sin must be contiguous float32 [B * T, head_dim]");
  TORCH_CHECK(ln1.scalar_type() == at::kFloat && ln1.numel() == C && ln2.scalar_type() == at::kFloat &&
                  ln2.numel() == C, "camelid::decode_layer: the norms' weights must be float32 [C]");
  const int64_t nqkv = (H + 2 * Hkv) * D;
  check_weight(wqkv, kqkv, nqkv, C, "qkv");
  check_weight(wo, ko, C, H * D, "o");
  check_weight(wgu, kgu, 2 * inter, C, "gate_up");
  check_weight(wd, kd, C, inter, "down");
  const int level = isa();
  const float fe = float(eps), fs = float(scale);

  at::Tensor out = x_in.clone();
  float* x = out.data_ptr<float>();
  std::vector<float> h(R * std::max(C, inter)), qkv(R * nqkv), att(R * H * D), o(R * C), gu(R * 2 * inter);
  int64_t last = 0;
  for (int64_t t = 0; t < T; ++t) last = std::max(last, sl[t]);
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  const int64_t* ks = key_start.data_ptr<int64_t>();
  float* kcp = kc.data_ptr<float>();
  float* vcp = vc.data_ptr<float>();

  for (int64_t i = 0; i < R; ++i) rmsnorm(x + i * C, ln1.data_ptr<float>(), fe, C, h.data() + i * C);
  linear(wqkv, kqkv, nqkv, h.data(), R, C, qkv.data(), level);
  for (int64_t i = 0; i < R; ++i) {  // every row's k, v into the cache before any row attends
    const int64_t b = i / T, slot = sl[i % T];
    float* r = qkv.data() + i * nqkv;
    for (int64_t j = 0; j < H + Hkv; ++j) rope(r + j * D, cs + i * D, sn + i * D, D);  // q heads, then k heads
    for (int64_t j = 0; j < Hkv; ++j) {
      std::copy_n(r + (H + j) * D, D, kcp + ((b * Hkv + j) * S + slot) * D);
      std::copy_n(r + (H + Hkv + j) * D, D, vcp + ((b * Hkv + j) * S + slot) * D);
    }
  }
  const int64_t G = H / Hkv;
  at::parallel_for(0, R * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sc(last + 1);
    for (int64_t ih = begin; ih < end; ++ih) {  // query row i = (b, t) sees keys [key_start[b], slot[t]]
      const int64_t i = ih / H, hd = ih % H, b = i / T, slot = sl[i % T], kv = hd / G, k0 = ks[b];
      float* y = att.data() + (i * H + hd) * D;
      if (k0 > slot) {  // a row with no keys (padding only): its output is never read
        std::fill_n(y, D, 0.f);
        continue;
      }
      attend_head(qkv.data() + i * nqkv + hd * D, kcp + (b * Hkv + kv) * S * D, vcp + (b * Hkv + kv) * S * D, k0,
                  slot, D, fs, sc.data(), y);
    }
  });
  linear(wo, ko, C, att.data(), R, H * D, o.data(), level);
  for (int64_t i = 0; i < R * C; ++i) x[i] = x[i] + o[i];
  for (int64_t i = 0; i < R; ++i) rmsnorm(x + i * C, ln2.data_ptr<float>(), fe, C, h.data() + i * C);
  linear(wgu, kgu, 2 * inter, h.data(), R, C, gu.data(), level);
  for (int64_t i = 0; i < R; ++i)
    silu_mul(gu.data() + i * 2 * inter, gu.data() + i * 2 * inter + inter, inter, h.data() + i * inter);
  linear(wd, kd, C, h.data(), R, inter, o.data(), level);
  for (int64_t i = 0; i < R * C; ++i) x[i] = x[i] + o[i];
  return out;
}

}  // namespace camelid

TORCH_LIBRARY_FRAGMENT(camelid, m) {
  m.def("decode_layer(Tensor x, Tensor ln1, Tensor ln2, float eps, Tensor wqkv, int kqkv, Tensor wo, int ko, "
        "Tensor wgu, int kgu, Tensor wd, int kd, Tensor(a!) kc, Tensor(b!) vc, Tensor slots, Tensor key_start, "
        "Tensor cos, Tensor sin, int heads, int kv_heads, int inter, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(camelid, CPU, m) { m.impl("decode_layer", &camelid::decode_layer); }
