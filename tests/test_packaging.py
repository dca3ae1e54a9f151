"""Packaging: the source distribution holds what a build needs and installs into a fresh environment;
a built extension that cannot be used (built for another torch, or failing to load) is reported by a
warning that says how to fix it instead of a silent slow fallback; the Makefile rebuilds when a build
option changes; the compile backend is declared through TorchDynamo's entry point."""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXT_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that points Python at this checkout or changes the build."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TRITON_INTERPRET", "LIGHTNET_OPS_NO_EXTENSION", "LIGHTNET_OPS_CUDA")}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The sdist of this tree, built as `python -m build --sdist --no-isolation` would (PEP 517 hook),
    with LIGHTNET_OPS_CUDA=0 set: the CUDA sources must ship anyway."""
    out = tmp_path_factory.mktemp("sdist")
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=_clean_env(LIGHTNET_OPS_CUDA="0"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return out / res.stdout.strip().splitlines()[-1]


def test_sdist_holds_everything_the_build_and_tests_need(sdist):
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n[len(top) + 1:] for n in tar.getnames() if n.startswith(top + "/")}
    wanted = {"setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "requirements.txt",
              "constraints.txt", "tests/conftest.py", "tests/parity.py", "tests/seed_model.py", "tests/_digits.py",
              "triton_kernels/__init__.py", "lightnet_ops/__init__.py"}
    for pattern in ("csrc/**/*.h", "csrc/**/*.cuh", "csrc/**/*.cpp", "csrc/**/*.cu", "tests/test_*.py"):
        found = {p.relative_to(ROOT).as_posix() for p in ROOT.glob(pattern)}
        assert found, pattern
        wanted |= found
    missing = sorted(wanted - names)
    assert not missing, f"the sdist lacks {missing}"
    built = sorted(n for n in names if n.endswith((".so", ".o", ".pyc")) or n.endswith("_build_info.py"))
    assert not built, f"the sdist ships build outputs {built}"


CHECK_INSTALLED = textwrap.dedent(r"""
    import importlib.metadata as md, os, sys, warnings
    warnings.simplefilter("error", UserWarning)  # an ExtensionWarning or a fallback to reference fails
    import torch, torch.nn.functional as F
    import lightnet_ops as lo
    assert lo.__file__.startswith(sys.prefix), (lo.__file__, sys.prefix)  # the install, not the checkout
    assert lo._ops.EXTENSION_AVAILABLE, lo._ops.EXTENSION_ERROR
    info = lo._ops.BUILD_INFO
    assert info["TORCH_VERSION"] == torch.__version__ and info["EXTENSION"] and not info["WITH_CUDA"], info
    assert "cpu" in lo.backends(), lo.backends()

    x = torch.randn(2, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for backend in ("cpu", "auto"):
        got = lo.conv2d_relu_maxpool2d(x, w, b, backend=backend)
        want = F.max_pool2d(F.relu(F.conv2d(x, w, b)), 2)
        torch.testing.assert_close(got, want)
        g_got = torch.autograd.grad(got.sum(), (x, w, b))
        g_want = torch.autograd.grad(want.sum(), (x, w, b))
        for a, e in zip(g_got, g_want):
            torch.testing.assert_close(a, e)
    xl = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    wl = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    got = lo.linear_relu(xl, wl, backend="cpu")
    want = F.relu(F.linear(xl, wl))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), xl)[0], torch.autograd.grad(want.sum(), xl)[0])

    meta = md.metadata("lightnet_ops")
    assert meta["Version"] == lo.__version__, (meta["Version"], lo.__version__)
    assert meta["License-Expression"] == "BSD-3-Clause", meta["License-Expression"]
    assert meta["Description-Content-Type"] == "text/markdown" and "lightnet_ops" in meta["Description"]
    assert {"bench", "examples"} <= set(meta.get_all("Provides-Extra")), meta.get_all("Provides-Extra")
    files = {str(f) for f in md.files("lightnet_ops")}
    assert any(f.endswith("LICENSE") for f in files), sorted(files)
    pkg = os.path.dirname(lo.__file__)
    assert os.path.isfile(os.path.join(pkg, "triton_kernels", "linear_relu.py"))
    assert not os.path.exists(os.path.join(pkg, "triton_kernels", "aot_check.py")), "dev script shipped"
    eps = md.entry_points(group="torch_dynamo_backends")
    assert [e.value for e in eps if e.name == "lightnet_ops"] == [
        "lightnet_ops.compile_backend:lightnet_ops_backend"], list(eps)
    from torch._dynamo.backends.registry import lookup_backend
    from lightnet_ops import compile_backend
    assert lookup_backend("lightnet_ops") is compile_backend.lightnet_ops_backend
    print("INSTALLED-OK")
