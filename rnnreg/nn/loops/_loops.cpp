// rnnreg's per-step loops in C++, twins of the Python loops in python.py without the
// interpreter between the calls. At the paper's small shape a step is a 20x200 by 200x800
// product and a handful of elementwise kernels of a few microseconds each, so the
// interpreter's few microseconds per call were a third of the loop's time. The GRU and Elman
// loops make the same ATen calls as their Python twins; the LSTM's does all of a step's
// pointwise work in one hand-written pass and runs blocks of batch rows in parallel (see
// below).
//
// Every function fills buffers that recurrence.py allocated and reads tensors it prepared, in
// the same order as the Python loop it replaces; the equations are documented there.
//
// The loops are registered as operators of the namespace ``rnnreg`` (TORCH_LIBRARY at the end),
// with schemas whose argument names are those of the Python twins, so cpp.py calls them by
// keyword (torch.ops.rnnreg.lstm_forward(projected=..., ...)). Each checks the dtype, shape and
// contiguity of what it reads or writes through raw pointers before touching memory: a caller's
// mistake is then one clear error, not a wrong result or a crash.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

// --- input checks --------------------------------------------------------------------------

// ``t`` has dtype ``dtype`` and the given sizes (a size of -1 matches 1 or ``steps``: the
// leading dimension of a fresh or per-sequence mask), and is contiguous when ``dense``.
void expect(const char* op, const char* name, const Tensor& t, at::ScalarType dtype,
            std::initializer_list<int64_t> sizes, int64_t steps = 0, bool dense = true) {
  TORCH_CHECK(t.defined(), "rnnreg.", op, ": ", name, " is missing");
  TORCH_CHECK(t.scalar_type() == dtype, "rnnreg.", op, ": ", name, " must have dtype ", dtype,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == static_cast<int64_t>(sizes.size()), "rnnreg.", op, ": ", name,
              " must have ", sizes.size(), " dimensions, got shape ", t.sizes());
  int64_t d = 0;
  for (int64_t size : sizes) {
    const int64_t got = t.size(d++);
    const bool ok = size == -1 ? (got == 1 || got == steps) : got == size;
    TORCH_CHECK(ok, "rnnreg.", op, ": ", name, " has shape ", t.sizes(), ", dimension ", d - 1,
                " should be ", size == -1 ? "1 or the number of steps" : std::to_string(size));
  }
  TORCH_CHECK(!dense || t.is_contiguous(), "rnnreg.", op, ": ", name, " must be contiguous");
}

void expect(const char* op, const char* name, const OptTensor& t, at::ScalarType dtype,
            std::initializer_list<int64_t> sizes, int64_t steps = 0, bool dense = true) {
  if (t) {
    expect(op, name, *t, dtype, sizes, steps, dense);
  }
}

void expect_float(const char* op, const Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "rnnreg.", op,
              ": expects floating-point tensors, got ", t.scalar_type());
}

// oneDNN's linear, X W^T (+ bias), W packed or a plain strided matrix: products.py decides
// when it pays (onednn_pays) and recurrence.py passes the packed weight or the oneDNN flag.
Tensor onednn_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const OptTensor&,
                                     std::string_view, c10::List<std::optional<at::Scalar>>,
                                     std::optional<std::string_view>)>();
  return op.call(x, weight, bias, "none", c10::List<std::optional<at::Scalar>>(),
                 std::string_view(""));
}

// X W^T + other, the per-step input added inside oneDNN's product.
Tensor onednn_linear_add(const Tensor& x, const Tensor& other, const Tensor& weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "binary")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&,
                                     const OptTensor&, std::string_view)>();
  return op.call(x, other, weight, std::nullopt, "add");
}

// out = add + x W^T; add is undefined, a (G*H,) bias or a (B, G*H) tensor.
void product_forward(Tensor& out, const Tensor& x, const Tensor& add, const Tensor& weight,
                     const OptTensor& packed) {
  if (packed) {
    if (add.defined() && add.dim() == 2) {
      out.copy_(onednn_linear_add(x, add, *packed));
    } else {
      out.copy_(onednn_linear(x, *packed, add.defined() ? OptTensor(add) : std::nullopt));
    }
  } else if (add.defined()) {
    at::addmm_out(out, add, x, weight.t());
  } else {
    at::mm_out(out, x, weight.t());
  }
}

// out = d W: the gradient reaching m * h(t-1) through the recurrent product.
void product_backward(Tensor& out, const Tensor& d, const Tensor& weight, bool onednn) {
  if (onednn) {
    out.copy_(onednn_linear(d, weight.t(), std::nullopt));
  } else {
    at::mm_out(out, d, weight);
  }
}

// The mask step t uses: row t of a fresh (T, B, H) mask or the one per-sequence row.
Tensor mask_at(const OptTensor& mask, int64_t t) {
  return mask->size(0) > 1 ? mask->select(0, t) : mask->select(0, 0);
}

// m * h(t-1) into h_in[t], or h(t-1) itself when there is no mask.
Tensor masked_state(const Tensor& h, const OptTensor& mask, const OptTensor& h_in, int64_t t) {
  if (!mask) {
    return h;
  }
  Tensor row = h_in->select(0, t);
  return at::mul_out(row, h, mask_at(mask, t));
}

// dL/dh(t-1) from step t (python.py's _previous): through the masked product, plus the
// gradient of output t-1, plus dh copied through a frozen state where the sequence has ended.
Tensor previous(const Tensor& d_out, const Tensor& d_hin, const OptTensor& mask, int64_t t,
                const Tensor& dh, const OptTensor& passthrough, OptTensor out) {
  Tensor d_row = d_hin.select(0, t);
  Tensor prev;
  if (t > 0) {
    Tensor target = out ? *out : at::empty_like(d_row);
    if (mask) {
      prev = at::addcmul_out(target, d_out.select(0, t - 1), d_row, mask_at(mask, t));
    } else {
      prev = at::add_out(target, d_out.select(0, t - 1), d_row);
    }
  } else {
    prev = mask ? d_row * mask_at(mask, t) : d_row.clone();
  }
  if (passthrough) {
    prev.addcmul_(dh, passthrough->select(0, t));
  }
  return prev;
}

// Freeze finished sequences: keep the old value where valid[t] is false.
void freeze(Tensor& value, const Tensor& old, const OptTensor& valid, int64_t t) {
  if (valid) {
    at::where_out(value, valid->select(0, t), value, old);
  }
}

// The LSTM, the cell the paper is about, goes further: after the recurrent product, all of a
// step's pointwise work (the four gate nonlinearities, the cell update, tanh(c), the output,
// zoneout or the frozen state past a sequence's end, and the next step's masked input) is one
// hand-written pass over the batch rows, instead of seven ATen kernels each with a few
// microseconds of setup for 4000 numbers. The passes are plain loops over contiguous arrays
// that the compiler vectorizes; the arithmetic is in at::opmath_type (float for bfloat16/half),
// like ATen's own kernels. The profile behind this: results/benchmarks/cpu-loop/.
template <typename T>
using Acc = at::opmath_type<T>;

