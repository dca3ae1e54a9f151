"""Build script for lightnet_ops: one torch extension, ``lightnet_ops._C``, plus the pure-Python package.

Install against the torch you already have (the extension links against that exact torch)::

    pip install --no-build-isolation .        # or -e . for a development install

Plain ``pip install .`` (build isolation) compiles against a fresh torch from PyPI instead; if that is
not the torch you run, the extension does not load and ``import lightnet_ops`` warns and says so.

Environment overrides (read at build time; ``make build`` rebuilds when one of them changes):
  LIGHTNET_OPS_NO_EXTENSION=1  build no extension: a pure-Python install (reference and Triton
                               backends only), no compiler needed
  LIGHTNET_OPS_CUDA=0|1        force the CUDA sources off / on (default: on when torch has CUDA and
                               nvcc is found)
  TORCH_CUDA_ARCH_LIST         GPU architectures to build for. Default: the visible GPUs' (plus PTX);
                               with no GPU visible, every architecture the installed torch was built for
                               that nvcc supports, the newest also as PTX (forward compatible)
  DEBUG=1                      -O0 -g host code, -G device code (default: -O3, no debug info)
  MAX_JOBS                     parallel compile jobs (ninja)
  CUDA_HOME                    CUDA toolkit root (default: found from nvcc, following wrapper scripts)

What was built is recorded in the generated module ``lightnet_ops/_build_info.py`` (torch version,
torch's CUDA version, the options above), which ``lightnet_ops`` compares with the running torch at
import.
"""

from __future__ import annotations

import glob
import os
import pprint
import re
import shutil
import site
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext
from setuptools.command.build_py import build_py as _build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
BUILD_INFO_MODULE = "_build_info"
# Development-only modules kept out of wheels (still in the sdist and the repository).
DEV_ONLY_MODULES = {("lightnet_ops.triton_kernels", "aot_check")}


def _env_flag(name: str) -> bool | None:
    """True / False for a set variable (0, '', false, off, no are False), None when unset."""
    value = os.environ.get(name)
    if value is None:
        return None
    return value.strip().lower() not in ("0", "", "false", "off", "no")


NO_EXTENSION = bool(_env_flag("LIGHTNET_OPS_NO_EXTENSION"))
DEBUG = bool(_env_flag("DEBUG"))


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


if not NO_EXTENSION and not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    _root = _toolkit_root_from_nvcc()
    if _root:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = _root


def _want_cuda(torch, cuda_home: str | None) -> bool:  # noqa: ANN001
    want = _env_flag("LIGHTNET_OPS_CUDA")
    if want is not None:
        if want and (torch.version.cuda is None or cuda_home is None):
            sys.exit("LIGHTNET_OPS_CUDA=1 but torch has no CUDA or no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        return want
    return torch.version.cuda is not None and cuda_home is not None


def _nvidia_pip_includes(torch) -> list[str]:  # noqa: ANN001
    """Headers shipped by torch's pip CUDA packages (site-packages/nvidia/*/include), e.g. cublas_v2.h,
    cusparse.h, which a bare toolkit install may lack."""
    dirs = []
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    roots.append(os.path.dirname(os.path.dirname(torch.__file__)))
    for root in dict.fromkeys(roots):
        dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _nvcc_arches(cuda_home: str) -> set[str] | None:
    """The compute capabilities nvcc can compile for, e.g. {"7.5", "9.0", "12.0"}; None if unknown."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    nums = re.findall(r"compute_(\d+)([a-z]?)\b", out)
    return {f"{n[:-1]}.{n[-1]}{suffix}" for n, suffix in nums} or None


def _default_cuda_arch_list(torch, cuda_home: str) -> str:  # noqa: ANN001
    """With no GPU visible: every sm_XY the installed torch was built for that nvcc supports, the
    newest also as PTX, so the binary runs on each of those GPUs and, JIT-compiled, on newer ones."""
    arches = []
    for name in torch.cuda.get_arch_list():
        m = re.fullmatch(r"sm_(\d+)([a-z]?)", name)
        if m:
            arches.append(f"{m.group(1)[:-1]}.{m.group(1)[-1]}{m.group(2)}")
    supported = _nvcc_arches(cuda_home)
    if supported is not None:
        arches = [a for a in arches if a in supported]
    if not arches:
        arches = ["9.0"]  # torch reports none (e.g. an unusual build): Hopper, the project's GPU target
    arches = sorted(dict.fromkeys(arches), key=lambda a: tuple(int(x) for x in re.findall(r"\d+", a)))
    return " ".join(arches) + "+PTX"


def _extensions(torch, cpp_extension) -> tuple[list, dict]:  # noqa: ANN001
    """(ext_modules, build options recorded in lightnet_ops/_build_info.py)."""
    use_cuda = _want_cuda(torch, cpp_extension.CUDA_HOME)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    linux = sys.platform.startswith("linux")
    # -std comes from torch (C++17 or C++20 by version). -g0 after Python's own CFLAGS (which carry -g):
    # release builds have no debug info.
    cxx = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
    cxx += ["-fopenmp"] if linux else []
    extra_link = (["-fopenmp"] if linux else []) + ([] if DEBUG or not linux else ["-Wl,--strip-debug"])
    options = {"with_cuda": use_cuda, "cuda_arch_list": None, "debug": DEBUG}
    if not use_cuda:
        ext = cpp_extension.CppExtension("lightnet_ops._C", sources, include_dirs=include_dirs,
                                         extra_compile_args={"cxx": cxx}, extra_link_args=extra_link)
        return [ext], options
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = _default_cuda_arch_list(torch, cpp_extension.CUDA_HOME)
    # With a GPU visible and no list set, torch builds for the visible GPUs (the newest also as PTX).
    options["cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST") or "visible GPUs"
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    include_dirs += _nvidia_pip_includes(torch)
    nvcc = ["-O0", "-G", "-g"] if DEBUG else ["-O3", "-lineinfo"]
    nvcc += ["--expt-relaxed-constexpr"]
    ext = cpp_extension.CUDAExtension("lightnet_ops._C", sources, include_dirs=include_dirs,
                                      extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=extra_link,
                                      py_limited_api=False)
    return [ext], options


def _build_info_source(info: dict) -> str:
    lines = [
        '"""What this lightnet_ops was built with. Generated by setup.py at build time; do not edit or commit.',
        "",
        "lightnet_ops._ops compares TORCH_VERSION and TORCH_CUDA_VERSION with the running torch before it",
        'loads the extension (an extension built for another torch does not load, or crashes)."""',
        "",
    ]
    lines += [f"{key.upper()} = {value!r}" for key, value in info.items()]
    lines += ["", f"OPTIONS = {pprint.pformat(BUILD_OPTIONS_ENV, width=100)}", ""]
    return "\n".join(lines)


