// Autograd for the extension's fused-layer ops (device-independent: CPU and CUDA kernels alike):
// one template, instantiated by each op's file (csrc/<op>.cpp) with a short traits struct.
//
// Each forward op gets an Autograd-key kernel: a C++ torch::autograd::Function whose forward calls
// the device kernel below autograd and saves what the hand-written backward op needs, and whose
// backward calls that op. Calling torch.ops.lightnet_ops.<op> on tensors that require grad
// therefore records one graph node, and backward runs without entering Python: the Python
// autograd.Functions in lightnet_ops/autograd.py cost about 10-20 us more per fused layer (forward
// and backward), as much as a small layer's kernels. The Python Functions remain for the Triton
// and reference backends.
//
// Under create_graph=True the backward switches to the op's differentiable ATen formulation
// routed by the same routing tensor (argmax, ReLU gate), so second derivatives are exact; dual
// (forward-mode AD) inputs get their tangent the same way. Plain first-order backward always runs
// the fast hand-written op.
//
// The ops this covers are fused layers: differentiable inputs (input, weight, bias?) followed by
// non-tensor parameters. An op's traits struct provides:
//
//   using Output = at::Tensor;                          // (output), which is also its routing, or
//   using Output = std::tuple<at::Tensor, at::Tensor>;  // (output, routing), routing not differentiable
//   using Params = std::tuple<P...>;  // the parameters backward needs, in the order the forward takes
//                                     // them: at::IntArrayRef, int64_t or bool
//   // The forward op, called below autograd. need_routing false may leave the routing empty (an op
//   // with an inference mode, like the conv's need_argmax); the autograd paths always pass true.
//   static Output forward(const at::Tensor& input, const at::Tensor& weight,
//                         const std::optional<at::Tensor>& bias, bool need_routing, P... params);
//   // The backward op, and its differentiable ATen twin (create_graph=True); `mask` says which of
//   // (grad_input, grad_weight, grad_bias) to compute.
//   static Grads backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
//                         const at::Tensor& routing, Mask mask, P... params);
//   static Grads composite_backward(/* the same */);
//   // The output's tangent, from the primals, their tangents (undefined counts as zero) and the routing.
//   static at::Tensor tangent(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& t_input,
//                             const at::Tensor& t_weight, const at::Tensor& t_bias, const at::Tensor& routing,
//                             P... params);
//
// AutogradOp<Traits>::kernel is then the Autograd-key kernel of an op whose schema is
// (input, weight, bias, params...); an op with other arguments (need_argmax) registers a wrapper
// that calls AutogradOp<Traits>::call.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <torch/autograd.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace lightnet_ops {

namespace autograd {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // (grad_input, grad_weight, grad_bias)
using Mask = std::array<bool, 3>;

// The schema's op `name` ("lightnet_ops::foo"), typed for calls through the dispatcher. Look it
// up once (a function-local static) and keep it.
template <class Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

namespace detail {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

inline bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Which of (input, weight, bias) backward must compute. Graph edges exist only for the tensors
// that were passed (no bias, no edge), in argument order.
inline Mask needed_grads(AutogradContext* ctx, bool has_bias) {
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2)};
}

inline at::Tensor if_needed(const at::Tensor& grad, bool needed) { return needed ? grad : at::Tensor(); }

inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }

// Backward under create_graph=True whose results depend on something that requires grad: it must
// record its own graph (the differentiable formulation) for a second derivative.
inline bool creates_graph(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight) {
  return at::GradMode::is_enabled() && (requires_grad(grad_output) || requires_grad(input) || requires_grad(weight));
}

// Whether this call must record a graph node.
inline bool records_graph(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return at::GradMode::is_enabled() &&
         (input.requires_grad() || weight.requires_grad() || (defined(bias) && bias->requires_grad()));
}

