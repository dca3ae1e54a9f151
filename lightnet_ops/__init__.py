"""lightnet_ops: fused Conv2d+ReLU+MaxPool2d and Linear+ReLU ops for PyTorch.

Layers, top to bottom: modules (nn.Module) -> functional -> autograd (hand-written backward)
-> backends (cpu | cuda | triton | reference) -> torch.ops.lightnet_ops.* -> kernels.
"""

from __future__ import annotations

from . import _ops  # noqa: F401  (loads the compiled extension if it is built; warns if it cannot)
from ._ops import ExtensionWarning
from .autograd import Conv2dReLUMaxPool2dFunction, LinearReLUFunction
from .backend_registry import BackendUnavailableError, ReferenceFallbackWarning
from .backend_registry import available_backends as backends
from .functional import conv2d_relu_maxpool2d, linear_relu
from .fuse import FusedChain, fuse
from .models import LightNet, StockLightNet
from .modules import Conv2dReLUMaxPool2d, LinearReLU

__version__ = "0.1.0"

# torch.compile(model, backend="lightnet_ops") needs no import here: TorchDynamo finds the backend
# through the torch_dynamo_backends entry point (see lightnet_ops/compile_backend.py).

__all__ = [
    "BackendUnavailableError",
    "Conv2dReLUMaxPool2d",
    "Conv2dReLUMaxPool2dFunction",
    "ExtensionWarning",
    "FusedChain",
    "LinearReLU",
    "LightNet",
    "LinearReLUFunction",
    "ReferenceFallbackWarning",
    "StockLightNet",
    "backends",
    "conv2d_relu_maxpool2d",
    "fuse",
    "linear_relu",
]