def _write_build_info(package_dir: str) -> None:
    path = os.path.join(package_dir, BUILD_INFO_MODULE + ".py")
    os.makedirs(package_dir, exist_ok=True)
    text = _build_info_source(BUILD_INFO)
    try:
        with open(path) as f:
            if f.read() == text:
                return  # unchanged: keep the mtime
    except OSError:
        pass
    with open(path, "w") as f:
        f.write(text)


#: The environment variables that change what is built, as set for this build.
BUILD_OPTIONS_ENV = {
    name: os.environ.get(name)
    for name in ("LIGHTNET_OPS_NO_EXTENSION", "LIGHTNET_OPS_CUDA", "TORCH_CUDA_ARCH_LIST", "DEBUG")
}

if NO_EXTENSION:
    try:
        import torch
    except ImportError:  # a pure-Python build does not need torch yet; installing needs it
        torch = None
    EXT_MODULES: list = []
    BUILD_INFO = {
        "extension": False,
        "torch_version": torch.__version__ if torch is not None else None,
        "torch_cuda_version": torch.version.cuda if torch is not None else None,
        "with_cuda": False,
        "cuda_arch_list": None,
        "debug": DEBUG,
    }
    BuildExtBase = _setuptools_build_ext
else:
    import torch
    from torch.utils import cpp_extension

    EXT_MODULES, _options = _extensions(torch, cpp_extension)
    BUILD_INFO = {
        "extension": True,
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        **_options,
    }
    BuildExtBase = cpp_extension.BuildExtension.with_options(use_ninja=True)


def _package_source_dir() -> str:
    return os.path.join(ROOT, "lightnet_ops")


class BuildPy(_build_py):
    """Writes lightnet_ops/_build_info.py into the build (or the source tree for an editable install)
    and leaves the development-only modules out of wheels."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            _write_build_info(_package_source_dir())
        else:
            _write_build_info(os.path.join(self.build_lib, "lightnet_ops"))

    def find_package_modules(self, package, package_dir):  # noqa: ANN001, ANN201
        modules = super().find_package_modules(package, package_dir)
        # The generated module comes from run(), never from a stale copy in the source tree.
        return [m for m in modules if (m[0], m[1]) not in DEV_ONLY_MODULES
                and (m[0], m[1]) != ("lightnet_ops", BUILD_INFO_MODULE)]


class BuildExt(BuildExtBase):
    """build_ext that also writes lightnet_ops/_build_info.py next to the extension. In place
    (`setup.py build_ext --inplace`, `make build`), an extension left from an earlier build is removed
    when this build makes none (LIGHTNET_OPS_NO_EXTENSION=1)."""

    def run(self) -> None:
        in_place = self.inplace or getattr(self, "editable_mode", False)
        if in_place and not self.extensions:
            for stale in glob.glob(os.path.join(_package_source_dir(), "_C.*")):
                os.remove(stale)
        super().run()
        _write_build_info(_package_source_dir() if in_place else os.path.join(self.build_lib, "lightnet_ops"))


def _long_description() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


setup(
    name="lightnet_ops",
    version=VERSION,
    description="Fused Conv2d+ReLU+MaxPool2d and Linear+ReLU ops for PyTorch (C++/CUDA/Triton) with "
                "hand-written backward passes",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    author="the lightnet_ops authors",
    license_expression="BSD-3-Clause",
    license_files=["LICENSE"],
    keywords=["pytorch", "cuda", "triton", "fused operators", "conv2d", "maxpool", "torch.compile"],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Software Development :: Libraries :: Python Modules",
    ],
    packages=find_packages(include=["lightnet_ops", "lightnet_ops.*"]) + ["lightnet_ops.triton_kernels"],
    # PyPI has a distribution importing as `triton_kernels`; ship ours inside the package instead.
    package_dir={"lightnet_ops.triton_kernels": "triton_kernels"},
    package_data={"lightnet_ops.bench": ["*.json"]},
    ext_modules=EXT_MODULES,
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={
        # lightnet-bench's charts; the repository's benchmarks/ also use pytest-benchmark.
        "bench": ["matplotlib", "numpy", "pytest", "pytest-benchmark"],
        # examples/: the digits trainer and the three-ways comparison (torchvision must match your torch).
        "examples": ["matplotlib", "numpy", "scikit-learn", "tqdm", "torchvision"],
    },
    entry_points={
        "console_scripts": ["lightnet-bench=lightnet_ops.bench:main"],
        # torch.compile(model, backend="lightnet_ops"), found by TorchDynamo through this entry point.
        "torch_dynamo_backends": ["lightnet_ops = lightnet_ops.compile_backend:lightnet_ops_backend"],
    },
    zip_safe=False,
)
