"""Coverage report of ``lo.fuse`` over torchvision's classification models (weights=None, no download).

Run it as ``python -m lightnet_ops.fuse --report`` (or ``python -m lightnet_ops.fuse_report``)::

    python -m lightnet_ops.fuse --report                        # a representative model per family
    python -m lightnet_ops.fuse --report --models resnet18,vgg11_bn --size 224
    python -m lightnet_ops.fuse --report --models all --out bench-results/fuse-all

For each model: the chains ``lo.fuse(model.eval())`` found, fused and left alone (with the reason the
pattern checks gave), the output's max difference against the original in float32 and float64, the
CPU inference time at batch 1 and 8, fused vs original (median of interleaved calls in one process,
no_grad), and each chain timed alone, fused vs stock (the ``guard_input`` timing of ``lo.fuse``),
which names the chains whose fused form is slower. Writes ``fuse_report.md`` and ``fuse_report.json``
to ``--out`` (default ``bench-results/fuse-report``, ignored by git).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .fuse import fuse as _fuse_fn

#: One model per family with Conv -> (BN) -> ReLU -> MaxPool chains or none, small enough to keep the
#: default run within a few minutes on a laptop-class CPU.
DEFAULT_MODELS = (
    "alexnet", "vgg11_bn", "resnet18", "densenet121", "squeezenet1_0", "googlenet", "inception_v3",
    "shufflenet_v2_x1_0",
)
#: The smallest input side each family accepts (others work from 32).
MIN_SIZE = {"inception_v3": 75, "googlenet": 32, "alexnet": 63}


def _classification_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _build(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """torchvision model `name`, weights=None, eval mode, seeded init (deterministic across runs)."""
    import torchvision

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GoogLeNet / Inception announce their init scheme
        model = torchvision.models.get_model(name, weights=None)
    return model.to(dtype).eval()


def _max_diff(a: Any, b: Any) -> tuple[float, float]:
    """(max |a - b|, max |b|) over the model's output (a tensor, or the first tensor of a tuple)."""
    if isinstance(a, (tuple, list)):
        a, b = a[0], b[0]
    return (a - b).abs().max().item(), b.abs().max().item()


def _time_interleaved(fns: Sequence[Callable[[], Any]], budget_s: float, min_rounds: int = 3,
                      max_rounds: int = 25) -> list[dict[str, float]]:
    """Median and min seconds per call of each function, calls interleaved in alternating order."""
    for f in fns:  # warm-up
        f()
    start = time.perf_counter()
    for f in fns:
        f()
    one = max(time.perf_counter() - start, 1e-6)
    rounds = int(min(max(budget_s / one, min_rounds), max_rounds))
    times: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [{"median_ms": statistics.median(t) * 1e3, "min_ms": min(t) * 1e3, "rounds": rounds} for t in times]


def _chain_rows(chains: Sequence[Any], fused: bool) -> list[dict[str, Any]]:
    return [{"kind": c.kind, "names": list(c.names), "where": c.where, "fused": fused, "reason": c.reason,
             "times_us": None if c.times is None else [round(c.times[0] * 1e6, 1), round(c.times[1] * 1e6, 1)]}
            for c in chains]


def report_model(name: str, size: int, batches: Sequence[int] = (1, 8), time_budget_s: float = 2.0,
                 chain_times: bool = True, backend: str = "auto") -> dict[str, Any]:
    """Fuse one torchvision model and measure it (see the module docstring). Returns a JSON-able dict."""
    size = max(size, MIN_SIZE.get(name, 32))
    row: dict[str, Any] = {"model": name, "size": size}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, size, size, generator=gen)
    try:
        model = _build(name)
    except Exception as e:  # noqa: BLE001 - a model that does not build offline is reported, not fatal
        row["error"] = f"build: {type(e).__name__}: {e}"
        return row
    t0 = time.perf_counter()
    fused = _fuse_fn(model, backend=backend)
    row["fuse_s"] = round(time.perf_counter() - t0, 3)
    row["chains"] = _chain_rows(fused.fused_chains, True) + _chain_rows(fused.skipped_chains, False)
    row["found"] = len(row["chains"])
    row["fused"] = len(fused.fused_chains)
    row["kinds"] = sorted({c.kind for c in fused.fused_chains})
    with torch.no_grad():
        row["maxdiff_f32"] = _max_diff(fused(x), model(x))
    # float64: the original's output first, then fuse it in place (no second float64 copy in memory)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        y64 = model64(x.double())
        fused64 = _fuse_fn(model64, inplace=True, backend=backend)
        row["maxdiff_f64"] = _max_diff(fused64(x.double()), y64)
    del model64, fused64, y64
    if chain_times:  # each candidate chain alone at its batch-1 shape, fused vs stock (nothing left out)
        timed = _fuse_fn(model, backend=backend, guard_input=x[:1], guard_ratio=float("inf"))
        row["chain_times"] = _chain_rows(timed.fused_chains, True)
        row["slower_chains"] = [c for c in row["chain_times"] if c["times_us"] and c["times_us"][0] > c["times_us"][1]]
        del timed
    row["time"] = {}
    for batch in batches:
        xb = torch.randn(batch, 3, size, size, generator=gen)
        with torch.no_grad():
            orig, fsd = _time_interleaved([lambda: model(xb), lambda: fused(xb)], time_budget_s)
        row["time"][str(batch)] = {"original": orig, "fused": fsd, "speedup": orig["median_ms"] / fsd["median_ms"],
                                   "speedup_min": orig["min_ms"] / fsd["min_ms"]}
    return row


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _fmt_diff(d: Optional[Sequence[float]]) -> str:
    return "—" if not d else f"{d[0]:.1e} (rel {d[0] / max(d[1], 1e-30):.0e})"


