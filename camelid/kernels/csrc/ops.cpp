// The torch.library face of the kernels: torch.ops.camelid.* (CPU). Shapes and dtypes are
// checked here, so a wrong call raises a Python error instead of reading out of bounds.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>

namespace camelid {

int best_isa() {
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
      return int(amx_usable() ? ISA_AMX : ISA_AVX512);
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return int(ISA_AVX2);
    return int(ISA_SCALAR);
  }();
  return level;
}

static std::atomic<int> forced{-1};

static int env_isa() {  // CAMELID_ISA=scalar|avx2|avx512 caps the level for the whole process
  const char* e = std::getenv("CAMELID_ISA");
  if (!e) return 99;
  if (!std::strcmp(e, "scalar")) return ISA_SCALAR;
  if (!std::strcmp(e, "avx2")) return ISA_AVX2;
  if (!std::strcmp(e, "avx512")) return ISA_AVX512;
  return 99;
}

int isa() {
  static const int cap = env_isa();
  const int f = forced.load();
  return std::min(f >= 0 ? f : 99, std::min(cap, best_isa()));
}

void force_isa(int level) { forced.store(level < 0 ? -1 : std::min(level, best_isa())); }

// ------------------------------------------------------------------------------------------ ops

static void check_x(const at::Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), op,
              ": x must be a contiguous float32 CPU matrix [M, K], got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(K < 0 || x.size(1) == K, op, ": x has ", x.size(1), " columns, the weight ", K, " inputs");
}

// x [M, K] float32 -> (codes int8 [M, K], scales float32 [M, K/32], sums int32 [M, K/32]); per
// block of 32, or with one scale per 256 (super_blocks: the K-quants' activations)
static std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act(const at::Tensor& x, bool super_blocks) {
  check_x(x, -1, "camelid::quantize_act");
  const int64_t M = x.size(0), K = x.size(1), B = super_blocks ? 256 : 32;
  TORCH_CHECK(K % B == 0, "camelid::quantize_act: K = ", K, " is not a multiple of ", B);
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto d = at::empty({M, K / 32}, x.options());
  auto s = at::empty({M, K / 32}, x.options().dtype(at::kInt));
  const int level = isa();
  const float* xp = x.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* dp = d.data_ptr<float>();
  int32_t* sp = s.data_ptr<int32_t>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    if (super_blocks)
      quantize_rows_k(xp + b * K, e - b, K, qp + b * K, dp + b * (K / 32), sp + b * (K / 32));
    else
      quantize_rows(xp + b * K, e - b, K, qp + b * K, dp + b * (K / 32), sp + b * (K / 32), level);
  });
  return {q, d, s};
}

// x [M, K] float32 @ W^T, W [n, K] repacked [T, K/32, BB] uint8 -> [M, n] float32
static at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& w, int64_t qtype, int64_t n) {
  const int BB = block_bytes(int(qtype));
  TORCH_CHECK(BB > 0, "camelid::quant_linear: no kernel for GGML type ", qtype);
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 3 && w.is_contiguous() &&
                  w.size(2) == BB && n > 0 && (n + TILE - 1) / TILE == w.size(0),
              "camelid::quant_linear: weight must be contiguous uint8 [ceil(n/16), K/", block_inputs(int(qtype)),
              ", ", BB, "] for n = ", n, ", got ", w.sizes());
  const int64_t J = w.size(1), K = block_inputs(int(qtype)) * J, T = w.size(0);
  check_x(x, K, "camelid::quant_linear");
  const int64_t M = x.size(0);
  auto y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  auto [q, d, s] = quantize_act(x, k_activations(int(qtype)));
  const int level = isa();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* dp = d.data_ptr<float>();
  const int32_t* sp = s.data_ptr<int32_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    qgemm_tiles(int(qtype), wp, J, b, e, n, qp, dp, sp, M, yp, n, level);
  });
  return y;
}

// x [M, K] float32 @ W^T, W [n, K] tiled [T, K, 16] float32 or bfloat16 -> [M, n] float32
static at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w, int64_t n) {
  TORCH_CHECK(w.device().is_cpu() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16) &&
                  w.dim() == 3 && w.is_contiguous() && w.size(2) == TILE && n > 0 &&
                  (n + TILE - 1) / TILE == w.size(0),
              "camelid::dense_linear: weight must be contiguous float32/bfloat16 [ceil(n/16), K, 16] for n = ", n,
              ", got ", w.scalar_type(), " ", w.sizes());
  const int64_t K = w.size(1), T = w.size(0);
  check_x(x, K, "camelid::dense_linear");
  const int64_t M = x.size(0);
  auto y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  const int level = isa();
  const void* wp = w.data_ptr();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) { dgemm_tiles(bf16, wp, K, b, e, n, xp, M, yp, n, level); });
  return y;
}