// The passes are compiled once for the build machine's baseline and once each for AVX2 and
// AVX-512, picked at load time by the CPU (GCC's function multiversioning), so the build runs
// on any x86-64 and uses wide vectors where they exist. -ffp-contract=off (cpp.py) keeps the
// versions' results identical: no version fuses a multiply and an add the others do not.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RNNREG_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define RNNREG_INLINE inline __attribute__((always_inline))  // into each version
#else
#define RNNREG_VECTOR_CLONES
#define RNNREG_INLINE inline
#endif

// exp(x) in float32 from plain arithmetic, so that the loops below vectorize (libm's expf does
// not): Cephes' expf (S. Moshier), range reduction by ln 2 in two parts and a degree-6
// polynomial, within 2 ulp of the exact value; x is clamped to where 2^n stays a normal float.
RNNREG_INLINE float exp_poly(float x) {
  // Written as selects and a truncation, which every vector width compiles without branches.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // n = floor(x log2(e) + 1/2), by truncating a number made positive (-87 <= x <= 88)
  const int32_t n = static_cast<int32_t>(x * 1.44269504088896341f + 128.5f) - 128;
  const float fn = static_cast<float>(n);
  const float r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

RNNREG_INLINE float sigmoid_of(float x) { return 1.0f / (1.0f + exp_poly(-x)); }

// tanh in float32 (Cephes' tanhf): an odd polynomial below |x| = 0.625, where 1 - 2/(e^2x + 1)
// would lose digits, and that formula above it (tanh(9) is 1 in float32).
RNNREG_INLINE float tanh_of(float x) {
  const float a = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float e = exp_poly(2.0f * (a < 9.0f ? a : 9.0f));
  const float large = std::copysign(1.0f - 2.0f / (e + 1.0f), x);
  return a < 0.625f ? small : large;
}

// float64 keeps libm's functions: it is for gradient checks, where accuracy is the point.
inline double sigmoid_of(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double tanh_of(double x) { return std::tanh(x); }

// One batch row of one forward step. ``pre`` is the recurrent product x W_hh^T and ``proj``
// the step's projected input, both 4H wide in torch's gate order [i, f, g, o]; the gates go to
// ``act``, the candidate c~ = f c(t-1) + i g to ``c_new`` and tanh(c~) to ``tc``, and
// h(t) = o tanh(c~) to ``h_new``. With zoneout (Zoned; keep factors zh, zc) each unit keeps d
// times its old value: h(t) = d_h h(t-1) + (1 - d_h) h~, and c(t) likewise from c~.
template <typename T, bool Zoned>
RNNREG_INLINE void lstm_row(const T* __restrict__ pre, const T* __restrict__ proj,
                            T* __restrict__ act, const T* __restrict__ c_old,
                            T* __restrict__ c_new, T* __restrict__ tc,
                            const T* __restrict__ h_old, T* __restrict__ h_new,
                            const T* __restrict__ zh, const T* __restrict__ zc, int64_t hidden) {
  for (int64_t j = 0; j < hidden; ++j) {
    // Each gate is rounded to T before use, as the backward reads the saved ones.
    const T i = T(sigmoid_of(Acc<T>(pre[j]) + Acc<T>(proj[j])));
    const T f = T(sigmoid_of(Acc<T>(pre[hidden + j]) + Acc<T>(proj[hidden + j])));
    const T g = T(tanh_of(Acc<T>(pre[2 * hidden + j]) + Acc<T>(proj[2 * hidden + j])));
    const T o = T(sigmoid_of(Acc<T>(pre[3 * hidden + j]) + Acc<T>(proj[3 * hidden + j])));
    act[j] = i;
    act[hidden + j] = f;
    act[2 * hidden + j] = g;
    act[3 * hidden + j] = o;
    const T c = T(Acc<T>(f) * Acc<T>(c_old[j]) + Acc<T>(i) * Acc<T>(g));
    const T t = T(tanh_of(Acc<T>(c)));
    tc[j] = t;
    const Acc<T> h = Acc<T>(o) * Acc<T>(t);
    if constexpr (Zoned) {
      const Acc<T> dh = zh[j], dc = zc[j];
      h_new[j] = dh * Acc<T>(h_old[j]) + (Acc<T>(1) - dh) * h;
      c_new[j] = dc * Acc<T>(c_old[j]) + (Acc<T>(1) - dc) * Acc<T>(c);
    } else {
      h_new[j] = h;
      c_new[j] = c;
    }
  }
}

// The pointers one forward step reads and writes, rows of B x (4H or H) arrays.
template <typename T>
struct ForwardStep {
  const T* pre;     // x W_hh^T, (B, 4H)
  const T* proj;    // projected input, (B, 4H)
  T* act;           // gates, (B, 4H)
  const T* c_old;   // (B, H) each
  T* c_new;
  T* tc;
  const T* h_old;
  T* h_new;
  const bool* alive;     // (B,) or null: past a sequence's end h and c keep their old values
  const T* zh;           // zoneout keep factors (B, H) or null (the sequence ends folded in)
  const T* zc;
  const T* next_mask;    // the next step's mask row (B, H) or null
  T* next_in;            // m(t+1) * h(t), the next step's input to the product, or null
};

template <typename T>
RNNREG_INLINE void lstm_step_rows(const ForwardStep<T>& s, int64_t batch, int64_t hidden) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t row = b * 4 * hidden, base = b * hidden;
    if (s.zh != nullptr) {
      lstm_row<T, true>(s.pre + row, s.proj + row, s.act + row, s.c_old + base,
                        s.c_new + base, s.tc + base, s.h_old + base, s.h_new + base,
                        s.zh + base, s.zc + base, hidden);
    } else {
      lstm_row<T, false>(s.pre + row, s.proj + row, s.act + row, s.c_old + base,
                         s.c_new + base, s.tc + base, s.h_old + base, s.h_new + base, nullptr,
                         nullptr, hidden);
      if (s.alive != nullptr && !s.alive[b]) {
        std::copy(s.h_old + base, s.h_old + base + hidden, s.h_new + base);
        std::copy(s.c_old + base, s.c_old + base + hidden, s.c_new + base);
      }
    }
    if (s.next_in != nullptr) {
      const T* __restrict__ h = s.h_new + base;
      const T* __restrict__ m = s.next_mask + base;
      T* __restrict__ out = s.next_in + base;
      for (int64_t j = 0; j < hidden; ++j) {
        out[j] = Acc<T>(h[j]) * Acc<T>(m[j]);
      }
    }
  }
}

RNNREG_VECTOR_CLONES void lstm_step(const ForwardStep<float>& s, int64_t batch, int64_t hidden) {
  lstm_step_rows(s, batch, hidden);
}

