"""Backend registry: which kernels of each op (lightnet_ops/ops) run for a given backend name and
tensor.

Backends:
  ``cpu``        C++ kernels from the extension (CPU tensors, float32/float64)
  ``cuda``       CUDA kernels from the extension (CUDA tensors, float32/float16/bfloat16/float64)
  ``triton``     Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
  ``reference``  pure PyTorch composition (any device, any floating dtype; always available)
  ``auto``       CUDA tensors -> cuda, else triton, else reference;
                 CPU tensors  -> cpu for float32/float64, else reference.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from . import _ops
from .ops import CONTRACTS

BACKEND_NAMES = ("cpu", "cuda", "triton", "reference")


@dataclass(frozen=True)
class OpKernels:
    """One backend's two entry points for one op; same signatures as the op's schemas
    (lightnet_ops/ops/<op>.py)."""

    forward: Callable
    backward: Callable


@dataclass(frozen=True)
class Backend:
    """A backend: op name (a key of lightnet_ops.ops.CONTRACTS) -> its kernels."""

    name: str
    ops: Mapping[str, OpKernels]
    # True for the extension's ops (cpu, cuda): their forward ops carry a C++ autograd kernel
    # (csrc/<op>.cpp) that records the hand-written backward itself. False: the functional API
    # records it with the Python autograd.Functions (lightnet_ops/autograd.py).
    records_autograd: bool = False

    def kernels(self, op: str) -> OpKernels:
        try:
            return self.ops[op]
        except KeyError:
            raise BackendUnavailableError(f"backend={self.name!r} has no kernels for {op}") from None


class BackendUnavailableError(RuntimeError):
    """The requested backend is not built / not installed / cannot run on the given tensor."""


# Built once per name: every fused call looks its backend up (forward and backward).
_EXTENSION_BACKENDS: dict[str, Backend] = {}
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def _extension_backend(name: str) -> Backend:
    impl = _EXTENSION_BACKENDS.get(name)
    if impl is None:
        lib = torch.ops.lightnet_ops
        impl = Backend(
            name,
            {op: OpKernels(getattr(lib, op), getattr(lib, c.backward_name))
             for op, c in CONTRACTS.items() if _ops.has_kernel(op, _DISPATCH_KEY[name])},
            records_autograd=True,
        )
        _EXTENSION_BACKENDS[name] = impl
    return impl


REFERENCE = Backend("reference", {op: OpKernels(c.reference, c.reference_backward) for op, c in CONTRACTS.items()})


# Read once: Triton itself reads TRITON_INTERPRET once, when it is imported. refresh() re-reads it.
_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_interpreter_on() -> bool:
    return _TRITON_INTERPRET


_TRITON_IMPORT_ERROR: dict[str, str | None] = {}


def _triton_import_error() -> str | None:
    """Why backend='triton' cannot be used in this process, or None. Computed once."""
    if "error" not in _TRITON_IMPORT_ERROR:
        if importlib.util.find_spec("triton") is None:
            err = "triton is not installed (pip install triton)"
        else:
            try:
                from . import _triton_ops  # noqa: F401
                err = None
            except Exception as e:  # noqa: BLE001 - report any import failure to the user
                err = f"the Triton kernels failed to import: {type(e).__name__}: {e}"
        _TRITON_IMPORT_ERROR["error"] = err
    return _TRITON_IMPORT_ERROR["error"]


# TorchDynamo cannot trace find_spec or imports; this marks the function as "evaluate at trace time
# and treat the result as a constant" (exactly what torch.compiler.assume_constant_result sets,
# without importing torch._dynamo when lightnet_ops is imported).
_triton_import_error._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _triton_backend() -> Backend:
    from . import _triton_ops  # already imported by _triton_import_error()

    return _triton_ops.BACKEND


# Read once at import (the extension is loaded by then): plain constants keep resolve() traceable
# by TorchDynamo without graph breaks.
_HAS_CPU_KERNELS = _ops.has_kernel("conv2d_relu_maxpool2d", "CPU")
_HAS_CUDA_KERNELS = _ops.has_kernel("conv2d_relu_maxpool2d", "CUDA")


def cpu_available() -> bool:
    return _HAS_CPU_KERNELS


def cuda_available() -> bool:
    """The extension was built with CUDA kernels (a GPU is needed to run them)."""
    return _HAS_CUDA_KERNELS


def triton_available() -> bool:
    return _triton_import_error() is None


def available_backends() -> list[str]:
    """What this install can run, e.g. ``["cpu", "reference", "triton"]``.

    ``cuda`` is listed when the extension has CUDA kernels and a GPU is visible; ``triton`` when
    Triton imports and either a GPU is visible or the interpreter is on (TRITON_INTERPRET=1)."""
    names = []
    if cpu_available():
        names.append("cpu")
    if cuda_available() and torch.cuda.is_available():
        names.append("cuda")
    names.append("reference")
    if triton_available() and (torch.cuda.is_available() or triton_interpreter_on()):
        names.append("triton")
    return names


def _check_device(backend: str, device: torch.device) -> None:
    ok = {
        "cpu": device.type == "cpu",
        "cuda": device.type == "cuda",
        "triton": device.type == "cuda" or (device.type == "cpu" and triton_interpreter_on()),
        "reference": True,
    }[backend]
    if not ok:
        if backend == "triton" and device.type == "cpu":
            raise BackendUnavailableError(
                "backend='triton' runs on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
                "triton is imported (Triton's interpreter), or use backend='cpu'"
            )
        raise BackendUnavailableError(f"backend={backend!r} cannot run on a tensor on {device}")


class ReferenceFallbackWarning(UserWarning):
    """backend="auto" chose the pure-PyTorch reference backend, which is slow."""


_AUTO_FALLBACK_WARNED: set[str] = set()


def _warn_auto_fell_back(device: torch.device, dtype: torch.dtype) -> None:
    """Warns once per reason that backend="auto" runs the (slow) reference backend, and why."""
    if not _ops.EXTENSION_AVAILABLE and (device.type == "cuda" or dtype in (torch.float32, torch.float64)):
        why = f"the compiled extension is not loaded ({_ops.EXTENSION_ERROR}); {_ops.BUILD_HINT}"
    elif device.type == "cuda":
        why = ("the extension has no CUDA kernels and the triton backend is unavailable for "
               f"{dtype} ({_triton_import_error() or 'it supports float32/float16/bfloat16'})")
    elif device.type == "cpu":
        why = f"the cpu backend supports float32 and float64, not {dtype}"
    else:
        why = f"no compiled backend runs on {device.type} tensors"
    if why not in _AUTO_FALLBACK_WARNED:
        _AUTO_FALLBACK_WARNED.add(why)
        warnings.warn(f"lightnet_ops: backend='auto' runs the unfused pure-PyTorch reference backend on "
                      f"{device.type} {dtype} tensors, slower than the compiled kernels: {why}", ReferenceFallbackWarning, stacklevel=5)


# Under TorchDynamo: run at trace time (so a compiled caller warns too), traced as a constant.
_warn_auto_fell_back._dynamo_marked_constant = True  # type: ignore[attr-defined]


# (requested name, device, dtype) -> Backend, filled by resolve(): every fused call resolves its
# backend, so after the first call for a key it is one dict lookup (keyed on the device itself:
# tensor.device is cheap, tensor.device.type is not). refresh() empties it.
_RESOLVED: dict[tuple[str, torch.device, torch.dtype], Backend] = {}


def refresh() -> None:
    """Forgets cached backend choices and re-reads TRITON_INTERPRET (for tests that change it)."""
    global _TRITON_INTERPRET
    _TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    _RESOLVED.clear()


def cached(backend: str, device: torch.device, dtype: torch.dtype) -> Backend | None:
    """resolve()'s earlier answer for this (name, device, dtype), or None if there is none yet."""
    return _RESOLVED.get((backend, device, dtype)) if type(backend) is str else None


