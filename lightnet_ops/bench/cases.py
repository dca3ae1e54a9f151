"""The benchmark cases, as data: one problem (op, shape, batch, dtype) per case, with the device
kinds it runs on and whether ``--quick`` includes it. Each op's entry in ``ops.OPS`` declares its
cases next to how it sets them up and times them; this module collects them (``CASES``) and selects
among them."""

from __future__ import annotations

import fnmatch
from typing import Any, Optional

from .ops import OPS, default_backends
from .problems import MODES, Case, ConvShape, LinearShape


def _collect() -> tuple[Case, ...]:
    """Every entry's cases, grouped as the tables list them: the cases measured in every mode of
    their op, then the inference-only ones, then those an op declares for another entry (its
    per-call cases); each group in OPS order, each entry's in its declaration order."""
    declared = []
    for index, (owner, bench) in enumerate(OPS.items()):
        for case in bench.cases:
            if case.op not in OPS:
                raise ValueError(f"case {case.name} names {case.op!r}, which is not an entry of OPS")
            group = 2 if case.op != owner else 1 if case.only_modes else 0
            declared.append((group, index, case))
    cases = tuple(case for _, _, case in sorted(declared, key=lambda t: t[:2]))
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"case names are not unique: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return cases


CASES: tuple[Case, ...] = _collect()
CASES_BY_NAME = {c.name: c for c in CASES}


def case_key(case: Case) -> tuple:
    """What makes two cases the same problem: (op, batch, shape, dtype)."""
    return case.op, case.batch, case.shape, case.dtype


def select_cases(device_kind: str, patterns: Optional[list[str]] = None, quick: bool = False) -> list[Case]:
    """Cases for a device kind. `patterns` are case names or fnmatch patterns ("conv*"); without them,
    every case for the device (only the quick subset when `quick`)."""
    cases = [c for c in CASES if device_kind in c.devices]
    if patterns:
        unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(c.name, p) for c in CASES)]
        if unknown:
            raise SystemExit(f"unknown case(s) {unknown}; --list shows them")
        chosen = [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
        if not chosen:
            raise SystemExit(f"no case matching {patterns} runs on {device_kind}")
        return chosen
    if quick:
        cases = [c for c in cases if device_kind in c.quick]
    return cases


def benchmark_matrix(op: str, device_kind: str) -> list[tuple[Case, str, str]]:
    """(case, mode, impl) for every case of `op` (a key of ``OPS``) on the device kind, every mode
    and every default backend and peer that applies: the parametrisation of benchmarks/bench_*.py."""
    impls = default_backends(device_kind)
    return [(c, m, i) for c in CASES if c.op == op and device_kind in c.devices for m in c.modes for i in impls
            if OPS[op].supports(c, i, m)]


def fused_op_benches() -> dict[str, str]:
    """fused op (contract name) -> the key of the ``OPS`` entry that times it alone, in OPS order:
    what benchmarks/bench_ops.py parametrises over."""
    return {bench.fused_op: name for name, bench in OPS.items() if bench.fused_op}


def case_id(value: Any) -> Optional[str]:
    """pytest id for benchmark_matrix values: the case name for a Case, the default otherwise."""
    return value.name if isinstance(value, Case) else None


__all__ = ["CASES", "CASES_BY_NAME", "MODES", "Case", "ConvShape", "LinearShape", "benchmark_matrix", "case_id",
           "case_key", "fused_op_benches", "select_cases"]
