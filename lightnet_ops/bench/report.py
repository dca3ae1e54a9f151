"""Reports of a run: the text / markdown table, the speedup chart, and the files
``results_<device>.json``, ``table_<device>.md`` and ``speedups_<device>.png``."""

from __future__ import annotations

import json
import os
from typing import Callable, Optional


def short_error(e: BaseException) -> str:
    """First line of "ExceptionType: message", at most 300 characters."""
    msg = f"{type(e).__name__}: {e}".strip().splitlines()
    return msg[0][:300] if msg else type(e).__name__


def fmt_time(s: Optional[float]) -> str:
    """Seconds as "12.3 us" / "4.567 ms" / "1.234 s"; "-" for None."""
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.3f} ms"
    return f"{s:.3f} s"


def fmt_ratio(r: Optional[float]) -> str:
    """A ratio with two decimals; "-" for None."""
    return "-" if r is None else f"{r:.2f}"


def fmt_bytes(b: Optional[float]) -> str:
    """Bytes as B / KiB / MiB; "-" for None."""
    if b is None:
        return "-"
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b:.0f} B"


TABLE_HEADER = ("case", "mode", "backend", "median", "IQR", "x stock", "x compile", "saved/sample", "mem saved",
                "peak mem", "%copyBW")
#: The peer column added after "x compile" when a run measured ONNX Runtime.
ORT_COLUMN = "x onnxruntime"


def _has_ort(rows: list[dict]) -> bool:
    return any(r.get("speedup_vs_onnxruntime") for r in rows)


def table_header(rows: list[dict]) -> tuple:
    """TABLE_HEADER, with the ONNX Runtime column when some row has that ratio."""
    return TABLE_HEADER[:7] + (ORT_COLUMN,) + TABLE_HEADER[7:] if _has_ort(rows) else TABLE_HEADER


def table_rows(rows: list[dict]) -> list[tuple]:
    """One tuple of formatted cells (table_header(rows) order) per result row."""
    ort = _has_ort(rows)
    out = []
    for r in rows:
        if r.get("error"):
            out.append((r["case"], r["mode"], r["backend"], "error: " + r["error"][:60]) + ("",) * (7 + ort))
            continue
        mem = r.get("memory_ratio_vs_stock")
        bw = r.get("fraction_of_copy_bandwidth")
        peers = (fmt_ratio(r.get("speedup_vs_stock")), fmt_ratio(r.get("speedup_vs_compile")))
        if ort:
            peers += (fmt_ratio(r.get("speedup_vs_onnxruntime")),)
        out.append((r["case"], r["mode"], r["backend"], fmt_time(r.get("median_s")), fmt_time(r.get("iqr_s")),
                    *peers, fmt_bytes(r.get("saved_bytes_per_sample")), "-" if mem is None else f"{mem:.1f}x",
                    fmt_bytes(r.get("peak_bytes")), "-" if bw is None else f"{100 * bw:.1f}%"))
    return out


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The result rows as an aligned text table, or a markdown table."""
    body = table_rows(rows)
    header = table_header(rows)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in body]
    return "\n".join(lines)


def format_targets(targets: list[dict]) -> str:
    """One line per checked target: holds / MISSED, what, measured and needed ratio."""
    return "\n".join(f"  {'holds ' if t['holds'] else 'MISSED'}  {t['case']} {t['mode']} {t['backend']} vs "
                     f"{t['versus']}: {t['measured']:.2f} (target >= {t['target']:.2f})" for t in targets)


def plot(rows: list[dict], path: str, title: str) -> None:
    """Horizontal bar chart of every non-stock row's speedup over stock (log scale) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for r in rows:
        key = (r["case"], r["mode"])
        if key not in groups:
            groups.append(key)
    impls = [b for b in dict.fromkeys(r["backend"] for r in rows) if b != "stock"]
    if not groups or not impls:
        return
    height = max(3.0, 0.22 * len(groups) * len(impls) + 1.5)
    fig, ax = plt.subplots(figsize=(9, height))
    bar = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        ys, xs = [], []
        for i, key in enumerate(groups):
            r = next((r for r in rows if (r["case"], r["mode"]) == key and r["backend"] == impl), None)
            if r and r.get("speedup_vs_stock"):
                ys.append(i + (j - (len(impls) - 1) / 2) * bar)
                xs.append(r["speedup_vs_stock"])
        ax.barh(ys, xs, height=bar, label=impl)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yticks(range(len(groups)))
    ax.set_yticklabels([f"{c} {m}" for c, m in groups], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over stock eager (stock median / backend median; log scale, >1 is faster)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(result: dict, out_dir: str, stem: str, table_title: str, plot_title: Optional[str],
                  log: Callable[[str], None]) -> list[str]:
    """Writes results_<stem>.json, table_<stem>.md and (unless plot_title is None) speedups_<stem>.png
    under out_dir; returns the paths written. A failing plot is logged, not raised."""
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, f"results_{stem}.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    md_path = os.path.join(out_dir, f"table_{stem}.md")
    with open(md_path, "w") as f:
        f.write(f"{table_title}\n\n")
        f.write(format_table(result["rows"], markdown=True) + "\n")
    written = [json_path, md_path]
    if plot_title is not None:
        png_path = os.path.join(out_dir, f"speedups_{stem}.png")
        try:
            plot(result["rows"], png_path, plot_title)
            written.append(png_path)
        except Exception as e:  # noqa: BLE001
            log(f"plot failed: {short_error(e)}")
    return written
