"""Swap the fused ops into existing models.

``fuse(model)`` replaces Conv2d -> ReLU -> MaxPool2d chains with :class:`Conv2dReLUMaxPool2d`,
Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d chains of an eval-mode model with
:class:`Conv2dBNReLUMaxPool2d` (the BatchNorm folded into the conv), and Linear -> ReLU chains with
:class:`LinearReLU`, without changing results or state_dict keys.

What is fused is one table, :data:`PATTERNS`: each :class:`Pattern` names its chain of stock ops
(:class:`OpSpec`: the module class, the functions / Tensor methods that spell the op in a graph,
and how to read its arguments), how to build the fused module from the matched modules, and the
``lightnet_ops.functional`` call that replaces the chain in a graph. Both passes below, and the
``torch.compile`` backend (compile_backend.py, through :func:`fuse_graph`), iterate this table;
a new fusion is one more entry.

Two passes:

1. Module pass: in every ``nn.Sequential`` (that keeps Sequential's own forward) a run of children
   that spells a pattern's chain, e.g. ``Conv2d, ReLU, MaxPool2d``, becomes the fused module
   followed by ``Identity`` placeholders. The fused module sits at the first module's name and
   holds the very same ``nn.Parameter`` objects, so ``features.0.weight`` stays
   ``features.0.weight`` and an optimizer built on the original parameters keeps working
   (``inplace=True``). Inside a Sequential an intermediate output has no other consumer.
2. Graph pass: a model whose ``forward`` calls ``F.relu`` / ``F.max_pool2d`` (or anything that is
   not a plain Sequential) is traced with ``torch.fx``; matching chains in the graph are rewritten
   and the model comes back as a ``torch.fx.GraphModule``. A chain is fused only when each
   intermediate value has exactly one consumer (the next op of the chain), so skip connections
   and second consumers are left alone (and reported). The trace inlines the model's own small
   submodules, so a chain that runs through them is found: torchvision's ``BasicConv2d`` (conv and
   bn in a module whose forward calls ``F.relu``) followed by a pool in the parent is one chain.
   A model that ``torch.fx`` cannot trace is
   searched submodule by submodule; for such models use ``torch.compile(model, backend="lightnet_ops")``,
   which rewrites the same chains in the graph TorchDynamo captures (see compile_backend.py).

Recognised: ``nn.Conv2d`` / ``F.conv2d`` / ``torch.conv2d``; ``nn.ReLU`` (also inplace) /
``F.relu`` / ``F.relu_`` / ``torch.relu`` / ``torch.relu_`` / ``Tensor.relu`` / ``Tensor.relu_``;
``nn.MaxPool2d`` / ``F.max_pool2d`` / ``torch.max_pool2d`` with any window and stride;
``nn.Linear`` / ``F.linear``; ``nn.BatchNorm2d`` / ``F.batch_norm(training=False)``. Only what the
fused op computes exactly is fused: conv groups=1, padding_mode='zeros' (padding ints, tuples, 'valid',
or 'same' when it is symmetric); pool dilation 1, return_indices=False, window of at most 255
elements, padding and ceil_mode as far as :data:`POOL_SUPPORT` says the op supports them.

BatchNorm2d folding (eval mode only): the fused module holds the conv's Parameters under the conv's
name and folds the BatchNorm (``torch.nn.utils.fusion.fuse_conv_bn_weights``' arithmetic) into
non-persistent buffers; the BatchNorm's Parameters and buffers stay under the BatchNorm's name in a
:class:`FoldedBatchNorm2d` stand-in whose forward is a pass-through, so state_dict keys do not change.
The fold is redone when a source tensor changes, and computed in the autograd graph when gradients
are needed. After ``.train()`` the fused module runs the stock chain (batch statistics) on those same
tensors, and ``.eval()`` folds the updated ones. A BatchNorm in training mode, one without running
statistics, and a BatchNorm module called from more than one place are left alone with the reason.

Left alone, with the reason in ``skipped_chains``: chains through a module that is not plain —
one with forward/backward hooks or pre-hooks (this includes the old-style
``torch.nn.utils.weight_norm`` / ``spectral_norm`` and ``torch.nn.utils.prune``, which recompute
the weight in a pre-hook), a parametrized one (``torch.nn.utils.parametrizations.weight_norm`` /
``spectral_norm`` / ``orthogonal``, any ``register_parametrization``), one whose weight is not an
``nn.Parameter``, a lazy module not initialised yet — and chains whose intermediate value has
another consumer. With ``guard_input`` each candidate chain is also timed alone (fused vs stock) and
left alone where the fused form is slower.

``inplace=True`` is all or nothing: if anything fails, every edit made to the model is undone
before the exception propagates. The default works on a copy (old-style weight_norm / pruning
attributes, which ``copy.deepcopy`` refuses, are copied detached: their hook recomputes them).
"""

from __future__ import annotations

import collections
import copy
import functools
import inspect
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import functional as LF
from ._shapes import MAX_POOL_WINDOW, pair
from .backend_registry import BACKEND_NAMES
from .modules import Conv2dReLUMaxPool2d, LinearReLU

__all__ = ["PATTERNS", "FusedChain", "Link", "OpSpec", "Pattern", "fuse", "fuse_graph", "summary"]

CONV_KIND = "conv2d_relu_maxpool2d"
CONV_BN_KIND = "conv2d_bn_relu_maxpool2d"
LINEAR_KIND = "linear_relu"