""")


@pytest.mark.slow
def test_sdist_installs_into_a_fresh_venv_and_runs_both_ops(sdist, tmp_path):
    """pip builds a wheel from the sdist (C++ only, LIGHTNET_OPS_CUDA=0, to keep the compile short) and
    installs it into a new virtual environment that reuses this environment's torch through a .pth
    file (nothing is downloaded: --no-index, --no-deps); the installed package runs both ops."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # This environment's packages (torch, setuptools, ninja, pip) after the new venv's own.
    here = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(os.path.join(p, "torch"))]
    assert here, sys.path
    Path(purelib, "_base_env.pth").write_text(here[0] + "\n")
    env = _clean_env(LIGHTNET_OPS_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)))
    install = subprocess.run([str(py), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                              str(sdist)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3000)
    assert install.returncode == 0, (install.stdout + install.stderr)[-6000:]
    assert not list(Path(purelib).glob("torch*")), "torch was installed into the new venv"
    check = subprocess.run([str(py), "-c", CHECK_INSTALLED], cwd=tmp_path, env=_clean_env(), capture_output=True,
                           text=True, timeout=600)
    assert check.returncode == 0, (check.stdout + check.stderr)[-6000:]
    assert "INSTALLED-OK" in check.stdout


# --- an extension that cannot be used: simulated on a copy of the Python package -----------------------


def _package_copy(tmp_path: Path, so_bytes: bytes | None = None, build_info: str | None = None) -> Path:
    """tmp_path/lightnet_ops: this package's Python files, plus a stand-in extension and build record."""
    dst = tmp_path / "lightnet_ops"
    shutil.copytree(ROOT / "lightnet_ops", dst,
                    ignore=shutil.ignore_patterns("_C.*", "_build_info.py", "__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "triton_kernels", tmp_path / "triton_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    if so_bytes is not None:
        (dst / f"_C{EXT_SUFFIX}").write_bytes(so_bytes)
    if build_info is not None:
        (dst / "_build_info.py").write_text(build_info)
    return tmp_path


def _build_info(torch_version: str, torch_cuda: str | None, extension: bool = True) -> str:
    return (f"TORCH_VERSION = {torch_version!r}\nTORCH_CUDA_VERSION = {torch_cuda!r}\nEXTENSION = {extension!r}\n"
            "WITH_CUDA = False\nCUDA_ARCH_LIST = None\nDEBUG = False\nOPTIONS = {}\n")


PROBE = textwrap.dedent(r"""
    import json, sys, warnings
    import torch
    with warnings.catch_warnings(record=True) as at_import:
        warnings.simplefilter("always")
        import lightnet_ops as lo
    assert lo.__file__.startswith(sys.argv[1]), lo.__file__
    x, w = torch.randn(2, 1, 8, 8), torch.randn(3, 1, 3, 3)
    with warnings.catch_warnings(record=True) as at_use:
        warnings.simplefilter("always")
        out = [lo.conv2d_relu_maxpool2d(x, w) for _ in range(3)]  # auto
        lo.linear_relu(torch.randn(2, 4), torch.randn(3, 4))
    torch.testing.assert_close(out[0], torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(x, w)), 2))
    try:
        lo.conv2d_relu_maxpool2d(x, w, backend="cpu")
        cpu_error = None
    except lo.BackendUnavailableError as e:
        cpu_error = str(e)
    print(json.dumps({
        "available": lo._ops.EXTENSION_AVAILABLE,
        "error": lo._ops.EXTENSION_ERROR,
        "import_warnings": [[type(m.message).__name__, str(m.message)] for m in at_import],
        "use_warnings": [[type(m.message).__name__, str(m.message)] for m in at_use],
        "backends": lo.backends(),
        "cpu_error": cpu_error,
    }))
""")


def _probe(root: Path) -> dict:
    import json

    res = subprocess.run([sys.executable, "-c", PROBE, str(root)], cwd=root, env=_clean_env(PYTHONPATH=str(root)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _assert_reference_fallback(r: dict) -> None:
    """No extension: backend='cpu' refuses with the reason and the fix; 'auto' runs the reference and
    says so exactly once (three conv calls and a linear call, same reason)."""
    assert not r["available"]
    assert "cpu" not in r["backends"]
    assert r["cpu_error"] and "circular import" not in r["cpu_error"] and r["error"] in r["cpu_error"]
    assert "pip install --no-build-isolation" in r["cpu_error"]
    fallback = [m for kind, m in r["use_warnings"] if kind == "ReferenceFallbackWarning"]
    assert len(fallback) == 1, r["use_warnings"]
    assert "reference" in fallback[0] and r["error"] in fallback[0]


@pytest.mark.slow  # a fresh interpreter each
def test_extension_that_fails_to_load_warns_at_import_with_the_fix(tmp_path):
    root = _package_copy(tmp_path, so_bytes=b"not a shared library")
    r = _probe(root)
    ext_warnings = [m for kind, m in r["import_warnings"] if kind == "ExtensionWarning"]
    assert len(ext_warnings) == 1, r["import_warnings"]
    msg = ext_warnings[0]
    assert "failed to load" in msg and f"_C{EXT_SUFFIX}" in msg, msg
    assert "pip install --no-build-isolation ." in msg, msg
    assert "failed to load" in r["error"]
    _assert_reference_fallback(r)


@pytest.mark.slow  # a fresh interpreter each
def test_extension_built_for_another_torch_is_not_loaded_and_warns(tmp_path):
    # The stand-in library is not even a library: the versions are compared before anything is loaded.
    root = _package_copy(tmp_path, so_bytes=b"not a shared library",
                         build_info=_build_info("2.0.0+cu117", "11.7"))
    r = _probe(root)
    ext_warnings = [m for kind, m in r["import_warnings"] if kind == "ExtensionWarning"]
    assert len(ext_warnings) == 1, r["import_warnings"]
    msg = ext_warnings[0]
    assert "built for torch 2.0.0+cu117 (CUDA 11.7)" in msg and f"this is torch {torch.__version__}" in msg, msg
    assert "pip install --no-build-isolation ." in msg and "failed to load" not in msg, msg
    _assert_reference_fallback(r)


@pytest.mark.slow  # a fresh interpreter each
def test_recorded_extension_that_is_missing_warns(tmp_path):
    root = _package_copy(tmp_path, build_info=_build_info(torch.__version__, torch.version.cuda))
    r = _probe(root)
    ext_warnings = [m for kind, m in r["import_warnings"] if kind == "ExtensionWarning"]
    assert len(ext_warnings) == 1 and "missing" in ext_warnings[0], r["import_warnings"]
    _assert_reference_fallback(r)


@pytest.mark.slow  # a fresh interpreter each
def test_never_built_tree_imports_quietly_and_names_the_real_reason(tmp_path):
    r = _probe(_package_copy(tmp_path))
    assert not [m for kind, m in r["import_warnings"] if kind == "ExtensionWarning"], r["import_warnings"]
    assert "not built" in r["error"], r["error"]
    _assert_reference_fallback(r)


@pytest.mark.slow  # a fresh interpreter each
def test_pure_python_install_is_reported_as_such(tmp_path):
    r = _probe(_package_copy(tmp_path, build_info=_build_info(torch.__version__, torch.version.cuda, extension=False)))
    assert not [m for kind, m in r["import_warnings"] if kind == "ExtensionWarning"], r["import_warnings"]
    assert "LIGHTNET_OPS_NO_EXTENSION=1" in r["error"], r["error"]
    _assert_reference_fallback(r)


def test_this_checkout_records_its_build():
    """`make build` wrote lightnet_ops/_build_info.py for the torch that runs the tests."""
    from lightnet_ops import _ops

    assert _ops.BUILD_INFO is not None, "lightnet_ops/_build_info.py is missing: run `make build`"
    assert _ops.BUILD_INFO["TORCH_VERSION"] == torch.__version__
    assert _ops.BUILD_INFO["TORCH_CUDA_VERSION"] == torch.version.cuda
    assert _ops.BUILD_INFO["EXTENSION"] == _ops.EXTENSION_AVAILABLE, (_ops.BUILD_INFO, _ops.EXTENSION_ERROR)


# --- the Makefile's build stamp ----------------------------------------------------------------------


def test_makefile_rebuilds_when_a_build_option_changes(tmp_path):
    """The real Makefile drives a stand-in setup.py that only counts its runs: the extension is rebuilt
    exactly when LIGHTNET_OPS_CUDA, TORCH_CUDA_ARCH_LIST, DEBUG or LIGHTNET_OPS_NO_EXTENSION changes."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    shutil.copy2(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "setup.py").write_text("import sys\nopen('runs.log', 'a').write(' '.join(sys.argv[1:]) + '\\n')\n")
    base = _clean_env()
    for name in ("TORCH_CUDA_ARCH_LIST", "DEBUG", "CUDA_HOME", "MAKEFLAGS", "MFLAGS"):
        base.pop(name, None)

    def build(**options: str) -> int:
        # -o: take .venv's dependency stamp as up to date; PYTHON: this interpreter.
        subprocess.run([make, "-s", "build", f"PYTHON={sys.executable}", "-o", ".venv/.deps-installed"],
                       cwd=tmp_path, env={**base, **options}, check=True, capture_output=True, timeout=120)
        return len((tmp_path / "runs.log").read_text().splitlines())

    assert build() == 1
    assert build() == 1  # nothing changed
    assert build(LIGHTNET_OPS_CUDA="0") == 2
    assert build(LIGHTNET_OPS_CUDA="0") == 2
    assert build() == 3  # back to the default
    assert build(TORCH_CUDA_ARCH_LIST="9.0+PTX") == 4
    assert build(TORCH_CUDA_ARCH_LIST="8.0 9.0+PTX") == 5
    assert build(DEBUG="1") == 6
    assert build(LIGHTNET_OPS_NO_EXTENSION="1") == 7
    assert build(LIGHTNET_OPS_CUDA="") == 8  # set but empty is "off" to setup.py, not "unset"
    assert "egg_info build_ext --inplace" in (tmp_path / "runs.log").read_text()
