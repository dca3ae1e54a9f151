"""The fused ops' contracts: one module per op holds everything about the op that does not depend
on a backend (its schemas, the Python argument checker, the fake kernels and the pure-PyTorch
reference forward / backward / tangent). Backends (backend_registry) map op names to kernels.

Adding an op: write ``ops/<op>.py`` with a ``CONTRACT`` and list it in ``CONTRACTS`` below (see
CONTRIBUTING.md, "Adding a fused op")."""

from __future__ import annotations

from . import conv2d_relu_maxpool2d, linear_relu
from ._contract import OpContract

CONTRACTS: dict[str, OpContract] = {c.name: c for c in (conv2d_relu_maxpool2d.CONTRACT, linear_relu.CONTRACT)}

__all__ = ["CONTRACTS", "OpContract", "conv2d_relu_maxpool2d", "linear_relu"]
