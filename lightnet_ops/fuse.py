"""Swap the fused ops into existing models.

``fuse(model)`` replaces Conv2d -> ReLU -> MaxPool2d chains with :class:`Conv2dReLUMaxPool2d` and
Linear -> ReLU chains with :class:`LinearReLU`, without changing results or state_dict keys.

Two passes:

1. Module pass: in every ``nn.Sequential`` (that keeps Sequential's own forward) a run of children
   ``Conv2d, ReLU, MaxPool2d`` becomes ``Conv2dReLUMaxPool2d, Identity, Identity`` and
   ``Linear, ReLU`` becomes ``LinearReLU, Identity``. The fused module sits at the conv's / linear's
   name and holds the very same ``nn.Parameter`` objects, so ``features.0.weight`` stays
   ``features.0.weight`` and an optimizer built on the original parameters keeps working
   (``inplace=True``). Inside a Sequential an intermediate output has no other consumer, so this is
   always safe (modules with hooks are left alone).
2. Graph pass: a model whose ``forward`` calls ``F.relu`` / ``F.max_pool2d`` (or anything that is
   not a plain Sequential) is traced with ``torch.fx``; matching chains in the graph are rewritten
   and the model comes back as a ``torch.fx.GraphModule``. A chain is fused only when each
   intermediate value has exactly one consumer (the next op of the chain), so skip connections
   and second consumers are left alone. A model that ``torch.fx`` cannot trace is searched
   submodule by submodule; for such models use ``torch.compile(model, backend="lightnet_ops")``,
   which rewrites the same chains in the graph TorchDynamo captures (see compile_backend.py).

Recognised: ``nn.Conv2d`` / ``F.conv2d`` / ``torch.conv2d``; ``nn.ReLU`` (also inplace) /
``F.relu`` / ``F.relu_`` / ``torch.relu`` / ``torch.relu_`` / ``Tensor.relu`` / ``Tensor.relu_``;
``nn.MaxPool2d`` / ``F.max_pool2d`` / ``torch.max_pool2d`` with any window and stride;
``nn.Linear`` / ``F.linear``. Only what the fused op computes exactly is fused: conv groups=1,
padding_mode='zeros' (padding ints, tuples, 'valid', or 'same' when it is symmetric); pool padding
0, dilation 1, ceil_mode=False, return_indices=False, window of at most 255 elements.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import functional as LF
from ._shapes import MAX_POOL_WINDOW, pair
from .backend_registry import BACKEND_NAMES
from .modules import Conv2dReLUMaxPool2d, LinearReLU

__all__ = ["FusedChain", "fuse", "fuse_graph", "summary"]

CONV_KIND = "conv2d_relu_maxpool2d"
LINEAR_KIND = "linear_relu"


@dataclass(frozen=True)
class FusedChain:
    """One chain that was fused (or, in ``skipped_chains``, left alone and why).

    kind: "conv2d_relu_maxpool2d" or "linear_relu".
    names: the original modules' qualified names (module pass) or graph node names (graph pass).
    where: "module" (nn.Sequential children swapped) or "graph" (torch.fx / TorchDynamo graph).
    reason: why a candidate was skipped; empty for fused chains.
    """

    kind: str
    names: tuple[str, ...]
    where: str
    reason: str = ""

    def __str__(self) -> str:
        chain = " -> ".join(self.names)
        return f"{self.kind}: {chain} ({self.where})" + (f" skipped: {self.reason}" if self.reason else "")


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


def _bind(sig_fn: Callable, args: tuple, kwargs: dict) -> Optional[dict[str, Any]]:
    try:
        bound = inspect.signature(sig_fn).bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


class _Skip(Exception):
    """A candidate chain that the fused op cannot compute exactly; the message says why."""


def _plain(module: nn.Module, cls: type) -> bool:
    """`module` is a `cls` that still runs `cls.forward` (a subclass may compute something else)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _int_pair(value: Any, name: str) -> tuple[int, int]:
    try:
        return tuple(pair(value, name))  # type: ignore[return-value]
    except (TypeError, ValueError) as e:
        raise _Skip(str(e)) from None


