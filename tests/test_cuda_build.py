"""The CUDA backend as far as a machine without a GPU can check it: the built extension carries
CUDA kernels for all four ops (so CI compiles csrc/cuda/*.cu) unless the build left them out on
purpose (its recorded options say so), the cuda backend refuses CPU tensors with a clear error, and
the host/device window math the CUDA backward relies on (window_math.h) is right, checked by
compiling it for the host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import lightnet_ops as lo
from lightnet_ops import _ops, backend_registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _nvcc_found() -> bool:
    if shutil.which("nvcc"):
        return True
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return any(r and os.path.exists(os.path.join(r, "bin", "nvcc")) for r in roots)


def _cuda_expected_by_default() -> str | None:
    """Why setup.py's default (no LIGHTNET_OPS_CUDA) builds no CUDA kernels here, or None if it does."""
    if torch.version.cuda is None:
        return "torch was built without CUDA, so setup.py builds the CPU-only extension"
    if not _nvcc_found():
        return "no CUDA toolkit (nvcc on PATH, CUDA_HOME or /usr/local/cuda), so setup.py builds the CPU-only extension"
    return None


def _flag_off(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("0", "", "false", "off", "no")


def _cuda_build_skip_reason() -> str | None:
    """Why the extension under test has no CUDA kernels by design, or None when it must have them.

    Follows what was built (lightnet_ops/_build_info.py records the build's options), so
    `LIGHTNET_OPS_CUDA=0 make build` followed by these tests skips them with that reason; a tree built
    without a record falls back to what setup.py would do in this environment."""
    info = _ops.BUILD_INFO
    if info is not None:
        options = info.get("OPTIONS") or {}
        if not info.get("EXTENSION", True):
            return "the package was built without its extension (LIGHTNET_OPS_NO_EXTENSION=1)"
        if _flag_off(options.get("LIGHTNET_OPS_CUDA")):
            return "built with LIGHTNET_OPS_CUDA=0: the CUDA sources were deliberately left out of the build"
        if not info.get("WITH_CUDA") and options.get("LIGHTNET_OPS_CUDA") is None:
            # The build chose CPU-only on its own: only right where the default build is CPU-only.
            return _cuda_expected_by_default()
        return None
    if _flag_off(os.environ.get("LIGHTNET_OPS_CUDA")):
        return "LIGHTNET_OPS_CUDA=0 is set: the CUDA sources were deliberately left out of the build"
    return _cuda_expected_by_default()


requires_cuda_build = pytest.mark.skipif(_cuda_build_skip_reason() is not None,
                                         reason=str(_cuda_build_skip_reason()))


@requires_cuda_build
def test_extension_loaded():
    assert _ops.EXTENSION_AVAILABLE, f"lightnet_ops._C did not load: {_ops.EXTENSION_ERROR}"


@requires_cuda_build
@pytest.mark.parametrize("op", _ops.OP_NAMES)
def test_cuda_kernel_registered(op):
    assert _ops.EXTENSION_AVAILABLE, f"lightnet_ops._C did not load: {_ops.EXTENSION_ERROR}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lightnet_ops::{op}", "CUDA"), (
        f"lightnet_ops::{op} has no CUDA kernel: the extension was built without csrc/cuda "
        "(rebuild with `python setup.py build_ext --inplace` on a machine with nvcc)"
    )
    # The CPU kernels are still there next to them.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lightnet_ops::{op}", "CPU")


@requires_cuda_build
def test_cuda_backend_reported_built():
    assert backend_registry.cuda_available()
    # Listed as runnable only where a GPU is visible.
    assert ("cuda" in lo.backends()) == torch.cuda.is_available()


def test_loaded_extension_is_what_the_build_recorded():
    """The kernels the extension registered match lightnet_ops/_build_info.py (with or without CUDA)."""
    info = _ops.BUILD_INFO
    assert info is not None, "lightnet_ops/_build_info.py is missing: rebuild with `make build`"
    assert _ops.EXTENSION_AVAILABLE == bool(info["EXTENSION"]), _ops.EXTENSION_ERROR
    if _ops.EXTENSION_AVAILABLE:
        for op in _ops.OP_NAMES:
            assert _ops.has_kernel(op, "CPU"), op
            assert _ops.has_kernel(op, "CUDA") == bool(info["WITH_CUDA"]), (op, info)


def test_cuda_backend_rejects_cpu_conv():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(lo.BackendUnavailableError, match=r"backend='cuda'.*cpu"):
        lo.conv2d_relu_maxpool2d(x, w, backend="cuda")
    with pytest.raises(lo.BackendUnavailableError, match=r"backend='cuda'.*cpu"):
        lo.conv2d_relu_maxpool2d(x.requires_grad_(), w, backend="cuda")


def test_cuda_backend_rejects_cpu_linear():
    x = torch.randn(5, 7)
    w = torch.randn(3, 7)
    with pytest.raises(lo.BackendUnavailableError, match=r"backend='cuda'.*cpu"):
        lo.linear_relu(x, w, backend="cuda")
    with pytest.raises(lo.BackendUnavailableError, match=r"backend='cuda'.*cpu"):
        lo.Conv2dReLUMaxPool2d(3, 4, 3, backend="cuda")(torch.randn(1, 3, 8, 8))


_WINDOW_MATH_CHECK = r"""
#include <cstdio>
#include "lightnet_ops/window_math.h"
using namespace lightnet_ops;
int main() {
  long checked = 0;
  for (int64_t kernel = 1; kernel <= 7; ++kernel)
    for (int64_t stride = 1; stride <= 8; ++stride)
      for (int64_t size = kernel; size <= 40; ++size) {
        const int64_t pooled = pool_out_size(size, kernel, stride);
        for (int64_t x = 0; x < size; ++x) {
          int64_t first = 0, last = -1;
          pool_windows_containing(x, kernel, stride, pooled, &first, &last);
          // Naive: every window p whose span [p*stride, p*stride + kernel) holds x.
          int64_t lo = -1, hi = -2;
          for (int64_t p = 0; p < pooled; ++p)
            if (p * stride <= x && x < p * stride + kernel) { if (lo < 0) lo = p; hi = p; }
          const bool none = lo < 0, got_none = first > last;
          if (none != got_none || (!none && (first != lo || last != hi))) {
            std::printf("MISMATCH kernel=%ld stride=%ld size=%ld x=%ld: got [%ld, %ld], want [%ld, %ld]\n",
                        (long)kernel, (long)stride, (long)size, (long)x, (long)first, (long)last, (long)lo, (long)hi);
            return 1;
          }
          ++checked;
        }
      }
  std::printf("checked %ld positions\n", checked);
  return 0;
}
"""


def test_pool_windows_containing_matches_naive(tmp_path):
    """The CUDA backward's gather visits exactly the pool windows containing each conv element."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build the window-math check")
    from torch.utils.cpp_extension import include_paths

    src = tmp_path / "check.cpp"
    exe = tmp_path / "check"
    src.write_text(_WINDOW_MATH_CHECK)
    incs = [f"-I{os.path.join(ROOT, 'csrc', 'include')}"] + [f"-I{p}" for p in include_paths()]
    build = subprocess.run([cxx, "-std=c++17", "-O1", *incs, str(src), "-o", str(exe)], capture_output=True,
                           text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "checked" in run.stdout


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
