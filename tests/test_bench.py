"""Tests of the benchmark harness (lightnet_ops.bench): one tiny case in --quick mode, run in
process, must print a table and write JSON (+ PNG) whose content is right: metadata, one row per
backend and mode, consistent timing statistics and ratios, and saved-activation bytes that match
what each implementation keeps for backward. Also: every op's setup gives the stock and fused
implementations the same problem, the targets file is valid and checked right, and results go to
the untracked folder unless the committed reference is asked for."""

from __future__ import annotations

import datetime
import fnmatch
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import lightnet_ops as lo
import lightnet_ops.bench as lb
import lightnet_ops.bench.ops as bench_ops
import lightnet_ops.bench.sweep as sweep

needs_extension = pytest.mark.skipif(not lo._ops.EXTENSION_AVAILABLE, reason="needs the built extension (cpu backend)")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--device", "cpu", "--cases", "conv1_b1", "--backends", "cpu", "reference", "stock",
            "--out", str(out)]
    rc = lb.main(argv)
    return rc, out


@needs_extension
def test_quick_run_writes_results(quick_run, capsys):
    rc, out = quick_run
    assert rc == 0
    data = json.loads((out / "results_cpu_quick.json").read_text())
    meta = data["meta"]
    assert meta["device"]["kind"] == "cpu" and meta["device"]["name"]
    assert meta["versions"]["torch"] == torch.__version__
    assert meta["versions"]["lightnet_ops"] == lo.__version__
    assert meta["threads"] == torch.get_num_threads() and meta["quick"] is True
    datetime.datetime.fromisoformat(meta["date"])
    assert meta["copy_bandwidth"]["gbps"] > 0

    rows = data["rows"]
    assert {(r["backend"], r["mode"]) for r in rows} == {
        (b, m) for b in ("cpu", "reference", "stock") for m in ("fwd", "fwd+bwd")
    }
    by = {(r["backend"], r["mode"]): r for r in rows}
    for r in rows:
        assert r["error"] is None and r["case"] == "conv1_b1" and r["batch"] == 1
        assert r["samples"] >= lb.QUICK.min_samples
        assert 0 < r["min_s"] <= r["q1_s"] <= r["median_s"] <= r["q3_s"] <= r["max_s"]
        stock = by[("stock", r["mode"])]["median_s"]
        assert r["speedup_vs_stock"] == pytest.approx(stock / r["median_s"])
        assert r["speedup_vs_compile"] is None  # compile was not asked for
    # conv1: 1->6 channels, 32x32 -> conv 30x30 -> pool 15x15, batch 1.
    # Stock keeps the ReLU output (float32, 6*30*30) and the pool's int64 indices (6*15*15);
    # the fused op keeps a uint8 argmax (6*15*15); input and weight are excluded.
    assert by[("stock", "fwd+bwd")]["saved_bytes"] == 6 * 30 * 30 * 4 + 6 * 15 * 15 * 8
    for b in ("cpu", "reference"):
        assert by[(b, "fwd+bwd")]["saved_bytes"] == 6 * 15 * 15
        assert by[(b, "fwd+bwd")]["memory_ratio_vs_stock"] == pytest.approx(24.0)
    assert all(r["saved_bytes"] is None for r in rows if r["mode"] == "fwd")
    assert by[("cpu", "fwd")]["flops"] == 2 * 6 * 30 * 30 * 9
    # Peak memory (profiler allocation records): the fused forward allocates only its output; with
    # autograd also the uint8 argmax, then the three gradients plus the backward's small partial
    # weight/bias sums (a few KiB here), and no conv-sized temporaries.
    out_bytes, argmax_bytes = 6 * 15 * 15 * 4, 6 * 15 * 15
    grads_bytes = 32 * 32 * 4 + 6 * 9 * 4 + 6 * 4
    assert by[("cpu", "fwd")]["peak_bytes"] == out_bytes
    needed = out_bytes + argmax_bytes + grads_bytes
    assert needed <= by[("cpu", "fwd+bwd")]["peak_bytes"] <= needed + 8 * 1024
    assert by[("stock", "fwd")]["peak_bytes"] >= 2 * 6 * 30 * 30 * 4  # conv output and ReLU output
    assert by[("stock", "fwd+bwd")]["peak_bytes"] > by[("cpu", "fwd+bwd")]["peak_bytes"]

    png = (out / "speedups_cpu_quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "conv1_b1" in (out / "table_cpu_quick.md").read_text()


@needs_extension
def test_failing_backend_is_recorded_and_run_continues(tmp_path, capsys):
    # The cuda backend cannot run CPU tensors: its rows carry the error, the others are measured.
    # A --targets file is checked against the run: stock against itself measures exactly 1; the
    # failed backend's target is left out.
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps({"targets": [
        {"device": "cpu", "case": "linear*", "mode": "fwd", "backends": [b], "versus": "stock", "at_least": 1.0}
        for b in ("stock", "cuda")]}))
    rc = lb.main(["--quick", "--device", "cpu", "--cases", "linear_576x120_b256", "--modes", "fwd",
                  "--backends", "cuda", "stock", "--out", str(tmp_path), "--no-plot", "--targets", str(targets)])
    assert rc == 0
    data = json.loads((tmp_path / "results_cpu_quick.json").read_text())
    assert data["targets"] == [dict(case="linear_576x120_b256", mode="fwd", backend="stock", versus="stock",
                                    target=1.0, measured=1.0, holds=True)]
    rows = data["rows"]
    assert [r["backend"] for r in rows] == ["cuda", "stock"]
    assert "cuda" in rows[0]["error"] and rows[0].get("median_s") is None
    assert rows[1]["error"] is None and rows[1]["median_s"] > 0
    assert not (tmp_path / "speedups_cpu_quick.png").exists()
    printed = capsys.readouterr().out
    assert "error:" in printed and "linear_576x120_b256" in printed
    assert "holds   linear_576x120_b256 fwd stock vs stock: 1.00" in printed