template <typename T>
void lstm_step(const ForwardStep<T>& s, int64_t batch, int64_t hidden) {
  lstm_step_rows(s, batch, hidden);
}

// Pointer to row t of a (T|1, B, H) mask (the single row of a per-sequence one), or null.
template <typename T>
const T* mask_row(const Tensor& mask, int64_t t, int64_t rows) {
  if (!mask.defined()) {
    return nullptr;
  }
  return mask.const_data_ptr<T>() + (mask.size(0) > 1 ? t : 0) * rows;
}

// ``p + k``, or null for a null ``p`` (an absent mask, lengths or zoneout factor).
template <typename T>
T* shift(T* p, int64_t k) {
  return p == nullptr ? nullptr : p + k;
}

// Rows lo..lo+n of a (B, ...) tensor.
Tensor block(const Tensor& rows, int64_t lo, int64_t n) {
  return n == rows.size(0) ? rows : rows.narrow(0, lo, n);
}

// Rows of a batch never meet in the recurrence: row b of step t needs only row b of step t-1.
// So the LSTM's loops run over blocks of rows, one block per thread, each through all its
// steps without waiting for the others, its per-step product on its own thread: at small
// widths that keeps both cores busy without a fork and join per step (and per kernel), and
// runs the pointwise passes in parallel too. ``whole`` (oneDNN's products, for wide layers):
// one block, whose product per step is large enough to split across the threads itself.
// Blocks depend on the number of threads only, so a run repeats exactly.
template <typename F>
void row_blocks(int64_t batch, bool whole, const F& body) {
  constexpr int64_t min_rows = 4;  // smaller blocks starve the product
  if (whole || at::in_parallel_region() || at::get_num_threads() == 1 || batch < 2 * min_rows) {
    body(0, batch);
    return;
  }
  // The worker threads take the caller's grad mode, autocast and dispatch state, as ATen's
  // calls inside the body must see them.
  const at::ThreadLocalState state;
  at::parallel_for(0, batch, min_rows, [&](int64_t lo, int64_t hi) {
    const at::ThreadLocalStateGuard guard(state);
    body(lo, hi);
  });
}

// --- the per-step recurrent product in float32 ---------------------------------------------
// At the small shape the per-step product (a block of 10 batch rows times the 200x800 W_hh^T
// per thread) was two thirds of the loop's time (results/benchmarks/cpu-loop/): torch.mm
// dispatches, checks and views tensors per call, and the BLAS behind it re-reads W into its own
// layout on every call. Here the product is a register-blocked kernel over raw pointers into
// buffers allocated before the loop: each output element is one fused multiply-add chain over
// k in order, so the AVX2 and AVX-512 versions give the same bits, and so do any number of
// threads and any block of rows (the sums differ from the BLAS's in the last bits only). CPUs
// with neither keep torch.mm. The kernels are compiled for their own instruction sets only
// (target attributes) and chosen at run time, so the build runs on any x86-64.
#if defined(__GNUC__) && defined(__x86_64__)
#define RNNREG_OWN_PRODUCT 1
#endif

// Which kernel this CPU runs: 2 AVX-512, 1 AVX2 with FMA, 0 none (torch.mm).
int product_kernel() {
#ifdef RNNREG_OWN_PRODUCT
  static const int kind = __builtin_cpu_supports("avx512f")                              ? 2
                          : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1
                                                                                            : 0;
  return kind;
#else
  return 0;
#endif
}

#ifdef RNNREG_OWN_PRODUCT
// C (m x n) = A (m x k) B (k x n), row-major with leading dimensions lda, ldb, ldc. A tile is
// MR rows by NV vectors of columns; mask0/mask1 cut the last tile's columns at n.
template <int MR, int NV>
__attribute__((target("avx512f"), always_inline)) inline void tile_avx512(
    const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
    int64_t depth, __mmask16 mask0, __mmask16 mask1) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    const float* bk = b + k * ldb;
    __m512 bv[NV];
    bv[0] = _mm512_maskz_loadu_ps(mask0, bk);
    if constexpr (NV > 1) {
      bv[1] = _mm512_maskz_loadu_ps(mask1, bk + 16);
    }
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + k]);
      for (int v = 0; v < NV; ++v) {
        acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, mask0, acc[r][0]);
    if constexpr (NV > 1) {
      _mm512_mask_storeu_ps(c + r * ldc + 16, mask1, acc[r][1]);
    }
  }
}

template <int NV>
__attribute__((target("avx512f"))) void rows_avx512(const float* a, int64_t lda, const float* b,
                                                    int64_t ldb, float* c, int64_t ldc,
                                                    int64_t rows, int64_t depth, __mmask16 m0,
                                                    __mmask16 m1) {
  // 12 rows by 2 vectors is 24 of the 32 vector registers as accumulators.
  for (; rows > 0; rows -= 12, a += 12 * lda, c += 12 * ldc) {
    switch (rows >= 12 ? 12 : rows) {
#define RNNREG_TILE(R) \
  case R:              \
    tile_avx512<R, NV>(a, lda, b, ldb, c, ldc, depth, m0, m1); \
    break;
      RNNREG_TILE(1) RNNREG_TILE(2) RNNREG_TILE(3) RNNREG_TILE(4) RNNREG_TILE(5) RNNREG_TILE(6)
      RNNREG_TILE(7) RNNREG_TILE(8) RNNREG_TILE(9) RNNREG_TILE(10) RNNREG_TILE(11)
      RNNREG_TILE(12)
#undef RNNREG_TILE
    }
  }
}

__attribute__((target("avx512f"))) void product_avx512(const float* a, int64_t lda,
                                                       const float* b, int64_t ldb, float* c,
                                                       int64_t ldc, int64_t m, int64_t n,
                                                       int64_t depth) {
  for (int64_t j = 0; j < n; j += 32) {
    const int64_t cols = std::min<int64_t>(32, n - j);
    const auto m0 = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
    if (cols > 16) {
      const auto m1 = static_cast<__mmask16>(cols >= 32 ? 0xFFFF : (1u << (cols - 16)) - 1);
      rows_avx512<2>(a, lda, b + j, ldb, c + j, ldc, m, depth, m0, m1);
    } else {
      rows_avx512<1>(a, lda, b + j, ldb, c + j, ldc, m, depth, m0, 0);
    }
  }
}

// The same with 8-wide vectors: 6 rows by 2 vectors is 12 of the 16 registers.
template <int MR>
__attribute__((target("avx2,fma"), always_inline)) inline void tile_avx2(
    const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
    int64_t depth, __m256i mask0, __m256i mask1) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = _mm256_setzero_ps();
    acc[r][1] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < depth; ++k) {
    const float* bk = b + k * ldb;
    const __m256 b0 = _mm256_maskload_ps(bk, mask0);
    const __m256 b1 = _mm256_maskload_ps(bk + 8, mask1);
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    _mm256_maskstore_ps(c + r * ldc, mask0, acc[r][0]);
    _mm256_maskstore_ps(c + r * ldc + 8, mask1, acc[r][1]);
  }
}

