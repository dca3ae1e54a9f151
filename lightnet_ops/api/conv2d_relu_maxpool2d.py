"""Public API of the fused conv op: ``conv2d_relu_maxpool2d`` (functional), ``Conv2dReLUMaxPool2d``
(nn.Module) and ``Conv2dReLUMaxPool2dFunction`` (its autograd.Function, built from the contract).

Also how the generic tools use it: ``FUSE_PATTERNS`` (Conv2d -> ReLU -> MaxPool2d, and Conv2d ->
BatchNorm2d -> ReLU -> MaxPool2d with the eval-mode BatchNorm folded in, :class:`Conv2dBNReLUMaxPool2d`)
for ``lightnet_ops.fuse``, and ``BENCH`` for ``lightnet_ops.bench``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.compiler import is_compiling

from .. import _ops
from .. import backend_registry as registry
from .._shapes import IntPair, pair
from ..autograd import function_for
from ..fuse_spec import BATCH_NORM2D, CONV2D, MAX_POOL2D, RELU, Link, Pattern, Skip, TensorOf, adopt_parameters, \
    pool_kwargs
from ..ops import conv2d_relu_maxpool2d as conv_op
from ._common import _add_weight_and_bias, _autocast, _needs_function, _needs_grad, _refuse_scripting, \
    _reset_like_stock, _tangents_possible, _tensors_on, _weight_and_bias

if TYPE_CHECKING:
    from ..bench.problems import Case

__all__ = ["conv2d_relu_maxpool2d", "conv2d_relu_maxpool2d_normalized", "Conv2dReLUMaxPool2d",
           "Conv2dReLUMaxPool2dFunction"]

#: ``apply(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, backend[, pool_padding,
#: ceil_mode])`` returns ``(output, argmax)``, both (N, K, PH, PW), like the raw op; every int argument is a pair.
#: (The argmax is an output, not hidden state, because torch.func transforms need every tensor that backward
#: uses to pass through ``setup_context``.)
Conv2dReLUMaxPool2dFunction: type[torch.autograd.Function] = function_for(conv_op.NAME, forward_ad=True)

# The extension's direct entry (csrc/ops.cpp): the op without torch.ops' boxed call for plain CPU
# tensors and int (pair) parameters, None (the Python path handles it) for anything else; TorchDynamo
# cannot trace it.
_direct_conv2d_relu_maxpool2d = _ops.direct_entry(conv_op.NAME)


def _same_padding(input: torch.Tensor, weight: torch.Tensor, stride: list[int],
                  dilation: list[int]) -> tuple[torch.Tensor, list[int]]:
    """padding='same' as F.conv2d does it: total padding dilation * (k - 1) per dimension, the odd
    element on the bottom/right (applied to the input explicitly, as the op pads symmetrically)."""
    if list(stride) != [1, 1]:
        raise ValueError("conv2d_relu_maxpool2d: padding='same' is not supported for strided convolutions")
    totals = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
    extra_h, extra_w = totals[0] % 2, totals[1] % 2
    if extra_h or extra_w:
        input = F.pad(input, (0, extra_w, 0, extra_h))
    return input, [totals[0] // 2, totals[1] // 2]


def conv2d_relu_maxpool2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    pool_kernel_size: IntPair = 2,
    pool_stride: Optional[IntPair] = None,
    pool_padding: IntPair = 0,
    ceil_mode: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``F.max_pool2d(F.relu(F.conv2d(input, weight, bias, stride, padding, dilation)), pool_kernel_size, pool_stride,
    pool_padding, ceil_mode=ceil_mode)`` in one op.

    Args:
        input: (N, C, H, W) or unbatched (C, H, W).
        weight: (K, C, R, S); groups=1.
        bias: (K) or None.
        stride, padding, dilation: conv parameters, int or pair (numpy / 0-d tensor ints too); padding may
            also be "valid" or "same" (stride 1), as in F.conv2d.
        pool_kernel_size: max-pool window, int or pair (at most 255 elements).
        pool_stride: max-pool stride; None means pool_kernel_size.
        pool_padding: max-pool padding (as -inf), int or pair, at most half the pool window.
        ceil_mode: max-pool ceil mode (windows that start inside the padded input count).
        backend: "auto", "cpu", "cuda", "triton" or "reference" (see lightnet_ops.backend_registry).

    Returns:
        (N, K, PH, PW), or (K, PH, PW) for unbatched input.
    """
    if _direct_conv2d_relu_maxpool2d is not None and not is_compiling():
        out = _direct_conv2d_relu_maxpool2d(input, weight, bias, stride, padding, dilation, pool_kernel_size,
                                            pool_stride, pool_padding, ceil_mode, backend)
        if out is not None:
            return out
    pool_k = pair(pool_kernel_size, "pool_kernel_size")
    return _conv2d_relu_maxpool2d_python(
        input, weight, bias, pair(stride, "stride"), padding if isinstance(padding, str) else pair(padding, "padding"),
        pair(dilation, "dilation"), pool_k, pool_k if pool_stride is None else pair(pool_stride, "pool_stride"),
        pair(pool_padding, "pool_padding"), ceil_mode, backend,
    )