def _conv_params(stride: Any, padding: Any, dilation: Any, groups: Any, kernel_size: Optional[tuple[int, int]],
                 padding_mode: str = "zeros") -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(stride, padding, dilation) as int pairs, or _Skip."""
    if groups != 1:
        raise _Skip(f"conv groups={groups} (the fused op needs groups=1)")
    if padding_mode != "zeros":
        raise _Skip(f"conv padding_mode={padding_mode!r} (the fused op pads with zeros)")
    stride_ = _int_pair(stride, "stride")
    dilation_ = _int_pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            return stride_, (0, 0), dilation_
        if padding != "same" or kernel_size is None:
            raise _Skip(f"conv padding={padding!r} with unknown kernel size")
        pads = []
        for d, k in zip(dilation_, kernel_size):
            total = d * (k - 1)
            if total % 2:
                raise _Skip("conv padding='same' is asymmetric for this kernel")
            pads.append(total // 2)
        return stride_, (pads[0], pads[1]), dilation_
    return stride_, _int_pair(padding, "padding"), dilation_


def _pool_params(kernel_size: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: Any,
                 return_indices: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """(pool_kernel_size, pool_stride) as int pairs, or _Skip."""
    k = _int_pair(kernel_size, "pool kernel_size")
    default_stride = stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0)  # [] in aten
    s = k if default_stride else _int_pair(stride, "pool stride")
    if _int_pair(padding, "pool padding") != (0, 0):
        raise _Skip(f"pool padding={padding} (the fused op pools without padding)")
    if _int_pair(dilation, "pool dilation") != (1, 1):
        raise _Skip(f"pool dilation={dilation}")
    if ceil_mode is not False:
        raise _Skip("pool ceil_mode=True")
    if return_indices is not False:
        raise _Skip("pool return_indices=True")
    if k[0] * k[1] > MAX_POOL_WINDOW:
        raise _Skip(f"pool window {k} has more than {MAX_POOL_WINDOW} elements")
    return k, s


def _check_conv_module(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    if isinstance(conv.weight, nn.parameter.UninitializedParameter):
        raise _Skip("lazy conv is not initialised yet")
    return _conv_params(conv.stride, conv.padding, conv.dilation, conv.groups, tuple(conv.kernel_size),
                        conv.padding_mode)


def _check_pool_module(pool: nn.MaxPool2d) -> tuple[tuple[int, int], tuple[int, int]]:
    return _pool_params(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                        pool.return_indices)


def _fused_conv_module(conv: nn.Conv2d, stride: tuple[int, int], padding: tuple[int, int],
                       dilation: tuple[int, int], pool_k: tuple[int, int], pool_s: tuple[int, int],
                       backend: str) -> Conv2dReLUMaxPool2d:
    """A fused module holding `conv`'s own Parameters (built on meta: no allocation, no RNG use)."""
    fused = Conv2dReLUMaxPool2d(
        conv.in_channels, conv.out_channels, tuple(conv.kernel_size), stride, padding, dilation,
        bias=conv.bias is not None, pool_kernel_size=pool_k, pool_stride=pool_s, backend=backend, device="meta",
    )
    fused.weight = conv.weight
    if conv.bias is not None:
        fused.bias = conv.bias
    fused.train(conv.training)
    return fused


def _fused_linear_module(linear: nn.Linear, backend: str) -> LinearReLU:
    if isinstance(linear.weight, nn.parameter.UninitializedParameter):
        raise _Skip("lazy linear is not initialised yet")
    fused = LinearReLU(linear.in_features, linear.out_features, bias=linear.bias is not None, backend=backend,
                       device="meta")
    fused.weight = linear.weight
    if linear.bias is not None:
        fused.bias = linear.bias
    fused.train(linear.training)
    return fused


# --------------------------------------------------------------------------------------------
# Module pass: nn.Sequential children


