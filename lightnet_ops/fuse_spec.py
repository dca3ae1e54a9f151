"""The building blocks of :mod:`lightnet_ops.fuse`'s pattern table, for the ops that declare their patterns.

Each op's API module (``lightnet_ops/api/<op>.py``) lists the chains of stock ops its fused op replaces
as ``FUSE_PATTERNS``, a tuple of :class:`Pattern`; ``lightnet_ops.fuse`` collects them into
``PATTERNS``. A pattern is made of :class:`OpSpec`s, one per stock op of the chain (the module class,
the functions / Tensor methods that spell it in a graph, how to read and check its arguments); the
stock ops fused today are here (:data:`CONV2D`, :data:`RELU`, :data:`MAX_POOL2D`, :data:`LINEAR`,
:data:`BATCH_NORM2D`). This module imports neither the ops' API nor the fuse passes, so both can import it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ._shapes import MAX_POOL_WINDOW, pair

__all__ = ["BATCH_NORM2D", "CONV2D", "LINEAR", "MAX_POOL2D", "POOL_SUPPORT", "RELU", "Link", "OpSpec", "Pattern",
           "PoolSupport", "Skip", "TensorOf", "adopt_parameters", "bind", "pool_kwargs"]


class Skip(Exception):
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


def bind(sig_fn: Callable, args: tuple, kwargs: dict) -> Optional[dict[str, Any]]:
    """A graph call's args / kwargs bound by name to `sig_fn`'s signature (defaults filled in), or None."""
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
        raise Skip(str(e)) from None


def _conv_params(stride: Any, padding: Any, dilation: Any, groups: Any, kernel_size: Optional[tuple[int, int]],
                 padding_mode: str = "zeros") -> dict[str, tuple[int, int]]:
    """{"stride", "padding", "dilation"} as int pairs, or Skip."""
    if groups != 1:
        raise Skip(f"conv groups={groups} (the fused op needs groups=1)")
    if padding_mode != "zeros":
        raise Skip(f"conv padding_mode={padding_mode!r} (the fused op pads with zeros)")
    stride_ = _int_pair(stride, "stride")
    dilation_ = _int_pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0)
        elif padding != "same" or kernel_size is None:
            raise Skip(f"conv padding={padding!r} with unknown kernel size")
        else:
            halves = []
            for d, k in zip(dilation_, kernel_size):
                total = d * (k - 1)
                if total % 2:
                    raise Skip("conv padding='same' is asymmetric for this kernel")
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
    """{"kernel_size", "stride", "padding"} as int pairs and "ceil_mode" (bool), or Skip."""
    k = _int_pair(kernel_size, "pool kernel_size")
    default_stride = stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0)  # [] in aten
    s = k if default_stride else _int_pair(stride, "pool stride")
    pad = _int_pair(padding, "pool padding")
    if pad != (0, 0) and not POOL_SUPPORT.padding:
        raise Skip(f"pool padding={padding} (the fused op pools without padding)")
    if _int_pair(dilation, "pool dilation") != (1, 1):
        raise Skip(f"pool dilation={dilation}")
    if not isinstance(ceil_mode, bool):
        raise Skip(f"pool ceil_mode={ceil_mode!r} is not a constant bool")
    if ceil_mode and not POOL_SUPPORT.ceil_mode:
        raise Skip("pool ceil_mode=True (the fused op pools in floor mode)")
    if return_indices is not False:
        raise Skip("pool return_indices=True")
    if k[0] * k[1] > MAX_POOL_WINDOW:
        raise Skip(f"pool window {k} has more than {MAX_POOL_WINDOW} elements")
    return {"kernel_size": k, "stride": s, "padding": pad, "ceil_mode": ceil_mode}


def pool_kwargs(pool: dict[str, Any]) -> dict[str, Any]:
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
        raise Skip("BatchNorm2d in training mode normalises with batch statistics, which cannot be folded "
                    "(fuse the model in eval mode: model.eval())")
    if bn.running_mean is None or bn.running_var is None:
        raise Skip("BatchNorm2d without running statistics (track_running_stats=False) normalises with batch "
                    "statistics, which cannot be folded")
    return {"eps": float(bn.eps)}


def _batch_norm_call_params(args: dict[str, Any]) -> dict[str, Any]:
    if args["training"] is not False:
        raise Skip(f"batch_norm(training={args['training']}) normalises with batch statistics, which cannot be "
                    "folded")
    if args["running_mean"] is None or args["running_var"] is None:
        raise Skip("batch_norm without running statistics cannot be folded")
    if not isinstance(args["eps"], (int, float)) or isinstance(args["eps"], bool):
        raise Skip(f"batch_norm eps={args['eps']!r} is not a constant number")
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
    module_params: normalised arguments of a module instance (dict); raises Skip when the fused
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
        Raises Skip where the chain has no functional form (e.g. it needs a module's train/eval mode).
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


def adopt_parameters(fused: nn.Module, module: nn.Module, names: Sequence[str]) -> nn.Module:
    """Give `fused` (built on meta) `module`'s own Parameters and training flag."""
    for name in names:
        value = getattr(module, name)
        if value is not None:
            setattr(fused, name, value)
    fused.train(module.training)
    return fused

