"""Pieces shared by the Triton kernels: interpreter detection, autotune config lists, the dtype
policy of ``tl.dot``, a deterministic channel-sum kernel (bias gradients), the checks every op's
launchers run before a launch, and the helpers of the ahead-of-time compile jobs (``aot_check``)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import triton
import triton.language as tl


@triton.jit
def _probe():
    pass


#: Whether Triton's interpreter runs the kernels (TRITON_INTERPRET=1 when triton was imported).
#: Triton decides this when a kernel is decorated, so asking a decorated kernel is the ground truth
#: (the env var spelling rules differ between Triton versions).
INTERPRET: bool = type(_probe).__name__ == "InterpretedFunction"

#: dtypes the Triton kernels run in (float32 accumulation throughout).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


#: Autotune on GPUs (triton.autotune over each kernel's config list, keyed on the problem sizes).
#: LIGHTNET_OPS_TRITON_AUTOTUNE=0 uses each kernel's default config instead: no benchmarking on the
#: first call of every new problem size (short test runs, reproducible timings). Read when this module is imported.
AUTOTUNE: bool = os.environ.get("LIGHTNET_OPS_TRITON_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "")


class Launcher:
    """``kernel[grid](*args, **constexprs)`` that autotunes over `configs` on a GPU, and runs one fixed
    config (`default` compiled, `interpreter_config` in the interpreter, which cannot benchmark) otherwise."""

    def __init__(self, fn, configs: list, default: triton.Config, interpreter_config: triton.Config, key: list):
        self.fn = fn                      # the @triton.jit function
        self.configs = configs
        self.default = interpreter_config if INTERPRET else default
        self.tuned = None if INTERPRET else triton.autotune(configs=configs, key=key)(fn)

    def __getitem__(self, grid):
        if self.tuned is not None and AUTOTUNE:
            return self.tuned[grid]
        c = self.default
        return lambda *args, **kw: self.fn[grid](*args, **kw, **c.kwargs, num_warps=c.num_warps,
                                                 num_stages=c.num_stages)


def autotune(configs: list, default: triton.Config, interpreter_config: triton.Config, key: list):
    """Decorator: wraps a @triton.jit kernel into a `Launcher`."""
    return lambda fn: Launcher(fn, configs, default, interpreter_config, key)


def cfg(**kw) -> triton.Config:
    """triton.Config(kw without num_warps/num_stages, num_warps=..., num_stages=...)."""
    num_warps = kw.pop("num_warps", 4)
    num_stages = kw.pop("num_stages", 3)
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


#: The one config every kernel uses under the interpreter (multi-config autotune fails there).
INTERP_CONFIG = cfg(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexpr flags of `mma` for tensors of `dtype`.

    FP32_IEEE: float32 operands are multiplied in full float32 (IEEE), not TF32, so float32 results
    keep float32 accuracy like stock PyTorch (TF32 would be ~1e-3 relative off).
    UPCAST: the interpreter multiplies bfloat16 blocks as their raw uint16 storage, so under the
    interpreter both operands are converted to float32 first (compiled code multiplies them natively).
    """
    return {
        "FP32_IEEE": dtype == torch.float32,
        "UPCAST": INTERPRET and dtype == torch.bfloat16,
    }