// Lane l of the mask is on when l < count (maskload reads nothing where it is off).
__attribute__((target("avx2,fma"), always_inline)) inline __m256i lanes(int64_t count) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), index);
}

__attribute__((target("avx2,fma"))) void product_avx2(const float* a, int64_t lda,
                                                      const float* b, int64_t ldb, float* c,
                                                      int64_t ldc, int64_t m, int64_t n,
                                                      int64_t depth) {
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t cols = std::min<int64_t>(16, n - j);
    const __m256i m0 = lanes(std::min<int64_t>(cols, 8)), m1 = lanes(cols - 8);
    const float* aa = a;
    float* cc = c + j;
    for (int64_t rows = m; rows > 0; rows -= 6, aa += 6 * lda, cc += 6 * ldc) {
      switch (rows >= 6 ? 6 : rows) {
#define RNNREG_TILE(R) \
  case R:              \
    tile_avx2<R>(aa, lda, b + j, ldb, cc, ldc, depth, m0, m1); \
    break;
        RNNREG_TILE(1) RNNREG_TILE(2) RNNREG_TILE(3) RNNREG_TILE(4) RNNREG_TILE(5)
        RNNREG_TILE(6)
#undef RNNREG_TILE
      }
    }
  }
}
#endif

// C = A B on this CPU's kernel (product_kernel() must be nonzero): A (m x depth), B (depth x
// n), C (m x n), row-major with the given leading dimensions.
void own_product(const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                 int64_t ldc, int64_t m, int64_t n, int64_t depth) {
#ifdef RNNREG_OWN_PRODUCT
  if (product_kernel() == 2) {
    product_avx512(a, lda, b, ldb, c, ldc, m, n, depth);
  } else {
    product_avx2(a, lda, b, ldb, c, ldc, m, n, depth);
  }
#else
  TORCH_CHECK(false, "rnnreg: no own product kernel on this CPU");
#endif
}

// own_product when ``own`` (float32 only; B is the tensor's data), else false and nothing done.
template <typename T>
bool own_product_if(bool own, const T* a, int64_t lda, const Tensor& b, int64_t ldb, T* c,
                    int64_t ldc, int64_t m, int64_t n, int64_t depth) {
  if constexpr (std::is_same_v<T, float>) {
    if (own) {
      own_product(a, lda, b.const_data_ptr<float>(), ldb, c, ldc, m, n, depth);
      return true;
    }
  }
  return false;
}

void lstm_forward(const Tensor& projected, const Tensor& w_hh, const OptTensor& packed,
                  const OptTensor& mask_opt, const OptTensor& valid_opt,
                  const OptTensor& zone_h_opt, const OptTensor& zone_c_opt, Tensor acts,
                  Tensor cs, Tensor tanh_c, Tensor hs, const OptTensor& h_in) {
  constexpr const char* op = "lstm_forward";
  TORCH_CHECK(projected.dim() == 3, "rnnreg.lstm_forward: projected must be (T, B, 4H)");
  expect_float(op, projected);
  const auto dt = projected.scalar_type();
  const int64_t steps = projected.size(0), batch = projected.size(1);
  const int64_t hidden = projected.size(2) / 4, rows = batch * hidden;
  expect(op, "projected", projected, dt, {steps, batch, 4 * hidden});
  expect(op, "w_hh", w_hh, dt, {4 * hidden, hidden}, 0, false);
  expect(op, "mask", mask_opt, dt, {-1, batch, hidden}, steps);
  expect(op, "valid", valid_opt, at::kBool, {steps, batch, 1});
  expect(op, "zone_h", zone_h_opt, dt, {-1, batch, hidden}, steps);
  expect(op, "zone_c", zone_c_opt, dt, {-1, batch, hidden}, steps);
  TORCH_CHECK(zone_h_opt.has_value() == zone_c_opt.has_value(),
              "rnnreg.lstm_forward: zone_h and zone_c come together");
  TORCH_CHECK(!(zone_h_opt && valid_opt), "rnnreg.lstm_forward: with zoneout, fold valid into "
              "the zoneout factors");
  expect(op, "acts", acts, dt, {steps, batch, 4 * hidden});
  expect(op, "cs", cs, dt, {steps + 1, batch, hidden});
  expect(op, "tanh_c", tanh_c, dt, {steps, batch, hidden});
  expect(op, "hs", hs, dt, {steps + 1, batch, hidden});
  TORCH_CHECK(mask_opt.has_value() == h_in.has_value(),
              "rnnreg.lstm_forward: h_in is needed exactly when there is a mask");
  expect(op, "h_in", h_in, dt, {steps, batch, hidden});
  const Tensor mask = mask_opt ? *mask_opt : Tensor();
  const Tensor valid = valid_opt ? *valid_opt : Tensor();
  const Tensor zone_h = zone_h_opt ? *zone_h_opt : Tensor();
  const Tensor zone_c = zone_c_opt ? *zone_c_opt : Tensor();
  if (mask.defined()) {
    Tensor first = h_in->select(0, 0);
    at::mul_out(first, hs.select(0, 0), mask.select(0, 0));
  }
  const Tensor w_t = w_hh.t();
  // float32 without oneDNN: the own product (above) reads W_hh^T as a dense (H, 4H) copy.
  const bool own = !packed && dt == at::kFloat && product_kernel() != 0;
  const Tensor w_t_dense = own ? w_t.contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, projected.scalar_type(), "lstm", [&] {
    const scalar_t* proj = projected.const_data_ptr<scalar_t>();
    scalar_t* act = acts.data_ptr<scalar_t>();
    scalar_t* c = cs.data_ptr<scalar_t>();
    scalar_t* h = hs.data_ptr<scalar_t>();
    scalar_t* tc = tanh_c.data_ptr<scalar_t>();
    scalar_t* x_in = mask.defined() ? h_in->data_ptr<scalar_t>() : nullptr;
    const bool* alive = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
    row_blocks(batch, packed.has_value(), [&](int64_t lo, int64_t hi) {
      const int64_t n = hi - lo, r0 = lo * hidden;
      // The product's buffer, allocated once per block; the projected input is added in the
      // pass. oneDNN's op returns a fresh tensor instead, read in place.
      Tensor pre = at::empty({n, 4 * hidden}, projected.options());
      scalar_t* pre_data = pre.data_ptr<scalar_t>();
      for (int64_t t = 0; t < steps; ++t) {
        const bool next = mask.defined() && t + 1 < steps;
        const int64_t now = t * rows + r0, after = (t + 1) * rows + r0;
        const scalar_t* product = pre_data;
        Tensor fresh;  // oneDNN's result, alive until the pass has read it
        // The spans name the per-step work for torch.profiler (profile_loop.py); when no
        // profiler runs, each is a check of a thread-local flag.
        {
          RECORD_FUNCTION("rnnreg::forward_step_product", std::vector<c10::IValue>());
          if (!own_product_if(own, (x_in != nullptr ? x_in : h) + now, hidden, w_t_dense,
                              4 * hidden, pre_data, 4 * hidden, n, 4 * hidden, hidden)) {
            const Tensor x =
                block(mask.defined() ? h_in->select(0, t) : hs.select(0, t), lo, n);
            if (packed) {
              fresh = onednn_linear(x, *packed, std::nullopt);
              product = fresh.const_data_ptr<scalar_t>();
            } else {
              at::mm_out(pre, x, w_t);
            }
          }
        }
        RECORD_FUNCTION("rnnreg::forward_step_pointwise", std::vector<c10::IValue>());
        const ForwardStep<scalar_t> step{
            product, proj + 4 * now, act + 4 * now, c + now,
            c + after, tc + now, h + now, h + after, shift(alive, t * batch + lo),
            shift(mask_row<scalar_t>(zone_h, t, rows), r0),
            shift(mask_row<scalar_t>(zone_c, t, rows), r0),
            next ? mask_row<scalar_t>(mask, t + 1, rows) + r0 : nullptr,
            next ? x_in + after : nullptr};
        lstm_step(step, n, hidden);
      }
    });
  });
}