def resolve(backend: str, tensor: torch.Tensor) -> Backend:
    """The backend that runs ops on `tensor` for the requested name (see module docstring)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    key = (backend, tensor.device, tensor.dtype)
    impl = _RESOLVED.get(key)
    if impl is None:
        impl = _resolve(backend, tensor.device, tensor.dtype)
        _RESOLVED[key] = impl
    return impl


def _resolve(backend: str, device: torch.device, dtype: torch.dtype) -> Backend:
    if backend == "auto":
        if device.type == "cuda":
            triton_ok = triton_available() and dtype in (torch.float32, torch.float16, torch.bfloat16)
            backend = "cuda" if cuda_available() else ("triton" if triton_ok else "reference")
        elif device.type == "cpu" and dtype in (torch.float32, torch.float64) and cpu_available():
            backend = "cpu"
        else:
            backend = "reference"
        if backend == "reference":
            _warn_auto_fell_back(device, dtype)
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKEND_NAMES}")
    _check_device(backend, device)
    if backend == "reference":
        return REFERENCE
    if backend == "triton":
        err = _triton_import_error()
        if err is not None:
            raise BackendUnavailableError(f"backend='triton' is unavailable: {err}")
        return _triton_backend()
    if not _ops.EXTENSION_AVAILABLE:
        raise BackendUnavailableError(
            f"backend={backend!r} needs the compiled extension lightnet_ops._C, which did not load "
            f"({_ops.EXTENSION_ERROR}); {_ops.BUILD_HINT}; or use backend='reference'"
        )
    if backend == "cuda" and not cuda_available():
        raise BackendUnavailableError(
            "backend='cuda': the extension was built without CUDA kernels; rebuild with a CUDA-enabled torch "
            "and nvcc on PATH (or CUDA_HOME set), LIGHTNET_OPS_CUDA=1 forces it"
        )
    if backend == "cpu" and dtype not in (torch.float32, torch.float64):
        raise BackendUnavailableError(
            f"backend='cpu' supports float32 and float64, got {dtype}; use backend='reference' "
            "(or 'auto', which falls back to it)"
        )
    return _extension_backend(backend)


def get(name: str) -> Backend:
    """The Backend for an already-resolved concrete name (no availability or device checks)."""
    if name == "reference":
        return REFERENCE
    if name == "triton":
        return _triton_backend()
    return _extension_backend(name)
