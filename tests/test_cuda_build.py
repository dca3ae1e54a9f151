"""The CUDA backend as far as a machine without a GPU can check it: the built extension carries
CUDA kernels for all four ops (so CI compiles csrc/cuda/*.cu), the cuda backend refuses CPU
tensors with a clear error, and the host/device window math the CUDA backward relies on
(window_math.h) is right, checked by compiling it for the host."""

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


def _cuda_build_skip_reason() -> str | None:
    if torch.version.cuda is None:
        return "torch was built without CUDA, so setup.py builds the CPU-only extension"
    if not _nvcc_found():
        return "no CUDA toolkit (nvcc on PATH, CUDA_HOME or /usr/local/cuda), so setup.py builds the CPU-only extension"
    if "LIGHTNET_OPS_CUDA" in os.environ and os.environ["LIGHTNET_OPS_CUDA"].strip().lower() in ("0", "", "false", "off", "no"):
        return "LIGHTNET_OPS_CUDA=0 is set: the CUDA sources were deliberately left out of the build"
    return None


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
