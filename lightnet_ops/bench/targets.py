"""The project's speed targets, kept as data in ``targets.json`` next to this module, and the check
of a run's rows against them."""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from typing import Optional

#: The targets file shipped with the package.
TARGETS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets.json")


@dataclass(frozen=True)
class Target:
    """One target: on `device` kind, for every row whose case and mode match the fnmatch patterns
    `case` / `mode` and whose backend is in `backends`, the ratio against `versus` is >= `at_least`.

    versus: "stock" / "compile" (peer median / backend median), "memory" (stock saved bytes /
    backend saved bytes) or another backend's name (its median / this backend's)."""

    device: str
    case: str
    mode: str
    backends: tuple
    versus: str
    at_least: float


def load_targets(path: Optional[str] = None) -> tuple[Target, ...]:
    """Targets from a JSON file ({"targets": [{device, case, mode, backends, versus, at_least}, ...]});
    default: TARGETS_FILE. Raises ValueError naming the file for a malformed entry."""
    path = path or TARGETS_FILE
    with open(path) as f:
        data = json.load(f)
    targets = []
    for i, entry in enumerate(data.get("targets", [])):
        try:
            t = Target(**{**entry, "backends": tuple(entry["backends"]), "at_least": float(entry["at_least"])})
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: target {i} ({entry!r}) is malformed: {e}") from None
        targets.append(t)
    return tuple(targets)


def _measured(row: dict, rows: list[dict], versus: str) -> Optional[float]:
    if versus == "memory":
        return row.get("memory_ratio_vs_stock")
    if versus in ("stock", "compile"):
        return row.get(f"speedup_vs_{versus}")
    # another backend of this library, e.g. triton vs cuda
    other = next((o for o in rows if o["case"] == row["case"] and o["mode"] == row["mode"]
                  and o["backend"] == versus and o.get("median_s")), None)
    return other["median_s"] / row["median_s"] if other and row.get("median_s") else None


def check_targets(rows: list[dict], device_kind: str, targets: Optional[tuple[Target, ...]] = None) -> list[dict]:
    """Each target that this run measured: the measured ratio and whether it holds. `targets`
    defaults to load_targets()."""
    if targets is None:
        targets = load_targets()
    results = []
    for t in targets:
        if t.device != device_kind:
            continue
        for r in rows:
            if r["backend"] not in t.backends or r.get("error") or not fnmatch.fnmatchcase(r["case"], t.case) \
                    or not fnmatch.fnmatchcase(r["mode"], t.mode):
                continue
            got = _measured(r, rows, t.versus)
            if got is None:
                continue
            results.append(dict(case=r["case"], mode=r["mode"], backend=r["backend"], versus=t.versus,
                                target=t.at_least, measured=got, holds=bool(got >= t.at_least)))
    return results
