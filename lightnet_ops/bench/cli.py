"""``python -m lightnet_ops.bench`` / ``lightnet-bench``: choose device, backends and cases, measure
every (case, mode) group, print the table and the targets, write the report files.

Results go to ``bench-results/`` (at the root of a source checkout, else under the current
directory; git-ignored) unless ``--out`` names another folder; ``--update-reference`` writes the
committed reference results under ``benchmarks/results/`` instead, and only for a full run.

``--sweep`` measures the shape sweep (``sweep.py``) instead of the fixed cases and writes
``sweep_<device>.json`` / ``sweep_<device>.md``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Optional

import torch

import lightnet_ops as lo

from .cases import CASES, MODES, select_cases
from .environment import REPO_ROOT, device_info, device_slug, git, in_source_checkout, load_average, version
from .measure import measure_group
from . import ops
from .ops import OPS, ORT, PEERS, default_backends
from .report import format_table, format_targets, short_error, write_results
from .sweep import (SWEEP_FULL, SWEEP_QUICK, SWEEP_SEED, format_summary, format_sweep_table, run_sweep, summarize,
                    summary_rows, sweep_cases, sweep_impls)
from .targets import TARGETS_FILE, check_targets, load_targets
from .timing import FULL, QUICK, copy_bandwidth

DESCRIPTION = "Benchmark harness: fused lightnet_ops backends against stock PyTorch and ``torch.compile``."
#: The committed reference results, written only with --update-reference.
REFERENCE_OUT = os.path.join(REPO_ROOT, "benchmarks", "results")
#: Where a run writes by default: an untracked, git-ignored folder.
DEFAULT_OUT = os.path.join(REPO_ROOT if in_source_checkout() else os.getcwd(), "bench-results")
KNOWN_BACKENDS = ("cpu", "cuda", "triton", "reference") + PEERS + (ORT,)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line of lightnet-bench."""
    p = argparse.ArgumentParser(prog="lightnet-bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the subset of cases marked quick, short measurements")
    p.add_argument("--sweep", action="store_true",
                   help="the shape sweep instead of the fixed cases: stock against the first backend (or every "
                        "backend named with --backends), fwd and fwd+bwd; with --quick, a few small shapes")
    p.add_argument("--cases", nargs="+", metavar="CASE", help="case names or patterns (conv*); see --list")
    p.add_argument("--backends", nargs="+", metavar="NAME",
                   help="lightnet_ops backends and peers (stock, compile, onnxruntime); default: all this "
                        "install has")
    p.add_argument("--modes", nargs="+", choices=MODES, help="default: every mode of each case")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch.get_num_threads())")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--no-onnxruntime", action="store_true", help="skip the ONNX Runtime peer")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", default=None,
                     help=f"results directory (default: {os.path.relpath(DEFAULT_OUT)}, not tracked by git)")
    out.add_argument("--update-reference", action="store_true",
                     help="write the committed reference results in benchmarks/results/ (a full run of every "
                          "case: not with --quick, --cases or --modes)")
    p.add_argument("--targets", metavar="FILE", default=None,
                   help="speed targets to check (JSON; default: the targets.json shipped with lightnet_ops.bench)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG chart")
    p.add_argument("--list", action="store_true", help="list the cases and backends, then exit")
    return p.parse_args(argv)


def output_dir(args: argparse.Namespace) -> str:
    """The folder a run writes to; raises ValueError when --update-reference cannot be honoured."""
    if not args.update_reference:
        return args.out or DEFAULT_OUT
    partial = [flag for flag, on in (("--quick", args.quick), ("--cases", args.cases), ("--modes", args.modes))
               if on]
    if partial:
        raise ValueError(f"--update-reference replaces the committed results of a full run; drop {', '.join(partial)}")
    if not in_source_checkout():
        raise ValueError(f"--update-reference needs a source checkout ({REPO_ROOT} has no benchmarks/ folder)")
    return REFERENCE_OUT


def _versions() -> dict:
    return dict(torch=torch.__version__, triton=version("triton"), lightnet_ops=lo.__version__,
                python=platform.python_version(), onnxruntime=version("onnxruntime"), onnx=version("onnx"))


