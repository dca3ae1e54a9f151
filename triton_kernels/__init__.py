"""Triton kernels for the fused ops, installed as ``lightnet_ops.triton_kernels``.

Modules: ``conv2d_relu_maxpool2d`` and ``linear_relu`` (kernels + launchers taking torch tensors),
``_common`` (interpreter detection, autotune configs, tl.dot policy, channel-sum kernel). The ops
are registered with torch.library in ``lightnet_ops/_triton_ops.py``. Importing this package
imports triton: set TRITON_INTERPRET=1 before that to run the kernels on CPU tensors.
"""

from . import conv2d_relu_maxpool2d, linear_relu
from ._common import INTERPRET, SUPPORTED_DTYPES

__all__ = ["INTERPRET", "SUPPORTED_DTYPES", "conv2d_relu_maxpool2d", "linear_relu"]
