// rnnreg's per-step loops in C++: the same ATen calls as the Python loops in recurrence.py,
// minus the Python interpreter between them. At the paper's small shape a step is a 20x200 by
// 200x800 product and a handful of elementwise kernels of a few microseconds each, so the
// interpreter's few microseconds per call were a third of the loop's time.
//
// Every function fills buffers that recurrence.py allocated and reads tensors it prepared, in
// the same order as the Python loop it replaces; the equations are documented there.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string_view>

using at::Tensor;
using OptTensor = std::optional<Tensor>;

namespace {

// oneDNN's linear, X W^T (+ bias), W packed or a plain strided matrix: recurrence.py decides
// when it pays (_onednn_pays) and passes the packed weight or the oneDNN flag.
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

// dL/dh(t-1) from step t (recurrence.py's _previous): through the masked product, plus the
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

void lstm_forward(const Tensor& projected, const Tensor& w_hh, const OptTensor& packed,
                  const OptTensor& mask, const OptTensor& valid, Tensor acts, Tensor cs,
                  Tensor tanh_c, Tensor hs, const OptTensor& h_in) {
  const int64_t steps = projected.size(0), batch = projected.size(1);
  const int64_t hidden = projected.size(2) / 4;
  Tensor pre = at::empty({batch, 4 * hidden}, projected.options());
  Tensor pre_g = pre.narrow(1, 2 * hidden, hidden);
  for (int64_t t = 0; t < steps; ++t) {
    Tensor h = hs.select(0, t);
    Tensor x = masked_state(h, mask, h_in, t);
    product_forward(pre, x, projected.select(0, t), w_hh, packed);
    Tensor a = acts.select(0, t);
    at::sigmoid_out(a, pre);
    Tensor gates = a.view({batch, 4, hidden});
    Tensor i = gates.select(1, 0), f = gates.select(1, 1), g = gates.select(1, 2),
           o = gates.select(1, 3);
    at::tanh_out(g, pre_g);
    Tensor c = cs.select(0, t + 1);
    at::mul_out(c, f, cs.select(0, t)).addcmul_(i, g);
    Tensor tc = tanh_c.select(0, t);
    at::tanh_out(tc, c);
    Tensor h_new = hs.select(0, t + 1);
    at::mul_out(h_new, o, tc);
    freeze(c, cs.select(0, t), valid, t);
    freeze(h_new, h, valid, t);
  }
}

// Returns (dL/dh0, dL/dc0), undefined when need_first is false.
std::tuple<Tensor, Tensor> lstm_backward(const Tensor& d_out, const Tensor& d_h,
                                         const Tensor& d_c, const Tensor& coef,
                                         const Tensor& to_cell, const Tensor& keep_c,
                                         const Tensor& w_hh, bool onednn, const OptTensor& mask,
                                         const OptTensor& passthrough, bool need_first,
                                         Tensor d_gates, Tensor d_hin) {
  const int64_t steps = d_gates.size(0), batch = d_gates.size(1);
  const int64_t hidden = d_gates.size(2) / 4;
  Tensor split = d_gates.view({steps, batch, 4, hidden});
  Tensor dh = d_out.select(0, steps - 1) + d_h;
  Tensor dc = d_c;
  for (int64_t t = steps - 1; t >= 0; --t) {
    Tensor dcc = at::addcmul(dc, dh, to_cell.select(0, t));
    Tensor d_ifg = split.select(0, t).narrow(1, 0, 3);
    at::mul_out(d_ifg, dcc.unsqueeze(1), coef.select(0, t).narrow(1, 0, 3));
    Tensor d_o = split.select(0, t).select(1, 3);
    at::mul_out(d_o, dh, coef.select(0, t).select(1, 3));
    if (t == 0 && !need_first) {
      return {Tensor(), Tensor()};
    }
    dc = dcc.mul_(keep_c.select(0, t));
    Tensor d_row = d_hin.select(0, t);
    product_backward(d_row, d_gates.select(0, t), w_hh, onednn);
    dh = previous(d_out, d_hin, mask, t, dh, passthrough, std::nullopt);
  }
  return {dh, dc};
}

void gru_forward(const Tensor& projected, const Tensor& w_hh, const OptTensor& b_hh,
                 const OptTensor& packed, const OptTensor& mask, const OptTensor& valid,
                 Tensor rec, Tensor rz, Tensor n, Tensor hs, const OptTensor& h_in) {
  const int64_t steps = projected.size(0);
  const int64_t hidden = projected.size(2) / 3;
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
    freeze(h_new, h, valid, t);
  }
}