// One backward step's gate gradients, straight from the forward's saved activations (the
// coefficients of recurrence.py's _LSTM, formed here per step instead of in bulk): with
// dh = dL/dh(t) and dc = dL/dc(t) from step t+1,
//   dcc = dc + dh o (1 - tanh(c)^2),  d[i, f, g] = dcc [g i (1-i), c(t-1) f (1-f), i (1-g^2)],
//   d_o = dh tanh(c) o (1-o),  and, in place, dc <- dcc f.
// Past a sequence's end (alive[b] false) the step is the identity: zero gate gradients, dc kept.
// With zoneout (Zoned; factors zone_h, zone_c) only (1 - d) of dh and dc reaches the candidate
// h~ and c~, and dc <- dcc f + d_c dc (d_h dh is previous_state's part).
template <typename T, bool Zoned>
RNNREG_INLINE void gate_row(const T* __restrict__ dh, T* __restrict__ dc, const T* __restrict__ a,
                            const T* __restrict__ c_prev, const T* __restrict__ tanh_c,
                            const T* __restrict__ zone_h, const T* __restrict__ zone_c,
                            T* __restrict__ d, int64_t hidden) {
  for (int64_t j = 0; j < hidden; ++j) {
    const Acc<T> i = a[j], f = a[hidden + j], g = a[2 * hidden + j], o = a[3 * hidden + j];
    const Acc<T> tc = tanh_c[j], dc_j = dc[j];
    Acc<T> dh_j = dh[j], dc_new = dc_j;
    if constexpr (Zoned) {
      dh_j *= Acc<T>(1) - Acc<T>(zone_h[j]);
      dc_new *= Acc<T>(1) - Acc<T>(zone_c[j]);
    }
    const Acc<T> dcc = dc_new + dh_j * o * (Acc<T>(1) - tc * tc);
    d[j] = dcc * g * i * (Acc<T>(1) - i);
    d[hidden + j] = dcc * Acc<T>(c_prev[j]) * f * (Acc<T>(1) - f);
    d[2 * hidden + j] = dcc * i * (Acc<T>(1) - g * g);
    d[3 * hidden + j] = dh_j * tc * o * (Acc<T>(1) - o);
    if constexpr (Zoned) {
      dc[j] = dcc * f + Acc<T>(zone_c[j]) * dc_j;
    } else {
      dc[j] = dcc * f;
    }
  }
}

template <typename T>
RNNREG_INLINE void gate_gradients(const T* __restrict__ dh, T* __restrict__ dc,
                                  const T* __restrict__ gates, const T* __restrict__ c_prev,
                                  const T* __restrict__ tanh_c, const bool* alive,
                                  const T* __restrict__ zone_h, const T* __restrict__ zone_c,
                                  T* __restrict__ d_gates, int64_t batch, int64_t hidden) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t base = b * hidden, row = b * 4 * hidden;
    T* __restrict__ d = d_gates + row;
    if (alive != nullptr && !alive[b]) {
      std::fill(d, d + 4 * hidden, T(0));
      continue;
    }
    if (zone_h != nullptr) {
      gate_row<T, true>(dh + base, dc + base, gates + row, c_prev + base, tanh_c + base,
                        zone_h + base, zone_c + base, d, hidden);
    } else {
      gate_row<T, false>(dh + base, dc + base, gates + row, c_prev + base, tanh_c + base,
                         nullptr, nullptr, d, hidden);
    }
  }
}

// dL/dh(t-1) in place of dh: the gradient of output t-1 (absent at t = 0), plus the masked
// recurrent product's, plus dh itself where the sequence has ended (passthrough 1), or the
// zoneout factor d_h times dh for every unit (zone, row t).
template <typename T>
RNNREG_INLINE void previous_state(T* __restrict__ dh, const T* __restrict__ d_out_prev,
                                  const T* __restrict__ d_hin, const T* __restrict__ mask,
                                  const T* __restrict__ passthrough, const T* __restrict__ zone,
                                  int64_t batch, int64_t hidden) {
  for (int64_t b = 0; b < batch; ++b) {
    T* __restrict__ out = dh + b * hidden;
    const T* __restrict__ d = d_hin + b * hidden;
    // Through the frozen (or zoned-out) state first, while dh still holds dL/dh(t).
    if (zone) {
      const T* __restrict__ keep = zone + b * hidden;
      for (int64_t j = 0; j < hidden; ++j) {
        out[j] = Acc<T>(keep[j]) * Acc<T>(out[j]);
      }
    } else if (passthrough) {
      const Acc<T> carry = passthrough[b];
      for (int64_t j = 0; j < hidden; ++j) {
        out[j] = carry * Acc<T>(out[j]);
      }
    } else {
      std::fill(out, out + hidden, T(0));
    }
    if (mask) {
      const T* __restrict__ m = mask + b * hidden;
      for (int64_t j = 0; j < hidden; ++j) {
        out[j] = Acc<T>(out[j]) + Acc<T>(d[j]) * Acc<T>(m[j]);
      }
    } else {
      for (int64_t j = 0; j < hidden; ++j) {
        out[j] = Acc<T>(out[j]) + Acc<T>(d[j]);
      }
    }
    if (d_out_prev) {
      const T* __restrict__ g = d_out_prev + b * hidden;
      for (int64_t j = 0; j < hidden; ++j) {
        out[j] = Acc<T>(out[j]) + Acc<T>(g[j]);
      }
    }
  }
}

