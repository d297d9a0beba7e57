"""Writers for evaluation rows: a markdown table, CSV, JSON and a perplexity-vs-sparsity plot.

    rows = sparse_infer.evaluate.evaluate()
    print(markdown_table(rows))
    paths = write_results(rows, "results")   # eval.csv, eval.json, eval.md, eval_ppl.png
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["markdown_table", "write_csv", "write_json", "plot_ppl", "write_results", "format_value"]

BASENAME = "eval"


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def format_value(key: str, v) -> str:
    if v is None or _isnan(v):
        return "—"
    if key in ("target", "sparsity"):
        return f"{100 * v:.1f} %" if key == "sparsity" else f"{100 * v:.0f} %"
    if key == "bytes_rel":
        return f"{v:.3f}"
    if key == "ppl":
        return f"{v:.2f}"
    if key == "kl":
        return f"{v:.4f}"
    if key == "top1":
        return f"{100 * v:.1f} %"
    return str(v)


def _varies(rows: Sequence[dict], key: str) -> bool:
    return len({r.get(key) for r in rows if r.get("method") != "dense"}) > 1


def markdown_table(rows: Sequence[dict]) -> str:
    """One line per row: method, target and measured sparsity, bytes read, PPL, KL, top-1.

    Protocol, mode and batch columns appear when they vary or differ from the
    default (every token, per-token masks); rows a method cannot reach (gate
    above 2/3) read "n/a"."""
    cols = [("method", "Method")]
    if any(r.get("method") == "rsparse" for r in rows) or _varies(rows, "allocation"):
        cols.append(("allocation", "Allocation"))
    cols.append(("target", "Target"))
    if _varies(rows, "protocol") or any(r.get("protocol") != "all" for r in rows):
        cols.append(("protocol", "Protocol"))
    sparse = [r for r in rows if r.get("method") != "dense"]
    if _varies(rows, "mode") or _varies(rows, "batch_size") or any(r.get("mode") == "shared" for r in sparse):
        cols += [("mode", "Mask"), ("batch_size", "Batch")]
    cols += [("sparsity", "Measured sparsity"), ("bytes_rel", "Weight bytes / token"), ("ppl", "PPL"),
             ("kl", "KL to dense"), ("top1", "Top-1 agree")]
    right = {"target", "batch_size", "sparsity", "bytes_rel", "ppl", "kl", "top1"}
    lines = ["| " + " | ".join(h for _, h in cols) + " |",
             "|" + "|".join("---:" if k in right else "---" for k, _ in cols) + "|"]
    for r in rows:
        cells = []
        na = str(r.get("status", "ok")).startswith("n/a")
        for k, _ in cols:
            if na and k in ("sparsity", "bytes_rel", "ppl", "kl", "top1"):
                cells.append("n/a")
            elif k == "mode":
                cells.append({"per_token": "per-token", "shared": "shared"}.get(r.get(k), str(r.get(k))))
            else:
                cells.append(format_value(k, r.get(k)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def caption(rows: Sequence[dict]) -> str:
    """One line naming what the table was computed on."""
    if not rows:
        return ""
    r = rows[0]
    scored = {}  # tokens scored per row, by protocol (the decode protocol scores second halves only)
    for x in rows:
        if x.get("status") == "ok":
            scored.setdefault(x.get("protocol"), x["n_tokens"])
    counts = "; ".join(f"{n} scored per {p} row" if len(scored) > 1 else f"{n} scored per row"
                       for p, n in scored.items()) or "0 scored per row"
    decode = "; decode protocol: the second halves" if "decode" in scored else ""
    n, simd = r.get("threads"), r.get("cpu_capability")
    # CPU rows: an exact rerun needs the same thread count and SIMD level (float32 summation order)
    threads = (f" {simd}" if simd else "") + (f", {n} thread{'s' if n != 1 else ''}" if n else "")
    return (f"{r['model']} ({r['dtype']}, {r['device']}{threads}), {r['targets']} linears, {r['n_windows']} windows of "
            f"{r['window']} tokens ({counts}{decode}), text sha256 "
            f"{str(r['text_sha256'])[:12]}, calibration {r['calib_windows']} held-out windows, seed {r['seed']}, "
            f"sparse-infer {r['version']}")


def write_csv(rows: Sequence[dict], path) -> str:
    from .evaluate import ROW_FIELDS

    keys = list(ROW_FIELDS) + sorted({k for r in rows for k in r} - set(ROW_FIELDS))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if _isnan(r.get(k)) else r.get(k)) for k in keys})
    return str(path)


def write_json(rows: Sequence[dict], path, meta: Optional[dict] = None) -> str:
    clean = [{k: (None if _isnan(v) else v) for k, v in r.items()} for r in rows]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"meta": meta or {}, "rows": clean}, f, indent=1, sort_keys=False)
        f.write("\n")
    return str(path)


def plot_ppl(rows: Sequence[dict], path) -> str:
    """Perplexity against measured sparsity, one line per method (per-token rows; shared rows
    as extra lines per batch size); one panel per protocol; dense as a dashed level."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    fig, axes = plt.subplots(1, len(protocols), figsize=(6.2 * len(protocols), 4.4), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        sel = [r for r in rows if r["protocol"] == protocol and r.get("status") == "ok"]
        dense = [r for r in sel if r["method"] == "dense"]
        lines: Dict[str, List[dict]] = {}
        for r in sel:
            if r["method"] == "dense":
                continue
            label = r["method"] + (f" ({r['allocation']})" if r["method"] == "rsparse" else "")
            if r.get("mode") == "shared":
                label += f", shared B={r['batch_size']}"
            lines.setdefault(label, []).append(r)
        for label, pts in lines.items():
            pts = sorted(pts, key=lambda r: r["sparsity"] if not _isnan(r["sparsity"]) else r["target"])
            xs = [r["sparsity"] if not _isnan(r["sparsity"]) else r["target"] for r in pts]
            if dense:
                xs, pts = [0.0] + xs, dense[:1] + pts
            ax.plot([100 * x for x in xs], [r["ppl"] for r in pts], marker="o", label=label,
                    linestyle="--" if "shared" in label else "-")
        if dense:
            ax.axhline(dense[0]["ppl"], color="gray", linestyle=":", linewidth=1, label=f"dense {dense[0]['ppl']:.2f}")
        ax.set_xlabel("measured model-level sparsity of the sparsified linears (%)")
        ax.set_ylabel("perplexity")
        ppls = [r["ppl"] for r in sel if not _isnan(r["ppl"])]
        if ppls and max(ppls) > 3 * min(ppls):  # a wide range reads better on a log axis
            ax.set_yscale("log")
            plain = matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
                lambda v, _pos: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        ax.set_title("every token sparse" if protocol == "all" else "decode-like (dense prefill, sparse 2nd half)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if rows:
        # two lines: a model file name can be wider than one panel
        fig.suptitle(f"{rows[0]['model']}\nperplexity vs. sparsity ({rows[0]['n_windows']} x {rows[0]['window']} tokens)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def prepare_out_dir(out_dir) -> Path:
    """Create ``out_dir`` and check that files can be written in it (OSError otherwise)."""
    out = Path(out_dir)
    os.makedirs(out, exist_ok=True)
    probe = out / f".{BASENAME}.write-test"
    probe.write_bytes(b"")
    probe.unlink()
    return out


def write_results(rows: Sequence[dict], out_dir="results", meta: Optional[dict] = None, plot: bool = True) -> Dict[str, str]:
    """CSV, JSON, markdown and (``plot``) PNG of ``rows`` under ``out_dir``; returns their paths.

    Without ``plot``, a PNG left there by an earlier run is removed (it would not match the new rows)."""
    out = prepare_out_dir(out_dir)
    paths = {
        "csv": write_csv(rows, out / f"{BASENAME}.csv"),
        "json": write_json(rows, out / f"{BASENAME}.json", meta),
    }
    md = out / f"{BASENAME}.md"
    md.write_text(markdown_table(rows) + "\n\n" + caption(rows) + "\n", encoding="utf-8")
    paths["markdown"] = str(md)
    png = out / f"{BASENAME}_ppl.png"
    if plot:
        paths["plot"] = plot_ppl(rows, png)
    elif png.is_file():  # an earlier run's plot would read as this run's
        png.unlink()
    return paths
