"""Public API of the fused linear op: ``linear_relu`` (functional), ``LinearReLU`` (nn.Module) and
``LinearReLUFunction`` (its autograd.Function, built from the contract).

Also how the generic tools use it: ``FUSE_PATTERNS`` (Linear -> ReLU) for ``lightnet_ops.fuse``, and
``BENCH`` for ``lightnet_ops.bench``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_compiling

from .. import _ops
from .. import backend_registry as registry
from ..autograd import function_for
from ..fuse_spec import LINEAR, RELU, Link, Pattern, TensorOf, adopt_parameters
from ..ops import linear_relu as linear_op
from ._common import _add_weight_and_bias, _autocast, _needs_function, _refuse_scripting, _reset_like_stock, \
    _tangents_possible, _tensors_on, _weight_and_bias

if TYPE_CHECKING:
    from ..bench.problems import Case

__all__ = ["linear_relu", "LinearReLU", "LinearReLUFunction"]

#: ``apply(input, weight, bias, backend)`` returns the output (M, out_features), for 2-D input.
LinearReLUFunction: type[torch.autograd.Function] = function_for(linear_op.NAME, forward_ad=True)

# The extension's direct entry (csrc/ops.cpp): the op without torch.ops' boxed call for plain 2-D CPU
# tensors, None (the call below handles it) for anything else; TorchDynamo cannot trace it.
_direct_linear_relu = _ops.direct_entry(linear_op.NAME)


def linear_relu(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.relu(F.linear(input, weight, bias))`` in one op.

    Args:
        input: (*, in_features).
        weight: (out_features, in_features).
        bias: (out_features) or None.
        backend: "auto", "cpu", "cuda", "triton" or "reference".

    Returns:
        (*, out_features).
    """
    if _direct_linear_relu is not None and not is_compiling():
        out = _direct_linear_relu(input, weight, bias, backend)
        if out is not None:
            return out
    if isinstance(input, torch.Tensor):
        if torch._C._is_any_autocast_enabled():
            input, weight, bias = _autocast(input, weight, bias)
        device = input.device
        impl = registry.cached(backend, device, input.dtype)
        # The common case, checked by the extension's op itself (see conv2d_relu_maxpool2d_normalized).
        if impl is not None and impl.records_autograd and input.dim() == 2 and _tensors_on(device, weight, bias) \
                and (bias is None or bias.dim() != 0):
            return _linear_relu_2d(impl, input, weight, bias)
    if isinstance(bias, torch.Tensor) and bias.dim() == 0 and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        bias = bias.expand(weight.shape[0])  # F.linear broadcasts a 0-d bias
    linear_op.check_linear(input, weight, bias)
    impl = registry.resolve(backend, input)
    if input.dim() == 2:  # no reshapes (each would add a view node to the graph)
        return _linear_relu_2d(impl, input, weight, bias)
    lead = input.shape[:-1]
    x2d = input.reshape(math.prod(lead), input.shape[-1])  # explicit rows: in_features may be 0
    return _linear_relu_2d(impl, x2d, weight, bias).reshape(*lead, weight.shape[0])


