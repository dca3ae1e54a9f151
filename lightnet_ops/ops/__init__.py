"""The fused ops' contracts: one module per op holds everything about the op that does not depend
on a backend (its schemas, the Python argument checker, the fake kernels, the pure-PyTorch
reference forward / backward / tangent and sample arguments for the tests). Backends
(backend_registry) map op names to kernels.

Adding an op: write ``ops/<op>.py`` with a ``CONTRACT``; ``CONTRACTS`` finds it (every module of
this package whose name does not start with ``_``). See CONTRIBUTING.md, "Adding a fused op"."""

from __future__ import annotations

import importlib
import pkgutil

from ._contract import OpContract


def _discover() -> dict[str, OpContract]:
    """name -> contract of every op module, in module-name order (so the order never depends on the
    file system)."""
    contracts: dict[str, OpContract] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        contract = importlib.import_module(f"{__name__}.{info.name}").CONTRACT
        if not isinstance(contract, OpContract) or contract.name != info.name:
            raise TypeError(f"lightnet_ops.ops.{info.name}.CONTRACT must be an OpContract named {info.name!r}")
        contracts[contract.name] = contract
    return contracts


CONTRACTS: dict[str, OpContract] = _discover()

__all__ = ["CONTRACTS", "OpContract", *CONTRACTS]
