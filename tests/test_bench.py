"""Tests of the benchmark harness (lightnet_ops.bench): one tiny case in --quick mode, run in
process, must print a table and write JSON (+ PNG) whose content is right: metadata, one row per
backend and mode, consistent timing statistics and ratios, and saved-activation bytes that match
what each implementation keeps for backward. Also: every op's setup gives the stock and fused
implementations the same problem, the targets file is valid and checked right, and results go to
the untracked folder unless the committed reference is asked for."""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import subprocess
import sys

import pytest
import torch

import lightnet_ops as lo
import lightnet_ops.bench as lb

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
    assert [c.name for c in lb.select_cases("cpu", ["conv2*"])] == ["conv2_b1", "conv2_b64", "conv2_b256"]
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
    for t in targets:
        cases = [c for c in lb.select_cases(t.device, [t.case])]  # raises SystemExit for an unknown case
        assert any(fnmatch.fnmatchcase(m, t.mode) for c in cases for m in c.modes), t
        assert set(t.backends) <= backends and t.versus in backends | {"stock", "compile", "memory"}, t
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


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "lightnet_ops.bench", "--list", "--device", "cpu"], cwd=lb.REPO_ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(c.name in r.stdout for c in lb.CASES if "cpu" in c.devices)


def _load_script(name: str):
    import importlib.util

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