def conv2d_relu_maxpool2d_normalized(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: list[int],
    padding: list[int] | str, dilation: list[int], pool_kernel_size: list[int], pool_stride: list[int],
    pool_padding: list[int], ceil_mode: bool, backend: str,
) -> torch.Tensor:
    """conv2d_relu_maxpool2d with its int parameters already pairs (sequences of two ints; padding may
    be "valid" or "same"), as the modules keep them: their per-call host path skips the normalisation."""
    if _direct_conv2d_relu_maxpool2d is not None and not is_compiling():
        out = _direct_conv2d_relu_maxpool2d(input, weight, bias, stride, padding, dilation, pool_kernel_size,
                                            pool_stride, pool_padding, ceil_mode, backend)
        if out is not None:
            return out
    return _conv2d_relu_maxpool2d_python(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride,
                                         pool_padding, ceil_mode, backend)


def _conv2d_relu_maxpool2d_python(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: list[int],
    padding: list[int] | str, dilation: list[int], pool_kernel_size: list[int], pool_stride: list[int],
    pool_padding: list[int], ceil_mode: bool, backend: str,
) -> torch.Tensor:
    """The calls the direct entry does not take: checks, autocast, string padding, backend resolution,
    the Python autograd.Function where one is needed."""
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"conv2d_relu_maxpool2d: ceil_mode must be a bool, got {ceil_mode!r}")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"conv2d_relu_maxpool2d: input must be a Tensor, got {type(input).__name__}")
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    elif input.dim() != 4:
        raise ValueError(
            f"conv2d_relu_maxpool2d: expected 3-D (C, H, W) or 4-D (N, C, H, W) input, got {input.dim()}-D input "
            f"of shape {tuple(input.shape)}"
        )
    if torch._C._is_any_autocast_enabled():
        input, weight, bias = _autocast(input, weight, bias)
    if isinstance(padding, str):  # F.conv2d's string forms
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same" and isinstance(weight, torch.Tensor) and weight.dim() == 4:
            input, padding = _same_padding(input, weight, stride, dilation)
        elif padding != "same":
            raise ValueError(f"conv2d_relu_maxpool2d: invalid padding string {padding!r}, should be one of "
                             "{'valid', 'same'}")
    device = input.device
    impl = registry.cached(backend, device, input.dtype)
    # The extension's ops check their own arguments in C++ (same exception types and messages,
    # csrc/<op>.cpp); Python checks only what they cannot see or never run.
    if impl is None or not impl.records_autograd or not _tensors_on(device, weight, bias) \
            or isinstance(padding, str):
        conv_op.check_conv_pool(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride,
                                pool_padding, ceil_mode)
        impl = registry.resolve(backend, input)
    if _needs_function(impl, input, weight, bias):
        out, _ = function_for(conv_op.NAME, _tangents_possible()).apply(
            input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, impl.name, pool_padding,
            ceil_mode
        )
    else:
        # need_argmax: whether backward may follow. A torch.jit.trace graph must not depend on the
        # grad mode it was traced in (its check re-traces under no_grad), so tracing always asks for it.
        need_argmax = _needs_grad(input, weight, bias) or torch._C._get_tracing_state() is not None
        out, _ = impl.kernels(conv_op.NAME).forward(input, weight, bias, stride, padding, dilation, pool_kernel_size,
                                                    pool_stride, need_argmax, pool_padding, ceil_mode)
    return out.squeeze(0) if unbatched else out


