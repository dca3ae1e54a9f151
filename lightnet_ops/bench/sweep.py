"""``lightnet-bench --sweep``: the fused ops against stock over many shapes that the fixed cases do
not list, inference (``fwd``) and forward+backward (``fwd+bwd``), to find where a fused path loses.

The shape list is deterministic: :func:`sweep_cases` draws it with ``random.Random(SWEEP_SEED)``
from the value lists below, so every run and every machine measures the same problems.

- conv2d_relu_maxpool2d: ``ANCHOR_CONVS`` (layers of ResNet/VGG-style networks after their first
  stage, where many channels meet small images, plus a ResNet stem), then ``CONV_DRAWS`` drawn
  shapes. Draw i takes filter ``CONV_KERNELS[i % 4]`` and pool ``POOLS[(i // 4) % 2]`` (so every
  filter size meets both pools), padding ``k // 2`` where i // 8 is odd (none where it is even),
  stride 2 on every third draw (i % 3 == 2); batch, channels and image size come from the value lists.
- linear_relu: ``LINEAR_DRAWS`` drawn shapes; draw i takes its row count M from bucket
  ``LINEAR_M_BUCKETS[i % 4]`` (few rows, tens, hundreds, thousands), K and N from ``LINEAR_FEATURES``.

A draw is redrawn (same rng stream) while it is invalid (pool output < 1), a fixed case, a shape
already drawn, or over the cost caps ``MAX_FWD_FLOPS`` / ``MAX_ELEMENTS``, which keep one call
below ~100 ms on a 2-core CPU so the whole sweep takes a few minutes. ``--quick`` takes the
``QUICK_PER_OP`` cheapest shapes of each op.

Timing: per (shape, mode), stock and each fused backend are warmed up (which also estimates one
call's time), then sampled in interleaved rounds, one block of back-to-back calls per
implementation per round (``timing.time_block``, at the thread count the run sets; the order
alternates between rounds). Repeat counts adapt to the shape: a block holds about ``block_s`` of
calls (at least one), and rounds continue until ``budget_s`` is spent (between ``min_rounds`` and
``max_rounds``; after 3 rounds once 4 x ``budget_s`` is spent, which bounds a group on a loaded
machine). Short blocks interleaved at millisecond scale put a load change or a preemption on
a shared machine into a few blocks of every implementation alike, and the median drops them.
The ratio is stock's median per-call time over the backend's (``speedup_vs_stock``; the ratio of the
fastest blocks is kept too). Summaries per backend and mode: geometric mean, worst ratio with its
case, and every case below ``SLOW_RATIO``.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .cases import CASES, Case, ConvShape, LinearShape, case_key
from .ops import build_runner
from .report import fmt_ratio, fmt_time, short_error
from .timing import time_block, warm_up

SWEEP_SEED = 20240617
#: Case-name prefix of the sweep cases (targets.json matches "sweep/*").
PREFIX = "sweep/"
#: Case name of the per-mode summary rows that carry the geometric mean (see summary_rows).
GEOMEAN_CASE = "sweep-geomean"
#: A fused backend slower than this fraction of stock's speed is listed as a loss.
SLOW_RATIO = 0.95

CONV_DRAWS = 44
LINEAR_DRAWS = 24
QUICK_PER_OP = 3
CONV_KERNELS = (1, 3, 5, 7)
POOLS = ((2, 2), (3, 2))
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
IN_CHANNELS = (1, 3, 8, 16, 32, 64, 96, 128, 256, 512)
OUT_CHANNELS = (4, 8, 16, 32, 64, 128, 256, 512)
IMAGES = (4, 7, 8, 12, 14, 16, 28, 32, 56, 64, 112, 224)
LINEAR_M_BUCKETS = ((1, 2, 4, 8), (16, 32, 64, 128), (256, 512, 1024), (2048, 4096))
LINEAR_FEATURES = (16, 32, 64, 84, 120, 128, 256, 512, 576, 1000, 1024, 2048, 4096)
MAX_FWD_FLOPS = 1.5e9
MAX_ELEMENTS = 8 * 2**20
#: (batch, shape): layers that are not drawn but always measured.
ANCHOR_CONVS = (
    (4, ConvShape(256, 256, 7, 7, 3, padding=1)),
    (2, ConvShape(128, 128, 14, 14, 3, padding=1)),
    (1, ConvShape(64, 64, 28, 28, 3, padding=1)),
    (8, ConvShape(128, 128, 28, 28, 1)),
    (1, ConvShape(3, 64, 224, 224, 7, stride=2, padding=3, pool_kernel=3, pool_stride=2)),
)


@dataclass(frozen=True)
class SweepSettings:
    """How long to measure one (shape, mode): block_s: target duration of one block of calls;
    budget_s: target sampling time of all implementations together; min_rounds / max_rounds: bounds
    on the interleaved rounds; warmup_s: warm-up after the first call."""

    block_s: float
    budget_s: float
    min_rounds: int
    max_rounds: int
    warmup_s: float


SWEEP_FULL = SweepSettings(block_s=0.004, budget_s=0.5, min_rounds=9, max_rounds=150, warmup_s=0.05)
SWEEP_QUICK = SweepSettings(block_s=0.002, budget_s=0.05, min_rounds=5, max_rounds=25, warmup_s=0.01)


def conv_name(batch: int, s: ConvShape) -> str:
    """e.g. "sweep/conv_b4_256to256_7x7_k3s1p1_pool2s2"."""
    return (f"{PREFIX}conv_b{batch}_{s.in_channels}to{s.out_channels}_{s.height}x{s.width}_k{s.kernel}s{s.stride}"
            f"p{s.padding}_pool{s.pool_kernel}s{s.pool_stride}")


def linear_name(batch: int, s: LinearShape) -> str:
    """e.g. "sweep/linear_m8_576to120"."""
    return f"{PREFIX}linear_m{batch}_{s.in_features}to{s.out_features}"


def fwd_flops(case: Case) -> float:
    """Multiply-add FLOPs of the case's forward (the conv / the matrix product)."""
    s, n = case.shape, case.batch
    if isinstance(s, ConvShape):
        p, q = s.conv_out
        return 2.0 * n * s.out_channels * p * q * s.in_channels * s.kernel ** 2
    return 2.0 * n * s.in_features * s.out_features