@dataclass(frozen=True)
class FusedChain:
    """One chain that was fused (or, in ``skipped_chains``, left alone and why).

    kind: "conv2d_relu_maxpool2d" or "linear_relu".
    names: the original modules' qualified names (module pass) or graph node names (graph pass).
    where: "module" (nn.Sequential children swapped) or "graph" (torch.fx / TorchDynamo graph).
    reason: why a candidate was skipped; empty for fused chains.
    modules: graph pass: the module each op was called as (its qualified name in the traced module, ""
        for a function call), so that a chain the module pass already reported is not reported twice.
    times: (fused, stock) seconds per call of the chain alone, when ``fuse`` timed it (``guard_input``).
    """

    kind: str
    names: tuple[str, ...]
    where: str
    reason: str = ""
    modules: tuple[str, ...] = field(default=(), compare=False, repr=False)
    times: Optional[tuple[float, float]] = field(default=None, compare=False)

    def __str__(self) -> str:
        chain = " -> ".join(self.names)
        timed = "" if self.times is None else \
            f" [fused {self.times[0] * 1e6:.0f} us, stock {self.times[1] * 1e6:.0f} us]"
        return f"{self.kind}: {chain} ({self.where}){timed}" + (f" skipped: {self.reason}" if self.reason else "")


class _Skip(Exception):
    """A candidate chain that the fused op cannot compute exactly; the message says why."""


# --------------------------------------------------------------------------------------------
# Argument normalisation (signatures of the stock functions, to bind node args/kwargs)


def _conv_sig(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: ANN001, ANN202
    pass


def _pool_sig(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,  # noqa: ANN001, ANN202
              return_indices=False):
    pass


def _linear_sig(input, weight, bias=None):  # noqa: ANN001, ANN202
    pass


def _relu_sig(input, inplace=False):  # noqa: ANN001, ANN202
    pass


def _batch_norm_sig(input, running_mean, running_var, weight=None, bias=None, training=False,  # noqa: ANN001, ANN202
                    momentum=0.1, eps=1e-5):
    pass


def _input_sig(input):  # noqa: ANN001, ANN202
    pass


def _bind(sig_fn: Callable, args: tuple, kwargs: dict) -> Optional[dict[str, Any]]:
    try:
        bound = inspect.signature(sig_fn).bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _int_pair(value: Any, name: str) -> tuple[int, int]:
    try:
        return tuple(pair(value, name))  # type: ignore[return-value]
    except (TypeError, ValueError) as e:
        raise _Skip(str(e)) from None


def _conv_params(stride: Any, padding: Any, dilation: Any, groups: Any, kernel_size: Optional[tuple[int, int]],
                 padding_mode: str = "zeros") -> dict[str, tuple[int, int]]:
    """{"stride", "padding", "dilation"} as int pairs, or _Skip."""
    if groups != 1:
        raise _Skip(f"conv groups={groups} (the fused op needs groups=1)")
    if padding_mode != "zeros":
        raise _Skip(f"conv padding_mode={padding_mode!r} (the fused op pads with zeros)")
    stride_ = _int_pair(stride, "stride")
    dilation_ = _int_pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0)
        elif padding != "same" or kernel_size is None:
            raise _Skip(f"conv padding={padding!r} with unknown kernel size")
        else:
            halves = []
            for d, k in zip(dilation_, kernel_size):
                total = d * (k - 1)
                if total % 2:
                    raise _Skip("conv padding='same' is asymmetric for this kernel")
                halves.append(total // 2)
            pads = (halves[0], halves[1])
    else:
        pads = _int_pair(padding, "padding")
    return {"stride": stride_, "padding": pads, "dilation": dilation_}


@dataclass(frozen=True)
class PoolSupport:
    """Which max_pool2d arguments beyond a floor-mode, unpadded window the fused op computes exactly.

    A chain whose pool needs an unsupported one is skipped with the reason; a supported one is passed to
    the fused module / functional call as ``pool_padding=`` / ``ceil_mode=`` (only when it is not the
    default, so calls of a fused op without those arguments stay valid).
    """

    padding: bool = False
    ceil_mode: bool = False


#: What the pool of the fused conv op supports (one line to change when the op gains an argument).
POOL_SUPPORT = PoolSupport(padding=True, ceil_mode=True)


def _pool_params(kernel_size: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: Any,
                 return_indices: Any) -> dict[str, Any]:
    """{"kernel_size", "stride", "padding"} as int pairs and "ceil_mode" (bool), or _Skip."""
    k = _int_pair(kernel_size, "pool kernel_size")
    default_stride = stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0)  # [] in aten
    s = k if default_stride else _int_pair(stride, "pool stride")
    pad = _int_pair(padding, "pool padding")
    if pad != (0, 0) and not POOL_SUPPORT.padding:
        raise _Skip(f"pool padding={padding} (the fused op pools without padding)")
    if _int_pair(dilation, "pool dilation") != (1, 1):
        raise _Skip(f"pool dilation={dilation}")
    if not isinstance(ceil_mode, bool):
        raise _Skip(f"pool ceil_mode={ceil_mode!r} is not a constant bool")
    if ceil_mode and not POOL_SUPPORT.ceil_mode:
        raise _Skip("pool ceil_mode=True (the fused op pools in floor mode)")
    if return_indices is not False:
        raise _Skip("pool return_indices=True")
    if k[0] * k[1] > MAX_POOL_WINDOW:
        raise _Skip(f"pool window {k} has more than {MAX_POOL_WINDOW} elements")
    return {"kernel_size": k, "stride": s, "padding": pad, "ceil_mode": ceil_mode}


def _pool_kwargs(pool: dict[str, Any]) -> dict[str, Any]:
    """The fused op's keyword arguments for a pool's padding / ceil mode, only where not the default."""
    kwargs: dict[str, Any] = {}
    if pool["padding"] != (0, 0):
        kwargs["pool_padding"] = pool["padding"]
    if pool["ceil_mode"]:
        kwargs["ceil_mode"] = True
    return kwargs


def _no_params(_: Any) -> dict[str, Any]:
    return {}


def _conv_module_params(conv: nn.Conv2d) -> dict[str, Any]:
    return _conv_params(conv.stride, conv.padding, conv.dilation, conv.groups, tuple(conv.kernel_size),
                        conv.padding_mode)


