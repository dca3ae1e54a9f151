"""Each op's public API in one module, ``lightnet_ops/api/<op>.py``: its functional form, its
nn.Module and its autograd.Function, listed in the module's ``__all__``.

Nothing else names them: ``lightnet_ops.functional`` re-exports the functions, ``lightnet_ops.modules``
the nn.Modules, and the package every name, through :func:`export`. Modules are found like the op
contracts (every module here whose name does not start with ``_``, in name order; each name in the
order of its ``__all__``), so adding an op's API is adding its module. The module also declares how the
library's generic tools use the op: ``FUSE_PATTERNS`` (the chains ``lightnet_ops.fuse`` replaces with it)
and ``BENCH`` (its benchmark entry, which ``lightnet_ops.bench.ops`` collects)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType
from typing import Any, Literal

from torch import nn

Kind = Literal["function", "module", "all"]


#: Every op's API module by its name (the op's), in name order; ``lightnet_ops.fuse`` reads their ``FUSE_PATTERNS``.
MODULES: dict[str, ModuleType] = {}


def _discover() -> dict[str, Any]:
    """name -> object of every op API module's ``__all__``; a name two modules claim is an error."""
    exports: dict[str, Any] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module: ModuleType = importlib.import_module(f"{__name__}.{info.name}")
        MODULES[info.name] = module
        names = getattr(module, "__all__", None)
        if not names:
            raise TypeError(f"{module.__name__} must list its public names in __all__")
        for name in names:
            if name in exports:
                raise TypeError(f"{module.__name__} exports {name!r}, which another op's API module exports")
            exports[name] = getattr(module, name)
    return exports


#: Every op's public names and objects, in the order described above.
EXPORTS: dict[str, Any] = _discover()


def _is_kind(obj: Any, kind: Kind) -> bool:
    if kind == "function":
        return inspect.isfunction(obj)
    if kind == "module":
        return inspect.isclass(obj) and issubclass(obj, nn.Module)
    return True


def export(namespace: dict[str, Any], kind: Kind) -> list[str]:
    """Binds the exported objects of `kind` ("function", "module" or "all") into `namespace` (a
    module's ``globals()``) and returns their names, for that module's ``__all__``. Refuses to
    shadow a different object the module already defines under the same name."""
    names = []
    for name, obj in EXPORTS.items():
        if not _is_kind(obj, kind):
            continue
        if namespace.get(name, obj) is not obj:
            raise ImportError(f"{namespace.get('__name__')}.{name} is already defined; an op's API module "
                              "cannot export that name")
        namespace[name] = obj
        names.append(name)
    return names
