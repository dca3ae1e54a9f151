"""What a result was measured on: device, CPU features, load, versions, git commit."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
from typing import Optional

import torch

#: The source checkout this package sits in (lightnet_ops/bench/ -> repository root); in an
#: installed copy this is a directory of site-packages and has no benchmarks/ folder.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def in_source_checkout() -> bool:
    """Whether REPO_ROOT is a source checkout (it has the benchmarks/ folder)."""
    return os.path.isdir(os.path.join(REPO_ROOT, "benchmarks"))


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_simd() -> list[str]:
    """The x86 vector extensions this CPU reports (empty where /proc/cpuinfo is absent)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [x for x in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni",
                                        "avx512_bf16", "amx_tile") if x in flags]
    except OSError:
        pass
    return []


def load_average() -> Optional[list[float]]:
    """1/5/15-minute load averages, or None where the OS has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def version(dist: str) -> Optional[str]:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git(*args: str) -> Optional[str]:
    """Output of `git args...` in REPO_ROOT, or None when git fails."""
    try:
        r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def device_info(device: torch.device) -> dict:
    """Name, kind and the settings that affect timings of `device`."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return dict(kind="cuda", name=torch.cuda.get_device_name(device),
                    total_memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}",
                    cuda_runtime=torch.version.cuda, host_cpu=cpu_model(),
                    cudnn_benchmark=torch.backends.cudnn.benchmark, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return dict(kind="cpu", name=cpu_model(), logical_cpus=os.cpu_count(), simd=cpu_simd(),
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability())


def device_slug(info: dict) -> str:
    """File-name part for a device: "cpu", or "cuda_<GPU name>"."""
    if info["kind"] == "cpu":
        return "cpu"
    return "cuda_" + re.sub(r"[^A-Za-z0-9]+", "-", info["name"]).strip("-")
