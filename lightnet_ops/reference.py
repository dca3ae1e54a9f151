"""The ``reference`` backend: each op's pure-PyTorch contract implementation (lightnet_ops/ops),
with the same signatures and return conventions as the compiled ops (``torch.ops.lightnet_ops.*``).

It runs on every device and dtype, is the fallback when the extension is not built, and is the
oracle the kernels are tested against. Its backward functions are hand-written too (routing
through the one-byte argmax, then ``aten.convolution_backward``) from differentiable stock ops,
which is what double backward differentiates."""

from __future__ import annotations

from .ops import conv2d_relu_maxpool2d as _conv
from .ops import linear_relu as _linear

conv2d_relu_maxpool2d = _conv.reference
conv2d_relu_maxpool2d_backward = _conv.reference_backward
conv2d_relu_maxpool2d_jvp = _conv.reference_jvp
route_pooled_grad = _conv.route_pooled_grad
linear_relu = _linear.reference
linear_relu_backward = _linear.reference_backward
linear_relu_jvp = _linear.reference_jvp