def _elements(case: Case) -> int:
    """Largest tensor of the problem, in elements (input, conv output or weight)."""
    s, n = case.shape, case.batch
    if isinstance(s, ConvShape):
        p, q = s.conv_out
        return max(n * s.in_channels * s.height * s.width, n * s.out_channels * p * q)
    return max(n * s.in_features, n * s.out_features, s.in_features * s.out_features)


def _fits(case: Case, seen: set) -> bool:
    s = case.shape
    if isinstance(s, ConvShape):
        p, q = s.conv_out
        if p < 1 or q < 1 or min(s.pool_out) < 1:
            return False
    return case_key(case) not in seen and fwd_flops(case) <= MAX_FWD_FLOPS and _elements(case) <= MAX_ELEMENTS


def _conv_case(batch: int, shape: ConvShape) -> Case:
    return Case(conv_name(batch, shape), "conv", batch, "sweep: conv2d_relu_maxpool2d", shape, devices=("cpu", "cuda"))


def _linear_case(batch: int, shape: LinearShape) -> Case:
    return Case(linear_name(batch, shape), "linear", batch, "sweep: linear_relu", shape, devices=("cpu", "cuda"))


def sweep_cases(quick: bool = False) -> list[Case]:
    """The sweep's shapes (see the module docstring): anchors, then conv draws, then linear draws;
    with `quick`, the QUICK_PER_OP cheapest of each op."""
    rng = random.Random(SWEEP_SEED)
    seen = {case_key(c) for c in CASES}
    cases: list[Case] = []

    def add(case: Case) -> None:
        seen.add(case_key(case))
        cases.append(case)

    for batch, shape in ANCHOR_CONVS:
        add(_conv_case(batch, shape))
    for i in range(CONV_DRAWS):
        k = CONV_KERNELS[i % len(CONV_KERNELS)]
        pool_k, pool_s = POOLS[(i // len(CONV_KERNELS)) % len(POOLS)]
        padding = k // 2 if (i // 8) % 2 else 0
        stride = 2 if i % 3 == 2 else 1
        while True:
            image = rng.choice(IMAGES)
            case = _conv_case(rng.choice(BATCHES), ConvShape(rng.choice(IN_CHANNELS), rng.choice(OUT_CHANNELS),
                                                             image, image, k, stride, padding, 1, pool_k, pool_s))
            if _fits(case, seen):
                add(case)
                break
    for i in range(LINEAR_DRAWS):
        bucket = LINEAR_M_BUCKETS[i % len(LINEAR_M_BUCKETS)]
        while True:
            case = _linear_case(rng.choice(bucket), LinearShape(rng.choice(LINEAR_FEATURES),
                                                                rng.choice(LINEAR_FEATURES)))
            if _fits(case, seen):
                add(case)
                break
    if quick:
        convs = sorted((c for c in cases if c.op == "conv"), key=fwd_flops)[:QUICK_PER_OP]
        linears = sorted((c for c in cases if c.op == "linear"), key=fwd_flops)[:QUICK_PER_OP]
        cases = convs + linears
    return cases


def measure_sweep_group(case: Case, mode: str, impls: list[str], device: torch.device,
                        settings: SweepSettings) -> list[dict]:
    """One row per impl ("stock" among them) for (case, mode): warm-up, then interleaved rounds of
    one block per impl (see the module docstring); median and minimum per-call time over the blocks,
    speedup_vs_stock (ratio of medians) and speedup_vs_stock_of_min. A failing impl gets a row with
    "error" set."""
    rows: dict[str, dict] = {}
    live: dict[str, tuple[Callable[[], Any], int]] = {}
    for impl in impls:
        row = dict(case=case.name, op=case.op, mode=mode, backend=impl, dtype=case.dtype, batch=case.batch,
                   shape=vars(case.shape).copy(), flops=fwd_flops(case) * (1 if mode == "fwd" else 3), error=None)
        rows[impl] = row
        try:
            runner = build_runner(case, impl, mode, device)
            _, per_call = warm_up(runner.fn, device, settings.warmup_s, min_calls=1)
            number = max(1, int(round(settings.block_s / max(per_call, 1e-9))))
            live[impl] = (runner.fn, number)
            row["block_calls"] = number
        except Exception as e:  # noqa: BLE001 - a failing backend is a result, not a crash
            row["error"] = short_error(e)
    times: dict[str, list[float]] = {impl: [] for impl in live}
    t0, r = time.perf_counter(), 0
    while live and r < settings.max_rounds:
        for impl in list(live) if r % 2 == 0 else list(reversed(live)):
            fn, number = live[impl]
            try:
                times[impl].append(time_block(fn, device, number))
            except Exception as e:  # noqa: BLE001
                rows[impl]["error"] = short_error(e)
                del live[impl]
        r += 1
        spent = time.perf_counter() - t0
        # Enough rounds and the budget spent; or, on a machine so loaded that calls take many times
        # their estimate, a few rounds and several budgets spent.
        if (r >= settings.min_rounds and spent >= settings.budget_s) or (r >= 3 and spent >= 4 * settings.budget_s):
            break
    for impl in live:
        ts = times[impl]
        rows[impl].update(median_s=statistics.median(ts), min_s=min(ts), blocks=len(ts))
    stock = rows.get("stock", {})
    for row in rows.values():
        med, fastest = row.get("median_s"), row.get("min_s")
        row["speedup_vs_stock"] = stock["median_s"] / med if stock.get("median_s") and med else None
        row["speedup_vs_stock_of_min"] = stock["min_s"] / fastest if stock.get("min_s") and fastest else None
    return [rows[i] for i in impls]


def geomean(values: list[float]) -> float:
    """Geometric mean of positive numbers."""
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(rows: list[dict]) -> dict:
    """{backend: {mode: summary}} over the rows of every non-stock backend, mode "all" pooling
    the modes. A summary: cases, geomean, worst {case, mode, ratio}, below {threshold, count,
    cases: [{case, mode, ratio, ratio_of_min}] slowest first}, errors (rows without a ratio), and
    from the ratios of the fastest blocks (less sensitive to other processes on a shared machine)
    geomean_of_min and below_of_min (a count)."""
    out: dict[str, dict] = {}
    backends = [b for b in dict.fromkeys(r["backend"] for r in rows) if b != "stock"]
    for backend in backends:
        mine = [r for r in rows if r["backend"] == backend]
        modes = list(dict.fromkeys(r["mode"] for r in mine))
        per: dict[str, dict] = {}
        for mode in modes + (["all"] if len(modes) > 1 else []):
            sel = [r for r in mine if mode == "all" or r["mode"] == mode]
            ok = [r for r in sel if r.get("speedup_vs_stock")]
            if not ok:
                per[mode] = dict(cases=0, geomean=None, worst=None, below=dict(threshold=SLOW_RATIO, count=0, cases=[]),
                                 errors=len(sel))
                continue
            ranked = sorted(ok, key=lambda r: r["speedup_vs_stock"])
            slow = [dict(case=r["case"], mode=r["mode"], ratio=r["speedup_vs_stock"],
                         ratio_of_min=r.get("speedup_vs_stock_of_min")) for r in ranked
                    if r["speedup_vs_stock"] < SLOW_RATIO]
            w = ranked[0]
            of_min = [r["speedup_vs_stock_of_min"] for r in ok if r.get("speedup_vs_stock_of_min")]
            per[mode] = dict(cases=len(ok), geomean=geomean([r["speedup_vs_stock"] for r in ok]),
                             worst=dict(case=w["case"], mode=w["mode"], ratio=w["speedup_vs_stock"]),
                             below=dict(threshold=SLOW_RATIO, count=len(slow), cases=slow), errors=len(sel) - len(ok),
                             geomean_of_min=geomean(of_min) if of_min else None,
                             below_of_min=sum(v < SLOW_RATIO for v in of_min))
        out[backend] = per
    return out


def summary_rows(summary: dict) -> list[dict]:
    """Rows that carry each (backend, mode) geometric mean as speedup_vs_stock under the case name
    GEOMEAN_CASE, so the target check treats it like any measured ratio."""
    return [dict(case=GEOMEAN_CASE, op="sweep", mode=mode, backend=backend, error=None, speedup_vs_stock=s["geomean"])
            for backend, per in summary.items() for mode, s in per.items() if s["geomean"] is not None]


def format_summary(summary: dict) -> str:
    """Lines per backend and mode: geomean, worst with its case, the count and list below SLOW_RATIO."""
    lines = []
    for backend, per in summary.items():
        for mode, s in per.items():
            if s["geomean"] is None:
                lines.append(f"  {backend} {mode}: no ratio measured ({s['errors']} errors)")
                continue
            w = s["worst"]
            of_min = (f" (fastest blocks: geomean x{s['geomean_of_min']:.2f}, {s['below_of_min']} below)"
                      if s.get("geomean_of_min") else "")
            lines.append(f"  {backend} {mode:<7} {s['cases']} cases: geomean x{s['geomean']:.2f}; worst "
                         f"x{w['ratio']:.2f} ({w['case']} {w['mode']}); {s['below']['count']} below "
                         f"x{SLOW_RATIO}" + (f"; {s['errors']} errors" if s["errors"] else "") + of_min)
            if mode != "all":
                lines += [f"      x{b['ratio']:.2f}" + (f" (fastest x{b['ratio_of_min']:.2f})" if b.get("ratio_of_min")
                                                         else "") + f"  {b['case']}" for b in s["below"]["cases"]]
    return "\n".join(lines)


def format_sweep_table(rows: list[dict], markdown: bool = False) -> str:
    """One line per (case, mode, fused backend): stock and fused medians and the ratio; "<" marks
    a ratio below SLOW_RATIO."""
    header = ("case", "mode", "backend", "stock", "fused", "x stock", "")
    stock = {(r["case"], r["mode"]): r for r in rows if r["backend"] == "stock"}
    body = []
    for r in rows:
        if r["backend"] == "stock":
            continue
        s = stock.get((r["case"], r["mode"]), {})
        ratio = r.get("speedup_vs_stock")
        if r.get("error") or s.get("error"):
            body.append((r["case"], r["mode"], r["backend"], "", "", "error: " + (r.get("error") or s["error"])[:60],
                         ""))
            continue
        body.append((r["case"], r["mode"], r["backend"], fmt_time(s.get("median_s")), fmt_time(r.get("median_s")),
                     fmt_ratio(ratio), "<" if ratio is not None and ratio < SLOW_RATIO else ""))
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*b) for b in body])