def _fuse_sequentials(root: nn.Module, backend: str, fused: list[FusedChain], skipped: list[FusedChain]) -> None:
    for seq_name, seq in list(root.named_modules()):
        if not _plain(seq, nn.Sequential):
            continue
        keys = list(seq._modules.keys())
        mods = list(seq._modules.values())
        names = [f"{seq_name}.{k}" if seq_name else k for k in keys]
        i = 0
        while i < len(mods):
            m = mods[i]
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            nxt2 = mods[i + 2] if i + 2 < len(mods) else None
            if _plain(m, nn.Conv2d) and nxt is not None and _plain(nxt, nn.ReLU) and nxt2 is not None \
                    and _plain(nxt2, nn.MaxPool2d):
                chain = tuple(names[i:i + 3])
                try:
                    if any(_has_hooks(x) for x in (m, nxt, nxt2)):
                        raise _Skip("a module in the chain has hooks")
                    stride, padding, dilation = _check_conv_module(m)
                    pool_k, pool_s = _check_pool_module(nxt2)
                except _Skip as e:
                    skipped.append(FusedChain(CONV_KIND, chain, "module", str(e)))
                    i += 1
                    continue
                seq._modules[keys[i]] = _fused_conv_module(m, stride, padding, dilation, pool_k, pool_s, backend)
                seq._modules[keys[i + 1]] = nn.Identity()
                seq._modules[keys[i + 2]] = nn.Identity()
                fused.append(FusedChain(CONV_KIND, chain, "module"))
                i += 3
            elif _plain(m, nn.Linear) and nxt is not None and _plain(nxt, nn.ReLU):
                chain = tuple(names[i:i + 2])
                try:
                    if _has_hooks(m) or _has_hooks(nxt):
                        raise _Skip("a module in the chain has hooks")
                    new = _fused_linear_module(m, backend)
                except _Skip as e:
                    skipped.append(FusedChain(LINEAR_KIND, chain, "module", str(e)))
                    i += 1
                    continue
                seq._modules[keys[i]] = new
                seq._modules[keys[i + 1]] = nn.Identity()
                fused.append(FusedChain(LINEAR_KIND, chain, "module"))
                i += 2
            else:
                i += 1


# --------------------------------------------------------------------------------------------
# Graph pass (torch.fx graphs: symbolic traces and TorchDynamo captures)

_RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_}
_RELU_METHODS = {"relu", "relu_"}
_POOL_FUNCTIONS = {F.max_pool2d, torch.max_pool2d}
_CONV_FUNCTIONS = {F.conv2d, torch.conv2d}
_LINEAR_FUNCTIONS = {F.linear}


def _module_of(gm: fx.GraphModule, node: fx.Node) -> Optional[nn.Module]:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def _relu_input(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.Node]:
    """The input node if `node` is a ReLU (any spelling), else None."""
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        b = _bind(_relu_sig, node.args, node.kwargs)  # (input, inplace=False); the others take only input
        return b["input"] if b else None
    if node.op == "call_method" and node.target in _RELU_METHODS and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    mod = _module_of(gm, node)
    if mod is not None and _plain(mod, nn.ReLU) and not _has_hooks(mod) and len(node.args) == 1:
        return node.args[0]
    return None


@dataclass
class _ConvInfo:
    input: Any
    weight: Any        # fx.Node (call_function) or None (call_module)
    bias: Any
    module: Optional[nn.Conv2d]
    params: tuple      # (stride, padding, dilation)


def _conv_info(gm: fx.GraphModule, node: fx.Node) -> Optional[_ConvInfo]:
    """Conv description if `node` is a 2-d convolution; raises _Skip for an unsupported one."""
    if node.op == "call_function" and node.target in _CONV_FUNCTIONS:
        b = _bind(_conv_sig, node.args, node.kwargs)
        if b is None:
            return None
        kernel = None
        if isinstance(b["padding"], str):
            w = b["weight"]
            val = w.meta.get("val", w.meta.get("example_value")) if isinstance(w, fx.Node) else None
            if isinstance(val, torch.Tensor) and val.dim() == 4:
                kernel = tuple(int(v) for v in val.shape[2:])
        params = _conv_params(b["stride"], b["padding"], b["dilation"], b["groups"], kernel)
        return _ConvInfo(b["input"], b["weight"], b["bias"], None, params)
    mod = _module_of(gm, node)
    if mod is not None and _plain(mod, nn.Conv2d) and len(node.args) == 1 and not node.kwargs:
        if _has_hooks(mod):
            raise _Skip("the conv module has hooks")
        return _ConvInfo(node.args[0], None, None, mod, _check_conv_module(mod))
    return None