// The forward gradient (tangent) of t at forward-AD level 0, or undefined.
inline at::Tensor tangent(const at::Tensor& t) { return t.defined() ? t._fw_grad(/*level=*/0) : at::Tensor(); }
inline at::Tensor tangent(const std::optional<at::Tensor>& t) {
  return t.has_value() ? tangent(*t) : at::Tensor();
}

// t without its tangent (a differentiable view), or t itself when it has none.
inline at::Tensor primal(const at::Tensor& t) { return tangent(t).defined() ? t._fw_primal(0) : t; }
inline std::optional<at::Tensor> primal(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(primal(*t)) : std::nullopt;
}

inline bool has_tangent(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return tangent(input).defined() || tangent(weight).defined() || tangent(bias).defined();
}

// The non-tensor parameters travel to backward as one int list in the node's saved data: a list
// is stored as its length and elements, an int or a bool as one element.
template <class T>
struct Param;

template <>
struct Param<at::IntArrayRef> {
  static size_t size(at::IntArrayRef v) { return 1 + v.size(); }
  static void put(c10::List<int64_t>& out, at::IntArrayRef v) {
    out.push_back(static_cast<int64_t>(v.size()));
    for (const int64_t x : v) out.push_back(x);
  }
  static at::IntArrayRef get(const std::vector<int64_t>& in, size_t& pos) {
    const auto n = static_cast<size_t>(in[pos]);
    const at::IntArrayRef v = at::IntArrayRef(in).slice(pos + 1, n);
    pos += 1 + n;
    return v;
  }
};

template <>
struct Param<int64_t> {
  static size_t size(int64_t) { return 1; }
  static void put(c10::List<int64_t>& out, int64_t v) { out.push_back(v); }
  static int64_t get(const std::vector<int64_t>& in, size_t& pos) { return in[pos++]; }
};

template <>
struct Param<bool> {
  static size_t size(bool) { return 1; }
  static void put(c10::List<int64_t>& out, bool v) { out.push_back(v ? 1 : 0); }
  static bool get(const std::vector<int64_t>& in, size_t& pos) { return in[pos++] != 0; }
};

template <class... P>
c10::List<int64_t> pack(P... params) {
  c10::List<int64_t> out;
  out.reserve((Param<P>::size(params) + ...));
  (Param<P>::put(out, params), ...);
  return out;
}

// Views into `in`, which must outlive them.
template <class... P>
std::tuple<P...> unpack(const std::vector<int64_t>& in) {
  size_t pos = 0;
  return std::tuple<P...>{Param<P>::get(in, pos)...};  // a braced list runs left to right
}

template <class T>
struct IsPair : std::false_type {};
template <>
struct IsPair<std::tuple<at::Tensor, at::Tensor>> : std::true_type {};

}  // namespace detail

template <class Op, class Params = typename Op::Params>
class AutogradOp;

template <class Op, class... P>
class AutogradOp<Op, std::tuple<P...>> : public torch::autograd::Function<AutogradOp<Op, std::tuple<P...>>> {
  using Output = typename Op::Output;
  static constexpr bool kRoutingOutput = detail::IsPair<Output>::value;
  static_assert(kRoutingOutput || std::is_same_v<Output, at::Tensor>,
                "Output is the output tensor, or the pair (output, routing)");

  static const at::Tensor& output_of(const Output& outs) {
    if constexpr (kRoutingOutput) {
      return std::get<0>(outs);
    } else {
      return outs;
    }
  }
  static const at::Tensor& routing_of(const Output& outs) {
    if constexpr (kRoutingOutput) {
      return std::get<1>(outs);
    } else {
      return outs;
    }
  }

 public:
  // What torch::autograd::Function::apply returns: {output, routing} or the output.
  using Result = std::conditional_t<kRoutingOutput, detail::variable_list, at::Tensor>;