def test_list_and_case_selection(capsys):
    assert lb.main(["--list", "--device", "cpu"]) == 0
    listed = capsys.readouterr().out
    for case in lb.CASES:
        assert case.name in listed
    cpu_cases = [c.name for c in lb.select_cases("cpu")]
    assert "vgg_b8_bf16" not in cpu_cases and "vgg_b8" in cpu_cases  # half precision only on CUDA
    assert [c.name for c in lb.select_cases("cpu", ["conv2*"])] == ["conv2_b1", "conv2_b64", "conv2_b256", "conv2_b8"]
    assert set(c.name for c in lb.select_cases("cpu", quick=True)) < set(cpu_cases)
    with pytest.raises(SystemExit):
        lb.select_cases("cpu", ["no_such_case"])


def test_saved_activation_bytes_counts_unique_storages():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)

    def forward():
        h = torch.relu(x @ w)  # mm saves x and w (excluded); relu saves h (4*8 floats)
        return (h * h).sum()   # mul saves h twice: same storage, counted once

    assert lb.saved_activation_bytes(forward, [x, w]) == 4 * 8 * 4
    assert lb.saved_activation_bytes(forward, []) == 4 * 8 * 4 + x.numel() * 4 + w.numel() * 4


def test_profiler_noise_is_dropped_and_other_stderr_kept(capfd):
    # The CPU peak-memory measurement starts the profiler once per row; its C++ side writes a
    # "USDT:" trace on every start / stop. Those lines are dropped, anything else comes through.
    with lb.quiet_profiler_logs():
        os.write(2, b"USDT:2026-11-27 13:08:16 1:1 SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        os.write(2, b"a real warning\n")
        os.write(2, b"ERROR:2026-11-27 13:08:16 1:1 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n")
    err = capfd.readouterr().err
    assert "a real warning" in err
    assert "USDT" not in err and "gpuGetDeviceCount" not in err


@pytest.mark.parametrize("case", [
    lb.Case("tiny_conv", "conv", 2, "tiny conv", lb.ConvShape(3, 4, 9, 8, 3, stride=1, padding=1, pool_kernel=3,
                                                              pool_stride=2)),
    lb.Case("tiny_linear", "linear", 5, "tiny linear", lb.LinearShape(7, 6)),
    lb.Case("tiny_lightnet", "lightnet", 3, "tiny LightNet"),
], ids=lambda c: c.name)
def test_every_op_gives_stock_and_fused_the_same_problem(case):
    # One description per op builds the inputs of every implementation: the fused backend must see
    # the very problem stock sees (same seeded tensors, same arguments), in every mode of the op.
    backend = "cpu" if lo._ops.EXTENSION_AVAILABLE else "reference"
    for mode in case.modes:
        stock = lb.build_runner(case, "stock", mode, "cpu")
        fused = lb.build_runner(case, backend, mode, "cpu")
        assert len(stock.exclude) == len(fused.exclude)
        for a, b in zip(stock.exclude, fused.exclude):
            assert torch.equal(a, b)
        got, want = fused.fn(), stock.fn()
        got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
        assert (stock.forward_with_grad is None) == (mode == "fwd")
    with pytest.raises(ValueError, match="does not apply"):
        lb.build_runner(case, "stock", "step" if case.op != "lightnet" else "fwd+bwd", "cpu")


def test_op_cost_counts_the_problem():
    linear = lb.Case("l", "linear", 5, "", lb.LinearShape(7, 6))
    assert lb.build_runner(linear, "stock", "fwd", "cpu").flops == 2 * 5 * 7 * 6
    assert lb.build_runner(linear, "stock", "fwd", "cpu").min_bytes == 4 * (5 * 7 + 6 * 7 + 6 + 5 * 6)
    assert lb.build_runner(linear, "stock", "fwd+bwd", "cpu").flops == 3 * 2 * 5 * 7 * 6
    shape = lb.ConvShape(3, 4, 9, 8, 3, stride=2, padding=1, dilation=2, pool_kernel=3, pool_stride=1)
    y = torch.nn.functional.conv2d(torch.zeros(1, 3, 9, 8), torch.zeros(4, 3, 3, 3), None, 2, 1, 2)
    assert shape.conv_out == tuple(y.shape[2:])
    assert shape.pool_out == tuple(torch.nn.functional.max_pool2d(y, 3, 1).shape[2:])
    conv = lb.Case("c", "conv", 2, "", shape)
    assert lb.build_runner(conv, "stock", "fwd", "cpu").flops == 2 * 2 * 4 * y.shape[2] * y.shape[3] * 3 * 9
    assert all(lb.build_runner(c, "stock", "fwd", "cpu").flops is None for c in lb.CASES if c.op == "lightnet")


def test_targets_file_names_real_cases_modes_and_backends():
    text = open(lb.TARGETS_FILE).read()
    assert "issue" not in text.lower()
    targets = lb.load_targets()
    assert {t.device for t in targets} == {"cpu", "cuda"}
    backends = {"cpu", "cuda", "triton", "reference"}
    sweep_names = [c.name for c in sweep.sweep_cases()]
    for t in targets:
        if t.case.startswith("sweep"):  # the sweep's shapes and its geometric-mean rows
            assert any(fnmatch.fnmatchcase(n, t.case) for n in sweep_names + [sweep.GEOMEAN_CASE]), t
            assert any(fnmatch.fnmatchcase(m, t.mode) for m in ("fwd", "fwd+bwd", "all")), t
        else:
            cases = [c for c in lb.select_cases(t.device, [t.case])]  # raises SystemExit for an unknown case
            assert any(fnmatch.fnmatchcase(m, t.mode) for c in cases for m in c.modes), t
        assert set(t.backends) <= backends, t
        assert t.versus in backends | {"stock", "compile", "memory", "onnxruntime"}, t
        assert t.at_least > 0, t


def test_check_targets_measures_each_kind_of_ratio(tmp_path):
    path = tmp_path / "targets.json"
    path.write_text(json.dumps({"targets": [
        {"device": "cpu", "case": "conv*", "mode": "fwd", "backends": ["cpu"], "versus": "stock", "at_least": 2.0},
        {"device": "cpu", "case": "conv1_b1", "mode": "*", "backends": ["cpu"], "versus": "memory", "at_least": 8},
        {"device": "cpu", "case": "*", "mode": "fwd", "backends": ["cpu"], "versus": "reference", "at_least": 1.5},
        {"device": "cuda", "case": "*", "mode": "*", "backends": ["cpu"], "versus": "stock", "at_least": 0.1},
    ]}))
    targets = lb.load_targets(str(path))

    def row(case, mode, backend, median, **kw):
        return dict(case=case, mode=mode, backend=backend, error=None, median_s=median, **kw)

    rows = [row("conv1_b1", "fwd", "cpu", 1.0, speedup_vs_stock=3.0), row("conv1_b1", "fwd", "reference", 1.2),
            row("conv2_b1", "fwd", "cpu", 1.0, speedup_vs_stock=1.5), row("conv2_b1", "fwd", "reference", 2.0),
            row("conv1_b1", "fwd+bwd", "cpu", 1.0, memory_ratio_vs_stock=24.0),
            row("vgg_b8", "fwd", "cpu", None, speedup_vs_stock=None) | {"error": "boom"}]
    got = [(t["case"], t["mode"], t["versus"], t["measured"], t["holds"]) for t in lb.check_targets(rows, "cpu", targets)]
    assert got == [("conv1_b1", "fwd", "stock", 3.0, True), ("conv2_b1", "fwd", "stock", 1.5, False),
                   ("conv1_b1", "fwd+bwd", "memory", 24.0, True),
                   ("conv1_b1", "fwd", "reference", pytest.approx(1.2), False),
                   ("conv2_b1", "fwd", "reference", 2.0, True)]
    path.write_text(json.dumps({"targets": [{"device": "cpu", "case": "x", "mode": "fwd"}]}))
    with pytest.raises(ValueError, match="targets.json"):
        lb.load_targets(str(path))


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=lb.REPO_ROOT, capture_output=True, text=True)