def _pool_info(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[Any, tuple, tuple]]:
    """(input, kernel, stride) if `node` is a 2-d max pool; raises _Skip for an unsupported one."""
    if node.op == "call_function" and node.target in _POOL_FUNCTIONS:
        b = _bind(_pool_sig, node.args, node.kwargs)
        if b is None:
            return None
        k, s = _pool_params(b["kernel_size"], b["stride"], b["padding"], b["dilation"], b["ceil_mode"],
                            b["return_indices"])
        return b["input"], k, s
    mod = _module_of(gm, node)
    if mod is not None and _plain(mod, nn.MaxPool2d) and len(node.args) == 1 and not node.kwargs:
        if _has_hooks(mod):
            raise _Skip("the pool module has hooks")
        k, s = _check_pool_module(mod)
        return node.args[0], k, s
    return None


def _linear_info(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[Any, Any, Any, Optional[nn.Linear]]]:
    if node.op == "call_function" and node.target in _LINEAR_FUNCTIONS:
        b = _bind(_linear_sig, node.args, node.kwargs)
        return None if b is None else (b["input"], b["weight"], b["bias"], None)
    mod = _module_of(gm, node)
    if mod is not None and _plain(mod, nn.Linear) and len(node.args) == 1 and not node.kwargs:
        if _has_hooks(mod):
            raise _Skip("the linear module has hooks")
        return node.args[0], None, None, mod
    return None


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def _call_sites(graph: fx.Graph, target: str) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_module" and n.target == target)


def fuse_graph(gm: fx.GraphModule, *, backend: str = "auto", use_modules: bool = True
               ) -> tuple[list[FusedChain], list[FusedChain]]:
    """Rewrite Conv2d->ReLU->MaxPool2d and Linear->ReLU chains in `gm`'s graph, in place.

    Args:
        gm: a GraphModule from ``torch.fx.symbolic_trace`` or TorchDynamo.
        backend: lightnet_ops backend the fused calls use.
        use_modules: swap a conv/linear submodule called from exactly one place for the fused module
            (keeps its name and Parameters); otherwise (and for functional convs) emit a call to
            ``lightnet_ops.functional`` with the same weight/bias values.

    Returns:
        (fused chains, skipped candidate chains with the reason).
    """
    graph = gm.graph
    fused: list[FusedChain] = []
    skipped: list[FusedChain] = []
    for node in list(graph.nodes):
        if getattr(node, "_erased", False):
            continue
        try:
            conv = _conv_info(gm, node)
        except _Skip as e:
            conv, reason = None, str(e)
            relu = _only_user(node)
            if relu is not None and _relu_input(gm, relu) is node:
                skipped.append(FusedChain(CONV_KIND, (node.name, relu.name), "graph", reason))
            continue
        if conv is not None:
            _try_fuse_conv(gm, node, conv, backend, use_modules, fused, skipped)
            continue
        try:
            lin = _linear_info(gm, node)
        except _Skip as e:
            relu = _only_user(node)
            if relu is not None and _relu_input(gm, relu) is node:
                skipped.append(FusedChain(LINEAR_KIND, (node.name, relu.name), "graph", str(e)))
            continue
        if lin is not None:
            _try_fuse_linear(gm, node, lin, backend, use_modules, fused)
    if fused:
        graph.lint()
        gm.recompile()
    return fused, skipped


def _try_fuse_conv(gm: fx.GraphModule, node: fx.Node, conv: _ConvInfo, backend: str, use_modules: bool,
                   fused: list[FusedChain], skipped: list[FusedChain]) -> None:
    graph = gm.graph
    relu = _only_user(node)
    if relu is None or _relu_input(gm, relu) is not node:
        return
    pool = _only_user(relu)
    if pool is None:
        return
    try:
        pool_info = _pool_info(gm, pool)
    except _Skip as e:
        skipped.append(FusedChain(CONV_KIND, (node.name, relu.name, pool.name), "graph", str(e)))
        return
    if pool_info is None or pool_info[0] is not relu:
        return
    _, pool_k, pool_s = pool_info
    stride, padding, dilation = conv.params
    with graph.inserting_before(pool):
        if conv.module is not None and use_modules and _call_sites(graph, node.target) == 1:
            _set_submodule(gm, node.target, _fused_conv_module(conv.module, stride, padding, dilation, pool_k,
                                                               pool_s, backend))
            new = graph.call_module(node.target, (conv.input,))
        else:
            if conv.module is not None:
                weight = graph.get_attr(f"{node.target}.weight")
                bias = graph.get_attr(f"{node.target}.bias") if conv.module.bias is not None else None
            else:
                weight, bias = conv.weight, conv.bias
            new = graph.call_function(
                LF.conv2d_relu_maxpool2d,
                (conv.input, weight, bias, stride, padding, dilation, pool_k, pool_s),
                {"backend": backend},
            )
    new.meta = dict(pool.meta)
    names = (node.name, relu.name, pool.name)
    pool.replace_all_uses_with(new)
    for n in (pool, relu, node):
        graph.erase_node(n)
    fused.append(FusedChain(CONV_KIND, names, "graph"))