class Conv2dReLUMaxPool2d(nn.Module):
    """Conv2d -> ReLU -> MaxPool2d as one fused op. Input (N, C, H, W) or (C, H, W).

    Parameters, their shapes and their default initialisation match nn.Conv2d exactly (same
    random-number consumption), so a seeded module gets stock's weights and state dicts load either way."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        pool_kernel_size: IntPair = 2,
        pool_stride: Optional[IntPair] = None,
        pool_padding: IntPair = 0,
        ceil_mode: bool = False,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(pair(kernel_size, "kernel_size"))
        self.stride = tuple(pair(stride, "stride"))
        self.padding = tuple(pair(padding, "padding"))
        self.dilation = tuple(pair(dilation, "dilation"))
        self.pool_kernel_size = tuple(pair(pool_kernel_size, "pool_kernel_size"))
        self.pool_stride = self.pool_kernel_size if pool_stride is None else tuple(pair(pool_stride, "pool_stride"))
        self.pool_padding = tuple(pair(pool_padding, "pool_padding"))
        self.ceil_mode = bool(ceil_mode)
        self.backend = backend
        _add_weight_and_bias(self, (out_channels, in_channels, *self.kernel_size), bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_like_stock(self.weight, self.bias)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The parameters were normalised to pairs in __init__: skip the functional API's normalisation.
        weight, bias = _weight_and_bias(self, Conv2dReLUMaxPool2d)
        return conv2d_relu_maxpool2d_normalized(
            input, weight, bias, self.stride, self.padding, self.dilation,
            self.pool_kernel_size, self.pool_stride, self.pool_padding, self.ceil_mode, self.backend,
        )

    # torch.jit.script calls this on every submodule before compiling: fail with a clear message.
    __prepare_scriptable__ = _refuse_scripting

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        s += f", pool_kernel_size={self.pool_kernel_size}, pool_stride={self.pool_stride}"
        if self.pool_padding != (0, 0):
            s += f", pool_padding={self.pool_padding}"
        if self.ceil_mode:
            s += ", ceil_mode=True"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


# --------------------------------------------------------------------------------------------
# Model swapping (lo.fuse, the compile backend): the chains of stock ops this op replaces


def _fused_module(links: Sequence[Link], backend: str) -> nn.Module:
    conv, _, pool = links
    m = conv.module
    p, q = conv.params, pool.params
    fused = Conv2dReLUMaxPool2d(  # on meta: no allocation, no RNG use
        m.in_channels, m.out_channels, tuple(m.kernel_size), p["stride"], p["padding"], p["dilation"],
        bias=m.bias is not None, pool_kernel_size=q["kernel_size"], pool_stride=q["stride"], backend=backend,
        device="meta", **pool_kwargs(q),
    )
    return adopt_parameters(fused, m, CONV2D.parameters)


def _call_kwargs(links: Sequence[Link]) -> dict[str, Any]:
    return pool_kwargs(links[-1].params)


def _call_args(links: Sequence[Link], tensor: TensorOf) -> tuple:
    conv, _, pool = links
    p, q = conv.params, pool.params
    return (tensor(conv, "weight"), tensor(conv, "bias"), p["stride"], p["padding"], p["dilation"],
            q["kernel_size"], q["stride"])


# --------------------------------------------------------------------------------------------
# BatchNorm folded into the conv (eval mode): Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d


def fold_conv_bn(weight: torch.Tensor, bias: Optional[torch.Tensor], running_mean: torch.Tensor,
                 running_var: torch.Tensor, bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor],
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the conv that computes ``batch_norm(conv2d(x, weight, bias))`` with running
    statistics (eval mode): the arithmetic of ``torch.nn.utils.fusion.fuse_conv_bn_weights``,
    differentiable in every argument.

    Args:
        weight: conv weight (K, C, R, S). bias: (K) or None.
        running_mean, running_var: (K). bn_weight, bn_bias: (K) or None (non-affine BatchNorm).
        eps: the BatchNorm's eps.

    Returns:
        (weight (K, C, R, S), bias (K)) in the conv weight's dtype.
    """
    if bias is None:
        bias = torch.zeros_like(running_mean)
    if bn_weight is None:
        bn_weight = torch.ones_like(running_mean)
    if bn_bias is None:
        bn_bias = torch.zeros_like(running_mean)
    var_rsqrt = torch.rsqrt(running_var + eps)
    w = (weight * (bn_weight * var_rsqrt).reshape(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    b = ((bias - running_mean) * var_rsqrt * bn_weight + bn_bias).to(weight.dtype)
    return w, b


def conv2d_bn_relu_maxpool2d(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], running_mean: torch.Tensor,
    running_var: torch.Tensor, bn_weight: Optional[torch.Tensor], bn_bias: Optional[torch.Tensor], eps: float,
    stride: Any = 1, padding: Any = 0, dilation: Any = 1, pool_kernel_size: Any = 2, pool_stride: Any = None,
    *, backend: str = "auto", **pool: Any,
) -> torch.Tensor:
    """``max_pool2d(relu(batch_norm(conv2d(input, weight, bias), running_mean, running_var, bn_weight,
    bn_bias, training=False, eps=eps)))`` as the fused conv op with the BatchNorm folded into its weight
    and bias (:func:`fold_conv_bn`, per call). Input (N, C, H, W) or (C, H, W); returns (N, K, PH, PW).
    ``pool`` takes the fused op's further pool arguments (see :data:`lightnet_ops.fuse_spec.POOL_SUPPORT`)."""
    w, b = fold_conv_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
    return conv2d_relu_maxpool2d(input, w, b, stride, padding, dilation, pool_kernel_size, pool_stride,
                                    backend=backend, **pool)


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """Stand-in for a BatchNorm2d folded into the :class:`Conv2dBNReLUMaxPool2d` before it.

    It holds the BatchNorm's own Parameters and buffers under the BatchNorm's name, so state_dict keys,
    checkpoints and ``isinstance(m, nn.BatchNorm2d)`` loops (freezing BN, resetting statistics) work as
    before; its forward passes the input through, because the fused module applies the BatchNorm.
    Input (N, K, H, W); output the same tensor.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input

    @classmethod
    def adopt(cls, bn: nn.BatchNorm2d) -> FoldedBatchNorm2d:
        """A stand-in sharing `bn`'s tensors (the same objects), settings and training flag."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        for name in ("weight", "bias"):
            new._parameters[name] = bn._parameters.get(name)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            new._buffers[name] = bn._buffers.get(name)
        new.train(bn.training)
        return new


class Conv2dBNReLUMaxPool2d(Conv2dReLUMaxPool2d):
    """Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d as one fused op, the BatchNorm folded into the conv.

    Built by :func:`fuse` from an eval-mode chain. It holds the conv's Parameters (``weight``,
    ``bias``) under the conv's name; the BatchNorm's tensors stay in a :class:`FoldedBatchNorm2d`
    under the BatchNorm's name (``self.bn`` refers to it without owning it). So the state_dict keys
    are the original model's, and a checkpoint loads either way.

    While that BatchNorm is in eval mode, forward runs the fused op with the folded weight and bias
    (non-persistent buffers ``folded_weight`` / ``folded_bias``, folded at fuse time and folded again
    whenever a source tensor changes: an optimizer step, ``load_state_dict``, ``.to()``). When
    gradients are needed the fold is recomputed in the autograd graph on each call, so the conv and
    BatchNorm parameters get their exact gradients. After ``.train()`` (the BatchNorm in training
    mode) forward is the stock chain, Conv2d -> BatchNorm2d (batch statistics, running-statistics
    updates) -> ReLU -> MaxPool2d, on the original tensors: training never updates a folded copy.
    Input (N, C, H, W) or (C, H, W).
    """

    def __init__(self, conv: nn.Conv2d, bn: FoldedBatchNorm2d, conv_params: dict[str, Any],
                 pool_params: dict[str, Any], *, backend: str = "auto") -> None:
        p, q = conv_params, pool_params
        super().__init__(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), p["stride"], p["padding"],
                         p["dilation"], bias=conv.bias is not None, pool_kernel_size=q["kernel_size"],
                         pool_stride=q["stride"], backend=backend, device="meta", **pool_kwargs(q))
        self._pool_extra = pool_kwargs(q)
        self._stock_pool = {"padding": q["padding"], "ceil_mode": q["ceil_mode"]}
        adopt_parameters(self, conv, CONV2D.parameters)
        self.__dict__["bn"] = bn  # not a submodule: its tensors keep the BatchNorm's state_dict keys
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)
        self._folded_from: Optional[tuple] = None
        self.refold()

    def _sources(self) -> tuple[Optional[torch.Tensor], ...]:
        bn = self.bn
        return (self.weight, self.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold_conv_bn(*self._sources(), self.bn.eps)

    def _source_key(self) -> Optional[tuple]:
        try:  # inference tensors have no version counter: no caching then
            return tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device)
                         for t in self._sources()) + (self.bn.eps,)
        except RuntimeError:
            return None

    def refold(self) -> None:
        """Fold the BatchNorm into ``folded_weight`` / ``folded_bias`` now (forward does it when needed)."""
        with torch.no_grad(), torch.inference_mode(False):
            self.folded_weight, self.folded_bias = self._fold()
        self._folded_from = self._source_key()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        if bn.training:  # batch statistics: the stock chain, on the original tensors
            y = F.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation)
            y = nn.BatchNorm2d.forward(bn, y)
            return F.max_pool2d(F.relu(y), self.pool_kernel_size, self.pool_stride, **self._stock_pool)
        sources = self._sources()
        if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources)) \
                or torch.jit.is_tracing() or torch.compiler.is_compiling():
            w, b = self._fold()  # in the autograd (or traced) graph
        else:
            key = self._source_key()
            if key is None or key != self._folded_from:
                self.refold()
            w, b = self.folded_weight, self.folded_bias
        return conv2d_relu_maxpool2d(input, w, b, self.stride, self.padding, self.dilation,
                                        self.pool_kernel_size, self.pool_stride, backend=self.backend,
                                        **self._pool_extra)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", batch_norm folded"


