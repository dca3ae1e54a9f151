"""NaN and infinity spread through the fused ops exactly as through stock: a seeded fuzz over
strided, padded, dilated, pool-padded and ceil-mode problems with one NaN or infinity in the weight,
the input, the bias or the incoming gradient, for every backend and float32/float64 dtype this
machine runs, comparing the output and every gradient element for element.

Stock's convolution has two rules for a padding tap, depending on the algorithm it picks: its
im2col kernels (float64, and float32 at batch 1 on CPU) multiply the weight by the padding's zero,
so an infinite weight gives NaN there and an infinite conv-output gradient gives NaN in
grad_weight; oneDNN (float32 batches on CPU) never multiplies a padding tap. Stock's dense backward
agrees with both on the rest: it multiplies every real (input, conv position, tap) triple, a zero
gradient included. The Triton kernels implement "a padding tap is never multiplied", checked against
`stock_real_taps` (stock ops with the padding taps masked out), which is itself checked against
stock wherever the padding rule cannot matter. The backends built on stock's convolution (cpu,
reference) are checked against stock in the same dtype; where the padding rule matters, stock in
float64 (the im2col rule on CPU) counts too, tensor by tensor: the cpu backend's direct
grad_weight kernels, which take a non-finite incoming gradient, follow that rule in float32.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_cases

import lightnet_ops as lo

# the interpreter's NumPy products warn on 0 * inf, which is what these tests are about
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

NONFINITE = (float("nan"), float("inf"), float("-inf"))
CONV_PLACES = ("weight", "input", "bias", "grad_output")
LINEAR_PLACES = ("weight", "input", "bias", "grad_output")
FAST_CASES = 32       # conv cases per backend and dtype in the fast tier
SLOW_CASES = 96       # more of them, marked slow
LINEAR_CASES = 16


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    """float32, and float64 where the backend has it (Triton has no float64)."""
    return [torch.float32] if backend == "triton" else [torch.float64, torch.float32]


# ----------------------------------------------------------------------------------- conv problems

@dataclasses.dataclass(frozen=True)
class ConvProblem:
    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: tuple
    padding: tuple
    dilation: tuple
    pool: tuple
    pool_stride: tuple
    pool_padding: tuple
    ceil_mode: bool
    bias: bool
    place: str           # which tensor holds the non-finite element
    value: float
    seed: int

    def padding_rule_matters(self) -> bool:
        """Whether stock's two padding rules can differ: a non-finite weight or gradient meets a padding tap."""
        return any(self.padding) and self.place in ("weight", "grad_output")


def _pooled_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    """max_pool2d's output size (the last window must start inside the input or its left padding)."""
    out = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


# Pinned first cases: an infinite weight with stride 2, padding 1, dilation 2; one NaN tap feeding
# grad_input through a strided conv; an infinite gradient next to padding.
PINNED = [
    ConvProblem(2, 2, 9, 9, 2, 3, 3, (2, 2), (1, 1), (2, 2), (2, 2), (1, 1), (0, 0), False, True, "weight",
                math.inf, 1),
    ConvProblem(1, 1, 6, 6, 1, 3, 3, (2, 2), (1, 1), (1, 1), (1, 1), (1, 1), (0, 0), False, True, "weight",
                math.nan, 2),
    ConvProblem(2, 2, 7, 8, 3, 3, 2, (1, 2), (1, 1), (1, 1), (3, 2), (2, 1), (1, 1), True, True, "grad_output",
                math.inf, 3),
]


