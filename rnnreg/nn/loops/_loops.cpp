// rnnreg's per-step loops in C++, twins of the Python loops in python.py without the
// interpreter between the calls. At the paper's small shape a step is a 20x200 by 200x800
// product and a handful of elementwise kernels of a few microseconds each, so the
// interpreter's few microseconds per call were a third of the loop's time. The GRU and Elman
// loops make the same ATen calls as their Python twins; the LSTM's fuses its plain arithmetic
// (see below).
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
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

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

// The LSTM, the cell the paper is about, goes one step further: the gate arithmetic that needs
// no transcendental function runs in one plain pass per step (compiled to vector code) instead
// of three or four ATen kernels, each with a few microseconds of setup for 4000 numbers. The
// arithmetic is in at::opmath_type (float for bfloat16/half), like ATen's own kernels.
template <typename T>
using Acc = at::opmath_type<T>;

// c(t) = f * c(t-1) + i * g for one step, gates rows of 4H in torch's order [i, f, g, o].
template <typename T>
void cell_update(const T* __restrict__ gates, const T* __restrict__ c_old, T* __restrict__ c_new,
                 int64_t batch, int64_t hidden) {
  for (int64_t b = 0; b < batch; ++b) {
    const T* __restrict__ i = gates + b * 4 * hidden;
    const T* __restrict__ f = i + hidden;
    const T* __restrict__ g = i + 2 * hidden;
    const T* __restrict__ c = c_old + b * hidden;
    T* __restrict__ out = c_new + b * hidden;
    for (int64_t j = 0; j < hidden; ++j) {
      out[j] = Acc<T>(f[j]) * Acc<T>(c[j]) + Acc<T>(i[j]) * Acc<T>(g[j]);
    }
  }
}

// h(t) = o * tanh(c(t)); past a sequence's end (alive[b] false) h and c keep their old values.
// With zoneout factors d_h, d_c (zone_h non-null; the sequence ends are folded into them) each
// unit keeps d times its old value: h(t) = d_h h(t-1) + (1 - d_h) o tanh(c~), and likewise c(t)
// from the candidate c~ that c_new holds on entry.
// Also writes m(t+1) * h(t), the next step's input to the recurrent product, if asked.
template <typename T>
void cell_output(const T* __restrict__ gates, const T* __restrict__ tanh_c,
                 const T* __restrict__ h_old, const T* __restrict__ c_old, T* __restrict__ h_new,
                 T* __restrict__ c_new, const bool* alive, const T* __restrict__ zone_h,
                 const T* __restrict__ zone_c, const T* __restrict__ next_mask,
                 T* __restrict__ next_in, int64_t batch, int64_t hidden) {
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t base = b * hidden;
    const T* __restrict__ o = gates + b * 4 * hidden + 3 * hidden;
    if (zone_h != nullptr) {
      for (int64_t j = 0; j < hidden; ++j) {
        const Acc<T> dh = zone_h[base + j], dc = zone_c[base + j];
        const Acc<T> h = Acc<T>(o[j]) * Acc<T>(tanh_c[base + j]);
        h_new[base + j] = dh * Acc<T>(h_old[base + j]) + (Acc<T>(1) - dh) * h;
        c_new[base + j] = dc * Acc<T>(c_old[base + j]) + (Acc<T>(1) - dc) * Acc<T>(c_new[base + j]);
      }
    } else if (alive == nullptr || alive[b]) {
      for (int64_t j = 0; j < hidden; ++j) {
        h_new[base + j] = Acc<T>(o[j]) * Acc<T>(tanh_c[base + j]);
      }
    } else {
      for (int64_t j = 0; j < hidden; ++j) {
        h_new[base + j] = h_old[base + j];
        c_new[base + j] = c_old[base + j];
      }
    }
    if (next_in != nullptr) {
      for (int64_t j = 0; j < hidden; ++j) {
        next_in[base + j] = Acc<T>(h_new[base + j]) * Acc<T>(next_mask[base + j]);
      }
    }
  }
}