def _linear_relu_2d(impl: registry.Backend, input: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
    if _needs_function(impl, input, weight, bias):
        return function_for(linear_op.NAME, _tangents_possible()).apply(input, weight, bias, impl.name)
    return impl.kernels(linear_op.NAME).forward(input, weight, bias)


class LinearReLU(nn.Module):
    """Linear -> ReLU as one fused op. Input (*, in_features).

    Parameters, their shapes and their default initialisation match nn.Linear exactly (same
    random-number consumption), so a seeded module gets stock's weights and state dicts load either way."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.backend = backend
        _add_weight_and_bias(self, (out_features, in_features), bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_like_stock(self.weight, self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, bias = _weight_and_bias(self, LinearReLU)
        return linear_relu(input, weight, bias, backend=self.backend)

    # torch.jit.script calls this on every submodule before compiling: fail with a clear message.
    __prepare_scriptable__ = _refuse_scripting

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


# --------------------------------------------------------------------------------------------
# Model swapping (lo.fuse, the compile backend): the chain of stock ops this op replaces


def _fused_module(links: Sequence[Link], backend: str) -> nn.Module:
    m = links[0].module
    fused = LinearReLU(m.in_features, m.out_features, bias=m.bias is not None, backend=backend, device="meta")
    return adopt_parameters(fused, m, LINEAR.parameters)


def _call_args(links: Sequence[Link], tensor: TensorOf) -> tuple:
    return (tensor(links[0], "weight"), tensor(links[0], "bias"))


#: The chain ``lo.fuse`` and the ``lightnet_ops`` compile backend replace with this op (``lightnet_ops.fuse``
#: collects it): Linear -> ReLU.
FUSE_PATTERNS: tuple[Pattern, ...] = (
    Pattern(linear_op.NAME, (LINEAR, RELU), LinearReLU, _fused_module, linear_relu, _call_args),
)


# --------------------------------------------------------------------------------------------
# Benchmark (lightnet_ops.bench): the cases, the stock composition, seeded inputs, compulsory work


class LinearReLUBench:
    """linear_relu on a :class:`~lightnet_ops.bench.problems.LinearShape`, (batch, in_features) input.

    ``lightnet_ops.bench.ops`` mixes this plain class into its ``FunctionalOpBench`` (whose helpers
    ``uniform`` and ``element_size`` it uses); importing the op does not import the harness."""

    name = "linear"

    def make_cases(self) -> tuple:
        from ..bench.problems import Case, LinearShape  # the harness's records, only when benchmarking

        name, fwd = self.name, ("fwd",)
        fc1, fc2 = LinearShape(576, 120), LinearShape(120, 84)  # LightNet fc1, fc2
        big = LinearShape(1024, 4096)
        square_4k = LinearShape(4096, 4096)  # a large layer at few rows: weight-bandwidth bound
        tiny = LinearShape(4, 4)  # 1x4 input, 4 -> 4
        return (
            Case("linear_576x120_b256", name, 256, "linear_relu 576->120 (LightNet fc1), batch 256", fc1,
                 quick=("cpu", "cuda")),
            Case("linear_1024x4096_b4096", name, 4096, "linear_relu 1024->4096, batch 4096", big),
            Case("linear_1024x4096_b4096_fp16", name, 4096, "linear_relu 1024->4096, batch 4096, float16", big,
                 "float16", ("cuda",)),
            Case("linear_1024x4096_b4096_bf16", name, 4096, "linear_relu 1024->4096, batch 4096, bfloat16", big,
                 "bfloat16", ("cuda",), ("cuda",)),
            # Small-batch inference: LightNet's fc1 / fc2 and a large layer at few rows.
            Case("linear_576x120_b1", name, 1, "linear_relu 576->120 (LightNet fc1), batch 1, inference", fc1,
                 only_modes=fwd),
            Case("linear_576x120_b8", name, 8, "linear_relu 576->120 (LightNet fc1), batch 8, inference", fc1,
                 only_modes=fwd),
            Case("linear_120x84_b1", name, 1, "linear_relu 120->84 (LightNet fc2), batch 1, inference", fc2,
                 only_modes=fwd),
            Case("linear_120x84_b8", name, 8, "linear_relu 120->84 (LightNet fc2), batch 8, inference", fc2,
                 only_modes=fwd),
            Case("linear_4096x4096_b1", name, 1, "linear_relu 4096->4096, batch 1, inference", square_4k,
                 only_modes=fwd),
            Case("linear_4096x4096_b8", name, 8, "linear_relu 4096->4096, batch 8, inference", square_4k,
                 only_modes=fwd),
            # Per-call host cost on tiny tensors (CallBench): one F.linear / nn.Linear call as "stock".
            Case("call_linear_fn", "call_fn", 1, "per-call cost: lo.linear_relu vs F.linear, 1x4 input, 4->4", tiny),
            Case("call_linear_module", "call_module", 1,
                 "per-call cost: LinearReLU vs nn.Linear module call, 1x4 input", tiny),
        )

    @staticmethod
    def stock(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
        return F.relu(F.linear(x, w, b))

    def inputs(self, case: Case, device: torch.device, dtype: torch.dtype) -> tuple[tuple, tuple, tuple]:
        fin, fout = case.shape.in_features, case.shape.out_features
        g = torch.Generator().manual_seed(0)
        x = torch.randn(case.batch, fin, generator=g).to(device, dtype)
        bound = 1.0 / math.sqrt(fin)
        w = self.uniform((fout, fin), bound, g).to(device, dtype)
        b = self.uniform((fout,), bound, g).to(device, dtype)
        return (x, w, b), (), (case.batch, fout)

    def cost(self, case: Case, mode: str) -> tuple[Optional[float], Optional[float]]:
        fin, fout, N = case.shape.in_features, case.shape.out_features, case.batch
        e = self.element_size(case)
        x, w, b, out = N * fin, fout * fin, fout, N * fout
        flops = 2.0 * N * fin * fout
        if mode == "fwd":
            return flops, float(e * (x + w + b + out))
        fwd = e * (x + w + b + out)
        bwd = e * (out + out + x + w) + e * (x + w + b)  # grad_out, saved out, x, w; grads
        return 3 * flops, float(fwd + bwd)

    #: The chain's first stock op, which the per-call cases time one call of.
    first_op = staticmethod(F.linear)

    def first_module(self, case: Case) -> nn.Module:
        return nn.Linear(case.shape.in_features, case.shape.out_features)

    def fused_module(self, case: Case, backend: str) -> nn.Module:
        return LinearReLU(case.shape.in_features, case.shape.out_features, backend=backend)


#: How ``lightnet_ops.bench`` times this op (``bench.ops.OPS`` collects it).
BENCH = LinearReLUBench