// Returns dL/dh0 (undefined when need_first is false); fills d_rec and d_hs, d_hin.
Tensor gru_backward(const Tensor& d_out, const Tensor& d_h, const Tensor& coef,
                    const Tensor& keep_h, const Tensor& w_hh, bool onednn,
                    const OptTensor& mask, bool need_first, Tensor d_rec, Tensor d_hs,
                    Tensor d_hin) {
  const int64_t steps = d_rec.size(0), batch = d_rec.size(1);
  const int64_t hidden = d_rec.size(2) / 3;
  Tensor split = d_rec.view({steps, batch, 3, hidden});
  Tensor last = d_hs.select(0, steps - 1);
  at::add_out(last, d_out.select(0, steps - 1), d_h);
  Tensor prev;
  for (int64_t t = steps - 1; t >= 0; --t) {
    Tensor dh = d_hs.select(0, t);
    Tensor d_step = split.select(0, t);
    at::mul_out(d_step, dh.unsqueeze(1), coef.select(0, t));
    if (t == 0 && !need_first) {
      return Tensor();
    }
    Tensor d_row = d_hin.select(0, t);
    product_backward(d_row, d_rec.select(0, t), w_hh, onednn);
    prev = previous(d_out, d_hin, mask, t, dh, std::nullopt,
                    t > 0 ? OptTensor(d_hs.select(0, t - 1)) : std::nullopt);
    prev.addcmul_(dh, keep_h.select(0, t));
  }
  return prev;
}

void elman_forward(const Tensor& projected, const Tensor& w_hh, const OptTensor& packed,
                   const OptTensor& mask, const OptTensor& valid, bool relu, Tensor hs,
                   const OptTensor& h_in) {
  const int64_t steps = projected.size(0);
  for (int64_t t = 0; t < steps; ++t) {
    Tensor h = hs.select(0, t);
    Tensor x = masked_state(h, mask, h_in, t);
    Tensor h_new = hs.select(0, t + 1);
    product_forward(h_new, x, projected.select(0, t), w_hh, packed);
    if (relu) {
      h_new.relu_();
    } else {
      h_new.tanh_();
    }
    freeze(h_new, h, valid, t);
  }
}

// Returns dL/dh0 (undefined when need_first is false); fills d_pre and d_hin.
Tensor elman_backward(const Tensor& d_out, const Tensor& d_h, const Tensor& slope,
                      const Tensor& w_hh, bool onednn, const OptTensor& mask,
                      const OptTensor& passthrough, bool need_first, Tensor d_pre,
                      Tensor d_hin) {
  const int64_t steps = d_pre.size(0);
  Tensor dh = d_out.select(0, steps - 1) + d_h;
  for (int64_t t = steps - 1; t >= 0; --t) {
    Tensor d_step = d_pre.select(0, t);
    at::mul_out(d_step, dh, slope.select(0, t));
    if (t == 0 && !need_first) {
      return Tensor();
    }
    Tensor d_row = d_hin.select(0, t);
    product_backward(d_row, d_step, w_hh, onednn);
    dh = previous(d_out, d_hin, mask, t, dh, passthrough, std::nullopt);
  }
  return dh;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lstm_forward", &lstm_forward);
  m.def("lstm_backward", &lstm_backward);
  m.def("gru_forward", &gru_forward);
  m.def("gru_backward", &gru_backward);
  m.def("elman_forward", &elman_forward);
  m.def("elman_backward", &elman_backward);
}