def test_results_go_to_an_ignored_folder_unless_the_reference_is_asked_for():
    assert lb.output_dir(lb.parse_args([])) == lb.DEFAULT_OUT
    assert lb.output_dir(lb.parse_args(["--quick", "--out", "/x"])) == "/x"
    assert lb.output_dir(lb.parse_args(["--update-reference"])) == lb.REFERENCE_OUT
    assert lb.REFERENCE_OUT == os.path.join(lb.REPO_ROOT, "benchmarks", "results")
    for partial in (["--quick"], ["--cases", "conv1_b1"], ["--modes", "fwd"]):
        with pytest.raises(ValueError, match="--update-reference"):
            lb.output_dir(lb.parse_args(["--update-reference", *partial]))
    with pytest.raises(SystemExit):
        lb.parse_args(["--update-reference", "--out", "/x"])
    if _git("rev-parse", "--is-inside-work-tree").returncode != 0:
        pytest.skip("not a git checkout: the ignore rules cannot be checked")
    # The default folder is ignored by git; the reference results are tracked files.
    assert lb.DEFAULT_OUT == os.path.join(lb.REPO_ROOT, "bench-results")
    probe = os.path.join(lb.DEFAULT_OUT, "results_cpu_quick.json")
    assert _git("check-ignore", "-q", probe).returncode == 0
    assert _git("ls-files", "--error-unmatch", os.path.join(lb.REFERENCE_OUT, "results_cpu.json")).returncode == 0