def conv_problem(index: int) -> ConvProblem:
    """The index-th problem of the fuzz: seeded, so every run and backend sees the same ones."""
    if index < len(PINNED):
        return PINNED[index]
    rng = random.Random(1000 + index)
    place = CONV_PLACES[index % len(CONV_PLACES)]
    value = NONFINITE[(index // len(CONV_PLACES)) % len(NONFINITE)]
    while True:
        R, S = rng.randint(1, 3), rng.randint(1, 3)
        stride = (rng.randint(1, 2), rng.randint(1, 2))
        padding = (rng.randint(0, R // 2 + 1), rng.randint(0, S // 2 + 1))
        dilation = (rng.randint(1, 2), rng.randint(1, 2))
        pool = (rng.randint(1, 3), rng.randint(1, 3))
        pool_stride = (rng.randint(1, 3), rng.randint(1, 3))
        pool_padding = (rng.randint(0, pool[0] // 2), rng.randint(0, pool[1] // 2))
        ceil_mode = rng.random() < 0.4
        H, W = rng.randint(4, 9), rng.randint(4, 9)
        P = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) // stride[0] + 1
        Q = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) // stride[1] + 1
        if P < 1 or Q < 1:
            continue
        if min(_pooled_size(P, pool[0], pool_stride[0], pool_padding[0], ceil_mode),
               _pooled_size(Q, pool[1], pool_stride[1], pool_padding[1], ceil_mode)) < 1:
            continue
        return ConvProblem(rng.randint(1, 2), rng.randint(1, 3), H, W, rng.randint(1, 4), R, S, stride, padding,
                           dilation, pool, pool_stride, pool_padding, ceil_mode, rng.random() < 0.8 or
                           place == "bias", place, value, index)


def conv_tensors(p: ConvProblem, dtype: torch.dtype, device: str, integer: bool = False):
    """(input, weight, bias, grad_output) in `dtype`, with the one non-finite element placed.
    integer: small integers (no near-ties; float16/bfloat16 round only the larger sums, once)."""
    g = torch.Generator().manual_seed(p.seed)
    if integer:
        ints = lambda low, high, *shape: torch.randint(low, high + 1, shape, generator=g).double()  # noqa: E731
        x, w, b = ints(-3, 3, p.N, p.C, p.H, p.W), ints(-2, 2, p.K, p.C, p.R, p.S), ints(-2, 2, p.K)
        b = b if p.bias else None
    else:
        x = torch.randn(p.N, p.C, p.H, p.W, generator=g, dtype=torch.float64)
        w = torch.randn(p.K, p.C, p.R, p.S, generator=g, dtype=torch.float64) / math.sqrt(p.C * p.R * p.S)
        b = torch.randn(p.K, generator=g, dtype=torch.float64) * 0.3 if p.bias else None
    with torch.no_grad():
        out = stock_conv(x, w, b, p)
    go = ints(-3, 3, *out.shape) if integer else torch.randn(out.shape, generator=g, dtype=torch.float64)
    target = {"input": x, "weight": w, "bias": b, "grad_output": go}[p.place]
    # a gradient where ReLU zeroed the output is dropped: place it where the output is live when one is
    live = (out.reshape(-1) > 0).nonzero().view(-1) if p.place == "grad_output" else torch.zeros(0)
    pick = int(torch.randint(live.numel() or target.numel(), (1,), generator=g))
    target.view(-1)[int(live[pick]) if live.numel() else pick] = p.value
    return [t.to(device=device, dtype=dtype) if t is not None else None for t in (x, w, b, go)]


def stock_conv(x, w, b, p: ConvProblem) -> torch.Tensor:
    conv = F.conv2d(x, w, b, p.stride, p.padding, p.dilation)
    return F.max_pool2d(F.relu(conv), p.pool, p.pool_stride, p.pool_padding, ceil_mode=p.ceil_mode)


def conv2d_real_taps(x, w, b, stride, padding, dilation) -> torch.Tensor:
    """F.conv2d from stock ops, never multiplying a padding tap: im2col columns, products masked
    where the tap falls on padding, summed. Autograd through it multiplies every real (input,
    conv position, tap) triple, as stock's dense backward does, and no padding tap."""
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    unfold = dict(kernel_size=(R, S), dilation=dilation, padding=padding, stride=stride)
    cols = F.unfold(x, **unfold)                                                  # (N, C*R*S, P*Q)
    real = F.unfold(torch.ones(1, 1, H, W, dtype=x.dtype, device=x.device), **unfold).repeat(1, C, 1) > 0
    cols = torch.where(real, cols, 0.0)                # no gradient reaches a padding column either
    prod = cols[:, None] * w.reshape(1, K, C * R * S, 1)                           # (N, K, C*R*S, P*Q)
    out = torch.where(real[:, None], prod, 0.0).sum(2)
    P = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    out = out.view(N, K, P, Q)
    return out if b is None else out + b.view(1, K, 1, 1)


def stock_real_taps(x, w, b, p: ConvProblem) -> torch.Tensor:
    conv = conv2d_real_taps(x, w, b, p.stride, p.padding, p.dilation)
    return F.max_pool2d(F.relu(conv), p.pool, p.pool_stride, p.pool_padding, ceil_mode=p.ceil_mode)


def fused_conv(backend: str):
    def run(x, w, b, p: ConvProblem) -> torch.Tensor:
        return lo.conv2d_relu_maxpool2d(x, w, b, p.stride, p.padding, p.dilation, p.pool, p.pool_stride,
                                        p.pool_padding, p.ceil_mode, backend=backend)
    return run


def outputs_and_grads(fn, tensors: list, grad_output: torch.Tensor, *args) -> list[torch.Tensor]:
    """[output, grad of each non-None tensor] of fn(*tensors, *args) for the given incoming gradient."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves, *args)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_output)
    return [out.detach(), *grads]


def nonfinite_mismatch(a: torch.Tensor, e: torch.Tensor) -> Optional[str]:
    """Why `a` does not have NaN where `e` has NaN, the same infinities with the same signs and the
    rest close, or None when it does (`a` may be float32 against a float64 `e`)."""
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(a.dtype, 1e-2)
    a, e = a.double(), e.double()
    if a.shape != e.shape:
        return f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    for kind, test in (("NaN", torch.isnan), ("infinite", torch.isinf)):
        in_a, in_e = test(a), test(e)
        if not torch.equal(in_a, in_e):
            return (f"{kind} at {int(in_a.sum())} positions, expected {int(in_e.sum())}; first differences at "
                    f"{(in_a != in_e).nonzero()[:4].tolist()}")
    if not torch.equal(a[torch.isinf(a)], e[torch.isinf(e)]):
        return "infinities of the wrong sign"
    fin = torch.isfinite(e)
    scale = max(float(e[fin].abs().max()), 1.0) if fin.any() else 1.0
    if not torch.allclose(a[fin], e[fin], rtol=tol, atol=tol * scale):
        return f"finite values differ by up to {float((a[fin] - e[fin]).abs().max()):.3g}"
    return None


def assert_matches_one_of(got: list, wants: list[list], names: list[str], what: str) -> None:
    """Each of got's tensors matches (nonfinite_mismatch) the same tensor of at least one of `wants`."""
    for i, (name, a) in enumerate(zip(names, got)):
        why = [nonfinite_mismatch(a, want[i]) for want in wants]
        assert None in why, f"{what} {name}: " + "; or ".join(why)


CONV_NAMES = ["output", "grad_input", "grad_weight", "grad_bias"]


def check_conv(backend: str, device: str, dtype: torch.dtype, p: ConvProblem) -> None:
    x, w, b, go = conv_tensors(p, dtype, device)
    got = outputs_and_grads(fused_conv(backend), [x, w, b], go, p)
    as64 = [t.double() if t is not None else None for t in (x, w, b)]
    if backend == "triton":
        # the Triton kernels' rule, against stock ops in float64 on the same (dtype-rounded) values
        wants = [outputs_and_grads(stock_real_taps, as64, go.double(), p)]
    else:
        # these backends call stock's convolution (or their own dense kernels) for non-finite operands;
        # where the padding rule matters, stock's float64 convolution (im2col on CPU) is stock too
        wants = [outputs_and_grads(stock_conv, [x, w, b], go, p)]
        if p.padding_rule_matters() and dtype != torch.float64:
            wants.append(outputs_and_grads(stock_conv, as64, go.double(), p))
    assert_matches_one_of(got, wants, CONV_NAMES, f"{backend}/{device}/{dtype} {p}")


def conv_params(indices):
    for backend, device in backend_cases():
        for dtype in dtypes_for(backend, device):
            for i in indices:
                yield pytest.param(backend, device, dtype, i, id=f"{backend}-{device}-{str(dtype)[6:]}-{i}")


@pytest.mark.parametrize("backend, device, dtype, index", list(conv_params(range(FAST_CASES))))
def test_conv_nonfinite_like_stock(backend, device, dtype, index):
    check_conv(backend, device, dtype, conv_problem(index))


@pytest.mark.slow
@pytest.mark.parametrize("backend, device, dtype, index",
                         list(conv_params(range(FAST_CASES, FAST_CASES + SLOW_CASES))))
def test_conv_nonfinite_like_stock_more(backend, device, dtype, index):
    check_conv(backend, device, dtype, conv_problem(index))


@pytest.mark.skipif(not any(b == "triton" for b, _ in backend_cases()), reason="needs the triton backend")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("index", range(12))
def test_triton_low_precision_nonfinite(dtype, index):
    """float16/bfloat16 through the Triton kernels' tl.dot and real-tap paths, on integer data that
    these dtypes hold (nearly) exactly: NaN and infinity where stock ops place them under the Triton rule."""
    p = conv_problem(index)
    device = next(d for b, d in backend_cases() if b == "triton")
    x, w, b, go = conv_tensors(p, dtype, device, integer=True)
    got = outputs_and_grads(fused_conv("triton"), [x, w, b], go, p)
    as64 = [t.double() if t is not None else None for t in (x, w, b)]
    want = outputs_and_grads(stock_real_taps, as64, go.double(), p)
    assert_matches_one_of(got, [want], CONV_NAMES, f"triton/{device}/{dtype} {p}")


@pytest.mark.parametrize("index", range(FAST_CASES + SLOW_CASES))
def test_real_tap_oracle_is_stock_where_padding_cannot_matter(index):
    """`stock_real_taps` gives stock's NaN/inf placement (float64) wherever no non-finite weight or
    gradient meets a padding tap; where one does, it is finite (or infinite) where stock's im2col
    convolution has NaN, never the other way round."""
    p = conv_problem(index)
    x, w, b, go = conv_tensors(p, torch.float64, "cpu")
    want = outputs_and_grads(stock_conv, [x, w, b], go, p)
    got = outputs_and_grads(stock_real_taps, [x, w, b], go, p)
    if not p.padding_rule_matters():
        assert_matches_one_of(got, [want], CONV_NAMES, f"oracle {p}")
        return
    for name, a, e in zip(CONV_NAMES, got, want):
        assert not (torch.isnan(a) & ~torch.isnan(e)).any(), f"oracle {p} {name}: NaN where stock has none"
        same = ~torch.isnan(e)
        assert torch.equal(torch.isinf(a[same]), torch.isinf(e[same])), f"oracle {p} {name}: infinities differ"


def test_fuzz_places_every_value_everywhere():
    """The fast tier covers each (place, value) pair, padding, stride, dilation, pool padding and ceil mode."""
    probs = [conv_problem(i) for i in range(FAST_CASES)]
    assert {(p.place, repr(p.value)) for p in probs} == {(pl, repr(v)) for pl in CONV_PLACES for v in NONFINITE}
    for feature in (lambda p: any(p.padding), lambda p: max(p.stride) > 1, lambda p: max(p.dilation) > 1,
                    lambda p: any(p.pool_padding), lambda p: p.ceil_mode, lambda p: p.N > 1,
                    lambda p: p.padding_rule_matters()):
        assert sum(map(feature, probs)) >= 4


# --------------------------------------------------------------------------------------- linear_relu

def linear_tensors(index: int, dtype: torch.dtype, device: str):
    rng = random.Random(2000 + index)
    # rows, in and out features: tails of the 16-wide blocks
    M, n_in, n_out = rng.randint(1, 20), rng.randint(1, 40), rng.randint(1, 20)
    place = LINEAR_PLACES[index % len(LINEAR_PLACES)]
    value = NONFINITE[(index // len(LINEAR_PLACES)) % len(NONFINITE)]
    g = torch.Generator().manual_seed(index)
    x = torch.randn(M, n_in, generator=g, dtype=torch.float64)
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / math.sqrt(n_in)
    b = torch.randn(n_out, generator=g, dtype=torch.float64) * 0.3
    go = torch.randn(M, n_out, generator=g, dtype=torch.float64)
    target = {"input": x, "weight": w, "bias": b, "grad_output": go}[place]
    target.view(-1)[int(torch.randint(target.numel(), (1,), generator=g))] = value
    return [t.to(device=device, dtype=dtype) for t in (x, w, b, go)]


def linear_params():
    for backend, device in backend_cases():
        for dtype in dtypes_for(backend, device):
            for i in range(LINEAR_CASES):
                yield pytest.param(backend, device, dtype, i, id=f"{backend}-{device}-{str(dtype)[6:]}-{i}")


@pytest.mark.parametrize("backend, device, dtype, index", list(linear_params()))
def test_linear_nonfinite_like_stock(backend, device, dtype, index):
    """linear_relu has no padding: every backend must place NaN/inf exactly as stock (dense GEMMs
    that multiply the ReLU-gated zeros too)."""
    x, w, b, go = linear_tensors(index, dtype, device)
    got = outputs_and_grads(lambda x, w, b: lo.linear_relu(x, w, b, backend=backend), [x, w, b], go)
    # stock in float64 on the same values: float32 stock GEMMs may differ from it only in rounding
    want = outputs_and_grads(lambda x, w, b: F.relu(F.linear(x, w, b)), [t.double() for t in (x, w, b)],
                             go.double())
    assert_matches_one_of(got, [want], CONV_NAMES, f"{backend}/{device}/{dtype} linear #{index}")

