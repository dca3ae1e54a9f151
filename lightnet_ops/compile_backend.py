"""``torch.compile(model, backend="lightnet_ops")``: a TorchDynamo backend that rewrites
Conv2d->ReLU->MaxPool2d and Linear->ReLU chains in the captured FX graph to the fused ops.

Dynamo captures whatever it can (including forwards that ``torch.fx.symbolic_trace`` rejects,
such as the seed LightNet's ``num_flat_features`` loop over ``x.size()``); each captured graph is
rewritten with :func:`lightnet_ops.fuse.fuse_graph` (the same rules as ``lo.fuse``: a chain is
fused only when every intermediate value has a single consumer) to calls of
``lightnet_ops.functional``, whose autograd.Functions carry the hand-written backward passes.

By default the rewritten graph runs eagerly (op by op, like the "eager" backend). Options::

    torch.compile(model, backend="lightnet_ops",
                  options={"backend": "cpu",       # lightnet_ops backend of the fused ops (default "auto")
                           "inductor": True,       # hand the rewritten graph on to Inductor (default False)
                           "verbose": True})       # print what each captured graph fused

With ``inductor=True`` the graph goes through AOTAutograd + Inductor: the fused ops stay calls to
``torch.ops.lightnet_ops.*`` (forward and backward ops), Inductor compiles everything around them.

The backend is registered with TorchDynamo under the name "lightnet_ops" when ``lightnet_ops`` is
imported. To keep ``import lightnet_ops`` cheap, registration waits until TorchDynamo's backend
registry is first imported (``torch.compile`` does that); if it is already loaded, it happens at once.
"""

from __future__ import annotations

import collections
import importlib.abc
import importlib.machinery
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.fx as fx

from .fuse import FusedChain, fuse_graph

__all__ = ["BACKEND_NAME", "CompileReport", "lightnet_ops_backend", "register", "reports"]

BACKEND_NAME = "lightnet_ops"
_REGISTRY_MODULE = "torch._dynamo.backends.registry"
_KNOWN_OPTIONS = ("backend", "inductor", "verbose")


@dataclass(frozen=True)
class CompileReport:
    """What the backend did to one captured graph."""

    fused: tuple[FusedChain, ...]
    skipped: tuple[FusedChain, ...]
    code: str            # Python code of the rewritten graph
    inductor: bool


#: The most recent reports, newest last (one per graph Dynamo handed to the backend).
reports: collections.deque[CompileReport] = collections.deque(maxlen=64)


def lightnet_ops_backend(gm: fx.GraphModule, example_inputs: list[Any], *,
                         options: Optional[dict[str, Any]] = None) -> Callable:
    """TorchDynamo backend: fuse the chains in `gm`, then run it eagerly or compile it with Inductor.

    Args:
        gm: the graph TorchDynamo captured (parameters are usually graph inputs).
        example_inputs: example (fake) inputs, used only by Inductor.
        options: {"backend": str, "inductor": bool, "verbose": bool}; see the module docstring.

    Returns:
        The callable Dynamo runs in place of the captured code.
    """
    opts = dict(options or {})
    unknown = set(opts) - set(_KNOWN_OPTIONS)
    if unknown:
        raise ValueError(f"lightnet_ops backend: unknown options {sorted(unknown)}; known: {list(_KNOWN_OPTIONS)}")
    backend = opts.get("backend", "auto")
    use_inductor = bool(opts.get("inductor", False))
    fused, skipped = fuse_graph(gm, backend=backend, use_modules=False)
    report = CompileReport(tuple(fused), tuple(skipped), gm.code, use_inductor)
    reports.append(report)
    if opts.get("verbose", False):
        lines = [f"lightnet_ops backend: {len(fused)} chain(s) fused in a graph of {len(gm.graph.nodes)} nodes"]
        lines += [f"  fused   {c}" for c in fused] + [f"  skipped {c}" for c in skipped]
        print("\n".join(lines))
    if use_inductor:
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    return gm.forward


def register() -> None:
    """Register the backend with TorchDynamo as "lightnet_ops" (idempotent; imports TorchDynamo)."""
    from torch._dynamo.backends import registry

    if BACKEND_NAME not in registry._COMPILER_FNS:
        registry.register_backend(compiler_fn=lightnet_ops_backend, name=BACKEND_NAME)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs register() right after TorchDynamo's backend registry module has been executed."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname != _REGISTRY_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)  # the normal spec, loader wrapped
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self._inner.exec_module(module)
        _remove_hook()
        if BACKEND_NAME not in module._COMPILER_FNS:
            module.register_backend(compiler_fn=lightnet_ops_backend, name=BACKEND_NAME)

    def __getattr__(self, name: str) -> Any:  # get_code, get_source, ... of the real loader
        return getattr(self._inner, name)


_HOOK = _RegisterAfterImport()


def _remove_hook() -> None:
    try:
        sys.meta_path.remove(_HOOK)
    except ValueError:
        pass


def register_on_import() -> None:
    """Register now if TorchDynamo's registry is loaded, else as soon as it is."""
    if _REGISTRY_MODULE in sys.modules:
        register()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)