// The backward's passes for float32, in the CPU-specific versions (see lstm_step).
RNNREG_VECTOR_CLONES void gate_gradients(const float* dh, float* dc, const float* gates,
                                         const float* c_prev, const float* tanh_c,
                                         const bool* alive, const float* zone_h,
                                         const float* zone_c, float* d_gates, int64_t batch,
                                         int64_t hidden) {
  gate_gradients<float>(dh, dc, gates, c_prev, tanh_c, alive, zone_h, zone_c, d_gates, batch,
                        hidden);
}

RNNREG_VECTOR_CLONES void previous_state(float* dh, const float* d_out_prev, const float* d_hin,
                                         const float* mask, const float* passthrough,
                                         const float* zone, int64_t batch, int64_t hidden) {
  previous_state<float>(dh, d_out_prev, d_hin, mask, passthrough, zone, batch, hidden);
}

// Returns (dL/dh0, dL/dc0); not yet those when need_first is false.
std::tuple<Tensor, Tensor> lstm_backward(const Tensor& d_out_in, const Tensor& d_h,
                                         const Tensor& d_c, const Tensor& acts,
                                         const Tensor& cs, const Tensor& tanh_c,
                                         const OptTensor& valid_opt, const Tensor& w_hh,
                                         bool onednn, const OptTensor& mask_opt,
                                         const OptTensor& passthrough_opt,
                                         const OptTensor& zone_h_opt,
                                         const OptTensor& zone_c_opt, bool need_first,
                                         Tensor d_gates, Tensor d_hin) {
  constexpr const char* op = "lstm_backward";
  TORCH_CHECK(d_gates.dim() == 3, "rnnreg.lstm_backward: d_gates must be (T, B, 4H)");
  expect_float(op, d_gates);
  const auto dt = d_gates.scalar_type();
  const int64_t steps = d_gates.size(0), batch = d_gates.size(1);
  const int64_t hidden = d_gates.size(2) / 4, rows = batch * hidden;
  expect(op, "d_gates", d_gates, dt, {steps, batch, 4 * hidden});
  expect(op, "d_out", d_out_in, dt, {steps, batch, hidden});
  expect(op, "d_h", d_h, dt, {batch, hidden}, 0, false);
  expect(op, "d_c", d_c, dt, {batch, hidden}, 0, false);
  expect(op, "acts", acts, dt, {steps, batch, 4 * hidden});
  expect(op, "cs", cs, dt, {steps + 1, batch, hidden});
  expect(op, "tanh_c", tanh_c, dt, {steps, batch, hidden});
  expect(op, "valid", valid_opt, at::kBool, {steps, batch, 1});
  expect(op, "w_hh", w_hh, dt, {4 * hidden, hidden}, 0, false);
  expect(op, "mask", mask_opt, dt, {-1, batch, hidden}, steps);
  expect(op, "passthrough", passthrough_opt, dt, {steps, batch, 1});
  expect(op, "zone_h", zone_h_opt, dt, {-1, batch, hidden}, steps);
  expect(op, "zone_c", zone_c_opt, dt, {-1, batch, hidden}, steps);
  TORCH_CHECK(zone_h_opt.has_value() == zone_c_opt.has_value(),
              "rnnreg.lstm_backward: zone_h and zone_c come together");
  TORCH_CHECK(!(zone_h_opt && (valid_opt || passthrough_opt)), "rnnreg.lstm_backward: with "
              "zoneout, fold valid into the zoneout factors");
  expect(op, "d_hin", d_hin, dt, {steps, batch, hidden});
  const Tensor& d_out = d_out_in;
  const Tensor mask = mask_opt ? *mask_opt : Tensor();
  const Tensor valid = valid_opt ? *valid_opt : Tensor();  // (T, B, 1)
  const Tensor passthrough = passthrough_opt ? *passthrough_opt : Tensor();
  const Tensor zone_h = zone_h_opt ? *zone_h_opt : Tensor();
  const Tensor zone_c = zone_c_opt ? *zone_c_opt : Tensor();
  Tensor dh = (d_out.select(0, steps - 1) + d_h).contiguous();
  Tensor dc = d_c.contiguous().clone();
  // float32 without oneDNN: the own product (see lstm_forward) reads W_hh's rows densely.
  const bool own = !onednn && dt == at::kFloat && product_kernel() != 0;
  const Tensor w_rows = own ? w_hh.contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, d_gates.scalar_type(), "lstm", [&] {
    scalar_t* dh_all = dh.data_ptr<scalar_t>();
    scalar_t* dc_all = dc.data_ptr<scalar_t>();
    const scalar_t* act = acts.const_data_ptr<scalar_t>();
    const scalar_t* c = cs.const_data_ptr<scalar_t>();
    const scalar_t* tc = tanh_c.const_data_ptr<scalar_t>();
    const scalar_t* d_prev = d_out.const_data_ptr<scalar_t>();
    const scalar_t* carry = passthrough.defined() ? passthrough.const_data_ptr<scalar_t>()
                                                  : nullptr;
    const bool* alive = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
    scalar_t* d_all = d_gates.data_ptr<scalar_t>();
    scalar_t* d_hin_all = d_hin.data_ptr<scalar_t>();
    row_blocks(batch, onednn, [&](int64_t lo, int64_t hi) {
      const int64_t n = hi - lo, r0 = lo * hidden;
      for (int64_t t = steps - 1; t >= 0; --t) {
        const int64_t now = t * rows + r0;
        const scalar_t* zh = shift(mask_row<scalar_t>(zone_h, t, rows), r0);
        {
          RECORD_FUNCTION("rnnreg::backward_step_pointwise", std::vector<c10::IValue>());
          gate_gradients(dh_all + r0, dc_all + r0, act + 4 * now, c + now, tc + now,
                         shift(alive, t * batch + lo), zh,
                         shift(mask_row<scalar_t>(zone_c, t, rows), r0), d_all + 4 * now,
                         n, hidden);
        }
        if (t == 0 && !need_first) {
          break;
        }
        scalar_t* d_row = d_hin_all + now;
        {
          RECORD_FUNCTION("rnnreg::backward_step_product", std::vector<c10::IValue>());
          if (!own_product_if(own, static_cast<const scalar_t*>(d_all + 4 * now), 4 * hidden,
                              w_rows, hidden, d_row, hidden, n, hidden, 4 * hidden)) {
            Tensor d_block = block(d_hin.select(0, t), lo, n);
            product_backward(d_block, block(d_gates.select(0, t), lo, n), w_hh, onednn);
          }
        }
        RECORD_FUNCTION("rnnreg::backward_step_pointwise", std::vector<c10::IValue>());
        previous_state(dh_all + r0, t > 0 ? d_prev + (t - 1) * rows + r0 : nullptr,
                       static_cast<const scalar_t*>(d_row),
                       shift(mask_row<scalar_t>(mask, t, rows), r0),
                       shift(carry, t * batch + lo), zh, n, hidden);
      }
    });
  });
  return {dh, dc};  // not yet dL/dh0, dL/dc0 when need_first is false: the caller ignores them
}

