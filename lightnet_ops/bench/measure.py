"""One (case, mode) group: every implementation warmed up, then sampled round-robin, one block of
calls per implementation per round, so load changes on a shared machine hit all of them alike;
then memory, and the ratios against the peers measured in the same group."""

from __future__ import annotations

import os
import time
import traceback
from typing import Callable

import torch

from .cases import Case
from .memory import peak_bytes, saved_activation_bytes
from .ops import ORT, Runner, build_runner
from .report import fmt_ratio, fmt_time, short_error
from .timing import BlockTimer, Settings, summary, warm_up


#: Pause before each block of a group that has ONNX Runtime in it. After a run, ONNX Runtime's
#: intra-op pool keeps a thread spinning for about 20 ms and OpenMP's workers for up to about 10 ms
#: (per-thread CPU time, LightNet batch 8 on 2 threads): without the pause that thread takes a core
#: from the next implementation's block (LightNet batch 8 on the cpu backend timed 100 us after
#: ONNX Runtime blocks instead of 64 us alone).
THREAD_POOL_SETTLE_S = 0.03


def measure_group(case: Case, mode: str, impls: list[str], device: torch.device, threads: int,
                  settings: Settings, log: Callable[[str], None]) -> list[dict]:
    """Rows for every impl on (case, mode); a failing impl gets a row with "error" set."""
    if "compile" in impls:
        torch._dynamo.reset()  # a fresh cache per group keeps recompile limits out of the way
    rows: dict[str, dict] = {}
    live: dict[str, tuple[Runner, BlockTimer, int]] = {}
    for impl in impls:
        row = dict(case=case.name, op=case.op, mode=mode, backend=impl, dtype=case.dtype, batch=case.batch,
                   error=None, saved_bytes=None, saved_bytes_per_sample=None, peak_bytes=None)
        rows[impl] = row
        try:
            runner = build_runner(case, impl, mode, device)
            first, per_call = warm_up(runner.fn, device, settings.warmup_s)
            row.update(first_call_s=first, per_call_estimate_s=per_call, flops=runner.flops,
                       min_bytes=runner.min_bytes)
            number = max(1, int(round(settings.block_s / max(per_call, 1e-9))))
            live[impl] = (runner, BlockTimer(runner.fn, device, threads), number)
            row["block_calls"] = number
        except Exception as e:  # noqa: BLE001 - a failing backend is a result, not a crash
            row["error"] = short_error(e)
            log(f"    {impl:<10} error: {row['error']}")
            if os.environ.get("LIGHTNET_BENCH_TRACEBACK"):
                traceback.print_exc()
    # Round-robin sampling.
    round_s = sum(number * rows[impl]["per_call_estimate_s"] for impl, (_, _, number) in live.items()) or 1.0
    samples = int(min(settings.max_samples, max(settings.min_samples, settings.budget_s // round_s)))
    times: dict[str, list[float]] = {impl: [] for impl in live}
    settle_s = THREAD_POOL_SETTLE_S if ORT in live else 0.0
    for _ in range(samples):
        for impl, (_, timer, number) in list(live.items()):
            try:
                if settle_s:
                    time.sleep(settle_s)
                times[impl].append(timer(number))
            except Exception as e:  # noqa: BLE001
                rows[impl]["error"] = short_error(e)
                del live[impl]
    for impl, (runner, _, _) in live.items():
        row = rows[impl]
        row.update(summary(times[impl]))
        try:
            if runner.forward_with_grad is not None:
                row["saved_bytes"] = saved_activation_bytes(runner.forward_with_grad, runner.exclude)
                row["saved_bytes_per_sample"] = row["saved_bytes"] / case.batch
            if runner.torch_memory:
                row["peak_bytes"] = peak_bytes(runner.fn, device)
        except Exception as e:  # noqa: BLE001
            row["memory_error"] = short_error(e)
    add_ratios(rows)
    for impl in impls:
        r = rows[impl]
        if r["error"] is None:
            vs_ort = f", x{fmt_ratio(r['speedup_vs_onnxruntime'])} vs {ORT}" if r["speedup_vs_onnxruntime"] else ""
            log(f"    {impl:<11} {fmt_time(r['median_s'])} (IQR {fmt_time(r['iqr_s'])}, {r['samples']} x "
                f"{r['block_calls']} calls)  x{fmt_ratio(r['speedup_vs_stock'])} vs stock{vs_ort}")
    return [rows[i] for i in impls]


def add_ratios(rows: dict[str, dict]) -> None:
    """Speedups and memory ratio of each row of one group against its "stock" / "compile" /
    "onnxruntime" rows, plus GFLOP/s and GB/s where the op defines its work."""
    stock = rows.get("stock", {}).get("median_s")
    comp = rows.get("compile", {}).get("median_s")
    ort = rows.get(ORT, {}).get("median_s")
    stock_saved = rows.get("stock", {}).get("saved_bytes")
    stock_min = rows.get("stock", {}).get("min_s")
    for row in rows.values():
        med = row.get("median_s")
        row["speedup_vs_stock"] = stock / med if med and stock else None
        row["speedup_vs_compile"] = comp / med if med and comp else None
        row["speedup_vs_onnxruntime"] = ort / med if med and ort else None
        # Ratio of the fastest samples: less sensitive to other processes on a shared machine.
        row["speedup_vs_stock_of_min"] = stock_min / row["min_s"] if row.get("min_s") and stock_min else None
        saved = row.get("saved_bytes")
        row["memory_ratio_vs_stock"] = (stock_saved / saved if saved else None) if stock_saved and saved is not None \
            else None
        if med and row.get("flops"):
            row["gflops"] = row["flops"] / med / 1e9
        if med and row.get("min_bytes"):
            row["gbps"] = row["min_bytes"] / med / 1e9