// Pointer to row t of a (T|1, B, H) mask (the single row of a per-sequence one), or null.
template <typename T>
const T* mask_row(const Tensor& mask, int64_t t, int64_t rows) {
  if (!mask.defined()) {
    return nullptr;
  }
  return mask.const_data_ptr<T>() + (mask.size(0) > 1 ? t : 0) * rows;
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
  Tensor pre = at::empty({batch, 4 * hidden}, projected.options());
  Tensor pre_g = pre.narrow(1, 2 * hidden, hidden);
  if (mask.defined()) {
    Tensor first = h_in->select(0, 0);
    at::mul_out(first, hs.select(0, 0), mask.select(0, 0));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, projected.scalar_type(), "lstm", [&] {
    const scalar_t* next_mask = nullptr;
    for (int64_t t = 0; t < steps; ++t) {
      Tensor x = mask.defined() ? h_in->select(0, t) : hs.select(0, t);
      product_forward(pre, x, projected.select(0, t), w_hh, packed);
      Tensor a = acts.select(0, t);
      at::sigmoid_out(a, pre);  // all four gates in one kernel; g's quarter is redone next
      Tensor g = a.view({batch, 4, hidden}).select(1, 2);
      at::tanh_out(g, pre_g);
      const scalar_t* gates = a.const_data_ptr<scalar_t>();
      const scalar_t* c_old = cs.select(0, t).const_data_ptr<scalar_t>();
      scalar_t* c_new = cs.select(0, t + 1).data_ptr<scalar_t>();
      cell_update(gates, c_old, c_new, batch, hidden);
      Tensor tc = tanh_c.select(0, t);
      at::tanh_out(tc, cs.select(0, t + 1));
      const bool last = t + 1 == steps;
      next_mask = mask.defined() && !last ? mask_row<scalar_t>(mask, t + 1, rows) : nullptr;
      cell_output(gates, tc.const_data_ptr<scalar_t>(),
                  hs.select(0, t).const_data_ptr<scalar_t>(), c_old,
                  hs.select(0, t + 1).data_ptr<scalar_t>(), c_new,
                  valid.defined() ? valid.select(0, t).const_data_ptr<bool>() : nullptr,
                  mask_row<scalar_t>(zone_h, t, rows), mask_row<scalar_t>(zone_c, t, rows),
                  next_mask, next_mask ? h_in->select(0, t + 1).data_ptr<scalar_t>() : nullptr,
                  batch, hidden);
    }
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
void gate_row(const T* __restrict__ dh, T* __restrict__ dc, const T* __restrict__ a,
              const T* __restrict__ c_prev, const T* __restrict__ tanh_c,
              const T* __restrict__ zone_h, const T* __restrict__ zone_c, T* __restrict__ d,
              int64_t hidden) {
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
void gate_gradients(const T* __restrict__ dh, T* __restrict__ dc, const T* __restrict__ gates,
                    const T* __restrict__ c_prev, const T* __restrict__ tanh_c,
                    const bool* alive, const T* __restrict__ zone_h,
                    const T* __restrict__ zone_c, T* __restrict__ d_gates, int64_t batch,
                    int64_t hidden) {
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
void previous_state(T* __restrict__ dh, const T* __restrict__ d_out_prev,
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, d_gates.scalar_type(), "lstm", [&] {
    for (int64_t t = steps - 1; t >= 0; --t) {
      const int64_t base = t * rows;
      gate_gradients(dh.const_data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
                     acts.const_data_ptr<scalar_t>() + 4 * base,
                     cs.const_data_ptr<scalar_t>() + base,
                     tanh_c.const_data_ptr<scalar_t>() + base,
                     valid.defined() ? valid.const_data_ptr<bool>() + t * batch : nullptr,
                     mask_row<scalar_t>(zone_h, t, rows), mask_row<scalar_t>(zone_c, t, rows),
                     d_gates.data_ptr<scalar_t>() + 4 * base, batch, hidden);
      if (t == 0 && !need_first) {
        break;
      }
      Tensor d_row = d_hin.select(0, t);
      product_backward(d_row, d_gates.select(0, t), w_hh, onednn);
      previous_state(dh.data_ptr<scalar_t>(),
                     t > 0 ? d_out.const_data_ptr<scalar_t>() + (t - 1) * rows : nullptr,
                     d_row.const_data_ptr<scalar_t>(), mask_row<scalar_t>(mask, t, rows),
                     passthrough.defined()
                         ? passthrough.const_data_ptr<scalar_t>() + t * batch : nullptr,
                     mask_row<scalar_t>(zone_h, t, rows), batch, hidden);
    }
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
