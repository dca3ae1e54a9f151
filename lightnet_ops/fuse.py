"""Swap the fused ops into existing models.

``fuse(model)`` replaces Conv2d -> ReLU -> MaxPool2d chains with :class:`Conv2dReLUMaxPool2d`,
Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d chains of an eval-mode model with
:class:`Conv2dBNReLUMaxPool2d` (the BatchNorm folded into the conv), and Linear -> ReLU chains with
:class:`LinearReLU`, without changing results or state_dict keys.

What is fused is one table, :data:`PATTERNS`: each :class:`Pattern` names its chain of stock ops
(:class:`OpSpec`: the module class, the functions / Tensor methods that spell the op in a graph,
and how to read its arguments), how to build the fused module from the matched modules, and the
``lightnet_ops.functional`` call that replaces the chain in a graph. Both passes below, and the
``torch.compile`` backend (compile_backend.py, through :func:`fuse_graph`), iterate this table.
Each op declares its own patterns, as ``FUSE_PATTERNS`` in its API module ``lightnet_ops/api/<op>.py``
(built from the blocks in fuse_spec.py), and the table collects them, longest chain first: a new
fusion is one more entry there, with no edit here. The conv op's module also holds the BatchNorm
composition (:class:`Conv2dBNReLUMaxPool2d` and its helpers, importable from here too).

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
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from . import api
from .backend_registry import BACKEND_NAMES
from .fuse_spec import Link, OpSpec, Pattern, Skip, bind

# Importable from here as well: the pattern building blocks (fuse_spec.py) and the conv op's BatchNorm composition.
from .api.conv2d_relu_maxpool2d import Conv2dBNReLUMaxPool2d, FoldedBatchNorm2d  # noqa: F401
from .api.conv2d_relu_maxpool2d import conv2d_bn_relu_maxpool2d, fold_conv_bn  # noqa: F401
from .fuse_spec import BATCH_NORM2D, CONV2D, LINEAR, MAX_POOL2D, POOL_SUPPORT, RELU  # noqa: F401
from .fuse_spec import PoolSupport, TensorOf  # noqa: F401

__all__ = ["PATTERNS", "FusedChain", "Link", "OpSpec", "Pattern", "fuse", "fuse_graph", "summary"]


@dataclass(frozen=True)
class FusedChain:
    """One chain that was fused (or, in ``skipped_chains``, left alone and why).

    kind: the pattern's kind ("conv2d_relu_maxpool2d", "conv2d_bn_relu_maxpool2d", "linear_relu", ...).
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



def _collect_patterns() -> tuple[Pattern, ...]:
    """Every op API module's ``FUSE_PATTERNS`` (``api.MODULES``, in name order), longest chain first.

    At each position the first pattern whose chain matches decides (fused or skipped), so a longer chain
    that starts with the same op as a shorter one must be tried first: sorting by chain length (stable,
    so equal lengths keep the modules' order) gives that whichever module declares which pattern."""
    found: list[Pattern] = []
    for module in api.MODULES.values():
        for pattern in getattr(module, "FUSE_PATTERNS", ()):
            if not isinstance(pattern, Pattern):
                raise TypeError(f"{module.__name__}.FUSE_PATTERNS must hold fuse_spec.Pattern objects, got "
                                f"{type(pattern).__name__}")
            found.append(pattern)
    kinds = [p.kind for p in found]
    if len(set(kinds)) != len(kinds):
        raise TypeError(f"two fuse patterns share a kind: {sorted(k for k in set(kinds) if kinds.count(k) > 1)}")
    return tuple(sorted(found, key=lambda p: -len(p.chain)))


#: Every fusion, in the order tried at each position (see _collect_patterns); the first pattern whose chain
#: matches decides (fused or skipped).
PATTERNS: tuple[Pattern, ...] = _collect_patterns()


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
    """Skip unless `module` is a plain instance the fused module can stand in for: no hooks, no
    parametrizations, its tensors real nn.Parameters (old-style weight_norm / prune turn the weight
    into a computed attribute), initialised."""
    if parametrize.is_parametrized(module):
        tensors = ", ".join(f"{t} by {'/'.join(type(p).__name__ for p in plist)}"
                            for t, plist in module.parametrizations.items())
        raise Skip(f"{name} is parametrized ({tensors}); the fused module would bypass the parametrization")
    hooks = _hook_names(module)
    if hooks:
        raise Skip(f"{name} has hooks ({', '.join(hooks)}); a module with hooks must run as itself")
    for tensor_name in op.parameters:
        value = getattr(module, tensor_name, None)
        if value is None and tensor_name in op.optional:
            continue
        if isinstance(value, nn.parameter.UninitializedParameter):
            raise Skip(f"lazy {op.name} is not initialised yet")
        if not isinstance(value, nn.Parameter) or module._parameters.get(tensor_name) is not value:
            raise Skip(f"{name}.{tensor_name} is not an nn.Parameter of the module ({type(value).__name__})")


def _resolve(links: Sequence[Link]) -> None:
    """Fill each link's params (module checks first); raises Skip with the first problem found."""
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
        be timed (a functional first op, several shapes, a value only known at run time); raises Skip
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


class _SlowerSkip(Skip):
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
                except Skip as e:
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
        args = bind(op.signature, node.args, node.kwargs)
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
                    raise Skip(shared)
                _resolve(links)
                # the module form adopts the modules of the first op and of every op with tensors (a
                # BatchNorm): each must be a module called from this one place
                swap = use_modules and all(link.module is not None and call_sites[link.node.target] == 1
                                           for j, link in enumerate(links) if j == 0 or link.op.parameters)
                new_module = pattern.build_module(links, backend) if swap else None
                times = guard.check(pattern, links, gm, backend, new_module) if guard is not None else None
                _rewrite(gm, pattern, links, backend, swap, journal, new_module)
            except Skip as e:
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
