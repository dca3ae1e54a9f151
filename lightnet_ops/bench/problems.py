"""What a benchmark problem is: the Case record and the problem shapes of the fused ops. The cases
themselves are declared with the op that runs them (a fused op's ``BENCH`` in ``lightnet_ops/api/<op>.py``,
the whole model and the per-call entries in ``ops.py``) and collected in ``cases.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODES = ("fwd", "fwd+bwd", "step")


@dataclass(frozen=True)
class ConvShape:
    """conv2d_relu_maxpool2d problem: an NCHW input of in_channels x height x width, out_channels
    square filters of size kernel, then a max pool of pool_kernel / pool_stride."""

    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    pool_kernel: int = 2
    pool_stride: int = 2

    @property
    def conv_out(self) -> tuple[int, int]:
        """(P, Q): the convolution's output height and width."""
        span = self.dilation * (self.kernel - 1) + 1
        return ((self.height + 2 * self.padding - span) // self.stride + 1,
                (self.width + 2 * self.padding - span) // self.stride + 1)

    @property
    def pool_out(self) -> tuple[int, int]:
        """(PH, PW): the pooled output's height and width."""
        P, Q = self.conv_out
        return (P - self.pool_kernel) // self.pool_stride + 1, (Q - self.pool_kernel) // self.pool_stride + 1


@dataclass(frozen=True)
class LinearShape:
    """linear_relu problem: (batch, in_features) -> (batch, out_features)."""

    in_features: int
    out_features: int


@dataclass(frozen=True)
class Case:
    """One benchmark problem.

    op: key of ``ops.OPS`` ("conv", "linear", "lightnet", "call_fn", "call_module"); shape: the op's
    problem description (ConvShape, LinearShape; None for the whole model, whose input is fixed).
    devices: device kinds the case runs on; quick: device kinds whose --quick run includes it.
    only_modes: when set, the case runs in these of its op's modes only (inference-only cases).
    """

    name: str
    op: str
    batch: int
    description: str
    shape: Any = None
    dtype: str = "float32"
    devices: tuple = ("cpu", "cuda")
    quick: tuple = ()
    only_modes: tuple = ()

    @property
    def modes(self) -> tuple:
        """The modes this case is measured in: its op's ("fwd", "fwd+bwd" / "step"), narrowed to
        `only_modes` when that is set."""
        from .ops import OPS  # ops.py declares the cases with these classes

        return tuple(m for m in OPS[self.op].modes if not self.only_modes or m in self.only_modes)