def run_sweep(cases: list[Case], modes: list[str], fused: list[str], device: torch.device, threads: int,
              settings: SweepSettings, log: Callable[[str], None]) -> tuple[list[dict], float]:
    """Measures every (case, mode) with stock and the `fused` backends with `threads` CPU threads
    (torch.set_num_threads); returns (rows, seconds)."""
    if device.type == "cpu":
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    groups = [(c, m) for c in cases for m in c.modes if m in modes]
    impls = ["stock", *fused]
    rows: list[dict] = []
    for i, (case, mode) in enumerate(groups, 1):
        got = measure_sweep_group(case, mode, impls, device, settings)
        rows += got
        parts = []
        for r in got[1:]:
            parts.append(f"{r['backend']} error: {r['error']}" if r.get("error") else
                         f"{r['backend']} x{fmt_ratio(r['speedup_vs_stock'])}")
        if got[0].get("error"):
            parts = [f"stock error: {got[0]['error']}"]
        log(f"[{i}/{len(groups)}] {case.name} {mode}: stock {fmt_time(got[0].get('median_s'))}; {'; '.join(parts)}")
    return rows, time.perf_counter() - t0


def sweep_impls(backends: list[str], explicit: bool, peers: tuple) -> Optional[list[str]]:
    """The fused backends a sweep measures against stock: every lightnet_ops backend named with
    --backends, else the first default one (cpu / cuda); None when there is none."""
    fused = [b for b in backends if b not in peers]
    if not fused:
        return None
    return fused if explicit else fused[:1]