def _conv_call_params(args: dict[str, Any]) -> dict[str, Any]:
    kernel = None
    if isinstance(args["padding"], str):  # 'same' needs the kernel size: from the weight's example value
        w = args["weight"]
        val = w.meta.get("val", w.meta.get("example_value")) if isinstance(w, fx.Node) else None
        if isinstance(val, torch.Tensor) and val.dim() == 4:
            kernel = tuple(int(v) for v in val.shape[2:])
    return _conv_params(args["stride"], args["padding"], args["dilation"], args["groups"], kernel)


def _pool_module_params(pool: nn.MaxPool2d) -> dict[str, Any]:
    return _pool_params(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                        pool.return_indices)


def _pool_call_params(args: dict[str, Any]) -> dict[str, Any]:
    return _pool_params(args["kernel_size"], args["stride"], args["padding"], args["dilation"], args["ceil_mode"],
                        args["return_indices"])


def _batch_norm_module_params(bn: nn.BatchNorm2d) -> dict[str, Any]:
    if bn.training:
        raise _Skip("BatchNorm2d in training mode normalises with batch statistics, which cannot be folded "
                    "(fuse the model in eval mode: model.eval())")
    if bn.running_mean is None or bn.running_var is None:
        raise _Skip("BatchNorm2d without running statistics (track_running_stats=False) normalises with batch "
                    "statistics, which cannot be folded")
    return {"eps": float(bn.eps)}


def _batch_norm_call_params(args: dict[str, Any]) -> dict[str, Any]:
    if args["training"] is not False:
        raise _Skip(f"batch_norm(training={args['training']}) normalises with batch statistics, which cannot be "
                    "folded")
    if args["running_mean"] is None or args["running_var"] is None:
        raise _Skip("batch_norm without running statistics cannot be folded")
    if not isinstance(args["eps"], (int, float)) or isinstance(args["eps"], bool):
        raise _Skip(f"batch_norm eps={args['eps']!r} is not a constant number")
    return {"eps": float(args["eps"])}


# --------------------------------------------------------------------------------------------
# The table: stock ops, and the chains of them that a fused op replaces


@dataclass(frozen=True)
class OpSpec:
    """One stock op a chain can contain, as a module and as a graph call.

    name: short name used in messages ("conv2d", "relu", ...).
    module_type: the nn.Module class (instances must keep its ``forward``; subclasses that override
        it compute something else and do not match).
    functions: ``call_function`` targets that spell the op in an fx graph (F.conv2d, torch.conv2d...).
    methods: ``call_method`` names (Tensor.relu -> "relu"), called with the input only.
    signature: a function with the stock signature, to bind a call's args/kwargs by name (default:
        the input only).
    module_params: normalised arguments of a module instance (dict); raises _Skip when the fused
        op cannot compute this instance exactly.
    call_params: the same from a bound functional call.
    parameters: names of the module's tensors that the fused module adopts (must be nn.Parameters).
    optional: those of ``parameters`` that may be None (a conv without bias, a non-affine BatchNorm).
    """

    name: str
    module_type: type
    functions: frozenset = frozenset()
    methods: frozenset = frozenset()
    signature: Callable = _input_sig
    module_params: Callable[[nn.Module], dict[str, Any]] = _no_params
    call_params: Callable[[dict[str, Any]], dict[str, Any]] = _no_params
    parameters: tuple[str, ...] = ()
    optional: tuple[str, ...] = ("bias",)


CONV2D = OpSpec("conv2d", nn.Conv2d, frozenset({F.conv2d, torch.conv2d}), signature=_conv_sig,
                module_params=_conv_module_params, call_params=_conv_call_params, parameters=("weight", "bias"))
RELU = OpSpec("relu", nn.ReLU, frozenset({F.relu, F.relu_, torch.relu, torch.relu_}), frozenset({"relu", "relu_"}),
              signature=_relu_sig)
MAX_POOL2D = OpSpec("max_pool2d", nn.MaxPool2d, frozenset({F.max_pool2d, torch.max_pool2d}), signature=_pool_sig,
                    module_params=_pool_module_params, call_params=_pool_call_params)
LINEAR = OpSpec("linear", nn.Linear, frozenset({F.linear}), signature=_linear_sig, parameters=("weight", "bias"))
# Only F.batch_norm: torch.batch_norm orders its arguments differently (and TorchDynamo records F.batch_norm).
BATCH_NORM2D = OpSpec("batch_norm2d", nn.BatchNorm2d, frozenset({F.batch_norm}), signature=_batch_norm_sig,
                      module_params=_batch_norm_module_params, call_params=_batch_norm_call_params,
                      parameters=("weight", "bias"), optional=("weight", "bias"))


@dataclass
class Link:
    """One matched op of a chain.

    op: its OpSpec. name: qualified module name (module pass) or graph node name (graph pass).
    module: the matched module (module pass, and ``call_module`` nodes), else None.
    node: the graph node (graph pass), else None. input: the node it reads (graph pass).
    args: the bound arguments of a ``call_function`` node ({} otherwise).
    params: the normalised arguments (``op.module_params`` / ``op.call_params``).
    """

    op: OpSpec
    name: str
    module: Optional[nn.Module] = None
    node: Optional[fx.Node] = None
    input: Any = None
    args: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)


#: tensor(link, "weight") -> the graph value of a matched op's tensor argument (None for a missing bias)
TensorOf = Callable[[Link, str], Any]