def sweep_main(args: argparse.Namespace, argv: Optional[list[str]], device: torch.device, backends: list[str],
               threads: int, targets: tuple, out_dir: str, log) -> int:
    """--sweep: measures the sweep's shapes, prints the table, the summaries and the targets, and
    writes sweep_<device>[_quick].json / .md."""
    kind = device.type
    fused = sweep_impls(backends, bool(args.backends), PEERS + (ORT,))
    if fused is None:
        print(f"--sweep needs a lightnet_ops backend among {backends}", file=sys.stderr)
        return 2
    cases = sweep_cases(args.quick)
    modes = [m for m in (args.modes or ("fwd", "fwd+bwd")) if m in ("fwd", "fwd+bwd")]
    if not modes:
        print("--sweep measures the modes fwd and fwd+bwd", file=sys.stderr)
        return 2
    settings = SWEEP_QUICK if args.quick else SWEEP_FULL
    info = device_info(device)
    load_before = load_average()
    log(f"lightnet_ops sweep on {info['name']} ({kind}, {threads} threads): {len(cases)} shapes x {len(modes)} modes, "
        f"stock vs {', '.join(fused)}{' (quick)' if args.quick else ''}; load average {load_before}")
    if kind == "cpu" and load_before and load_before[0] > (os.cpu_count() or 1):
        log(f"warning: load average {load_before[0]:.1f} exceeds the {os.cpu_count()} CPUs; ratios will be noisy")
    rows, elapsed = run_sweep(cases, modes, fused, device, threads, settings, log)
    summary = summarize(rows)
    print(format_sweep_table(rows))
    print(f"\nsweep summary (fused speed / stock speed; {len(cases)} shapes):")
    print(format_summary(summary))
    checked = check_targets(rows + summary_rows(summary), kind, targets)
    if checked:
        held = sum(t["holds"] for t in checked)
        print(f"\nspeed targets measured in this run: {held} of {len(checked)} hold; missed:")
        print(format_targets([t for t in checked if not t["holds"]]) or "  none")
    meta = dict(
        device=info, threads=threads, quick=args.quick, sweep_seed=SWEEP_SEED, shapes=len(cases), modes=modes,
        fused_backends=fused, argv=sys.argv[1:] if argv is None else list(argv),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git("rev-parse", "HEAD"), git_dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
        versions=_versions(), settings=asdict(settings), elapsed_s=elapsed, load_average_before=load_before,
        load_average_after=load_average(),
        notes=["speedup_vs_stock = stock median per-call time / backend median, interleaved in one process",
               "fwd = inference under torch.no_grad(); fwd+bwd = forward + torch.autograd.grad of input, weight, "
               "bias", "summary mode 'all' pools fwd and fwd+bwd"])
    stem = "sweep_" + device_slug(info) + ("_quick" if args.quick else "")
    os.makedirs(out_dir, exist_ok=True)
    json_path, md_path = os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".md")
    with open(json_path, "w") as f:
        json.dump(dict(meta=meta, summary=summary, rows=rows, targets=checked), f, indent=1)
    with open(md_path, "w") as f:
        f.write(f"Shape sweep on {info['name']} ({kind}, {threads} threads), torch {torch.__version__}, commit "
                f"{(meta['git_commit'] or '?')[:10]}, {meta['date']}\n\n```\n{format_summary(summary)}\n```\n\n")
        f.write(format_sweep_table(rows, markdown=True) + "\n")
    log(f"\nwrote {os.path.relpath(json_path)}, {os.path.relpath(md_path)} ({elapsed:.0f} s)")
    return 0


def _device(choice: str) -> Optional[torch.device]:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        return None
    return torch.device("cuda", torch.cuda.current_device())