def _bn_fused_module(links: Sequence[Link], backend: str) -> nn.Module:
    conv, bn, _, pool = links
    return Conv2dBNReLUMaxPool2d(conv.module, FoldedBatchNorm2d.adopt(bn.module), conv.params, pool.params,
                                 backend=backend)


def _bn_stand_ins(links: Sequence[Link], fused: nn.Module) -> list[Optional[nn.Module]]:
    return [fused.bn, None, None]


def _bn_call_args(links: Sequence[Link], tensor: TensorOf) -> tuple:
    conv, bn, _, pool = links
    if bn.module is not None:  # checked before any graph edit
        raise Skip(f"{bn.name} is a BatchNorm2d module called from more than one place (or its conv is): a "
                    "fused call could not follow its train/eval mode")
    p, q = conv.params, pool.params
    return (tensor(conv, "weight"), tensor(conv, "bias"), tensor(bn, "running_mean"), tensor(bn, "running_var"),
            tensor(bn, "weight"), tensor(bn, "bias"), bn.params["eps"], p["stride"], p["padding"], p["dilation"],
            q["kernel_size"], q["stride"])


#: The chains ``lo.fuse`` and the ``lightnet_ops`` compile backend replace with this op (``lightnet_ops.fuse``
#: collects them): Conv2d -> ReLU -> MaxPool2d, and the eval-mode BatchNorm composition over it.
FUSE_PATTERNS: tuple[Pattern, ...] = (
    Pattern(conv_op.NAME, (CONV2D, RELU, MAX_POOL2D), Conv2dReLUMaxPool2d, _fused_module, conv2d_relu_maxpool2d,
            _call_args, _call_kwargs),
    Pattern("conv2d_bn_relu_maxpool2d", (CONV2D, BATCH_NORM2D, RELU, MAX_POOL2D), Conv2dBNReLUMaxPool2d,
            _bn_fused_module, conv2d_bn_relu_maxpool2d, _bn_call_args, _call_kwargs, _bn_stand_ins),
)


