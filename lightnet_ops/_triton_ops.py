"""The ``triton`` backend: the Triton kernels registered as torch ops through ``torch.library``.

Ops (the schemas of the contracts in lightnet_ops/ops, as the C++ ones, prefixed ``triton_``):
  lightnet_ops::triton_conv2d_relu_maxpool2d, lightnet_ops::triton_conv2d_relu_maxpool2d_backward,
  lightnet_ops::triton_linear_relu, lightnet_ops::triton_linear_relu_backward
They are ``torch.library.custom_op``s with fake kernels, so ``torch.compile(fullgraph=True)`` treats them
as opaque ops with known output shapes (this also works for CPU tensors under Triton's interpreter,
where Inductor could not compile a user Triton kernel).

Runs on CUDA tensors, and on CPU tensors when Triton's interpreter is on (TRITON_INTERPRET=1 set
before triton is imported). float32, float16 and bfloat16; float64 raises.

Importing this module imports triton; backend_registry guards the import, so lightnet_ops imports
without triton.

Where the kernels come from: setup.py ships the top-level ``triton_kernels/`` directory as the
subpackage ``lightnet_ops.triton_kernels`` (package_dir); a regular install has it at
lightnet_ops/triton_kernels/. A source tree (``setup.py build_ext --inplace``, or an editable install)
has no ``lightnet_ops/triton_kernels``; there `_import_kernels` loads ``<repo>/triton_kernels`` under
that same name, so the kernels are one module, with one name, either way.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

import torch

from .backend_registry import Backend, OpKernels
from .ops import CONTRACTS
from .ops import conv2d_relu_maxpool2d as conv_op
from .ops import linear_relu as linear_op

_KERNELS_NAME = f"{__package__}.triton_kernels"


def _import_kernels() -> ModuleType:
    """``lightnet_ops.triton_kernels``, from the tree this lightnet_ops package belongs to.

    Installed (regular install): the subpackage lightnet_ops/triton_kernels/ that setup.py ships.
    Source tree (``build_ext --inplace``, or an editable install of this tree): ``<repo>/triton_kernels``,
    loaded by path under the same module name. The source tree is checked before a plain import because
    an editable install of *another* checkout registers a finder that maps the name
    ``lightnet_ops.triton_kernels`` to that checkout's directory, whatever ``lightnet_ops`` is imported.
    """
    if _KERNELS_NAME in sys.modules:
        return sys.modules[_KERNELS_NAME]
    pkg_dir = Path(__file__).resolve().parent
    tree = pkg_dir.parent / "triton_kernels"
    if (pkg_dir / "triton_kernels" / "__init__.py").is_file() or not (tree / "__init__.py").is_file():
        return importlib.import_module(_KERNELS_NAME)
    spec = importlib.util.spec_from_file_location(_KERNELS_NAME, tree / "__init__.py",
                                                  submodule_search_locations=[str(tree)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_KERNELS_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_KERNELS_NAME]
        raise
    setattr(sys.modules[__package__], "triton_kernels", module)
    return module


_kernels = _import_kernels()
_conv = _kernels.conv2d_relu_maxpool2d
_linear = _kernels.linear_relu
INTERPRET: bool = _kernels.INTERPRET


def _check_runnable(op: str, t: torch.Tensor) -> None:
    """Raises unless the Triton kernels can run on `t` (dtype, and device under this Triton mode)."""
    if t.dtype not in _kernels.SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: the triton backend supports float32, float16 and bfloat16, got {t.dtype}"
            + ("; use backend='cpu', 'cuda' or 'reference' for float64" if t.dtype == torch.float64 else "")
        )
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu":
        if INTERPRET:
            return
        raise RuntimeError(
            f"{op}: backend='triton' got CPU tensors, but Triton's interpreter is off; the Triton kernels run "
            "on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before triton is imported "
            "(or use backend='cpu')"
        )
    raise RuntimeError(f"{op}: backend='triton' runs on CUDA tensors (CPU under the interpreter), got {t.device}")


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device (multi-GPU, DDP)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _check_dtype_only(op: str, t: torch.Tensor) -> None:
    if t.dtype not in _kernels.SUPPORTED_DTYPES:
        _check_runnable(op, t)


# ---------------------------------------------------------------------------------------------
# conv2d_relu_maxpool2d
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("lightnet_ops::triton_conv2d_relu_maxpool2d", mutates_args=(), schema=conv_op.SCHEMA)
def triton_conv2d_relu_maxpool2d(
    input: torch.Tensor,                 # (N, C, H, W)
    weight: torch.Tensor,                # (K, C, R, S)
    bias: Optional[torch.Tensor],        # (K) or None
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    pool_kernel_size: Sequence[int],
    pool_stride: Sequence[int],
    need_argmax: bool,
    pool_padding: Sequence[int] = (0, 0),
    ceil_mode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (N, K, PH, PW), argmax uint8 (N, K, PH, PW), or an empty uint8 [0] without need_argmax)."""
    s = conv_op.conv_pool_shape(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride,
                                pool_padding, ceil_mode)
    _check_runnable("conv2d_relu_maxpool2d", input)
    with _on_device(input):
        return _conv.conv2d_relu_maxpool2d_forward(
            input, weight, bias, s.stride, s.padding, s.dilation, s.pool_kernel_size, s.pool_stride,
            s.P, s.Q, s.PH, s.PW, need_argmax, s.pool_padding,
        )