def _try_fuse_linear(gm: fx.GraphModule, node: fx.Node, lin: tuple, backend: str, use_modules: bool,
                     fused: list[FusedChain]) -> None:
    graph = gm.graph
    relu = _only_user(node)
    if relu is None or _relu_input(gm, relu) is not node:
        return
    x, weight, bias, module = lin
    with graph.inserting_before(relu):
        if module is not None and use_modules and _call_sites(graph, node.target) == 1:
            try:
                new_mod = _fused_linear_module(module, backend)
            except _Skip:
                return
            _set_submodule(gm, node.target, new_mod)
            new = graph.call_module(node.target, (x,))
        else:
            if module is not None:
                weight = graph.get_attr(f"{node.target}.weight")
                bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
            new = graph.call_function(LF.linear_relu, (x, weight, bias), {"backend": backend})
    new.meta = dict(relu.meta)
    names = (node.name, relu.name)
    relu.replace_all_uses_with(new)
    graph.erase_node(relu)
    graph.erase_node(node)
    fused.append(FusedChain(LINEAR_KIND, names, "graph"))


class _Tracer(fx.Tracer):
    """Default torch.fx tracer that also keeps the fused modules as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (Conv2dReLUMaxPool2d, LinearReLU)):
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
                 skipped: list[FusedChain], notes: list[str]) -> Optional[nn.Module]:
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
            f, s = fuse_graph(gm, backend=backend, use_modules=True)
            prefix = f"{qualname}." if qualname else ""
            skipped.extend(FusedChain(c.kind, tuple(prefix + n for n in c.names), c.where, c.reason) for c in s)
            if not f:
                return None
            fused.extend(FusedChain(c.kind, tuple(prefix + n for n in c.names), c.where) for c in f)
            _restore_state_keys(module, gm)
            _copy_training_flags(module, gm)
            return gm
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _fuse_traced(child, f"{qualname}.{name}" if qualname else name, backend, fused, skipped, notes)
        if new is not None:
            module._modules[name] = new
    return None


# --------------------------------------------------------------------------------------------
# Public entry point


def fuse(model: nn.Module, *, inplace: bool = False, backend: str = "auto", verbose: bool = False) -> nn.Module:
    """Replace Conv2d->ReLU->MaxPool2d and Linear->ReLU chains in `model` with the fused ops.

    Results and state_dict keys do not change: checkpoints of the original load into the fused
    model and back. The fused modules hold the original ``nn.Parameter`` objects.

    Args:
        model: any nn.Module; ``nn.Sequential`` stacks are fused module by module, other forwards
            through a ``torch.fx`` trace (the model then comes back as a ``torch.fx.GraphModule``).
        inplace: modify `model` itself (its Sequentials; a traced model still comes back as a new
            GraphModule sharing `model`'s parameters). Default: work on a deep copy.
        backend: backend of the fused ops: "auto", "cpu", "cuda", "triton" or "reference".
        verbose: print what was fused and which candidates were left alone and why.

    Returns:
        The fused model. ``.fused_chains`` lists the fused chains (:class:`FusedChain`),
        ``.skipped_chains`` the candidates left alone with the reason.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: model must be an nn.Module, got {type(model).__name__}")
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKEND_NAMES}")
    root = model if inplace else copy.deepcopy(model)
    fused: list[FusedChain] = []
    skipped: list[FusedChain] = []
    notes: list[str] = []
    if isinstance(root, fx.GraphModule):
        f, s = fuse_graph(root, backend=backend, use_modules=True)
        fused += f
        skipped += s
        result: nn.Module = root
    else:
        _fuse_sequentials(root, backend, fused, skipped)
        result = _fuse_traced(root, "", backend, fused, skipped, notes) or root
    result.fused_chains = fused
    result.skipped_chains = skipped
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