  static Result forward(detail::AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, P... params) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    Output outs = Op::forward(input, weight, bias, /*need_routing=*/true, params...);
    ctx->save_for_backward({input, weight, routing_of(outs)});
    if constexpr (sizeof...(P) > 0) ctx->saved_data["params"] = detail::pack<P...>(params...);
    ctx->saved_data["has_bias"] = detail::defined(bias);
    // An output that gets no gradient arrives undefined instead of as a zero-filled tensor (an
    // allocation and, on CUDA, a fill kernel per call; the routing output never gets one).
    ctx->set_materialize_grads(false);
    if constexpr (kRoutingOutput) {
      ctx->mark_non_differentiable({std::get<1>(outs)});
      return {std::get<0>(outs), std::get<1>(outs)};
    } else {
      return outs;
    }
  }

  static detail::variable_list backward(detail::AutogradContext* ctx, detail::variable_list grads) {
    const auto saved = ctx->get_saved_variables();  // input, weight, routing
    const Mask mask = detail::needed_grads(ctx, ctx->saved_data["has_bias"].toBool());
    at::Tensor grad_input, grad_weight, grad_bias;
    // Without materialised gradients, an output that received none arrives undefined: then no
    // gradient flows to any input (undefined results mean zero to autograd).
    if (grads[0].defined() && (mask[0] || mask[1] || mask[2])) {
      const auto run = [&](auto... params) -> Grads {
        if (detail::creates_graph(grads[0], saved[0], saved[1])) {
          return Op::composite_backward(grads[0], saved[0], saved[1], saved[2], mask, params...);
        }
        const at::NoGradGuard no_grad;
        return Op::backward(grads[0], saved[0], saved[1], saved[2], mask, params...);
      };
      if constexpr (sizeof...(P) > 0) {
        const std::vector<int64_t> packed = ctx->saved_data["params"].toIntVector();
        std::tie(grad_input, grad_weight, grad_bias) = std::apply(run, detail::unpack<P...>(packed));
      } else {
        std::tie(grad_input, grad_weight, grad_bias) = run();
      }
    }
    detail::variable_list out = {detail::if_needed(grad_input, mask[0]), detail::if_needed(grad_weight, mask[1]),
                                 detail::if_needed(grad_bias, mask[2])};
    out.resize(3 + sizeof...(P));  // one entry per forward argument (undefined for the parameters)
    return out;
  }

  // The Autograd-key kernel's work; need_routing is the caller's (the routing output is returned
  // empty when false).
  static Output call(bool need_routing, const at::Tensor& input, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, P... params) {
    const bool records = detail::records_graph(input, weight, bias);
    const bool dual = detail::has_tangent(input, weight, bias);
    if (!records && !dual) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      return Op::forward(input, weight, bias, need_routing, params...);
    }
    // need_routing=false with an input that requires grad (a graph traced or exported under
    // no_grad, then run with grad): the node still gets its routing; the caller just does not see it.
    Output outs;
    if (records) {
      // C++ custom Functions reject dual inputs; their primals carry the reverse-mode history.
      auto result = AutogradOp::apply(detail::primal(input), detail::primal(weight), detail::primal(bias), params...);
      if constexpr (kRoutingOutput) {
        outs = {result[0], result[1]};
      } else {
        outs = result;
      }
    } else {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      outs = Op::forward(input, weight, bias, /*need_routing=*/true, params...);
    }
    if (dual) {  // forward-mode AD: the tangent routed like the output
      output_of(outs)._set_fw_grad(Op::tangent(detail::primal(input), detail::primal(weight), detail::tangent(input),
                                               detail::tangent(weight), detail::tangent(bias), routing_of(outs),
                                               params...),
                                   /*level=*/0, /*is_inplace_op=*/false);
    }
    if constexpr (kRoutingOutput) {
      if (!need_routing) std::get<1>(outs) = at::empty({0}, std::get<1>(outs).options());
    }
    return outs;
  }

  // The Autograd-key kernel of an op whose schema is (input, weight, bias, params...).
  static Output kernel(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       P... params) {
    return call(/*need_routing=*/true, input, weight, bias, params...);
  }
};

}  // namespace autograd

}  // namespace lightnet_ops
