"""Triton kernels for the fused ops, installed as ``lightnet_ops.triton_kernels``.

One module per op, with the basename of the op's contract module ``lightnet_ops/ops/<op>.py``:
its kernels and
  ``forward(...)`` / ``backward(...)``   launchers taking the arguments of the contract's forward /
                                         backward schema (they check their arguments, then launch);
  ``validate`` / ``validate_backward``   optional: the argument checks the contract's fakes do not
                                         run, which the registered fakes run too;
  ``aot_jobs(dtypes, all_configs)``      the kernels' compile jobs for ``aot_check``.
``OP_MODULES`` finds them (every module here whose name does not start with ``_``, except the
``aot_check`` tool, in name order); ``_common`` holds what they share (interpreter detection,
autotune configs, tl.dot policy, channel-sum kernel, launch checks). ``lightnet_ops/_triton_ops.py``
registers every op with torch.library. Importing this package imports triton: set
TRITON_INTERPRET=1 before that to run the kernels on CPU tensors.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from ._common import INTERPRET, SUPPORTED_DTYPES

#: Modules of this package that are tools, not ops (aot_check is not shipped in an install).
_TOOLS = frozenset({"aot_check"})
#: What an op module must define.
_REQUIRED = ("forward", "backward", "aot_jobs")


def _discover() -> dict[str, ModuleType]:
    """op name -> kernel module, in module-name order (so the order never depends on the file system)."""
    modules: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name in _TOOLS:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        missing = [attr for attr in _REQUIRED if not callable(getattr(module, attr, None))]
        if missing:
            raise TypeError(f"{module.__name__} must define {', '.join(missing)} (see this package's docstring)")
        modules[info.name] = module
    return modules


OP_MODULES: dict[str, ModuleType] = _discover()

__all__ = ["INTERPRET", "OP_MODULES", "SUPPORTED_DTYPES", *OP_MODULES]
