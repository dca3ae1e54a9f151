"""nn.Modules for the fused ops. Parameters, their shapes and their default initialisation match
nn.Conv2d / nn.Linear exactly (same random-number consumption), so a seeded fused module gets the
same weights as its stock twin and state dicts load either way.

Each op's module lives with its function and Function in ``lightnet_ops/api/<op>.py``; this module
re-exports every op's modules (``Conv2dReLUMaxPool2d``, ``LinearReLU``, ...), so a new op needs no
edit here."""

from __future__ import annotations

from . import api

__all__ = api.export(globals(), "module")