def test_update_reference_with_quick_is_refused_before_measuring(capsys):
    before = {f: os.stat(os.path.join(lb.REFERENCE_OUT, f)).st_mtime_ns for f in os.listdir(lb.REFERENCE_OUT)}
    assert lb.main(["--update-reference", "--quick", "--device", "cpu"]) == 2
    assert "--quick" in capsys.readouterr().err
    assert {f: os.stat(os.path.join(lb.REFERENCE_OUT, f)).st_mtime_ns for f in os.listdir(lb.REFERENCE_OUT)} == before


def test_update_reference_run_writes_the_reference_files(tmp_path, monkeypatch):
    # The whole run path with --update-reference: files named as the committed ones (no _quick),
    # written where REFERENCE_OUT points (a temporary folder here; one small case, short settings).
    import lightnet_ops.bench.cli as cli

    monkeypatch.setattr(cli, "REFERENCE_OUT", str(tmp_path))
    monkeypatch.setattr(cli, "FULL", lb.QUICK)
    monkeypatch.setattr(cli, "select_cases", lambda kind, patterns, quick: [lb.CASES_BY_NAME["conv1_b1"]])
    assert lb.main(["--update-reference", "--device", "cpu", "--backends", "stock", "--no-plot"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results_cpu.json", "table_cpu.md"]
    data = json.loads((tmp_path / "results_cpu.json").read_text())
    assert data["meta"]["quick"] is False and data["meta"]["argv"][0] == "--update-reference"
    assert [(r["case"], r["mode"]) for r in data["rows"]] == [("conv1_b1", "fwd"), ("conv1_b1", "fwd+bwd")]


def test_every_fused_op_is_benchmarked_by_bench_ops():
    # One OPS entry per contract, with its cases; benchmarks/bench_ops.py times every case of each.
    from lightnet_ops.ops import CONTRACTS

    benches = lb.fused_op_benches()
    assert list(benches) == list(CONTRACTS)
    for op, entry in benches.items():
        assert lb.OPS[entry].fused_op == op and any(c.op == entry for c in lb.OPS[entry].cases), op
    assert set(lb.CASES) == {c for bench in lb.OPS.values() for c in bench.cases}
    path = os.path.join(lb.REPO_ROOT, "benchmarks", "bench_ops.py")
    spec = importlib.util.spec_from_file_location("bench_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kind = module.DEVICE_KIND
    assert module.MATRIX == [(op, *p) for op, entry in benches.items() for p in lb.benchmark_matrix(entry, kind)]
    assert {op for op, *_ in module.MATRIX} == set(CONTRACTS)


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "lightnet_ops.bench", "--list", "--device", "cpu"], cwd=lb.REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(c.name in r.stdout for c in lb.CASES if "cpu" in c.devices)


def _load_script(name: str):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", name)
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_scripts_name_real_cuda_cases():
    # scripts/gpu_profile.py and scripts/gpu_check.sh name benchmark cases by string; a renamed case
    # would only show up as an error on a GPU machine, where device time is scarce.
    profile = _load_script("gpu_profile.py")
    for name in profile.DEFAULT_CASES:
        assert name in lb.CASES_BY_NAME and "cuda" in lb.CASES_BY_NAME[name].devices, name
    script = open(os.path.join(lb.REPO_ROOT, "scripts", "gpu_check.sh")).read()
    bench_args = script.split("GPU_CHECK_BENCH_ARGS:-", 1)[1].split("}", 1)[0].split()
    cases = bench_args[bench_args.index("--cases") + 1:]
    cases = cases[:next((i for i, a in enumerate(cases) if a.startswith("--")), len(cases))]
    assert cases and all(c in lb.CASES_BY_NAME and "cuda" in lb.CASES_BY_NAME[c].devices for c in cases), cases
    assert lb.parse_args(bench_args).cases == cases  # the default arguments parse


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_profile_without_a_gpu_says_so(capsys):
    profile = _load_script("gpu_profile.py")
    assert profile.main([]) == 1
    assert "no CUDA device" in capsys.readouterr().out


# --- small-batch cases, per-call cost, the ONNX Runtime peer, the shape sweep ---

FUSED = "cpu" if lo._ops.EXTENSION_AVAILABLE else "reference"


@pytest.fixture
def keep_threads():
    """Restores torch's thread count after a test that runs the harness with --threads."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)



def test_small_batch_inference_cases_are_listed_once():
    by = lb.CASES_BY_NAME
    for name in ("lightnet_b1", "lightnet_b8", "conv1_b8", "conv2_b8", "linear_576x120_b1", "linear_576x120_b8",
                 "linear_120x84_b1", "linear_120x84_b8", "linear_4096x4096_b1", "linear_4096x4096_b8"):
        assert by[name].modes == ("fwd",), name
    assert (by["linear_4096x4096_b1"].batch, by["linear_4096x4096_b8"].batch) == (1, 8)
    assert by["linear_4096x4096_b8"].shape == lb.LinearShape(4096, 4096)
    assert by["lightnet_b64"].modes == ("fwd", "step")  # only_modes narrows only where set
    keys = [lb.cases.case_key(c) for c in lb.CASES]
    assert len(keys) == len(set(keys)), "two cases measure the same problem"


@pytest.mark.parametrize("name", ["call_conv_fn", "call_conv_module", "call_linear_fn", "call_linear_module"])
def test_per_call_cases_time_one_stock_call_against_the_fused_call(name):
    # "stock" here is the FIRST op of the chain alone (F.conv2d / nn.Conv2d, F.linear / nn.Linear) on
    # the same tensors: the fused output is that output after ReLU (and the pool).
    case = lb.CASES_BY_NAME[name]
    assert case.modes == ("fwd",)
    stock, fused = lb.build_runner(case, "stock", "fwd", "cpu"), lb.build_runner(case, FUSED, "fwd", "cpu")
    for a, b in zip(stock.exclude, fused.exclude):
        assert torch.equal(a, b)
    want = torch.relu(stock.fn())
    if isinstance(case.shape, lb.ConvShape):
        assert stock.fn().shape == (1, 1, 2, 2)  # 1x1x4x4 input, 3x3 filter: F.conv2d only, no pool
        want = torch.nn.functional.max_pool2d(want, 2)
    else:
        assert stock.fn().shape == (1, 4)
    torch.testing.assert_close(fused.fn(), want)
    op = lb.OPS[case.op]
    assert not op.supports(case, "compile", "fwd") and not op.supports(case, "onnxruntime", "fwd")
    assert op.supports(case, "stock", "fwd") and op.supports(case, FUSED, "fwd")
    if case.op == "call_module":
        module = op.fused_module(case, FUSED)
        assert isinstance(module, (lo.Conv2dReLUMaxPool2d, lo.LinearReLU)) and module.backend == FUSED
    with pytest.raises(ValueError):
        lb.build_runner(case, "compile", "fwd", "cpu")


def test_run_leaves_out_the_peers_a_case_does_not_take(tmp_path, keep_threads):
    # compile is asked for, but the per-call case has no compile peer: no row, no error.
    rc = lb.main(["--quick", "--device", "cpu", "--cases", "call_linear_fn", "--backends", FUSED, "stock", "compile",
                  "--out", str(tmp_path), "--no-plot", "--targets", str(_no_targets(tmp_path)), "--threads", "1"])
    assert rc == 0
    rows = json.loads((tmp_path / "results_cpu_quick.json").read_text())["rows"]
    assert [(r["backend"], r["error"]) for r in rows] == [(FUSED, None), ("stock", None)]
    assert rows[0]["speedup_vs_stock"] == pytest.approx(rows[1]["median_s"] / rows[0]["median_s"])


def _no_targets(tmp_path):
    path = tmp_path / "no_targets.json"
    path.write_text(json.dumps({"targets": []}))
    return path


def test_onnxruntime_peer_is_optional(tmp_path, monkeypatch, keep_threads, capsys):
    # Without onnxruntime (or onnx, which the exporter needs) the peer is not a default, and naming it
    # gives an error row that says what is missing while the rest of the run is measured. A failing
    # export is reported the same way.
    monkeypatch.setattr(bench_ops, "ort_missing", lambda: ["onnx"])
    assert "onnxruntime" not in lb.default_backends("cpu")
    assert lb.main(["--list", "--device", "cpu"]) == 0
    assert "needs the onnx package" in capsys.readouterr().err
    monkeypatch.setattr(bench_ops, "ort_missing", lambda: ["onnxruntime", "onnx"])
    assert "onnxruntime" not in lb.default_backends("cpu")
    argv = ["--quick", "--device", "cpu", "--cases", "lightnet_b1", "--backends", "stock", "onnxruntime",
            "--out", str(tmp_path), "--no-plot", "--targets", str(_no_targets(tmp_path)), "--threads", "1"]
    assert lb.main(argv) == 0
    rows = json.loads((tmp_path / "results_cpu_quick.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["stock", "onnxruntime"]
    assert rows[0]["error"] is None and rows[0]["median_s"] > 0 and rows[0]["speedup_vs_onnxruntime"] is None
    assert "onnxruntime is not installed" in rows[1]["error"]

    monkeypatch.setattr(bench_ops, "ort_missing", lambda: [])
    assert "onnxruntime" in lb.default_backends("cpu") and "onnxruntime" not in lb.default_backends("cuda")

    def no_export(model, x):
        raise RuntimeError("torch.onnx.export failed (not installed: onnx; pip install onnx)")

    monkeypatch.setattr(bench_ops, "onnx_export", no_export)
    assert lb.main(argv) == 0
    rows = json.loads((tmp_path / "results_cpu_quick.json").read_text())["rows"]
    assert "not installed: onnx" in rows[1]["error"] and rows[0]["error"] is None
    model = lb.OPS["lightnet"]
    assert model.supports(lb.CASES_BY_NAME["lightnet_b1"], "onnxruntime", "fwd")
    assert not model.supports(lb.CASES_BY_NAME["lightnet_b64"], "onnxruntime", "step")
    assert not lb.OPS["conv"].supports(lb.CASES_BY_NAME["conv1_b1"], "onnxruntime", "fwd")


def test_onnxruntime_peer_runs_the_stock_model():
    pytest.importorskip("onnxruntime")
    case = lb.CASES_BY_NAME["lightnet_b8"]
    try:
        ort = lb.build_runner(case, "onnxruntime", "fwd", "cpu")
    except RuntimeError as e:  # onnxruntime without the packages torch.onnx.export needs
        pytest.skip(str(e))
    assert "onnxruntime" in lb.default_backends("cpu")
    assert not ort.torch_memory
    torch.testing.assert_close(ort.fn(), lb.build_runner(case, "stock", "fwd", "cpu").fn(), rtol=1e-4, atol=1e-5)


def test_table_has_the_onnxruntime_column_only_when_measured():
    row = dict(case="lightnet_b1", mode="fwd", backend="cpu", error=None, median_s=1e-4, speedup_vs_stock=2.0)
    assert "x onnxruntime" not in lb.format_table([row])
    text = lb.format_table([row | {"speedup_vs_onnxruntime": 0.5}], markdown=True)
    header, _, line = text.splitlines()
    assert header.split(" | ")[7] == "x onnxruntime" and line.split(" | ")[7] == "0.50"
    error = lb.format_table([row | {"speedup_vs_onnxruntime": 0.5}, row | {"error": "boom"}]).splitlines()[-1]
    assert "error: boom" in error


def test_sweep_shapes_are_seeded_and_cover_the_ranges():
    cases = sweep.sweep_cases()
    assert [c.name for c in cases] == [c.name for c in sweep.sweep_cases()]  # deterministic
    assert len(cases) >= 60 and len({c.name for c in cases}) == len(cases)
    fixed = {lb.cases.case_key(c) for c in lb.CASES}
    assert not any(lb.cases.case_key(c) in fixed for c in cases)
    convs = [c for c in cases if c.op == "conv"]
    linears = [c for c in cases if c.op == "linear"]
    assert len(convs) + len(linears) == len(cases) and len(linears) >= 20
    assert {c.shape.kernel for c in convs} == {1, 3, 5, 7}
    assert {(c.shape.pool_kernel, c.shape.pool_stride) for c in convs} == {(2, 2), (3, 2)}
    assert {c.shape.stride for c in convs} == {1, 2} and {c.shape.padding > 0 for c in convs} == {True, False}
    assert min(c.batch for c in convs) == 1 and max(c.batch for c in convs) == 256
    channels = [n for c in convs for n in (c.shape.in_channels, c.shape.out_channels)]
    assert min(channels) == 1 and max(channels) == 512
    assert min(c.shape.height for c in convs) == 4 and max(c.shape.height for c in convs) == 224
    assert min(c.batch for c in linears) == 1 and max(c.batch for c in linears) == 4096
    features = [n for c in linears for n in (c.shape.in_features, c.shape.out_features)]
    assert min(features) == 16 and max(features) == 4096
    for c in convs:  # shapes the stock ops accept, with the output sizes ConvShape predicts
        s = c.shape
        y = torch.nn.functional.conv2d(torch.empty(c.batch, s.in_channels, s.height, s.width, device="meta"),
                                       torch.empty(s.out_channels, s.in_channels, s.kernel, s.kernel, device="meta"),
                                       None, s.stride, s.padding)
        assert tuple(y.shape[2:]) == s.conv_out
        assert tuple(torch.nn.functional.max_pool2d(y, s.pool_kernel, s.pool_stride).shape[2:]) == s.pool_out
        assert min(s.pool_out) >= 1
    assert all(sweep.fwd_flops(c) <= sweep.MAX_FWD_FLOPS for c in cases)
    quick = sweep.sweep_cases(quick=True)
    assert {c.name for c in quick} < {c.name for c in cases}
    assert [c.op for c in quick] == ["conv"] * sweep.QUICK_PER_OP + ["linear"] * sweep.QUICK_PER_OP


def test_sweep_shapes_come_from_the_seed(monkeypatch):
    before = [c.name for c in sweep.sweep_cases()]
    monkeypatch.setattr(sweep, "SWEEP_SEED", sweep.SWEEP_SEED + 1)
    after = [c.name for c in sweep.sweep_cases()]
    assert after[:len(sweep.ANCHOR_CONVS)] == before[:len(sweep.ANCHOR_CONVS)]  # the anchors are not drawn
    assert after != before


def test_sweep_summary_of_known_ratios():
    def row(case, mode, backend, ratio):
        return dict(case=case, mode=mode, backend=backend, error=None if ratio else "boom", speedup_vs_stock=ratio)

    rows = [row("a", "fwd", "stock", 1.0), row("a", "fwd", "cpu", 0.5), row("b", "fwd", "cpu", 2.0),
            row("c", "fwd", "cpu", 8.0), row("a", "fwd+bwd", "cpu", 0.9), row("b", "fwd+bwd", "cpu", 0.94),
            row("c", "fwd+bwd", "cpu", None)]
    s = sweep.summarize(rows)["cpu"]
    assert set(s) == {"fwd", "fwd+bwd", "all"}
    assert s["fwd"]["geomean"] == pytest.approx(2.0) and s["fwd"]["cases"] == 3
    assert s["fwd"]["worst"] == dict(case="a", mode="fwd", ratio=0.5)
    assert s["fwd"]["below"]["count"] == 1
    assert [b["case"] for b in s["fwd+bwd"]["below"]["cases"]] == ["a", "b"]  # slowest first
    assert s["fwd+bwd"]["errors"] == 1 and s["fwd+bwd"]["cases"] == 2
    assert s["all"]["cases"] == 5 and s["all"]["below"]["count"] == 3
    assert s["all"]["geomean"] == pytest.approx((0.5 * 2 * 8 * 0.9 * 0.94) ** (1 / 5))
    assert s["fwd"]["geomean_of_min"] is None  # these rows have no fastest-block ratios
    rows[1]["speedup_vs_stock_of_min"], rows[2]["speedup_vs_stock_of_min"] = 0.9, 1.6
    s = sweep.summarize(rows)["cpu"]["fwd"]
    assert s["geomean_of_min"] == pytest.approx(1.2) and s["below_of_min"] == 1
    assert s["below"]["cases"] == [dict(case="a", mode="fwd", ratio=0.5, ratio_of_min=0.9)]
    # The geometric means are rows the target check reads like any ratio.
    targets = (lb.Target("cpu", sweep.GEOMEAN_CASE, "fwd", ("cpu",), "stock", 2.0),
               lb.Target("cpu", "*", "fwd+bwd", ("cpu",), "stock", 0.95))
    got = lb.check_targets(rows + sweep.summary_rows(sweep.summarize(rows)), "cpu", targets)
    assert [(t["case"], t["mode"], t["holds"]) for t in got] == [
        (sweep.GEOMEAN_CASE, "fwd", True), ("a", "fwd+bwd", False), ("b", "fwd+bwd", False),
        (sweep.GEOMEAN_CASE, "fwd+bwd", False)]
    text = sweep.format_summary(sweep.summarize(rows))
    assert "worst x0.50 (a fwd)" in text and "1 below x0.95" in text


def test_sweep_quick_run_writes_the_summary(tmp_path, capsys, keep_threads):
    # One thread: on a loaded machine, two OpenMP threads wait for each other at every parallel
    # region and the timings (not checked here) take many times longer.
    rc = lb.main(["--sweep", "--quick", "--device", "cpu", "--backends", "stock", FUSED, "--out", str(tmp_path),
                  "--threads", "1"])
    assert rc == 0
    data = json.loads((tmp_path / "sweep_cpu_quick.json").read_text())
    quick = sweep.sweep_cases(quick=True)
    assert data["meta"]["sweep_seed"] == sweep.SWEEP_SEED and data["meta"]["shapes"] == len(quick)
    assert data["meta"]["threads"] == 1 and data["meta"]["quick"] is True
    rows = data["rows"]
    assert [(r["case"], r["mode"], r["backend"]) for r in rows] == [
        (c.name, m, b) for c in quick for m in ("fwd", "fwd+bwd") for b in ("stock", FUSED)]
    stock = {(r["case"], r["mode"]): r for r in rows if r["backend"] == "stock"}
    ratios = {}
    for r in rows:
        assert r["error"] is None and 0 < r["min_s"] <= r["median_s"]
        assert r["blocks"] >= 3  # min_rounds, or 3 when a loaded machine stretches the group
        s = stock[(r["case"], r["mode"])]
        assert r["speedup_vs_stock"] == pytest.approx(s["median_s"] / r["median_s"])
        assert r["speedup_vs_stock_of_min"] == pytest.approx(s["min_s"] / r["min_s"])
        if r["backend"] == FUSED:
            ratios[(r["case"], r["mode"])] = r["speedup_vs_stock"]
    summary = data["summary"][FUSED]
    for mode in ("fwd", "fwd+bwd"):
        mine = {k: v for k, v in ratios.items() if k[1] == mode}
        assert summary[mode]["geomean"] == pytest.approx(sweep.geomean(list(mine.values())))
        worst = min(mine, key=mine.get)
        assert (summary[mode]["worst"]["case"], summary[mode]["worst"]["ratio"]) == (worst[0], mine[worst])
        assert summary[mode]["below"]["count"] == sum(v < 0.95 for v in mine.values())
    assert summary["all"]["geomean"] == pytest.approx(sweep.geomean(list(ratios.values())))
    # Every default sweep target was checked (the "cpu" targets name the cpu backend).
    if FUSED == "cpu":
        geo = {t["mode"]: t["measured"] for t in data["targets"] if t["case"] == sweep.GEOMEAN_CASE}
        assert geo == pytest.approx({m: summary[m]["geomean"] for m in ("fwd", "fwd+bwd", "all")})
        assert sum(t["case"].startswith("sweep/") for t in data["targets"]) == len(ratios)
    printed = capsys.readouterr().out
    assert f"geomean x{summary['fwd']['geomean']:.2f}" in printed and summary["fwd"]["worst"]["case"] in printed
    assert quick[0].name in (tmp_path / "sweep_cpu_quick.md").read_text()


def test_sweep_command_line_checks():
    assert lb.main(["--sweep", "--cases", "conv1_b1", "--device", "cpu"]) == 2
    assert lb.main(["--sweep", "--device", "cpu", "--backends", "stock"]) == 2  # nothing to compare with
    assert lb.main(["--sweep", "--device", "cpu", "--modes", "step"]) == 2
    assert sweep.sweep_impls(["cpu", "reference", "stock", "compile"], False, lb.PEERS) == ["cpu"]
    assert sweep.sweep_impls(["cpu", "reference", "stock"], True, lb.PEERS) == ["cpu", "reference"]
