"""Functional API of the fused ops: argument normalisation, validation, unbatched input, backend
choice, and the choice between the autograd path (keeps a uint8 argmax) and the inference path
(writes only the output). The extension's ops (cpu, cuda) record their hand-written backward in
C++ (csrc/<op>.cpp); the other backends through the autograd.Functions in autograd.py.

Each op's function lives with its module and Function in ``lightnet_ops/api/<op>.py`` (the helpers
they share in ``lightnet_ops/api/_common.py``); this module re-exports every op's functions
(``conv2d_relu_maxpool2d``, ``linear_relu``, ...), so a new op needs no edit here."""

from __future__ import annotations

from . import api

__all__ = api.export(globals(), "function")
