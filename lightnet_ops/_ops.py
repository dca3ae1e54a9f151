"""Loads the compiled extension (``lightnet_ops._C``), which registers the op schemas
(csrc/<op>.cpp) and the CPU/CUDA kernels, and registers the fake (meta) implementations that let
``torch.compile`` and ``torch.library.opcheck`` reason about shapes without running kernels.

Importing this module never fails: without a loaded extension ``EXTENSION_AVAILABLE`` is False and
``EXTENSION_ERROR`` says why. When an extension was built but cannot be used (built for another
torch, or its library fails to load) the import also warns (:class:`ExtensionWarning`): the
``auto`` backend would otherwise fall back to the slow pure-PyTorch reference without a word.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from types import ModuleType
from typing import Any

import torch

from .ops import CONTRACTS


class ExtensionWarning(UserWarning):
    """The compiled extension exists but cannot be used; the message says why and how to fix it."""


BUILD_HINT = (
    "build it against the torch you run: `pip install --no-build-isolation .` in the source tree "
    "(`pip install --no-build-isolation -e .` for a development install, or `make build`)"
)
REBUILD_HINT = (
    "re" + BUILD_HINT + "; plain `pip install .` (build isolation) compiles against a fresh torch from "
    "PyPI instead of yours"
)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _optional_module(name: str) -> ModuleType | None:
    """The submodule `name` of this package, or None when there is none (without the misleading
    "partially initialized module ... circular import" ImportError a missing submodule raises)."""
    try:
        spec = importlib.util.find_spec(f"{__package__}.{name}")
    except (ImportError, ValueError):
        return None
    return None if spec is None else importlib.import_module(f"{__package__}.{name}")


def _read_build_info() -> dict[str, Any] | None:
    """What setup.py recorded at build time (lightnet_ops/_build_info.py), or None for a tree built
    without it."""
    module = _optional_module("_build_info")
    if module is None:
        return None
    return {k: v for k, v in vars(module).items() if k.isupper()}


#: What this lightnet_ops was built with (TORCH_VERSION, TORCH_CUDA_VERSION, EXTENSION, WITH_CUDA,
#: CUDA_ARCH_LIST, DEBUG, OPTIONS), or None when the build did not record it.
BUILD_INFO = _read_build_info()


def _torch_mismatch(info: dict[str, Any] | None) -> str | None:
    """How the torch the extension was built for differs from the running one, or None."""
    if info is None:
        return None
    built = (info.get("TORCH_VERSION"), info.get("TORCH_CUDA_VERSION"))
    running = (torch.__version__, torch.version.cuda)
    if built == running:
        return None
    return (f"it was built for torch {built[0]} (CUDA {built[1]}) but this is torch {running[0]} "
            f"(CUDA {running[1]})")


def _load_extension() -> tuple[bool, str | None]:
    """Loads lightnet_ops._C. Returns (loaded, why not); warns when a built extension cannot be used."""
    if BUILD_INFO is not None and not BUILD_INFO.get("EXTENSION", True):
        return False, ("this lightnet_ops was built without its compiled extension "
                       "(LIGHTNET_OPS_NO_EXTENSION=1): only the reference and triton backends exist")
    try:
        spec = importlib.util.find_spec(f"{__package__}._C")
    except (ImportError, ValueError):
        spec = None
    error = None
    if spec is None:
        if BUILD_INFO is None:
            return False, f"lightnet_ops._C is not built (no compiled extension in {_PACKAGE_DIR})"
        error = (f"lightnet_ops._C is missing: the build recorded one for torch {BUILD_INFO.get('TORCH_VERSION')}, "
                 f"but there is no compiled extension in {_PACKAGE_DIR}")
    elif (mismatch := _torch_mismatch(BUILD_INFO)) is not None:
        error = f"lightnet_ops._C was not loaded: {mismatch}"
    else:
        try:
            importlib.import_module(f"{__package__}._C")  # runs the TORCH_LIBRARY registrations
            return True, None
        except (ImportError, OSError) as e:
            error = (f"lightnet_ops._C ({spec.origin}) failed to load: {type(e).__name__}: {e}. "
                     "It was most likely built for another torch or CUDA")
    warnings.warn(f"{error}. Only the slow pure-PyTorch reference backend (and triton, where it runs) "
                  f"can be used; {REBUILD_HINT}.", ExtensionWarning, stacklevel=3)
    return False, error


EXTENSION_AVAILABLE, EXTENSION_ERROR = _load_extension()

# The extension's ops: each contract's forward and backward (lightnet_ops/ops).
OP_NAMES = tuple(name for c in CONTRACTS.values() for name in (c.name, c.backward_name))


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """Whether the built extension registered a `dispatch_key` ("CPU", "CUDA") kernel for the op."""
    if not EXTENSION_AVAILABLE:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"lightnet_ops::{op_name}", dispatch_key)


def direct_entry(name: str) -> Any:
    """The extension module's function `name` (csrc/ops.cpp: an op's entry without torch.ops' boxed
    call), or None without a loaded extension or where the module lacks it."""
    if not EXTENSION_AVAILABLE:
        return None
    return getattr(importlib.import_module(f"{__package__}._C"), name, None)


# Fixed once the extension is loaded: TorchDynamo calls it at trace time and keeps the answer as a
# constant (the dispatcher query itself cannot be traced), as torch.compiler.assume_constant_result does.
has_kernel._dynamo_marked_constant = True  # type: ignore[attr-defined]


# Fake (meta) kernels of the compiled ops come from the contracts; the Triton ops register the same.
if EXTENSION_AVAILABLE:
    for _c in CONTRACTS.values():
        torch.library.register_fake(f"lightnet_ops::{_c.name}")(_c.fake)
        torch.library.register_fake(f"lightnet_ops::{_c.backward_name}")(_c.backward_fake)