void gru_forward(const Tensor& projected, const Tensor& w_hh, const OptTensor& b_hh,
                 const OptTensor& packed, const OptTensor& mask, const OptTensor& valid,
                 const OptTensor& zone, Tensor rec, Tensor rz, Tensor n, Tensor hs,
                 const OptTensor& h_in) {
  constexpr const char* op = "gru_forward";
  TORCH_CHECK(projected.dim() == 3, "rnnreg.gru_forward: projected must be (T, B, 3H)");
  expect_float(op, projected);
  const auto dt = projected.scalar_type();
  const int64_t steps = projected.size(0), batch = projected.size(1);
  const int64_t hidden = projected.size(2) / 3;
  expect(op, "projected", projected, dt, {steps, batch, 3 * hidden});
  expect(op, "w_hh", w_hh, dt, {3 * hidden, hidden}, 0, false);
  expect(op, "b_hh", b_hh, dt, {3 * hidden}, 0, false);
  expect(op, "mask", mask, dt, {-1, batch, hidden}, steps, false);
  expect(op, "valid", valid, at::kBool, {steps, batch, 1}, 0, false);
  expect(op, "zone", zone, dt, {-1, batch, hidden}, steps, false);
  expect(op, "rec", rec, dt, {steps, batch, 3 * hidden});
  expect(op, "rz", rz, dt, {steps, batch, 2 * hidden});
  expect(op, "n", n, dt, {steps, batch, hidden});
  expect(op, "hs", hs, dt, {steps + 1, batch, hidden});
  TORCH_CHECK(mask.has_value() == h_in.has_value(),
              "rnnreg.gru_forward: h_in is needed exactly when there is a mask");
  expect(op, "h_in", h_in, dt, {steps, batch, hidden});
  const Tensor bias = b_hh ? *b_hh : Tensor();
  for (int64_t t = 0; t < steps; ++t) {
    Tensor h = hs.select(0, t);
    Tensor x = masked_state(h, mask, h_in, t);
    Tensor a = rec.select(0, t);
    product_forward(a, x, bias, w_hh, packed);
    Tensor p = projected.select(0, t);
    Tensor rz_t = rz.select(0, t);
    at::add_out(rz_t, p.narrow(1, 0, 2 * hidden), a.narrow(1, 0, 2 * hidden)).sigmoid_();
    Tensor n_t = n.select(0, t);
    at::addcmul_out(n_t, p.narrow(1, 2 * hidden, hidden), rz_t.narrow(1, 0, hidden),
                    a.narrow(1, 2 * hidden, hidden))
        .tanh_();
    Tensor h_new = hs.select(0, t + 1);
    at::lerp_out(h_new, n_t, h, rz_t.narrow(1, hidden, hidden));
    if (zone) {  // zoneout: d h(t-1) + (1 - d) h~
      h_new.lerp_(h, mask_at(zone, t));
    }
    freeze(h_new, h, valid, t);
  }
}

// Returns dL/dh0 (a tensor to ignore when need_first is false); fills d_rec and d_hs, d_hin.
Tensor gru_backward(const Tensor& d_out, const Tensor& d_h, const Tensor& coef,
                    const Tensor& keep_h, const Tensor& w_hh, bool onednn,
                    const OptTensor& mask, bool need_first, Tensor d_rec, Tensor d_hs,
                    Tensor d_hin) {
  constexpr const char* op = "gru_backward";
  TORCH_CHECK(d_rec.dim() == 3, "rnnreg.gru_backward: d_rec must be (T, B, 3H)");
  expect_float(op, d_rec);
  const auto dt = d_rec.scalar_type();
  const int64_t steps = d_rec.size(0), batch = d_rec.size(1);
  const int64_t hidden = d_rec.size(2) / 3;
  expect(op, "d_rec", d_rec, dt, {steps, batch, 3 * hidden});
  expect(op, "d_out", d_out, dt, {steps, batch, hidden}, 0, false);
  expect(op, "d_h", d_h, dt, {batch, hidden}, 0, false);
  expect(op, "coef", coef, dt, {steps, batch, 3, hidden}, 0, false);
  expect(op, "keep_h", keep_h, dt, {-1, batch, hidden}, steps, false);
  expect(op, "w_hh", w_hh, dt, {3 * hidden, hidden}, 0, false);
  expect(op, "mask", mask, dt, {-1, batch, hidden}, steps, false);
  expect(op, "d_hs", d_hs, dt, {steps, batch, hidden});
  expect(op, "d_hin", d_hin, dt, {steps, batch, hidden});
  Tensor split = d_rec.view({steps, batch, 3, hidden});
  Tensor last = d_hs.select(0, steps - 1);
  at::add_out(last, d_out.select(0, steps - 1), d_h);
  Tensor prev;
  for (int64_t t = steps - 1; t >= 0; --t) {
    Tensor dh = d_hs.select(0, t);
    Tensor d_step = split.select(0, t);
    at::mul_out(d_step, dh.unsqueeze(1), coef.select(0, t));
    if (t == 0 && !need_first) {
      return at::empty_like(d_h);  // ignored by the caller
    }
    Tensor d_row = d_hin.select(0, t);
    product_backward(d_row, d_rec.select(0, t), w_hh, onednn);
    prev = previous(d_out, d_hin, mask, t, dh, std::nullopt,
                    t > 0 ? OptTensor(d_hs.select(0, t - 1)) : std::nullopt);
    prev.addcmul_(dh, keep_h.select(0, keep_h.size(0) > 1 ? t : 0));
  }
  return prev;
}