@triton_conv2d_relu_maxpool2d.register_fake
def _(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, need_argmax,
      pool_padding=(0, 0), ceil_mode=False):
    _check_dtype_only("conv2d_relu_maxpool2d", input)
    return conv_op.fake(input, weight, bias, stride, padding, dilation, pool_kernel_size, pool_stride, need_argmax,
                        pool_padding, ceil_mode)


@torch.library.custom_op("lightnet_ops::triton_conv2d_relu_maxpool2d_backward", mutates_args=(),
                         schema=conv_op.BACKWARD_SCHEMA)
def triton_conv2d_relu_maxpool2d_backward(
    grad_output: torch.Tensor,           # (N, K, PH, PW)
    input: torch.Tensor,                 # (N, C, H, W)
    weight: torch.Tensor,                # (K, C, R, S)
    argmax: torch.Tensor,                # uint8 (N, K, PH, PW)
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    pool_kernel_size: Sequence[int],
    pool_stride: Sequence[int],
    output_mask: Sequence[bool],
    pool_padding: Sequence[int] = (0, 0),
    ceil_mode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_input (N, C, H, W), grad_weight (K, C, R, S), grad_bias (K)); masked-off entries are
    empty tensors of shape [0]."""
    s = conv_op.conv_pool_shape(input, weight, None, stride, padding, dilation, pool_kernel_size, pool_stride,
                                pool_padding, ceil_mode)
    conv_op.check_backward(s, grad_output, input, argmax)
    _check_runnable("conv2d_relu_maxpool2d_backward", input)
    with _on_device(input):
        return _conv.conv2d_relu_maxpool2d_backward(
            grad_output, input, weight, argmax, s.stride, s.padding, s.dilation, s.pool_kernel_size,
            s.pool_stride, s.P, s.Q, output_mask, pool_padding=s.pool_padding,
        )


@triton_conv2d_relu_maxpool2d_backward.register_fake
def _(grad_output, input, weight, argmax, stride, padding, dilation, pool_kernel_size, pool_stride, output_mask,
      pool_padding=(0, 0), ceil_mode=False):
    s = conv_op.conv_pool_shape(input, weight, None, stride, padding, dilation, pool_kernel_size, pool_stride,
                                pool_padding, ceil_mode)
    conv_op.check_backward(s, grad_output, input, argmax)
    _check_dtype_only("conv2d_relu_maxpool2d_backward", input)
    return conv_op.backward_fake(grad_output, input, weight, argmax, stride, padding, dilation, pool_kernel_size,
                                 pool_stride, output_mask, pool_padding, ceil_mode)


# ---------------------------------------------------------------------------------------------
# linear_relu
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("lightnet_ops::triton_linear_relu", mutates_args=(), schema=linear_op.SCHEMA)
def triton_linear_relu(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """input (M, in_features), weight (out_features, in_features), bias (out_features) or None -> (M, out_features)."""
    linear_op.check_linear(input, weight, bias)
    if input.dim() != 2:
        raise ValueError(f"linear_relu: the op takes 2-D input (M, in_features), got shape {list(input.shape)}")
    _check_runnable("linear_relu", input)
    with _on_device(input):
        return _linear.linear_relu_forward(input, weight, bias)


@triton_linear_relu.register_fake
def _(input, weight, bias):
    linear_op.check_linear(input, weight, bias)
    if input.dim() != 2:
        raise ValueError(f"linear_relu: the op takes 2-D input (M, in_features), got shape {list(input.shape)}")
    _check_dtype_only("linear_relu", input)
    return linear_op.fake(input, weight, bias)


@torch.library.custom_op("lightnet_ops::triton_linear_relu_backward", mutates_args=(),
                         schema=linear_op.BACKWARD_SCHEMA)
def triton_linear_relu_backward(
    grad_output: torch.Tensor,           # (M, out_features)
    input: torch.Tensor,                 # (M, in_features)
    weight: torch.Tensor,                # (out_features, in_features)
    output: torch.Tensor,                # (M, out_features), the forward output (ReLU gate)
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_input (M, in), grad_weight (out, in), grad_bias (out)); masked-off entries are empty [0]."""
    linear_op.check_backward(grad_output, input, weight, output)
    _check_runnable("linear_relu_backward", input)
    with _on_device(input):
        return _linear.linear_relu_backward(grad_output, input, weight, output, output_mask)


@triton_linear_relu_backward.register_fake
def _(grad_output, input, weight, output, output_mask):
    linear_op.check_backward(grad_output, input, weight, output)
    _check_dtype_only("linear_relu_backward", input)
    return linear_op.backward_fake(grad_output, input, weight, output, output_mask)


_lib = torch.ops.lightnet_ops
BACKEND = Backend(
    "triton",
    {op: OpKernels(getattr(_lib, f"triton_{op}"), getattr(_lib, f"triton_{c.backward_name}"))
     for op, c in CONTRACTS.items()},
)