@dataclass(frozen=True)
class Pattern:
    """One fusion: a chain of stock ops and what replaces it.

    kind: the name reported in FusedChain.kind.
    chain: the ops, in data-flow order; each reads the previous one's output.
    fused_module: the class build_module returns (torch.fx traces keep it as a leaf).
    build_module(links, backend): the fused nn.Module, adopting the first link's module's Parameters
        (used when the chain starts with a module: the module pass, and ``call_module`` nodes).
    function: the ``lightnet_ops.functional`` op that replaces the chain in a graph.
    call_args(links, tensor): its arguments after the input (the call also gets ``backend=``);
        ``tensor`` gives the graph value of a matched op's weight/bias, whether module or function.
        Raises _Skip where the chain has no functional form (e.g. it needs a module's train/eval mode).
    call_kwargs(links): keyword arguments of that call besides ``backend``.
    stand_ins(links, fused): for each link after the first, the module that takes the place of its
        module (None: ``nn.Identity`` in a Sequential; in a graph the module is left where it is). A
        stand-in keeps a module's tensors under its name (state_dict keys unchanged) when the fused
        module folds it in; a graph chain whose stand-in link is a module called from more than one
        place is not swapped.
    """

    kind: str
    chain: tuple[OpSpec, ...]
    fused_module: type
    build_module: Callable[[Sequence[Link], str], nn.Module]
    function: Callable
    call_args: Callable[[Sequence[Link], TensorOf], tuple]
    call_kwargs: Callable[[Sequence[Link]], dict[str, Any]] = lambda links: {}
    stand_ins: Callable[[Sequence[Link], nn.Module], Sequence[Optional[nn.Module]]] = \
        lambda links, fused: [None] * (len(links) - 1)


def _adopt_parameters(fused: nn.Module, module: nn.Module, names: Sequence[str]) -> nn.Module:
    """Give `fused` (built on meta) `module`'s own Parameters and training flag."""
    for name in names:
        value = getattr(module, name)
        if value is not None:
            setattr(fused, name, value)
    fused.train(module.training)
    return fused


def _conv_relu_pool_module(links: Sequence[Link], backend: str) -> nn.Module:
    conv, _, pool = links
    m = conv.module
    p, q = conv.params, pool.params
    fused = Conv2dReLUMaxPool2d(  # on meta: no allocation, no RNG use
        m.in_channels, m.out_channels, tuple(m.kernel_size), p["stride"], p["padding"], p["dilation"],
        bias=m.bias is not None, pool_kernel_size=q["kernel_size"], pool_stride=q["stride"], backend=backend,
        device="meta", **_pool_kwargs(q),
    )
    return _adopt_parameters(fused, m, CONV2D.parameters)


def _conv_relu_pool_kwargs(links: Sequence[Link]) -> dict[str, Any]:
    return _pool_kwargs(links[-1].params)


def _conv_relu_pool_args(links: Sequence[Link], tensor: TensorOf) -> tuple:
    conv, _, pool = links
    p, q = conv.params, pool.params
    return (tensor(conv, "weight"), tensor(conv, "bias"), p["stride"], p["padding"], p["dilation"],
            q["kernel_size"], q["stride"])


def _linear_relu_module(links: Sequence[Link], backend: str) -> nn.Module:
    m = links[0].module
    fused = LinearReLU(m.in_features, m.out_features, bias=m.bias is not None, backend=backend, device="meta")
    return _adopt_parameters(fused, m, LINEAR.parameters)


