"""Build script for lightnet_ops: one torch extension, ``lightnet_ops._C``.

Environment overrides:
  LIGHTNET_OPS_CUDA=0|1   force the CUDA sources off / on (default: on when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST    GPU architectures to build for (default "9.0" with no GPU visible, else the visible GPU's)
  MAX_JOBS                parallel compile jobs (ninja)
  DEBUG=1                 -O0 -g host code, -G device code
  CUDA_HOME               CUDA toolkit root (default: found from nvcc, following wrapper scripts)

Install with ``pip install --no-build-isolation -e .``: build isolation would compile against a
fresh torch from PyPI instead of the torch you run, and the extension would not load.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root_from_nvcc() -> str | None:
    """The CUDA toolkit root. `nvcc` on PATH may be a wrapper script outside the toolkit
    (`exec /usr/local/cuda-13.0/bin/nvcc "$@"`), which makes torch guess a wrong CUDA_HOME."""
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                m = re.search(rb"(/\S+/bin/nvcc)", head)
                if m:
                    real = m.group(1).decode()
        except OSError:
            pass
        candidates.append(os.path.dirname(os.path.dirname(real)))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.isdir(os.path.join(root, "include")):
            return root
    return None


if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    _root = _toolkit_root_from_nvcc()
    if _root:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = _root

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda() -> bool:
    flag = os.environ.get("LIGHTNET_OPS_CUDA")
    if flag is not None:
        want = flag.strip().lower() not in ("0", "", "false", "off", "no")
        if want and (torch.version.cuda is None or CUDA_HOME is None):
            sys.exit("LIGHTNET_OPS_CUDA=1 but torch has no CUDA or no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return want
    return torch.version.cuda is not None and CUDA_HOME is not None


def _nvidia_pip_includes() -> list[str]:
    """Headers shipped by torch's pip CUDA packages (site-packages/nvidia/*/include), e.g. cublas_v2.h,
    cusparse.h, which a bare toolkit install may lack."""
    dirs = []
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    roots.append(os.path.dirname(os.path.dirname(torch.__file__)))
    for root in dict.fromkeys(roots):
        dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _extensions():
    debug = os.environ.get("DEBUG", "0") == "1"
    use_cuda = _want_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp"] if sys.platform.startswith("linux") else []  # -std comes from torch (C++17 or C++20 by version)
    extra_link = ["-fopenmp"] if sys.platform.startswith("linux") else []
    if use_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            # No GPU to ask: build for Hopper (our target GPU). Override for other cards.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        include_dirs += _nvidia_pip_includes()
        nvcc = ["-O0", "-G", "-g"] if debug else ["-O3", "-lineinfo"]
        nvcc += ["--expt-relaxed-constexpr"]
        return [
            CUDAExtension(
                "lightnet_ops._C",
                sources,
                include_dirs=include_dirs,
                define_macros=[("LIGHTNET_OPS_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                extra_link_args=extra_link,
                py_limited_api=False,
            )
        ]
    return [
        CppExtension(
            "lightnet_ops._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=extra_link,
        )
    ]


setup(
    name="lightnet_ops",
    version="0.1.0",
    description="Fused Conv2d+ReLU+MaxPool2d and Linear+ReLU ops for PyTorch (C++/CUDA/Triton) with hand-written backward passes",
    packages=find_packages(include=["lightnet_ops", "lightnet_ops.*"]) + ["lightnet_ops.triton_kernels"],
    # PyPI has a distribution importing as `triton_kernels`; ship ours inside the package instead.
    package_dir={"lightnet_ops.triton_kernels": "triton_kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    entry_points={"console_scripts": ["lightnet-bench=lightnet_ops.bench:main"]},
)