// Rows `ids` of a repacked table, dequantized: float32 [len(ids), K] (embedding lookups). The same
// values as camelid.kernels.packed_rows (d * q, d * (q - 8) or d * q + m, each rounded once).
static at::Tensor quant_rows(const at::Tensor& w, int64_t qtype, const at::Tensor& ids, int64_t n) {
  const int BB = block_bytes(int(qtype));
  TORCH_CHECK(BB > 0 && w.scalar_type() == at::kByte && w.dim() == 3 && w.is_contiguous() && w.size(2) == BB &&
                  (n + TILE - 1) / TILE == w.size(0),
              "camelid::quant_rows: weight must be contiguous uint8 tiles of GGML type ", qtype);
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1, "camelid::quant_rows: ids must be int64 [n]");
  auto idc = ids.contiguous();
  const int64_t J = w.size(1), B = block_inputs(int(qtype)), K = B * J, L = idc.numel();
  const int64_t* ip = idc.data_ptr<int64_t>();
  for (int64_t i = 0; i < L; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < n, "camelid::quant_rows: row ", ip[i], " outside [0, ", n, ")");
  auto out = at::empty({L, K}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < L; ++i) {
    const int64_t t = ip[i] / TILE, r = ip[i] % TILE;
    for (int64_t k = 0; k < K; ++k) op[i * K + k] = weight_value(int(qtype), wp + (t * J + k / B) * BB, int(r), int(k % B));
  }
  return out;
}

// Greedy decoding's pick: the index of each row's largest value, as torch.argmax has it (the first
// of equal maxima; a row holding NaN: its first NaN), 16 lanes at a time. torch's own CPU argmax
// takes 60 us for one 49152-wide row here (0.33 ms for 8), more than a layer's products.
static int64_t argmax_row_portable(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

__attribute__((target("avx512f"))) static int64_t argmax_row_avx512(const float* x, int64_t n) {
  const int64_t n16 = n / 16 * 16;
  if (n16 == 0) return argmax_row_portable(x, n);
  __m512 vmax = _mm512_loadu_ps(x);
  __m512i vidx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), idx = vidx;
  const __m512i step = _mm512_set1_epi32(16);
  __mmask16 nan = _mm512_cmp_ps_mask(vmax, vmax, _CMP_UNORD_Q);
  for (int64_t i = 16; i < n16 && !nan; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    idx = _mm512_add_epi32(idx, step);
    const __mmask16 gt = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);  // strictly: a lane keeps its first
    vmax = _mm512_mask_blend_ps(gt, vmax, v);
    vidx = _mm512_mask_blend_epi32(gt, vidx, idx);
    nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  if (nan) return argmax_row_portable(x, n);  // the first NaN (rare: the plain loop finds it)
  alignas(64) float mv[16];
  alignas(64) int32_t mi[16];
  _mm512_store_ps(mv, vmax);
  _mm512_store_si512(mi, vidx);
  int64_t best = mi[0];
  for (int l = 1; l < 16; ++l)
    if (mv[l] > x[best] || (mv[l] == x[best] && mi[l] < best)) best = mi[l];
  for (int64_t i = n16; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    if (x[i] > x[best]) best = i;
  }
  return best;
}

static at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
                  x.size(1) > 0 && x.size(1) < (int64_t(1) << 31),
              "camelid::argmax: x must be a contiguous float32 CPU matrix [M, N], 0 < N < 2^31, got ",
              x.scalar_type(), " ", x.sizes());
  const int64_t M = x.size(0), N = x.size(1);
  auto out = at::empty({M}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const bool wide = isa() >= ISA_AVX512;
  at::parallel_for(0, M, 1, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) op[m] = wide ? argmax_row_avx512(xp + m * N, N) : argmax_row_portable(xp + m * N, N);
  });
  return out;
}

static int64_t isa_op() { return isa(); }
static int64_t best_isa_op() { return best_isa(); }
static int64_t set_isa_op(int64_t level) {
  force_isa(int(level));
  return isa();
}

}  // namespace camelid

TORCH_LIBRARY(camelid, m) {
  m.def("quantize_act(Tensor x, bool super_blocks=False) -> (Tensor, Tensor, Tensor)");
  m.def("quant_linear(Tensor x, Tensor w, int qtype, int n) -> Tensor");
  m.def("dense_linear(Tensor x, Tensor w, int n) -> Tensor");
  m.def("quant_rows(Tensor w, int qtype, Tensor ids, int n) -> Tensor");
  m.def("argmax(Tensor x) -> Tensor");
  m.def("isa() -> int", &camelid::isa_op);
  m.def("best_isa() -> int", &camelid::best_isa_op);
  m.def("set_isa(int level) -> int", &camelid::set_isa_op);
}

TORCH_LIBRARY_IMPL(camelid, CPU, m) {
  m.impl("quantize_act", &camelid::quantize_act);
  m.impl("quant_linear", &camelid::quant_linear);
  m.impl("dense_linear", &camelid::dense_linear);
  m.impl("quant_rows", &camelid::quant_rows);
  m.impl("argmax", &camelid::argmax_rows);
}
