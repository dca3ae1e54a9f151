"""Smoke tests of the benchmark harness (lightnet_ops.bench): one tiny case in --quick mode, run in
process, must print a table and write JSON (+ PNG) whose content is right: metadata, one row per
backend and mode, consistent timing statistics and ratios, and saved-activation bytes that match
what each implementation keeps for backward."""

from __future__ import annotations

import datetime
import json
import os

import pytest
import torch

import lightnet_ops as lo
import lightnet_ops.bench as lb

pytestmark = pytest.mark.skipif(not lo._ops.EXTENSION_AVAILABLE, reason="needs the built extension (cpu backend)")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--device", "cpu", "--cases", "conv1_b1", "--backends", "cpu", "reference", "stock",
            "--out", str(out)]
    rc = lb.main(argv)
    return rc, out


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


def test_failing_backend_is_recorded_and_run_continues(tmp_path, capsys):
    # The cuda backend cannot run CPU tensors: its rows carry the error, the others are measured.
    rc = lb.main(["--quick", "--device", "cpu", "--cases", "linear_576x120_b256", "--modes", "fwd",
                  "--backends", "cuda", "stock", "--out", str(tmp_path), "--no-plot"])
    assert rc == 0
    rows = json.loads((tmp_path / "results_cpu_quick.json").read_text())["rows"]
    assert [r["backend"] for r in rows] == ["cuda", "stock"]
    assert "cuda" in rows[0]["error"] and rows[0].get("median_s") is None
    assert rows[1]["error"] is None and rows[1]["median_s"] > 0
    assert not (tmp_path / "speedups_cpu_quick.png").exists()
    printed = capsys.readouterr().out
    assert "error:" in printed and "linear_576x120_b256" in printed


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
    with lb._quiet_profiler_logs():
        os.write(2, b"USDT:2026-11-27 13:08:16 1:1 SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        os.write(2, b"a real warning\n")
        os.write(2, b"ERROR:2026-11-27 13:08:16 1:1 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\n")
    err = capfd.readouterr().err
    assert "a real warning" in err
    assert "USDT" not in err and "gpuGetDeviceCount" not in err


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
    assert lb._parse(bench_args).cases == cases  # the default arguments parse


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_profile_without_a_gpu_says_so(capsys):
    profile = _load_script("gpu_profile.py")
    assert profile.main([]) == 1
    assert "no CUDA device" in capsys.readouterr().out