def main(argv: Optional[list[str]] = None) -> int:
    """Runs the benchmark; returns the process exit status."""
    args = parse_args(argv)
    device = _device(args.device)
    if device is None:
        print("--device cuda: no CUDA GPU is visible", file=sys.stderr)
        return 2
    kind = device.type
    backends = list(args.backends) if args.backends else default_backends(kind)
    if kind == "cpu" and not args.backends and not args.no_onnxruntime and ops.ort_missing() == ["onnx"]:
        print("note: onnxruntime is installed but torch.onnx.export needs the onnx package; the ONNX Runtime "
              "peer is left out (pip install onnx)", file=sys.stderr)
    if args.no_compile:
        backends = [b for b in backends if b != "compile"]
    if args.no_onnxruntime:
        backends = [b for b in backends if b != ORT]
    unknown = [b for b in backends if b not in KNOWN_BACKENDS]
    if unknown:
        print(f"unknown backend(s) {unknown}; choose from {', '.join(KNOWN_BACKENDS)}", file=sys.stderr)
        return 2
    if args.sweep and args.cases:
        print("--sweep measures its own shapes; --cases selects fixed cases (use one or the other)", file=sys.stderr)
        return 2
    if args.list:
        print(f"device: {kind}; backends: {' '.join(backends)}")
        if args.sweep:
            for c in sweep_cases(args.quick):
                print(f"  {c.name}")
            return 0
        for c in CASES:
            q = f" quick on {','.join(c.quick)}" if c.quick else ""
            print(f"  {c.name:<30} [{','.join(c.devices)}{q}] modes {'/'.join(c.modes)}: {c.description}")
        return 0
    try:
        out_dir = output_dir(args)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        targets = load_targets(args.targets)
    except (OSError, ValueError) as e:
        if args.targets:
            print(f"--targets: {short_error(e)}", file=sys.stderr)
            return 2
        log(f"warning: no speed targets checked ({TARGETS_FILE}: {short_error(e)})")
        targets = ()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if args.sweep:
        return sweep_main(args, argv, device, backends, threads, targets, out_dir, log)
    cases = select_cases(kind, args.cases, args.quick)
    settings = QUICK if args.quick else FULL
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    info = device_info(device)

    groups = [(c, m) for c in cases for m in c.modes if not args.modes or m in args.modes]
    log(f"lightnet_ops bench on {info['name']} ({kind}, {threads} threads): {len(groups)} case/mode groups x "
        f"{len(backends)} backends [{', '.join(backends)}]{' (quick)' if args.quick else ''}")
    load_before = load_average()
    if kind == "cpu" and load_before and load_before[0] > (os.cpu_count() or 1):
        log(f"warning: load average {load_before[0]:.1f} exceeds the {os.cpu_count()} CPUs; other processes are "
            f"competing for the cores and CPU timings will be noisy (compare ratios, not absolute times)")
    t_start = time.perf_counter()
    bw = None
    try:
        bw = copy_bandwidth(device, threads, (256 if kind == "cuda" else 64) * 2**20)
        log(f"copy bandwidth: {bw['gbps']:.1f} GB/s (read+write, {bw['bytes'] >> 20} MiB dst.copy_(src))")
    except Exception as e:  # noqa: BLE001
        log(f"copy bandwidth measurement failed: {short_error(e)}")
    rows: list[dict] = []
    for i, (case, mode) in enumerate(groups, 1):
        log(f"[{i}/{len(groups)}] {case.name} {mode} ({case.dtype}, batch {case.batch})")
        impls = [b for b in backends if OPS[case.op].supports(case, b, mode)
                 and not (b == "compile" and args.quick and mode == "fwd")]
        rows += measure_group(case, mode, impls, device, threads, settings, log)
    elapsed = time.perf_counter() - t_start
    if bw:
        for r in rows:
            if r.get("gbps"):
                r["fraction_of_copy_bandwidth"] = r["gbps"] / bw["gbps"]

    print(format_table(rows))
    checked = check_targets(rows, kind, targets)
    if checked:
        print("\nspeed targets measured in this run:")
        print(format_targets(checked))
    meta = dict(
        device=info, threads=threads, quick=args.quick, argv=sys.argv[1:] if argv is None else list(argv),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=git("rev-parse", "HEAD"), git_dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
        versions=_versions(),
        backends=backends, lightnet_ops_backends=lo.backends(),
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
        triton_autotune=os.environ.get("LIGHTNET_OPS_TRITON_AUTOTUNE", "1"), copy_bandwidth=bw, elapsed_s=elapsed,
        settings=asdict(settings), load_average_before=load_before, load_average_after=load_average(),
        notes=["speedups are ratios of medians from the same run (round-robin sampling)",
               "fwd = inference under torch.no_grad(); fwd+bwd = forward + torch.autograd.grad of input, "
               "weight, bias with a fixed grad_output; step = zero_grad, forward, cross_entropy, backward, SGD",
               "saved_bytes = unique storages saved for backward (saved_tensors_hooks), params and input excluded",
               "peak_bytes: peak allocated during one call above the pre-call level (CUDA: "
               "max_memory_allocated; CPU: running sum of the profiler's memory records)",
               "min_bytes/gbps: compulsory traffic (inputs read once, outputs written once) per call"],
    )
    result = dict(meta=meta, rows=rows, targets=checked)
    stem = device_slug(info) + ("_quick" if args.quick else "")
    title = f"{info['name']} ({kind}, {threads} threads)"
    written = write_results(
        result, out_dir, stem,
        table_title=f"{title}, torch {torch.__version__}, commit {(meta['git_commit'] or '?')[:10]}, {meta['date']}",
        plot_title=None if args.no_plot else f"lightnet_ops speedups over stock eager - {title}",
        log=log)
    log(f"\nwrote {', '.join(os.path.relpath(p) for p in written)} ({elapsed:.0f} s)")
    return 0