def _linear_relu_args(links: Sequence[Link], tensor: TensorOf) -> tuple:
    return (tensor(links[0], "weight"), tensor(links[0], "bias"))


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
    ``pool`` takes the fused op's further pool arguments (see :data:`POOL_SUPPORT`)."""
    w, b = fold_conv_bn(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
    return LF.conv2d_relu_maxpool2d(input, w, b, stride, padding, dilation, pool_kernel_size, pool_stride,
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


_FOLD_SOURCES = ("weight", "bias", "running_mean", "running_var", "bn_weight", "bn_bias")


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
                         pool_stride=q["stride"], backend=backend, device="meta", **_pool_kwargs(q))
        self._pool_extra = _pool_kwargs(q)
        self._stock_pool = {"padding": q["padding"], "ceil_mode": q["ceil_mode"]}
        _adopt_parameters(self, conv, CONV2D.parameters)
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
        return LF.conv2d_relu_maxpool2d(input, w, b, self.stride, self.padding, self.dilation,
                                        self.pool_kernel_size, self.pool_stride, backend=self.backend,
                                        **self._pool_extra)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", batch_norm folded"


def _conv_bn_relu_pool_module(links: Sequence[Link], backend: str) -> nn.Module:
    conv, bn, _, pool = links
    return Conv2dBNReLUMaxPool2d(conv.module, FoldedBatchNorm2d.adopt(bn.module), conv.params, pool.params,
                                 backend=backend)


def _conv_bn_stand_ins(links: Sequence[Link], fused: nn.Module) -> list[Optional[nn.Module]]:
    return [fused.bn, None, None]


def _conv_bn_relu_pool_args(links: Sequence[Link], tensor: TensorOf) -> tuple:
    conv, bn, _, pool = links
    if bn.module is not None:  # checked before any graph edit
        raise _Skip(f"{bn.name} is a BatchNorm2d module called from more than one place (or its conv is): a "
                    "fused call could not follow its train/eval mode")
    p, q = conv.params, pool.params
    return (tensor(conv, "weight"), tensor(conv, "bias"), tensor(bn, "running_mean"), tensor(bn, "running_var"),
            tensor(bn, "weight"), tensor(bn, "bias"), bn.params["eps"], p["stride"], p["padding"], p["dilation"],
            q["kernel_size"], q["stride"])



#: Every fusion, tried in this order at each position (a longer chain that starts with the same op
#: as a shorter one goes first); the first pattern whose chain matches decides (fused or skipped).
PATTERNS: tuple[Pattern, ...] = (
    Pattern(CONV_BN_KIND, (CONV2D, BATCH_NORM2D, RELU, MAX_POOL2D), Conv2dBNReLUMaxPool2d, _conv_bn_relu_pool_module,
            conv2d_bn_relu_maxpool2d, _conv_bn_relu_pool_args, _conv_relu_pool_kwargs, _conv_bn_stand_ins),
    Pattern(CONV_KIND, (CONV2D, RELU, MAX_POOL2D), Conv2dReLUMaxPool2d, _conv_relu_pool_module,
            LF.conv2d_relu_maxpool2d, _conv_relu_pool_args, _conv_relu_pool_kwargs),
    Pattern(LINEAR_KIND, (LINEAR, RELU), LinearReLU, _linear_relu_module, LF.linear_relu, _linear_relu_args),
)


# --------------------------------------------------------------------------------------------
# Checks shared by both passes


def _plain(module: Any, cls: type) -> bool:
    """`module` is a `cls` that still runs `cls.forward` (a subclass may compute something else)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _hook_names(module: nn.Module) -> list[str]:
    found = []
    for kind, hooks in (("forward pre-hook", module._forward_pre_hooks), ("forward hook", module._forward_hooks),
                        ("backward pre-hook", getattr(module, "_backward_pre_hooks", {})),
                        ("backward hook", module._backward_hooks)):
        for hook in hooks.values():
            what = getattr(hook, "__qualname__", None) or type(hook).__name__
            found.append(f"{kind} {what}")
    return found


def _check_module(op: OpSpec, name: str, module: nn.Module) -> None:
    """_Skip unless `module` is a plain instance the fused module can stand in for: no hooks, no
    parametrizations, its tensors real nn.Parameters (old-style weight_norm / prune turn the weight
    into a computed attribute), initialised."""
    if parametrize.is_parametrized(module):
        tensors = ", ".join(f"{t} by {'/'.join(type(p).__name__ for p in plist)}"
                            for t, plist in module.parametrizations.items())
        raise _Skip(f"{name} is parametrized ({tensors}); the fused module would bypass the parametrization")
    hooks = _hook_names(module)
    if hooks:
        raise _Skip(f"{name} has hooks ({', '.join(hooks)}); a module with hooks must run as itself")
    for tensor_name in op.parameters:
        value = getattr(module, tensor_name, None)
        if value is None and tensor_name in op.optional:
            continue
        if isinstance(value, nn.parameter.UninitializedParameter):
            raise _Skip(f"lazy {op.name} is not initialised yet")
        if not isinstance(value, nn.Parameter) or module._parameters.get(tensor_name) is not value:
            raise _Skip(f"{name}.{tensor_name} is not an nn.Parameter of the module ({type(value).__name__})")


def _resolve(links: Sequence[Link]) -> None:
    """Fill each link's params (module checks first); raises _Skip with the first problem found."""
    for link in links:
        if link.module is not None:
            _check_module(link.op, link.name, link.module)
            link.params = link.op.module_params(link.module)
        else:
            link.params = link.op.call_params(link.args)


# --------------------------------------------------------------------------------------------
# Undo log: every edit fuse makes to a model it was given goes through it, so a failure can undo them


class _Journal:
    """Edits to existing modules, with their undo actions (run newest first by rollback)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._graphs: set[int] = set()

    def set_child(self, parent: nn.Module, name: str, child: nn.Module) -> None:
        old = parent._modules[name]
        parent._modules[name] = child
        self._undo.append(lambda: parent._modules.__setitem__(name, old))

    def set_attr(self, obj: nn.Module, name: str, value: Any) -> None:
        had, old = name in obj.__dict__, obj.__dict__.get(name)
        obj.__dict__[name] = value
        self._undo.append(lambda: obj.__dict__.__setitem__(name, old) if had else obj.__dict__.pop(name, None))

    def new_graph_module(self, gm: fx.GraphModule) -> None:
        """`gm` was made by fuse itself: its graph needs no snapshot."""
        self._graphs.add(id(gm))

    def keep_graph(self, gm: fx.GraphModule) -> None:
        """Snapshot `gm`'s graph before its first edit."""
        if id(gm) in self._graphs:
            return
        self._graphs.add(id(gm))
        saved = copy.deepcopy(gm.graph)
        self._undo.append(lambda: setattr(gm, "graph", saved))  # the setter recompiles

    def rollback(self) -> None:
        while self._undo:
            self._undo.pop()()


# --------------------------------------------------------------------------------------------
# Speed guard: time each candidate chain alone, fused vs stock, and leave the slower ones


def _median_times(fused: Callable[[], Any], stock: Callable[[], Any], budget_s: float = 0.3
                  ) -> tuple[float, float]:
    """Median seconds per call of `fused` and `stock`, interleaved (same machine state for both)."""
    for f in (fused, stock, fused, stock):  # warm-up: first-call allocations, kernel plans, caches
        f()
    start = time.perf_counter()
    fused()
    stock()
    one = max(time.perf_counter() - start, 1e-7)
    rounds = int(min(max(budget_s / one, 5), 41))
    tf: list[float] = []
    ts: list[float] = []
    for i in range(rounds):
        for f, out in ((fused, tf), (stock, ts)) if i % 2 == 0 else ((stock, ts), (fused, tf)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return statistics.median(tf), statistics.median(ts)


class _Guard:
    """Per-chain speed check for ``fuse(guard_input=...)``: the input shape each module saw on one run of
    the model, and the ratio fused/stock above which a chain is left alone."""

    def __init__(self, model: nn.Module, inputs: tuple, ratio: float) -> None:
        self.ratio = ratio
        self.seen: dict[int, set] = collections.defaultdict(set)

        def record(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                t = args[0]
                self.seen[id(module)].add((tuple(t.shape), t.dtype, t.device))

        handles = [m.register_forward_pre_hook(record) for m in model.modules()]
        state = {k: v.clone() for k, v in model.named_buffers()}
        try:  # one run, then every buffer (BatchNorm statistics...) and the RNG put back
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                model(*inputs)
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(state[k])

    def check(self, pattern: Pattern, links: Sequence[Link], gm: Optional[fx.GraphModule], backend: str,
              new_module: Optional[nn.Module]) -> Optional[tuple[float, float]]:
        """(fused, stock) seconds of this chain at the shape its first module saw, or None where it cannot
        be timed (a functional first op, several shapes, a value only known at run time); raises _Skip
        when fused / stock > ratio."""
        first = links[0]
        shapes = self.seen.get(id(first.module)) if first.module is not None else None
        if not shapes or len(shapes) != 1:
            return None
        shape, dtype, device = next(iter(shapes))
        if not dtype.is_floating_point:
            return None
        # its own generator: fusing leaves the global RNG alone
        x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0)).to(device)

        def value(link: Link, name: str) -> Any:
            if link.module is not None:
                return getattr(link.module, name)
            return _node_value(gm, link.args[name])

        try:
            stock_ops = [_stock_call(link, gm) for link in links]
            if new_module is not None:
                fused_call = functools.partial(new_module, x)
            else:
                args = pattern.call_args(links, value)
                fused_call = functools.partial(pattern.function, x, *args, **pattern.call_kwargs(links),
                                               backend=backend)
        except _NotTimed:
            return None

        def stock_call() -> Any:
            y = x
            for op in stock_ops:
                y = op(y)
            return y

        with torch.no_grad():
            tf, ts = _median_times(fused_call, stock_call)
        if tf > self.ratio * ts:
            raise _SlowerSkip(f"fused chain slower than stock at input {tuple(shape)}: {tf * 1e6:.0f} us vs "
                              f"{ts * 1e6:.0f} us", (tf, ts))
        return tf, ts


class _NotTimed(Exception):
    pass


class _SlowerSkip(_Skip):
    def __init__(self, message: str, times: tuple[float, float]) -> None:
        super().__init__(message)
        self.times = times


def _node_value(gm: Optional[fx.GraphModule], value: Any) -> Any:
    """A graph argument's value where it is known before running (constants, get_attr), else _NotTimed."""
    if isinstance(value, fx.Node):
        if value.op == "get_attr" and gm is not None:
            obj: Any = gm
            for part in str(value.target).split("."):
                obj = getattr(obj, part)
            return obj
        raise _NotTimed
    if isinstance(value, (list, tuple)):
        return type(value)(_node_value(gm, v) for v in value)
    return value


def _stock_call(link: Link, gm: Optional[fx.GraphModule]) -> Callable[[torch.Tensor], Any]:
    """The op of `link` as it runs in the model, as a function of its input."""
    if link.module is not None:
        return link.module
    node = link.node
    if node.op == "call_method":
        return lambda x: getattr(x, node.target)()
    args = [_node_value(gm, a) if a is not link.input else None for a in node.args]
    kwargs = {k: _node_value(gm, v) for k, v in node.kwargs.items() if v is not link.input}
    pos = next((i for i, a in enumerate(node.args) if a is link.input), None)
    if pos is None:
        key = next(k for k, v in node.kwargs.items() if v is link.input)
        return lambda x: node.target(*args, **{**kwargs, key: x})
    return lambda x: node.target(*args[:pos], x, *args[pos + 1:], **kwargs)


# --------------------------------------------------------------------------------------------
# Module pass: nn.Sequential children


def _fuse_sequentials(root: nn.Module, backend: str, fused: list[FusedChain], skipped: list[FusedChain],
                      journal: _Journal, guard: Optional[_Guard] = None) -> None:
    patterns = PATTERNS
    for seq_name, seq in list(root.named_modules()):
        if not _plain(seq, nn.Sequential):
            continue
        keys = list(seq._modules.keys())
        mods = list(seq._modules.values())
        names = [f"{seq_name}.{k}" if seq_name else k for k in keys]
        i = 0
        while i < len(mods):
            step = 1
            for pattern in patterns:
                n = len(pattern.chain)
                window = mods[i:i + n]
                if len(window) < n or not all(_plain(m, op.module_type) for m, op in zip(window, pattern.chain)):
                    continue
                links = [Link(op, names[i + j], module=window[j]) for j, op in enumerate(pattern.chain)]
                try:
                    _resolve(links)
                    new = pattern.build_module(links, backend)
                    times = guard.check(pattern, links, None, backend, new) if guard is not None else None
                except _Skip as e:
                    skipped.append(FusedChain(pattern.kind, tuple(names[i:i + n]), "module", str(e),
                                              times=getattr(e, "times", None)))
                    break
                journal.set_child(seq, keys[i], new)
                for key, stand_in in zip(keys[i + 1:i + n], pattern.stand_ins(links, new)):
                    journal.set_child(seq, key, nn.Identity() if stand_in is None else stand_in)
                fused.append(FusedChain(pattern.kind, tuple(names[i:i + n]), "module", times=times))
                step = n
                break
            i += step


# --------------------------------------------------------------------------------------------
# Graph pass (torch.fx graphs: symbolic traces and TorchDynamo captures)


def _module_of(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def _match_node(gm: fx.GraphModule, op: OpSpec, node: fx.Node) -> Optional[Link]:
    """A Link if `node` spells `op` (module, function or method call), else None. Arguments are
    not checked here (see _resolve)."""
    if node.op == "call_function" and node.target in op.functions:
        args = _bind(op.signature, node.args, node.kwargs)
        return None if args is None else Link(op, node.name, node=node, input=args["input"], args=args)
    if node.op == "call_method" and node.target in op.methods and len(node.args) == 1 and not node.kwargs:
        return Link(op, node.name, node=node, input=node.args[0])
    mod = _module_of(gm, node)
    if mod is not None and _plain(mod, op.module_type) and len(node.args) == 1 and not node.kwargs:
        return Link(op, node.name, module=mod, node=node, input=node.args[0])
    return None


def _match_chain(gm: fx.GraphModule, pattern: Pattern, node: fx.Node) -> Optional[tuple[list[Link], str]]:
    """(links, why-not) if the chain of `pattern` starts at `node`, following each op's output to a
    consumer that is the next op; why-not is "" or names an intermediate with another consumer."""
    first = _match_node(gm, pattern.chain[0], node)
    if first is None:
        return None
    links, shared = [first], ""
    for op in pattern.chain[1:]:
        prev = links[-1].node
        nxt = None
        for user in prev.users:
            link = _match_node(gm, op, user)
            if link is not None and link.input is prev:
                nxt = link
                break
        if nxt is None:
            return None
        if len(prev.users) > 1 and not shared:
            shared = f"the output of {prev.name} has {len(prev.users)} consumers"
        links.append(nxt)
    return links, shared


def _parent_of(root: nn.Module, target: str) -> tuple[nn.Module, str]:
    parent_name, _, leaf = target.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), leaf


def _rewrite(gm: fx.GraphModule, pattern: Pattern, links: Sequence[Link], backend: str, swap_module: bool,
             journal: _Journal, new_module: Optional[nn.Module] = None) -> None:
    """Replace the chain's nodes by one call of the fused module (swap_module: the first op is a
    module called from this one place) or of the fused function."""
    graph = gm.graph
    first, last = links[0], links[-1]
    if swap_module and new_module is None:
        new_module = pattern.build_module(links, backend)
    elif not swap_module:
        new_module = None
    journal.keep_graph(gm)
    with graph.inserting_before(last.node):
        if new_module is not None:
            parent, leaf = _parent_of(gm, first.node.target)
            journal.set_child(parent, leaf, new_module)
            for link, stand_in in zip(links[1:], pattern.stand_ins(links, new_module)):
                if stand_in is not None:
                    journal.set_child(*_parent_of(gm, link.node.target), stand_in)
            new = graph.call_module(first.node.target, (first.input,))
        else:
            def tensor(link: Link, name: str) -> Any:
                if link.module is None:
                    return link.args[name]
                return graph.get_attr(f"{link.node.target}.{name}") if getattr(link.module, name) is not None \
                    else None

            args = pattern.call_args(links, tensor)
            new = graph.call_function(pattern.function, (first.input, *args),
                                      {**pattern.call_kwargs(links), "backend": backend})
    new.meta = dict(last.node.meta)
    last.node.replace_all_uses_with(new)
    for link in reversed(links):
        graph.erase_node(link.node)


def _fuse_graph(gm: fx.GraphModule, backend: str, use_modules: bool, journal: _Journal,
                guard: Optional[_Guard] = None, decided: Callable[[tuple[str, ...]], bool] = lambda modules: False
                ) -> tuple[list[FusedChain], list[FusedChain]]:
    """See fuse_graph. decided(modules): the module pass already left this chain of modules alone (and
    said why): the graph pass leaves it too, unreported."""
    graph = gm.graph
    patterns = PATTERNS
    fused: list[FusedChain] = []
    skipped: list[FusedChain] = []
    call_sites = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in list(graph.nodes):
        if getattr(node, "_erased", False):
            continue
        for pattern in patterns:
            found = _match_chain(gm, pattern, node)
            if found is None:
                continue
            links, shared = found
            names = tuple(link.name for link in links)
            modules = tuple(str(link.node.target) if link.node.op == "call_module" else "" for link in links)
            if decided(modules):
                break
            try:
                if shared:
                    raise _Skip(shared)
                _resolve(links)
                # the module form adopts the modules of the first op and of every op with tensors (a
                # BatchNorm): each must be a module called from this one place
                swap = use_modules and all(link.module is not None and call_sites[link.node.target] == 1
                                           for j, link in enumerate(links) if j == 0 or link.op.parameters)
                new_module = pattern.build_module(links, backend) if swap else None
                times = guard.check(pattern, links, gm, backend, new_module) if guard is not None else None
                _rewrite(gm, pattern, links, backend, swap, journal, new_module)
            except _Skip as e:
                skipped.append(FusedChain(pattern.kind, names, "graph", str(e), modules, getattr(e, "times", None)))
            else:
                fused.append(FusedChain(pattern.kind, names, "graph", modules=modules, times=times))
            break
    if fused:
        graph.lint()
        gm.recompile()
    return fused, skipped


def fuse_graph(gm: fx.GraphModule, *, backend: str = "auto", use_modules: bool = True
               ) -> tuple[list[FusedChain], list[FusedChain]]:
    """Rewrite the chains of :data:`PATTERNS` (Conv2d->(BatchNorm2d)->ReLU->MaxPool2d, Linear->ReLU) in `gm`'s graph,
    in place; if anything fails, `gm` is restored before the exception propagates.

    Args:
        gm: a GraphModule from ``torch.fx.symbolic_trace`` or TorchDynamo.
        backend: lightnet_ops backend the fused calls use.
        use_modules: swap a conv/linear submodule called from exactly one place for the fused module
            (keeps its name and Parameters); otherwise (and for functional convs) emit a call to
            ``lightnet_ops.functional`` with the same weight/bias values.

    Returns:
        (fused chains, skipped candidate chains with the reason).
    """
    journal = _Journal()
    try:
        return _fuse_graph(gm, backend, use_modules, journal)
    except BaseException:
        journal.rollback()
        raise


class _Tracer(fx.Tracer):
    """Default torch.fx tracer that also keeps the fused modules (of every pattern) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, tuple(p.fused_module for p in PATTERNS)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _is_leaf(m: nn.Module) -> bool:
    return _Tracer().is_leaf_module(m, "")


def _restore_state_keys(original: nn.Module, gm: fx.GraphModule) -> None:
    """GraphModule keeps only what forward touches; put back the rest so state_dict keys match."""
    have = gm.state_dict(keep_vars=True)
    for key, value in original.state_dict(keep_vars=True).items():
        if key in have:
            continue
        path, _, leaf = key.rpartition(".")
        owner: nn.Module = gm
        for part in path.split(".") if path else []:
            child = owner._modules.get(part)
            if child is None:
                child = nn.Module()
                owner.add_module(part, child)
            owner = child
        if isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value)


def _copy_training_flags(original: nn.Module, gm: nn.Module) -> None:
    """GraphModule makes fresh containers on the paths to used submodules; give them the original flags."""
    for name, sub in gm.named_modules():
        try:
            sub.training = original.get_submodule(name).training if name else original.training
        except AttributeError:
            pass


def _fuse_traced(module: nn.Module, qualname: str, backend: str, fused: list[FusedChain],
                 skipped: list[FusedChain], notes: list[str], journal: _Journal,
                 guard: Optional[_Guard] = None) -> Optional[nn.Module]:
    """Trace `module` with torch.fx and fuse its graph; a GraphModule if anything was fused, else None.
    If it cannot be traced, try its children (replacing them in place)."""
    if _is_leaf(module):
        return None
    if not _plain(module, nn.Sequential):
        try:
            graph = _Tracer().trace(module)
        except Exception as e:  # noqa: BLE001 - any tracing failure means: look inside instead
            notes.append(f"{qualname or type(module).__name__}: torch.fx could not trace it "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "use torch.compile(model, backend='lightnet_ops') for such models")
        else:
            gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
            journal.new_graph_module(gm)
            prefix = f"{qualname}." if qualname else ""
            reported = {c.names for c in skipped if c.where == "module"}
            f, s = _fuse_graph(gm, backend, True, journal, guard,
                               lambda modules: tuple(prefix + m for m in modules) in reported)
            skipped.extend(FusedChain(c.kind, tuple(prefix + n for n in c.names), c.where, c.reason, times=c.times)
                           for c in s)
            if not f:
                return None
            fused.extend(FusedChain(c.kind, tuple(prefix + n for n in c.names), c.where, times=c.times) for c in f)
            _restore_state_keys(module, gm)
            _copy_training_flags(module, gm)
            return gm
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _fuse_traced(child, f"{qualname}.{name}" if qualname else name, backend, fused, skipped, notes,
                           journal, guard)
        if new is not None:
            journal.set_child(module, name, new)
    return None


# --------------------------------------------------------------------------------------------
# Public entry point


def _copy_model(model: nn.Module) -> nn.Module:
    """copy.deepcopy, except for the non-leaf tensors that old-style ``weight_norm`` /
    ``spectral_norm`` / ``prune`` keep as plain attributes (deepcopy refuses them): the copy gets
    them detached; their forward pre-hook recomputes them from the copied parameters on every call."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def fuse(model: nn.Module, *, inplace: bool = False, backend: str = "auto", verbose: bool = False,
         guard_input: Union[torch.Tensor, tuple, None] = None, guard_ratio: float = 1.0) -> nn.Module:
    """Replace Conv2d->(BatchNorm2d)->ReLU->MaxPool2d and Linear->ReLU chains (:data:`PATTERNS`) in `model`
    with the fused ops (a BatchNorm is folded only in eval mode: call ``model.eval()`` first).

    Results and state_dict keys do not change: checkpoints of the original load into the fused
    model and back. The fused modules hold the original ``nn.Parameter`` objects. Chains through
    modules with hooks or parametrizations are left alone and listed, with the reason, in
    ``skipped_chains``.

    Args:
        model: any nn.Module; ``nn.Sequential`` stacks are fused module by module, other forwards
            through a ``torch.fx`` trace (the model then comes back as a ``torch.fx.GraphModule``).
        inplace: modify `model` itself (its Sequentials; a traced model still comes back as a new
            GraphModule sharing `model`'s parameters); all or nothing: on any exception `model` is
            restored before it propagates. Default: work on a deep copy.
        backend: backend of the fused ops: "auto", "cpu", "cuda", "triton" or "reference".
        verbose: print what was fused and which candidates were left alone and why.
        guard_input: an example input (a tensor, or a tuple of forward's arguments). When given, the
            model runs once on it (no_grad; buffers and the RNG state are put back) to see each chain's
            input shape, and each candidate chain is timed alone at that shape, fused against stock
            (inference, median of interleaved calls); a chain whose fused form takes more than
            ``guard_ratio`` times the stock time is left alone (in ``skipped_chains``, with both
            times). Chains that cannot be timed this way (their first op is a function call, or it
            saw several shapes) are fused untimed.
        guard_ratio: see guard_input.

    Returns:
        The fused model. ``.fused_chains`` lists the fused chains (:class:`FusedChain`),
        ``.skipped_chains`` the candidates left alone with the reason.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: model must be an nn.Module, got {type(model).__name__}")
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKEND_NAMES}")
    root = model if inplace else _copy_model(model)
    guard = None
    if guard_input is not None:
        guard = _Guard(root, guard_input if isinstance(guard_input, tuple) else (guard_input,), guard_ratio)
    fused: list[FusedChain] = []
    skipped: list[FusedChain] = []
    notes: list[str] = []
    journal = _Journal()
    try:
        if isinstance(root, fx.GraphModule):
            f, s = _fuse_graph(root, backend, True, journal, guard)
            fused += f
            skipped += s
            result: nn.Module = root
        else:
            _fuse_sequentials(root, backend, fused, skipped, journal, guard)
            result = _fuse_traced(root, "", backend, fused, skipped, notes, journal, guard) or root
        journal.set_attr(result, "fused_chains", fused)
        journal.set_attr(result, "skipped_chains", skipped)
    except BaseException:
        journal.rollback()
        raise
    if verbose:
        print(summary(result, notes))
    return result


def summary(model: nn.Module, notes: Union[list[str], tuple] = ()) -> str:
    """Human-readable list of what ``fuse`` did to `model`."""
    fused = getattr(model, "fused_chains", [])
    skipped = getattr(model, "skipped_chains", [])
    lines = [f"lightnet_ops.fuse: {len(fused)} chain(s) fused"]
    lines += [f"  fused   {c}" for c in fused]
    lines += [f"  skipped {c}" for c in skipped]
    lines += [f"  note    {n}" for n in notes]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m lightnet_ops.fuse --report: the torchvision coverage report
    from lightnet_ops.fuse_report import main

    raise SystemExit(main())
