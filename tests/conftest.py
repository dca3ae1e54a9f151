"""Shared test setup.

Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors; it must be switched
on before triton is imported, so this happens here, first. On a GPU machine the real Triton runs.
"""

from __future__ import annotations

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lightnet_ops as lo  # noqa: E402
from lightnet_ops import backend_registry  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# Compare float32 against float32 stock without TF32 (PyTorch enables it for cuDNN by default),
# so the "within k x stock's own error" rule measures real float32 accuracy.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def backend_cases() -> list[tuple[str, str]]:
    """(backend, device) pairs this machine can test: every built backend on every device it runs on.

    A compiled backend that failed to build is still listed, so its tests fail rather than vanish."""
    cases = [("reference", "cpu"), ("cpu", "cpu")]
    if backend_registry.triton_interpreter_on():
        cases.append(("triton", "cpu"))
    if HAS_CUDA:
        cases += [("reference", "cuda"), ("cuda", "cuda"), ("triton", "cuda")]
    return cases


@contextlib.contextmanager
def env_vars(**values: str):
    """Sets environment variables for the block, then restores what was there. For the kernel
    overrides the extension reads on every call (LIGHTNET_OPS_CPU_*) inside hypothesis tests, where
    monkeypatch's function scope does not fit (hypothesis runs many examples per call)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def results_per_thread_count(fn, counts=(1, 2, 3, 2)):
    """[fn() with torch.set_num_threads(n) for n in counts], restoring the thread count after."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(threads)


def autograd_node_names(t: torch.Tensor) -> set[str]:
    """Names of every autograd node reachable from t.grad_fn (which backward code would run):
    "MaxPool2DWithIndicesBackward0" for stock ops, "LinearReLUFunctionBackward" for the Python
    autograd.Functions, "torch::autograd::CppNode<...LinearReLUFunction>" for the C++ ones."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    return names


def ran_fused_backwards(names: set[str]) -> bool:
    """Whether both fused ops' hand-written backwards (Python or C++ autograd Function) are among
    the node names."""
    return all(any(op in n for n in names) for op in ("Conv2dReLUMaxPool2dFunction", "LinearReLUFunction"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


#: Tests that start another interpreter or process group, compile, or train, and the single cases
#: over ~10 s on a 2-core machine (`file::test` marks every case, `file::test[id]` one). Marked `slow`
#: here (tests may also carry the mark themselves): `make test-fast` (pytest -m "not slow") leaves
#: them out, `make test` runs them.
SLOW_TESTS = {
    "test_api.py::test_import_without_built_extension_keeps_reference_and_says_how_to_build",
    "test_api.py::test_raw_ops_are_differentiable[True]",
    "test_bench.py::test_module_entry_point_runs",
    "test_compile_backend.py::test_inductor_handoff_uses_fused_forward_and_backward_ops",
    "test_compile_backend.py::test_lazy_registration_in_fresh_process",
    "test_compile_backend.py::test_three_ways_example_runs",
    "test_conv2d_relu_maxpool2d.py::test_cpu_winograd_forward_shapes",
    "test_conv2d_relu_maxpool2d.py::test_fuzz_against_reference[triton]",
    "test_conv2d_relu_maxpool2d.py::test_gradcheck[small-reference-cpu]",
    "test_ddp.py::test_ddp_matches_single_process",
    "test_fuse.py::test_torchvision_fused_matches_original[vgg11-32-expect0]",
    "test_training.py::test_example_script_runs",
    "test_training.py::test_float64_training_parity_and_accuracy",
    "test_triton_kernels.py::test_cpu_tensors_without_interpreter_raise_a_clear_error",
    "test_triton_kernels.py::test_kernels_compile_for_sm90_without_a_gpu",
}


def pytest_collection_modifyitems(config, items):
    modules = {}
    for item in items:
        if {f"{item.path.name}::{item.originalname}", f"{item.path.name}::{item.name}"} & SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        if getattr(item, "module", None) is not None:
            modules[item.path.name] = item.module
    # A renamed test would silently slow the fast tier down: fail when a listed test is gone from its file.
    stale = []
    for entry in sorted(SLOW_TESTS):
        file, test = entry.split("::")
        if file in modules and not hasattr(modules[file], test.split("[")[0]):
            stale.append(entry)
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW_TESTS names tests that do not exist: {stale}")


def pytest_report_header(config):
    return [
        f"lightnet_ops backends: {lo.backends()}; extension: "
        f"{'loaded' if lo._ops.EXTENSION_AVAILABLE else lo._ops.EXTENSION_ERROR}; "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}; cuda={HAS_CUDA}"
    ]


class NoGradThrough(torch.autograd.Function):
    """Identity whose backward passes no gradient on (returns None): the node before it then runs
    without a gradient for its output."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


# --- What the cpu backend ran (the extension's debug ops report "key=value" words) ------------------

ISA_ORDER = ("default", "avx2", "avx512")


def cpu_best_isa() -> str:
    """The widest instruction set the cpu backend compiles that this CPU runs (cpu_simd.h's probe)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return "default"
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "default"


def expected_isa(requested: str) -> str:
    """LIGHTNET_OPS_CPU_ISA caps the instruction set at what this CPU runs."""
    return min(requested, cpu_best_isa(), key=ISA_ORDER.index)


def parse_run(words: str) -> dict:
    """"path=direct isa=avx512" -> {"path": "direct", "isa": "avx512"}."""
    return dict(w.split("=", 1) for w in words.split())