# --------------------------------------------------------------------------------------------
# Benchmark (lightnet_ops.bench): the cases, the stock composition, seeded inputs, compulsory work


class ConvReLUMaxPoolBench:
    """conv2d_relu_maxpool2d on a :class:`~lightnet_ops.bench.problems.ConvShape` (NCHW input).

    ``lightnet_ops.bench.ops`` mixes this plain class into its ``FunctionalOpBench`` (whose helpers
    ``uniform`` and ``element_size`` it uses); importing the op does not import the harness."""

    name = "conv"

    def make_cases(self) -> tuple:
        from ..bench.problems import Case, ConvShape  # the harness's records, only when benchmarking

        name, fwd = self.name, ("fwd",)
        conv1 = ConvShape(1, 6, 32, 32, 3)  # LightNet conv1: 1->6, 32x32, k3, pool2
        conv2 = ConvShape(6, 16, 15, 15, 3)  # LightNet conv2: 6->16, 15x15, k3, pool2
        vgg = ConvShape(64, 64, 56, 56, 3, padding=1)  # VGG-style block: 64->64, 56x56, k3 pad1, pool2
        # Per-call host cost: problems so small that one call is all argument handling and dispatch.
        tiny = ConvShape(1, 1, 4, 4, 3)  # 1x1x4x4 input, 3x3 filter -> 2x2 -> pool -> 1x1
        return (
            Case("conv1_b1", name, 1, "LightNet conv1 1->6 32x32 k3 pool2, batch 1", conv1),
            Case("conv1_b64", name, 64, "LightNet conv1 1->6 32x32 k3 pool2, batch 64", conv1, quick=("cpu",)),
            Case("conv1_b256", name, 256, "LightNet conv1 1->6 32x32 k3 pool2, batch 256", conv1, quick=("cuda",)),
            Case("conv2_b1", name, 1, "LightNet conv2 6->16 15x15 k3 pool2, batch 1", conv2),
            Case("conv2_b64", name, 64, "LightNet conv2 6->16 15x15 k3 pool2, batch 64", conv2, quick=("cpu",)),
            Case("conv2_b256", name, 256, "LightNet conv2 6->16 15x15 k3 pool2, batch 256", conv2, quick=("cuda",)),
            Case("vgg_b8", name, 8, "VGG-style block 64->64 56x56 k3 pad1 pool2, batch 8", vgg, quick=("cpu",)),
            Case("vgg_b8_fp16", name, 8, "VGG-style block, float16", vgg, "float16", ("cuda",), ("cuda",)),
            Case("vgg_b8_bf16", name, 8, "VGG-style block, bfloat16", vgg, "bfloat16", ("cuda",), ("cuda",)),
            # Small-batch inference.
            Case("conv1_b8", name, 8, "LightNet conv1 1->6 32x32 k3 pool2, batch 8, inference", conv1,
                 only_modes=fwd),
            Case("conv2_b8", name, 8, "LightNet conv2 6->16 15x15 k3 pool2, batch 8, inference", conv2,
                 only_modes=fwd),
            # Per-call host cost on tiny tensors (CallBench): "stock" is ONE stock call (F.conv2d, or an
            # nn.Conv2d module call), not the stock composition.
            Case("call_conv_fn", "call_fn", 1,
                 "per-call cost: lo.conv2d_relu_maxpool2d vs F.conv2d, 1x1x4x4 input, 3x3", tiny, quick=("cpu",)),
            Case("call_conv_module", "call_module", 1,
                 "per-call cost: Conv2dReLUMaxPool2d vs nn.Conv2d module call, 1x1x4x4 input, 3x3", tiny),
        )

    @staticmethod
    def stock(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], stride: IntPair, padding: IntPair,
              dilation: IntPair, pool_k: IntPair, pool_s: IntPair) -> torch.Tensor:
        return F.max_pool2d(F.relu(F.conv2d(x, w, b, stride, padding, dilation)), pool_k, pool_s)

    def inputs(self, case: Case, device: torch.device, dtype: torch.dtype) -> tuple[tuple, tuple, tuple]:
        s = case.shape
        g = torch.Generator().manual_seed(0)
        x = torch.randn(case.batch, s.in_channels, s.height, s.width, generator=g).to(device, dtype)
        bound = 1.0 / math.sqrt(s.in_channels * s.kernel ** 2)
        w = self.uniform((s.out_channels, s.in_channels, s.kernel, s.kernel), bound, g).to(device, dtype)
        b = self.uniform((s.out_channels,), bound, g).to(device, dtype)
        args = ((s.stride,) * 2, (s.padding,) * 2, (s.dilation,) * 2, (s.pool_kernel,) * 2, (s.pool_stride,) * 2)
        PH, PW = s.pool_out
        return (x, w, b), args, (case.batch, s.out_channels, PH, PW)

    def cost(self, case: Case, mode: str) -> tuple[Optional[float], Optional[float]]:
        s, N = case.shape, case.batch
        e = self.element_size(case)
        (P, Q), (PH, PW) = s.conv_out, s.pool_out
        x, w, b = N * s.in_channels * s.height * s.width, s.out_channels * s.in_channels * s.kernel ** 2, s.out_channels
        out = N * s.out_channels * PH * PW
        flops = 2.0 * N * s.out_channels * P * Q * s.in_channels * s.kernel ** 2
        if mode == "fwd":
            return flops, float(e * (x + w + b + out))
        # forward writes out + argmax (1 B); backward reads grad_out, argmax, x, w, writes the three grads
        fwd = e * (x + w + b + out) + out
        bwd = e * (out + x + w) + out + e * (x + w + b)
        return 3 * flops, float(fwd + bwd)

    #: The chain's first stock op, which the per-call cases time one call of.
    first_op = staticmethod(F.conv2d)

    def first_module(self, case: Case) -> nn.Module:
        s = case.shape
        return nn.Conv2d(s.in_channels, s.out_channels, s.kernel, s.stride, s.padding, s.dilation)

    def fused_module(self, case: Case, backend: str) -> nn.Module:
        s = case.shape
        return Conv2dReLUMaxPool2d(s.in_channels, s.out_channels, s.kernel, s.stride, s.padding, s.dilation,
                                   pool_kernel_size=s.pool_kernel, pool_stride=s.pool_stride, backend=backend)


#: How ``lightnet_ops.bench`` times this op (``bench.ops.OPS`` collects it).
BENCH = ConvReLUMaxPoolBench
