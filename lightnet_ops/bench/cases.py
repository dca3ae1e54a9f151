"""The benchmark cases, as data: one problem (op, shape, batch, dtype) per case, with the device
kinds it runs on and whether ``--quick`` includes it. How each op is set up and timed lives in
``ops.py`` (``OPS``), keyed by ``Case.op``."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Optional

from .ops import OPS, default_backends

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
        return tuple(m for m in OPS[self.op].modes if not self.only_modes or m in self.only_modes)


_CONV1 = ConvShape(1, 6, 32, 32, 3)                 # LightNet conv1: 1->6, 32x32, k3, pool2
_CONV2 = ConvShape(6, 16, 15, 15, 3)                # LightNet conv2: 6->16, 15x15, k3, pool2
_VGG = ConvShape(64, 64, 56, 56, 3, padding=1)      # VGG-style block: 64->64, 56x56, k3 pad1, pool2
_FC1 = LinearShape(576, 120)                        # LightNet fc1
_FC2 = LinearShape(120, 84)                         # LightNet fc2
_BIG_LINEAR = LinearShape(1024, 4096)
_SQUARE_4K = LinearShape(4096, 4096)                # a large layer at few rows: weight-bandwidth bound
_LIGHTNET = "LightNet 1x32x32 -> 10: inference forward / SGD training step"
_FWD = ("fwd",)
# Per-call host cost: problems so small that one call is all argument handling and dispatch.
_TINY_CONV = ConvShape(1, 1, 4, 4, 3)               # 1x1x4x4 input, 3x3 filter -> 2x2 -> pool -> 1x1
_TINY_LINEAR = LinearShape(4, 4)                    # 1x4 input, 4 -> 4

CASES: tuple[Case, ...] = (
    Case("conv1_b1", "conv", 1, "LightNet conv1 1->6 32x32 k3 pool2, batch 1", _CONV1),
    Case("conv1_b64", "conv", 64, "LightNet conv1 1->6 32x32 k3 pool2, batch 64", _CONV1, quick=("cpu",)),
    Case("conv1_b256", "conv", 256, "LightNet conv1 1->6 32x32 k3 pool2, batch 256", _CONV1, quick=("cuda",)),
    Case("conv2_b1", "conv", 1, "LightNet conv2 6->16 15x15 k3 pool2, batch 1", _CONV2),
    Case("conv2_b64", "conv", 64, "LightNet conv2 6->16 15x15 k3 pool2, batch 64", _CONV2, quick=("cpu",)),
    Case("conv2_b256", "conv", 256, "LightNet conv2 6->16 15x15 k3 pool2, batch 256", _CONV2, quick=("cuda",)),
    Case("vgg_b8", "conv", 8, "VGG-style block 64->64 56x56 k3 pad1 pool2, batch 8", _VGG, quick=("cpu",)),
    Case("vgg_b8_fp16", "conv", 8, "VGG-style block, float16", _VGG, "float16", ("cuda",), ("cuda",)),
    Case("vgg_b8_bf16", "conv", 8, "VGG-style block, bfloat16", _VGG, "bfloat16", ("cuda",), ("cuda",)),
    Case("linear_576x120_b256", "linear", 256, "linear_relu 576->120 (LightNet fc1), batch 256", _FC1,
         quick=("cpu", "cuda")),
    Case("linear_1024x4096_b4096", "linear", 4096, "linear_relu 1024->4096, batch 4096", _BIG_LINEAR),
    Case("linear_1024x4096_b4096_fp16", "linear", 4096, "linear_relu 1024->4096, batch 4096, float16", _BIG_LINEAR,
         "float16", ("cuda",)),
    Case("linear_1024x4096_b4096_bf16", "linear", 4096, "linear_relu 1024->4096, batch 4096, bfloat16", _BIG_LINEAR,
         "bfloat16", ("cuda",), ("cuda",)),
    Case("lightnet_b64", "lightnet", 64, f"{_LIGHTNET}, batch 64", quick=("cpu",)),
    Case("lightnet_b256", "lightnet", 256, f"{_LIGHTNET}, batch 256", quick=("cuda",)),
    # Small-batch inference: LightNet and its layers at batch 1 and 8, a large layer at few rows.
    Case("conv1_b8", "conv", 8, "LightNet conv1 1->6 32x32 k3 pool2, batch 8, inference", _CONV1, only_modes=_FWD),
    Case("conv2_b8", "conv", 8, "LightNet conv2 6->16 15x15 k3 pool2, batch 8, inference", _CONV2, only_modes=_FWD),
    Case("linear_576x120_b1", "linear", 1, "linear_relu 576->120 (LightNet fc1), batch 1, inference", _FC1,
         only_modes=_FWD),
    Case("linear_576x120_b8", "linear", 8, "linear_relu 576->120 (LightNet fc1), batch 8, inference", _FC1,
         only_modes=_FWD),
    Case("linear_120x84_b1", "linear", 1, "linear_relu 120->84 (LightNet fc2), batch 1, inference", _FC2,
         only_modes=_FWD),
    Case("linear_120x84_b8", "linear", 8, "linear_relu 120->84 (LightNet fc2), batch 8, inference", _FC2,
         only_modes=_FWD),
    Case("linear_4096x4096_b1", "linear", 1, "linear_relu 4096->4096, batch 1, inference", _SQUARE_4K,
         only_modes=_FWD),
    Case("linear_4096x4096_b8", "linear", 8, "linear_relu 4096->4096, batch 8, inference", _SQUARE_4K,
         only_modes=_FWD),
    Case("lightnet_b1", "lightnet", 1, "LightNet 1x32x32 -> 10, batch 1, inference", only_modes=_FWD,
         quick=("cpu",)),
    Case("lightnet_b8", "lightnet", 8, "LightNet 1x32x32 -> 10, batch 8, inference", only_modes=_FWD),
    # Per-call host cost on tiny tensors. "stock" is ONE stock call (F.conv2d / F.linear, or an
    # nn.Conv2d / nn.Linear module call), not the stock composition: the fused call should cost no
    # more host time than the first op of the chain it replaces.
    Case("call_conv_fn", "call_fn", 1, "per-call cost: lo.conv2d_relu_maxpool2d vs F.conv2d, 1x1x4x4 input, 3x3",
         _TINY_CONV, quick=("cpu",)),
    Case("call_conv_module", "call_module", 1,
         "per-call cost: Conv2dReLUMaxPool2d vs nn.Conv2d module call, 1x1x4x4 input, 3x3", _TINY_CONV),
    Case("call_linear_fn", "call_fn", 1, "per-call cost: lo.linear_relu vs F.linear, 1x4 input, 4->4", _TINY_LINEAR),
    Case("call_linear_module", "call_module", 1, "per-call cost: LinearReLU vs nn.Linear module call, 1x4 input",
         _TINY_LINEAR),
)
CASES_BY_NAME = {c.name: c for c in CASES}


def case_key(case: Case) -> tuple:
    """What makes two cases the same problem: (op, batch, shape, dtype)."""
    return case.op, case.batch, case.shape, case.dtype


def select_cases(device_kind: str, patterns: Optional[list[str]] = None, quick: bool = False) -> list[Case]:
    """Cases for a device kind. `patterns` are case names or fnmatch patterns ("conv*"); without them,
    every case for the device (only the quick subset when `quick`)."""
    cases = [c for c in CASES if device_kind in c.devices]
    if patterns:
        unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(c.name, p) for c in CASES)]
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; --list shows them")
        chosen = [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
        if not chosen:
            raise SystemExit(f"no case matching {patterns} runs on {device_kind}")
        return chosen
    if quick:
        cases = [c for c in cases if device_kind in c.quick]
    return cases


def benchmark_matrix(op: str, device_kind: str) -> list[tuple[Case, str, str]]:
    """(case, mode, impl) for every case of `op` (a key of ``OPS``) on the device kind, every mode
    and every default backend and peer that applies: the parametrisation of benchmarks/bench_*.py."""
    impls = default_backends(device_kind)
    return [(c, m, i) for c in CASES if c.op == op and device_kind in c.devices for m in c.modes for i in impls
            if OPS[op].supports(c, i, m)]


def case_id(value: Any) -> Optional[str]:
    """pytest id for benchmark_matrix values: the case name for a Case, the default otherwise."""
    return value.name if isinstance(value, Case) else None