def to_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# lo.fuse coverage over torchvision classification models",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"load average at start {m['load_avg']}, {m['date']}. Models built with weights=None, eval mode, "
        "float32; times are medians of interleaved no_grad calls in one process (CPU); the speedup in "
        "brackets compares the fastest calls, less sensitive to other load on the machine. A model with "
        "nothing fused runs unchanged, so its speedup shows the noise of the measurement.",
        "",
        "| model | input | chains found | fused | left alone | max abs diff f32 | max abs diff f64 "
        "| batch 1 ms orig / fused | speedup | batch 8 ms orig / fused | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        if "error" in r:
            lines.append(f"| {r['model']} | — | error: {r['error']} | | | | | | | | |")
            continue
        cells = [r["model"], str(r["size"]), str(r["found"]), str(r["fused"]), str(r["found"] - r["fused"]),
                 _fmt_diff(r["maxdiff_f32"]), _fmt_diff(r["maxdiff_f64"])]
        for b in ("1", "8"):
            t = r["time"].get(b)
            cells += ["—", "—"] if t is None else [
                f"{t['original']['median_ms']:.1f} / {t['fused']['median_ms']:.1f}",
                f"{t['speedup']:.2f}x (min {t['speedup_min']:.2f}x)"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Chains", ""]
    for r in result["models"]:
        if "error" in r or not r["chains"]:
            continue
        lines.append(f"### {r['model']}")
        times = {tuple(c["names"]): c["times_us"] for c in r.get("chain_times", [])}
        for c in r["chains"]:
            chain = " -> ".join(c["names"])
            t = times.get(tuple(c["names"]))
            timing = "" if not t else f" — alone at batch 1: fused {t[0]:.0f} us, stock {t[1]:.0f} us" + (
                " (fused slower)" if t[0] > t[1] else "")
            status = "fused" if c["fused"] else f"left alone: {c['reason']}"
            lines.append(f"- `{c['kind']}` {chain} ({c['where']}): {status}{timing}")
        lines.append("")
    none = [r["model"] for r in result["models"] if "error" not in r and not r["chains"]]
    if none:
        lines += [f"No candidate chain in: {', '.join(none)}.", ""]
    return "\n".join(lines)


def run(models: Sequence[str], size: int, out: Path, batches: Sequence[int] = (1, 8), time_budget_s: float = 2.0,
        chain_times: bool = True, timing: bool = True, backend: str = "auto",
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Report on `models`; writes fuse_report.md / fuse_report.json under `out` and returns the result."""
    result: dict[str, Any] = {"machine": machine(), "size": size, "models": []}
    for name in models:
        t0 = time.perf_counter()
        row = report_model(name, size, batches if timing else (), time_budget_s, chain_times and timing, backend)
        result["models"].append(row)
        log(f"{name}: {row.get('fused', 0)}/{row.get('found', 0)} chains fused"
            + (f", error {row['error']}" if "error" in row else "") + f" ({time.perf_counter() - t0:.1f} s)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuse_report.json").write_text(json.dumps(result, indent=1))
    (out / "fuse_report.md").write_text(to_markdown(result))
    log(f"wrote {out / 'fuse_report.md'} and {out / 'fuse_report.json'}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightnet_ops.fuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true", help="run the coverage report (required)")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated torchvision model names, or 'all' (every classification model)")
    parser.add_argument("--size", type=int, default=112, help="input height = width (default 112)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/fuse-report"))
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timing per model and batch size")
    parser.add_argument("--no-time", action="store_true", help="only chains and differences, no timing")
    parser.add_argument("--no-chain-times", action="store_true", help="skip timing each chain alone")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    if not args.report:
        parser.error("nothing to do: pass --report")
    try:
        names = _classification_models() if args.models == "all" else [m for m in args.models.split(",") if m]
    except ImportError:
        parser.error("the report builds torchvision models: pip install torchvision")
    run(names, args.size, args.out, time_budget_s=args.budget, chain_times=not args.no_chain_times,
        timing=not args.no_time, backend=args.backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
