"""Memory accounting of one call.

``saved_activation_bytes``: what the forward keeps for backward, measured with
``torch.autograd.graph.saved_tensors_hooks`` (unique storages, parameters and the input excluded).
``peak_bytes``: the peak of memory allocated through PyTorch during one call above the level before
it: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU, the running sum of the allocation /
free records of ``torch.profiler`` (``profile_memory=True``) in time order."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Any, Callable, Iterator, Optional

import torch


def saved_activation_bytes(forward: Callable[[], Any], exclude: list) -> int:
    """Bytes of the unique storages autograd saves during `forward()` for backward, not counting
    the storages of `exclude` (parameters, the input)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in excluded:
            seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


# Lines the profiler's C++ side writes to stderr on every start / stop (a "USDT:" trace of
# profiler_start / profiler_stop, and a CUDA probe on machines without a GPU); everything else on
# stderr is passed through.
PROFILER_NOISE = (re.compile(r"^USDT:.*SyncActivityProfilerHandler"),
                  re.compile(r"^ERROR:.*gpuGetDeviceCount failed"))


@contextlib.contextmanager
def quiet_profiler_logs() -> Iterator[None]:
    """Runs the body with file descriptor 2 captured, then writes the captured lines back to
    stderr except the profiler's per-start/stop noise (PROFILER_NOISE)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (e.g. an embedded interpreter): leave it alone
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(p.search(line) for p in PROFILER_NOISE)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def cpu_peak_bytes(fn: Callable[[], Any]) -> Optional[int]:
    """Peak of the bytes allocated through PyTorch's CPU allocator during one `fn()` (its result
    freed at the end) above the level before it, from the profiler's memory records; None if this
    torch does not expose them."""
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler_logs(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    try:
        records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]")
    except AttributeError:  # the (private) kineto result API moved
        return None
    level = peak = 0
    for _, nbytes in records:
        level += nbytes
        peak = max(peak, level)
    return peak


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak allocated bytes during one `fn()` above what was allocated before it."""
    if device.type != "cuda":
        return cpu_peak_bytes(fn)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return int(torch.cuda.max_memory_allocated(device) - base)