@triton.jit
def mma(acc, a, b, FP32_IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation; a (BM, BK) and b (BK, BN) of the same dtype."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif FP32_IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def any_nan(v, mask):
    """Whether the 2-D block v holds a NaN where mask is set (a scalar, for a run-time branch)."""
    return tl.max(tl.max(tl.where(mask & (v != v), 1, 0), axis=1), axis=0) > 0


@triton.jit
def relu_keep_nan(v):
    """Stock ReLU: anything <= 0 becomes 0, NaN stays NaN."""
    return tl.where(v <= 0, 0.0, v)


@triton.jit(do_not_specialize=["B", "KC", "L"])
def _channel_sum_kernel(
    x_ptr,      # (B, KC, L) values, strides (stride_b, stride_k, stride_l)
    gate_ptr,   # same layout as x (strides of x) when GATED: values where gate <= 0 count as 0
    out_ptr,    # (KC) sums, in out_ptr's dtype
    B, KC, L,
    stride_b, stride_k, stride_l,
    GATED: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """out[k] = sum over b, l of x[b, k, l], in a fixed order (deterministic), float32 accumulation."""
    pid = tl.program_id(0)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < KC
    k_off = offs_k.to(tl.int64) * stride_k
    acc = tl.zeros([BLOCK_K, BLOCK_L], dtype=tl.float32)
    n_l = tl.cdiv(L, BLOCK_L)
    for b in range(0, B):
        base = tl.cast(b, tl.int64) * stride_b   # tl.cast: the interpreter hands loop counters over as ints
        for lt in range(0, n_l):
            offs_l = lt * BLOCK_L + tl.arange(0, BLOCK_L)
            mask = k_mask[:, None] & (offs_l < L)[None, :]
            off = base + k_off[:, None] + offs_l.to(tl.int64)[None, :] * stride_l
            v = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
            if GATED:
                g = tl.load(gate_ptr + off, mask=mask, other=0.0)
                v = tl.where(g <= 0, 0.0, v)
            acc += v
    tl.store(out_ptr + offs_k, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=k_mask)


def channel_sum(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """out (KC) = x.sum over dims 0 and 2 of a 3-D view x (B, KC, L); gate (same shape and strides as
    x) zeroes the entries where gate <= 0. Returns `out`."""
    B, KC, L = x.shape
    if KC == 0:
        return out
    if B == 0 or L == 0:
        return out.zero_()
    if gate is not None and gate.stride() != x.stride():
        raise ValueError("channel_sum: gate must have the same strides as x")
    block_l = min(triton.next_power_of_2(L), 128)
    block_k = 16 if block_l > 16 else 64
    _channel_sum_kernel[(triton.cdiv(KC, block_k),)](
        x, gate if gate is not None else x, out, B, KC, L, *x.stride(),
        GATED=gate is not None, BLOCK_K=block_k, BLOCK_L=block_l,
    )
    return out


# ---------------------------------------------------------------------------------------------
# what every op's launchers check before a launch
# ---------------------------------------------------------------------------------------------


def check_dtype(op: str, t: torch.Tensor) -> None:
    """Raises TypeError unless the kernels run in `t`'s dtype (float64 names the backends that do)."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{op}: the triton backend supports float32, float16 and bfloat16, got {t.dtype}"
            + ("; use backend='cpu', 'cuda' or 'reference' for float64" if t.dtype == torch.float64 else "")
        )


def check_runnable(op: str, t: torch.Tensor) -> None:
    """Raises unless the kernels can run on `t` (dtype, and device under this Triton mode)."""
    check_dtype(op, t)
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


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device (multi-GPU, DDP)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile jobs (aot_check): (jit function, pointer types, constexprs + num_warps/num_stages)
# ---------------------------------------------------------------------------------------------

AotJob = tuple  # (triton.JITFunction, {pointer arg: "*fp16" ...}, {constexpr: value, num_warps, num_stages})


def aot_configs(launcher: Launcher, all_configs: bool) -> list[dict]:
    """The launcher's configs to compile (every one, or its default) as constexpr dicts with
    num_warps / num_stages."""
    cs = launcher.configs if all_configs else [launcher.default]
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in cs]


def aot_flags(dt: str) -> dict:
    """`dot_flags` of compiled code for a Triton pointer dtype name ("fp32", "fp16", "bf16")."""
    return {"FP32_IEEE": dt == "fp32", "UPCAST": False}


def aot_jobs(dtypes: list[str], all_configs: bool) -> Iterator[AotJob]:
    """The shared kernels' compile jobs (the channel sum, in every variant the launchers pick)."""
    for dt in dtypes:
        p = "*" + dt
        for gated in (True, False):
            for block_k, block_l in ((16, 128), (64, 1), (64, 16)):
                yield _channel_sum_kernel, {"x_ptr": p, "gate_ptr": p, "out_ptr": p}, dict(
                    GATED=gated, BLOCK_K=block_k, BLOCK_L=block_l, num_warps=4, num_stages=1)
