"""lightnet_ops: fused Conv2d+ReLU+MaxPool2d and Linear+ReLU ops for PyTorch.

Layers, top to bottom: modules (nn.Module) -> functional -> autograd (hand-written backward)
-> backends (cpu | cuda | triton | reference) -> torch.ops.lightnet_ops.* -> kernels.

Each op's public names (its function, nn.Module and autograd.Function, e.g. ``conv2d_relu_maxpool2d``,
``Conv2dReLUMaxPool2d``, ``Conv2dReLUMaxPool2dFunction``) come from its module ``lightnet_ops/api/<op>.py``
and are bound here, in ``lightnet_ops.functional`` and in ``lightnet_ops.modules`` by ``api.export``.
"""

from __future__ import annotations

from . import _ops  # noqa: F401  (loads the compiled extension if it is built; warns if it cannot)
from . import api, functional, modules  # noqa: F401  (functional / modules: lightnet_ops.functional.*, ...)
from ._ops import ExtensionWarning
from .backend_registry import BackendUnavailableError, ReferenceFallbackWarning
from .backend_registry import available_backends as backends
from .fuse import FusedChain, fuse
from .models import LightNet, StockLightNet

__version__ = "0.1.0"

# torch.compile(model, backend="lightnet_ops") needs no import here: TorchDynamo finds the backend
# through the torch_dynamo_backends entry point (see lightnet_ops/compile_backend.py).

__all__ = [
    "BackendUnavailableError",
    "ExtensionWarning",
    "FusedChain",
    "LightNet",
    "ReferenceFallbackWarning",
    "StockLightNet",
    "backends",
    "fuse",
]
# Every op's function, nn.Module and autograd.Function (and whatever else its API module lists).
__all__ += api.export(globals(), "all")