// With zoneout the activation goes to candidates[t] (kept for act' in the backward) and
// h(t) = d h(t-1) + (1 - d) candidates[t].
void elman_forward(const Tensor& projected, const Tensor& w_hh, const OptTensor& packed,
                   const OptTensor& mask, const OptTensor& valid, bool relu,
                   const OptTensor& zone, const OptTensor& candidates, Tensor hs,
                   const OptTensor& h_in) {
  constexpr const char* op = "elman_forward";
  TORCH_CHECK(projected.dim() == 3, "rnnreg.elman_forward: projected must be (T, B, H)");
  expect_float(op, projected);
  const auto dt = projected.scalar_type();
  const int64_t steps = projected.size(0), batch = projected.size(1);
  const int64_t hidden = projected.size(2);
  expect(op, "projected", projected, dt, {steps, batch, hidden}, 0, false);
  expect(op, "w_hh", w_hh, dt, {hidden, hidden}, 0, false);
  expect(op, "mask", mask, dt, {-1, batch, hidden}, steps, false);
  expect(op, "valid", valid, at::kBool, {steps, batch, 1}, 0, false);
  expect(op, "zone", zone, dt, {-1, batch, hidden}, steps, false);
  TORCH_CHECK(zone.has_value() == candidates.has_value(),
              "rnnreg.elman_forward: candidates are needed exactly with zoneout");
  expect(op, "candidates", candidates, dt, {steps, batch, hidden});
  expect(op, "hs", hs, dt, {steps + 1, batch, hidden});
  TORCH_CHECK(mask.has_value() == h_in.has_value(),
              "rnnreg.elman_forward: h_in is needed exactly when there is a mask");
  expect(op, "h_in", h_in, dt, {steps, batch, hidden});
  for (int64_t t = 0; t < steps; ++t) {
    Tensor h = hs.select(0, t);
    Tensor x = masked_state(h, mask, h_in, t);
    Tensor h_new = zone ? candidates->select(0, t) : hs.select(0, t + 1);
    product_forward(h_new, x, projected.select(0, t), w_hh, packed);
    if (relu) {
      h_new.relu_();
    } else {
      h_new.tanh_();
    }
    if (zone) {
      Tensor kept = hs.select(0, t + 1);
      at::lerp_out(kept, h_new, h, mask_at(zone, t));
      h_new = kept;
    }
    freeze(h_new, h, valid, t);
  }
}

// Returns dL/dh0 (a tensor to ignore when need_first is false); fills d_pre and d_hin.
Tensor elman_backward(const Tensor& d_out, const Tensor& d_h, const Tensor& slope,
                      const Tensor& w_hh, bool onednn, const OptTensor& mask,
                      const OptTensor& passthrough, bool need_first, Tensor d_pre,
                      Tensor d_hin) {
  constexpr const char* op = "elman_backward";
  TORCH_CHECK(d_pre.dim() == 3, "rnnreg.elman_backward: d_pre must be (T, B, H)");
  expect_float(op, d_pre);
  const auto dt = d_pre.scalar_type();
  const int64_t steps = d_pre.size(0), batch = d_pre.size(1), hidden = d_pre.size(2);
  expect(op, "d_pre", d_pre, dt, {steps, batch, hidden});
  expect(op, "d_out", d_out, dt, {steps, batch, hidden}, 0, false);
  expect(op, "d_h", d_h, dt, {batch, hidden}, 0, false);
  expect(op, "slope", slope, dt, {steps, batch, hidden}, 0, false);
  expect(op, "w_hh", w_hh, dt, {hidden, hidden}, 0, false);
  expect(op, "mask", mask, dt, {-1, batch, hidden}, steps, false);
  if (passthrough) {  // (T, B, 1) past the sequences' ends, (T, B, H) with zoneout
    TORCH_CHECK(passthrough->dim() == 3 && passthrough->size(0) == steps &&
                    passthrough->size(1) == batch &&
                    (passthrough->size(2) == 1 || passthrough->size(2) == hidden) &&
                    passthrough->scalar_type() == dt,
                "rnnreg.elman_backward: passthrough must be (T, B, 1) or (T, B, H) of ", dt,
                ", got ", passthrough->sizes(), " of ", passthrough->scalar_type());
  }
  expect(op, "d_hin", d_hin, dt, {steps, batch, hidden});
  Tensor dh = d_out.select(0, steps - 1) + d_h;
  for (int64_t t = steps - 1; t >= 0; --t) {
    Tensor d_step = d_pre.select(0, t);
    at::mul_out(d_step, dh, slope.select(0, t));
    if (t == 0 && !need_first) {
      return dh;  // not yet dL/dh0: ignored by the caller
    }
    Tensor d_row = d_hin.select(0, t);
    product_backward(d_row, d_step, w_hh, onednn);
    dh = previous(d_out, d_hin, mask, t, dh, passthrough, std::nullopt);
  }
  return dh;
}

}  // namespace

// Schemas: argument names are the Python twins' (python.py), buffers the loops fill are
// marked mutable (a!), and the backward loops return fresh (B, H) tensors: dL/dh0 (and
// dL/dc0), or, when need_first is false, ones the caller ignores. ``packed`` is oneDNN's
// blocked W_hh or None.
TORCH_LIBRARY(rnnreg, m) {
  m.def("lstm_forward(Tensor projected, Tensor w_hh, Tensor? packed, Tensor? mask, "
        "Tensor? valid, Tensor? zone_h, Tensor? zone_c, Tensor(a!) acts, Tensor(b!) cs, "
        "Tensor(c!) tanh_c, Tensor(d!) hs, Tensor(e!)? h_in) -> ()");
  m.def("lstm_backward(Tensor d_out, Tensor d_h, Tensor d_c, Tensor acts, Tensor cs, "
        "Tensor tanh_c, Tensor? valid, Tensor w_hh, bool onednn, Tensor? mask, "
        "Tensor? passthrough, Tensor? zone_h, Tensor? zone_c, bool need_first, "
        "Tensor(a!) d_gates, Tensor(b!) d_hin) -> (Tensor, Tensor)");
  m.def("gru_forward(Tensor projected, Tensor w_hh, Tensor? b_hh, Tensor? packed, "
        "Tensor? mask, Tensor? valid, Tensor? zone, Tensor(a!) rec, Tensor(b!) rz, "
        "Tensor(c!) n, Tensor(d!) hs, Tensor(e!)? h_in) -> ()");
  m.def("gru_backward(Tensor d_out, Tensor d_h, Tensor coef, Tensor keep_h, Tensor w_hh, "
        "bool onednn, Tensor? mask, bool need_first, Tensor(a!) d_rec, Tensor(b!) d_hs, "
        "Tensor(c!) d_hin) -> Tensor");
  m.def("elman_forward(Tensor projected, Tensor w_hh, Tensor? packed, Tensor? mask, "
        "Tensor? valid, bool relu, Tensor? zone, Tensor(a!)? candidates, Tensor(b!) hs, "
        "Tensor(c!)? h_in) -> ()");
  m.def("elman_backward(Tensor d_out, Tensor d_h, Tensor slope, Tensor w_hh, bool onednn, "
        "Tensor? mask, Tensor? passthrough, bool need_first, Tensor(a!) d_pre, "
        "Tensor(b!) d_hin) -> Tensor");
}

void register_kernels(torch::Library& m) {
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
  m.impl("gru_forward", &gru_forward);
  m.impl("gru_backward", &gru_backward);
  m.impl("elman_forward", &elman_forward);
  m.impl("elman_backward", &elman_backward);
}

TORCH_LIBRARY_IMPL(rnnreg, CPU, m) { register_kernels(m); }

// oneDNN's packed W_hh is an MkldnnCPU tensor, which sends the whole call to that key.
TORCH_LIBRARY_IMPL(rnnreg, MkldnnCPU, m) { register_kernels(m); }
