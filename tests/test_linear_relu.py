"""linear_relu: parity with F.relu(F.linear(...)) for every backend, gradcheck, opcheck,
torch.compile, NaN, views, bad inputs, fuzzing, module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import NoGradThrough, backend_cases, env_vars, results_per_thread_count, expected_isa, parse_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from parity import DTYPES, assert_matches

import lightnet_ops as lo
from lightnet_ops import _shapes

# (name, input shape, out_features, bias)
CASES = [
    ("lightnet_fc1", (4, 576), 120, True),
    ("lightnet_fc2", (5, 120), 84, True),
    ("odd_sizes", (7, 13), 9, True),
    ("no_bias", (6, 10), 5, False),
    ("leading_dims", (2, 3, 11), 6, True),
    ("single_row", (1, 17), 1, True),
    ("vector_input", (12,), 4, True),
    # Several row blocks of the CPU gate/bias-sum pass (32 rows each, the last partial) and the
    # side-by-side GEMM path (>= 2^16 multiply-adds).
    ("fc1_batch_300", (300, 576), 120, True),
    # The CPU's register-blocked GEMM: rows past the last 8-row tile, a column block that ends in
    # a partial vector, and a reduction length past the last whole vector of the W^T packing.
    ("gemm_tails", (19, 37), 45, True),
]
CASES_BY_NAME = {c[0]: c for c in CASES}
TINY = {"odd_sizes", "no_bias", "leading_dims", "single_row", "vector_input"}

def parity_params():
    for backend, device in backend_cases():
        for dtype in DTYPES[(backend, device)]:
            for case in CASES:
                if backend == "triton" and device == "cpu" and case[0] not in TINY:
                    continue  # the interpreter is slow; tiny cases cover the same code
                yield pytest.param(backend, device, dtype, case, id=f"{backend}-{device}-{str(dtype)[6:]}-{case[0]}")


def make_inputs(case, dtype, device, requires_grad=True):
    _, shape, out_features, bias = case
    x64 = torch.randn(*shape, dtype=torch.float64).to(dtype).double()
    w64 = (torch.randn(out_features, shape[-1], dtype=torch.float64) / shape[-1] ** 0.5).to(dtype).double()
    b64 = (torch.randn(out_features, dtype=torch.float64) * 0.3).to(dtype).double() if bias else None

    def leaf(t, dt):
        return None if t is None else t.to(device=device, dtype=dt).detach().requires_grad_(requires_grad)

    return (leaf(x64, torch.float64), leaf(w64, torch.float64), leaf(b64, torch.float64)), (
        leaf(x64, dtype), leaf(w64, dtype), leaf(b64, dtype))


def outputs_and_grads(fn, tensors):
    leaves = [t for t in tensors if t is not None]
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, g.to(device=out.device, dtype=out.dtype)))


def stock(x, w, b):
    return F.relu(F.linear(x, w, b))


@pytest.mark.parametrize("backend, device, dtype, case", list(parity_params()))
def test_parity_with_stock(backend, device, dtype, case):
    (x64, w64, b64), (x, w, b) = make_inputs(case, dtype, device)
    ref = outputs_and_grads(stock, (x64, w64, b64))
    want = outputs_and_grads(stock, (x, w, b))
    got = outputs_and_grads(lambda *t: lo.linear_relu(*t, backend=backend), (x, w, b))
    for name, g, s, r in zip(["output", "grad_input", "grad_weight", "grad_bias"], got, want, ref):
        assert_matches(g, s, r, f"{backend}/{device}/{dtype} {case[0]} {name}")


@pytest.mark.parametrize("backend, device", [bd for bd in backend_cases() if bd[0] != "triton"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in TINY], ids=lambda c: c[0])
def test_gradcheck(backend, device, case):
    _, (x, w, b) = make_inputs(case, torch.float64, device)
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def fn(*t):
        return lo.linear_relu(t[0], t[1], t[2] if b is not None else None, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", [d for d in ("cpu", "cuda") if d in lo.backends()]
                         or [pytest.param("cpu", marks=pytest.mark.xfail(reason="extension not built", strict=True))])
def test_opcheck(device):
    x, w, b = torch.randn(6, 10, device=device), torch.randn(5, 10, device=device), torch.randn(5, device=device)
    fwd = torch.ops.lightnet_ops.linear_relu.default
    torch.library.opcheck(fwd, (x, w, b))
    torch.library.opcheck(fwd, (x, w, None))
    out = fwd(x, w, b)
    bwd = torch.ops.lightnet_ops.linear_relu_backward.default
    torch.library.opcheck(bwd, (torch.randn_like(out), x, w, out, [True, True, True]))
    torch.library.opcheck(bwd, (torch.randn_like(out), x, w, out, [False, True, False]))


@pytest.mark.parametrize("backend, device", [bd for bd in backend_cases() if bd[0] != "triton"])
def test_compile_fullgraph(backend, device):
    _, (x, w, b) = make_inputs(CASES_BY_NAME["leading_dims"], torch.float32, device)

    def f(x, w, b):
        return lo.linear_relu(x, w, b, backend=backend).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, w, b)
    got_grads = torch.autograd.grad(got, (x, w, b))
    want = f(x, w, b)
    for a, e in zip(got_grads, torch.autograd.grad(want, (x, w, b))):
        torch.testing.assert_close(a, e)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend, device", backend_cases())
def test_output_without_gradient_leaves_grads_none_like_stock(backend, device):
    case = CASES_BY_NAME["odd_sizes"]
    for f in (lambda x, w, b: lo.linear_relu(x, w, b, backend=backend), stock):
        _, (x, w, b) = make_inputs(case, torch.float32, device)
        other = torch.ones(3, device=device, requires_grad=True)
        (NoGradThrough.apply(f(x, w, b)).sum() + (other * 2).sum()).backward()
        assert (x.grad, w.grad, b.grad) == (None, None, None)
        torch.testing.assert_close(other.grad, torch.full_like(other, 2.0))


@pytest.mark.parametrize("backend, device", backend_cases())
def test_nan_and_zero_gate_like_stock(backend, device):
    x = torch.tensor([[1.0, -2.0, float("nan")], [0.5, 0.25, -1.0]], device=device, requires_grad=True)
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=device,
                     requires_grad=True)
    b = torch.tensor([0.0, 0.0, 0.0, 0.0], device=device, requires_grad=True)
    got = outputs_and_grads(lambda *t: lo.linear_relu(*t, backend=backend), (x, w, b))
    want = outputs_and_grads(stock, (x, w, b))
    for name, g, s in zip(["output", "grad_input", "grad_weight", "grad_bias"], got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(s)), f"{name}: NaN positions differ"
        torch.testing.assert_close(g, s, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend, device", backend_cases())
def test_views_batch_zero_and_inference(backend, device):
    w = torch.randn(6, 8, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    x = torch.randn(8, 5, device=device).t().requires_grad_(True)  # non-contiguous (5, 8)
    got = outputs_and_grads(lambda *t: lo.linear_relu(*t, backend=backend), (x, w, b))
    want = outputs_and_grads(stock, (x, w, b))
    for g, s in zip(got, want):
        torch.testing.assert_close(g, s, rtol=1e-4, atol=1e-4)
    empty = torch.randn(0, 8, device=device, requires_grad=True)
    out = lo.linear_relu(empty, w, b, backend=backend)
    assert out.shape == (0, 6)
    gx, gw, gb = torch.autograd.grad(out.sum(), (empty, w, b))
    assert gx.shape == (0, 8) and gw.abs().sum() == 0 and gb.abs().sum() == 0
    with torch.no_grad():
        torch.testing.assert_close(lo.linear_relu(x, w, b, backend=backend), stock(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend, device", backend_cases())
def test_saves_output_not_a_separate_mask(backend, device):
    x = torch.randn(4, 8, device=device, requires_grad=True)
    w = torch.randn(6, 8, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lo.linear_relu(x, w, backend=backend)
    assert sorted(tuple(t.shape) for t in saved) == [(4, 6), (4, 8), (6, 8)]


BAD = [
    ("feature_mismatch", (4, 7), (5, 8), (5,), "input has 7 features but weight expects 8"),
    ("weight_rank", (4, 8), (5, 8, 1), (5,), "expected 2-D weight"),
    ("bias_size", (4, 8), (5, 8), (4,), r"bias must have shape \[5\]"),
    ("scalar_input", (), (5, 8), (5,), "at least 1 dimension"),
]


@pytest.mark.parametrize("backend, device", backend_cases())
@pytest.mark.parametrize("name, xs, ws, bs, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, device, name, xs, ws, bs, message):
    x, w, b = torch.randn(xs, device=device), torch.randn(ws, device=device), torch.randn(bs, device=device)
    with pytest.raises(ValueError, match=message):
        lo.linear_relu(x, w, b, backend=backend)


def test_dtype_device_mismatch_and_direct_op_checks():
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="does not match weight dtype"):
        lo.linear_relu(x, w.double())
    with pytest.raises(ValueError, match="is on meta"):
        lo.linear_relu(x, w.to("meta"))
    if "cpu" not in lo.backends():
        pytest.fail("the extension is not built")
    with pytest.raises(ValueError, match="input has 4 features but weight expects 5"):
        torch.ops.lightnet_ops.linear_relu(x, torch.randn(2, 5), None)
    with pytest.raises(ValueError, match=r"expects 2-D input \(M, in_features\), got \(4,\)"):
        torch.ops.lightnet_ops.linear_relu(x[0], w, None)
    with pytest.raises(TypeError, match="cpu backend supports float32 and float64, got torch.float16"):
        torch.ops.lightnet_ops.linear_relu(x.half(), w.half(), None)
    out = torch.ops.lightnet_ops.linear_relu(x, w, None)
    bwd = torch.ops.lightnet_ops.linear_relu_backward
    with pytest.raises(ValueError, match=r"^linear_relu_backward: grad_output has shape \[3\], expected \[3, 2\]"):
        bwd(out[:, 0], x, w, out, [True, True, True])
    with pytest.raises(ValueError, match=r"output has shape \[2, 2\], expected \[3, 2\]"):
        bwd(out, x, w, out[:2], [True, True, True])
    with pytest.raises(ValueError, match="input dtype torch.float32 does not match output dtype torch.float64"):
        bwd(out, x, w, out.double(), [True, True, True])


# Arguments the Python checker (lightnet_ops/ops/linear_relu.py) rejects: the C++ op raises the same
# exception type with the same message.
OP_BAD_ARGS = [
    ("feature_mismatch", dict(x=(4, 7))),
    ("weight_rank", dict(w=(5, 8, 1))),
    ("weight_rank1", dict(w=(8,))),
    ("bias_size", dict(b=(4,))),
    ("bias_rank", dict(b=(5, 1))),
    ("integer_dtype", dict(dtype=torch.int32)),
    ("weight_dtype", dict(w_dtype=torch.float64)),
    ("bias_dtype", dict(b_dtype=torch.float16)),
]


@pytest.mark.parametrize("device", [d for d in ("cpu", "cuda") if d in lo.backends()]
                         or [pytest.param("cpu", marks=pytest.mark.xfail(reason="extension not built", strict=True))])
@pytest.mark.parametrize("name, change", OP_BAD_ARGS, ids=[b[0] for b in OP_BAD_ARGS])
def test_compiled_op_errors_match_python_checker(device, name, change):
    dtype = change.get("dtype", torch.float32)
    x = torch.ones(*change.get("x", (4, 8)), dtype=dtype, device=device)
    w = torch.ones(*change.get("w", (5, 8)), dtype=change.get("w_dtype", dtype), device=device)
    b = torch.ones(*change.get("b", (5,)), dtype=change.get("b_dtype", dtype), device=device)
    with pytest.raises((ValueError, TypeError)) as want:
        _shapes.check_linear(x, w, b)
    with pytest.raises((ValueError, TypeError)) as got:
        torch.ops.lightnet_ops.linear_relu(x, w, b)
    assert (type(got.value), str(got.value)) == (type(want.value), str(want.value))


@pytest.mark.parametrize("backend", [b for b, d in backend_cases() if d == "cpu" and b != "reference"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(0, 9), k=st.integers(1, 40), n=st.integers(1, 40), bias=st.booleans())
def test_fuzz_against_reference(backend, m, k, n, bias):
    dtype = torch.float64 if backend != "triton" else torch.float32
    case = ("fuzz", (m, k), n, bias)
    _, (x, w, b) = make_inputs(case, dtype, "cpu")
    got = outputs_and_grads(lambda *t: lo.linear_relu(*t, backend=backend), (x, w, b))
    want = outputs_and_grads(lambda *t: lo.linear_relu(*t, backend="reference"), (x, w, b))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for g, s in zip(got, want):
        torch.testing.assert_close(g, s, rtol=tol, atol=tol)


def assert_gemm_ran(gemm: str, isa: str) -> None:
    """The last forward and backward (_cpu_linear_last_run) ran this GEMM on this instruction set
    (the dot-product GEMM is a forward kernel: forced, the backward keeps its own rule)."""
    forward, backward = (parse_run(r) for r in torch.ops.lightnet_ops._cpu_linear_last_run())
    assert (forward["gemm"], forward["isa"]) == (gemm, isa), forward
    backward_gemms = ("native", "blas") if gemm == "dot" else (gemm,)
    assert backward["gemm"] in backward_gemms and backward["isa"] == isa, backward


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("gemm", ["native", "dot", "blas"])
@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_cpu_gemm_paths_and_instruction_sets(monkeypatch, gemm, isa, case):
    # The cpu backend's GEMMs are BLAS calls or its own register-blocked kernel (use_native_gemm
    # chooses per call, by dtype, size and CPU); force each, with every compiled instruction set
    # of the kernel (one this CPU lacks falls back to the best it has), in both dtypes.
    monkeypatch.setenv("LIGHTNET_OPS_CPU_ISA", isa)
    for dtype in (torch.float64, torch.float32):
        (x64, w64, b64), (x, w, b) = make_inputs(case, dtype, "cpu")
        ref = outputs_and_grads(stock, (x64, w64, b64))
        want = outputs_and_grads(stock, (x, w, b))
        with env_vars(LIGHTNET_OPS_CPU_GEMM=gemm):
            got = outputs_and_grads(lambda *t: lo.linear_relu(*t, backend="cpu"), (x, w, b))
        for name, g, s_, r in zip(["output", "grad_input", "grad_weight", "grad_bias"], got, want, ref):
            assert_matches(g, s_, r, f"{gemm}/{isa}/{dtype} {case[0]} {name}")
        assert_gemm_ran(gemm, expected_isa(isa))
    if expected_isa(isa) != isa:
        pytest.skip(f"this CPU lacks {isa}: checked its fallback to {expected_isa(isa)} only")


# (rows, depth, cols, forward GEMM, backward GEMM) under each set of bounds (forward_gemm /
# use_native_gemm_backward in csrc/cpu/linear_relu.cpp, float32 on AVX-512 CPUs).
GEMM_RULES = {
    # BLAS tuned for the CPU (MKL on Intel): the forward's blocked kernel packs W^T per call, so below
    # 64 rows the forward takes the dot-product kernel where K >= 32 * rows and N <= 8 * K, BLAS
    # elsewhere; from 64 rows the blocked kernel up to 2^22 multiply-adds. The backward's GEMMs take
    # the blocked kernel from 4 rows up to 2^21 multiply-adds with N <= 8 * K. BLAS everywhere else.
    "tuned": [
        (1, 96, 40, "dot", "blas"), (3, 96, 40, "dot", "blas"), (4, 96, 40, "blas", "native"),
        (8, 576, 40, "dot", "native"), (18, 576, 40, "dot", "native"), (19, 576, 40, "blas", "native"),
        (63, 4096, 40, "dot", "blas"), (64, 96, 40, "native", "native"), (1, 96, 769, "blas", "blas"),
        (1, 96, 768, "dot", "blas"), (4, 96, 769, "blas", "blas"), (128, 512, 64, "native", "blas"),
        (128, 513, 64, "blas", "blas")],
    # Generic BLAS (MKL elsewhere): from 64 rows the blocked kernel up to 2^34 multiply-adds; below
    # 64 rows the dot kernel where N <= 8 * K and K >= 32 * rows or, below 8 rows, K * N <= 2^14;
    # else the blocked kernel from 8 rows where N <= 8 * K. The backward: the blocked kernel from
    # 4 rows up to 2^28, with N <= 8 * K below 16 rows.
    "generic": [
        (4, 96, 40, "dot", "native"), (7, 128, 128, "dot", "native"), (7, 129, 128, "blas", "native"),
        (8, 120, 84, "native", "native"), (8, 100, 801, "blas", "blas"), (16, 100, 801, "blas", "native"),
        (1, 96, 769, "blas", "blas"), (40, 1280, 64, "dot", "native"), (64, 120, 84, "native", "native"),
        (1024, 120, 84, "native", "native"), (1024, 512, 512, "native", "native"), (1024, 512, 513, "native", "blas")],
}


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("blas, rows, depth, cols, forward_gemm, backward_gemm",
                         [(blas, *case) for blas, cases in GEMM_RULES.items() for case in cases])
def test_cpu_gemm_rule_by_rows(monkeypatch, blas, rows, depth, cols, forward_gemm, backward_gemm):
    if expected_isa("avx512") != "avx512":
        pytest.skip("the project's GEMMs are chosen on AVX-512 CPUs only")
    monkeypatch.setenv("LIGHTNET_OPS_CPU_BLAS", blas)
    x, w, b = (torch.randn(rows, depth, requires_grad=True), torch.randn(cols, depth, requires_grad=True),
               torch.randn(cols, requires_grad=True))
    lo.linear_relu(x, w, b, backend="cpu").sum().backward()
    forward, backward = (parse_run(r) for r in torch.ops.lightnet_ops._cpu_linear_last_run())
    assert forward["gemm"] == forward_gemm, forward
    assert backward["gemm"] == backward_gemm, backward


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(0, 20), k=st.integers(0, 40), n=st.integers(1, 70), bias=st.booleans(),
       isa=st.sampled_from(["avx2", "avx512"]), gemm=st.sampled_from(["native", "dot"]))
def test_fuzz_project_gemms_against_float64_reference(m, k, n, bias, isa, gemm):
    # Every tile shape and edge of the project's GEMMs (row tails 1..7, partial column vectors,
    # transposition tails, dot-product tiles of 1..4 rows x 1..4 columns, partial last vectors of
    # the reduction, empty reductions), float64 at float64 precision.
    case = ("fuzz", (m, k), n, bias)
    _, (x, w, b) = make_inputs(case, torch.float64, "cpu")
    want = outputs_and_grads(lambda *t: lo.linear_relu(*t, backend="reference"), (x, w, b))
    with env_vars(LIGHTNET_OPS_CPU_GEMM=gemm, LIGHTNET_OPS_CPU_ISA=isa):
        got = outputs_and_grads(lambda *t: lo.linear_relu(*t, backend="cpu"), (x, w, b))
    assert_gemm_ran(gemm, expected_isa(isa))
    for g, s_ in zip(got, want):
        torch.testing.assert_close(g, s_, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gemm", ["native", "dot"])
def test_cpu_project_gemms_are_bitwise_deterministic_across_thread_counts(monkeypatch, gemm):
    # Each output element of the project's GEMMs is computed in a fixed order (one multiply-add
    # chain, or lane chains and a fixed lane tree), whichever thread computes its column block:
    # every result is bitwise the same for any thread count.
    monkeypatch.setenv("LIGHTNET_OPS_CPU_GEMM", gemm)
    torch.manual_seed(4)
    x, w, b, out_grad = torch.randn(70, 300), torch.randn(150, 300) / 17, torch.randn(150), torch.randn(70, 150)
    outs = results_per_thread_count(lambda: torch.ops.lightnet_ops.linear_relu(x, w, b), (1, 2, 3))
    grads = results_per_thread_count(
        lambda: torch.ops.lightnet_ops.linear_relu_backward(out_grad, x, w, outs[0], [True, True, True]), (1, 2, 3))
    for got in outs[1:]:
        assert torch.equal(got, outs[0])
    for got in grads[1:]:
        for g, want in zip(got, grads[0]):
            assert torch.equal(g, want)


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
def test_cpu_blocked_gemm_split_into_row_chunks_matches_stock(monkeypatch):
    # With few column blocks (N = 84: six blocks of 16 float64 columns with AVX-512, fewer than four
    # per thread) the blocked GEMM splits the rows into chunks across the threads too; row tails of
    # every length end the chunks.
    monkeypatch.setenv("LIGHTNET_OPS_CPU_GEMM", "native")
    torch.manual_seed(6)
    for rows in (64, 203):
        x, w, b = (torch.randn(rows, 37, dtype=torch.float64), torch.randn(84, 37, dtype=torch.float64),
                   torch.randn(84, dtype=torch.float64))
        want = F.relu(F.linear(x, w, b))
        for got in results_per_thread_count(lambda: torch.ops.lightnet_ops.linear_relu(x, w, b), (1, 2, 3)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("gemm", ["native", "dot", "blas", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows, depth, cols, bias", [(1, 84, 10, True), (8, 84, 10, False), (70, 33, 21, True)])
def test_cpu_linear_no_grad_is_stock_linear(monkeypatch, gemm, dtype, rows, depth, cols, bias):
    # _linear_no_grad (convnet_forward's last stage in inference): F.linear through the same GEMMs and
    # rules as linear_relu, without the ReLU; negative outputs stay.
    if gemm is not None:
        monkeypatch.setenv("LIGHTNET_OPS_CPU_GEMM", gemm)
    torch.manual_seed(7)
    x, w = torch.randn(rows, depth, dtype=dtype), torch.randn(cols, depth, dtype=dtype)
    b = torch.randn(cols, dtype=dtype) if bias else None
    got = torch.ops.lightnet_ops._linear_no_grad(x, w, b)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert (want < 0).any()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want.to(dtype), rtol=tol, atol=tol)
    if gemm is not None:
        assert parse_run(torch.ops.lightnet_ops._cpu_linear_last_run()[0])["gemm"] == gemm


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
def test_linear_no_grad_checks_and_fakes():
    x, w, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
    torch.library.opcheck(torch.ops.lightnet_ops._linear_no_grad.default, (x, w, b))
    with pytest.raises(ValueError, match="_linear_no_grad: input has 5 features but weight expects 6"):
        torch.ops.lightnet_ops._linear_no_grad(x, torch.randn(4, 6), b)
    meta = torch.ops.lightnet_ops._linear_no_grad(x.to("meta"), w.to("meta"), b.to("meta"))
    assert meta.shape == (3, 4) and meta.device.type == "meta"


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_no_grad_is_at_linear_where_autograd_records(dtype):
    # Where a gradient or tangent is recorded, and for what the project's kernels do not take
    # (a 0-d bias, leading dimensions), the op is at::linear itself.
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(8)
    x, w, b = (torch.randn(3, 5, dtype=dtype, requires_grad=True), torch.randn(4, 5, dtype=dtype),
               torch.randn(4, dtype=dtype, requires_grad=True))
    got, want = torch.ops.lightnet_ops._linear_no_grad(x, w, b), F.linear(x, w, b)
    assert torch.equal(got, want) and got.grad_fn is not None
    g = torch.randn_like(got)
    assert all(torch.equal(p, q) for p, q in zip(torch.autograd.grad(got, (x, b), g),
                                                 torch.autograd.grad(want, (x, b), g)))
    t = torch.randn_like(x)
    with torch.no_grad(), fwAD.dual_level():
        got = fwAD.unpack_dual(torch.ops.lightnet_ops._linear_no_grad(fwAD.make_dual(x.detach(), t), w, None))
        assert torch.equal(got.tangent, F.linear(t, w))
        assert torch.equal(torch.ops.lightnet_ops._linear_no_grad(x, w, b[0]), F.linear(x, w, b[0]))
        x3 = torch.randn(2, 3, 5, dtype=dtype)
        assert torch.equal(torch.ops.lightnet_ops._linear_no_grad(x3, w, b), F.linear(x3, w, b))


def test_cpu_backward_is_deterministic_across_thread_counts():
    # The bias gradient is summed in fixed row blocks and the GEMMs may run side by side or split:
    # the result must not depend on how many threads ran it.
    torch.manual_seed(3)
    x, w, out_grad = torch.randn(300, 576), torch.randn(120, 576) / 24, torch.randn(300, 120)
    out = torch.ops.lightnet_ops.linear_relu(x, w, torch.randn(120))
    results = results_per_thread_count(
        lambda: torch.ops.lightnet_ops.linear_relu_backward(out_grad, x, w, out, [True, True, True]), (1, 2, 3))
    for got in results[1:]:
        torch.testing.assert_close(got[2], results[0][2], rtol=0, atol=0)  # bias grad: bitwise
        for g, want in zip(got[:2], results[0][:2]):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)  # BLAS blocking may differ


def test_module_matches_nn_linear():
    torch.manual_seed(5)
    ref = torch.nn.Linear(20, 7)
    torch.manual_seed(5)
    mod = lo.LinearReLU(20, 7)
    torch.testing.assert_close(mod.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(mod.bias, ref.bias, rtol=0, atol=0)
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 20)
    torch.testing.assert_close(mod(x), F.relu(ref(x)))
    assert repr(mod) == "LinearReLU(in_features=20, out_features=7, bias=True)"
    assert lo.LinearReLU(3, 2, bias=False).bias is None


@pytest.mark.skipif("cpu" not in lo.backends(), reason="needs the C++ extension")
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("cols", [4, 8, 13, 120])
def test_cpu_dot_gemm_rows_do_not_depend_on_the_tiling(isa, cols):
    # The dot-product GEMM tiles 1 or 2 rows by 8 columns (AVX-512) and more rows by 4: every output
    # is the same lane-wise dot product reduced by the same tree, so a row's result is the same bits
    # alone, in a pair or in a batch of 7, and close to stock.
    x = torch.randn(7, 200)
    w = torch.randn(cols, 200)
    b = torch.randn(cols)
    with env_vars(LIGHTNET_OPS_CPU_GEMM="dot", LIGHTNET_OPS_CPU_ISA=isa):
        batch = lo.linear_relu(x, w, b, backend="cpu")
        assert parse_run(torch.ops.lightnet_ops._cpu_linear_last_run()[0])["gemm"] == "dot"
        singles = torch.cat([lo.linear_relu(x[i:i + 1], w, b, backend="cpu") for i in range(7)])
        pairs = torch.cat([lo.linear_relu(x[i:i + 2], w, b, backend="cpu") for i in range(0, 7, 2)])
    assert torch.equal(batch.view(torch.int32), singles.view(torch.int32))
    assert torch.equal(batch.view(torch.int32), pairs.view(torch.int32))
    torch.testing.assert_close(batch, torch.relu(torch.nn.functional.linear(x, w, b)), rtol=1e-5, atol=1e-4)
