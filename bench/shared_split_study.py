"""Shared-mask study (issue 7): where one mask per decode step hurts, and a budget split that hurts less.

A shared mask keeps the same input channels for every sequence of a batch.  This study moves a
fixed MLP budget between the two kinds of MLP input on SmolLM2-135M: the hidden state that
gate_proj and up_proj read, and the gated activation that down_proj reads.  Every row reads the
same weight bytes per token (`--sparsity` of the MLP, the model-level sparsity of
``SparsityConfig``). It reports the perplexity with per-token masks at batch 1 and with shared
masks at each batch size.  The batch's sequences are different windows of WikiText-2 (the
evaluation part of the stream), as unrelated as a server's requests.

    python bench/shared_split_study.py                                 # 50 %, gate/up at 50/40/30 %
    python bench/shared_split_study.py --sparsity 0.3 --gate-up 0.3 0.2 0.1 --out split.json
    python bench/shared_split_study.py --gate-up 0.5 --calibrated greedy search   # + the splits calibration picks

``--calibrated`` adds one row per allocation that calibration spreads over the layers
(``SparsityConfig(method="topk", allocation=...)``, on windows of the calibration tail, which
the evaluation never reads), served with per-token and with shared masks: does calibration
find the split by itself?  Its gate/up and down columns are the byte-weighted mean sparsity
it gave each kind of projection.

A split is set with ``SparsityConfig.overrides`` (top-k, reference path), so a user can apply the
split this study picks:
``SparsityConfig(mode="shared", overrides={"*gate_proj": {"sparsity": a}, "*up_proj": {"sparsity": a},
"*down_proj": {"sparsity": d}})``.  The down_proj sparsity ``d`` is what keeps the MLP's bytes at
the budget; this script prints it.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import List

import torch

import sparse_infer as si
from sparse_infer import data as D
from sparse_infer.evaluate import _select_windows, perplexity
from sparse_infer.patch import _targets, find_family

HIDDEN = ("gate_proj", "up_proj")  # the linears that read the hidden state; down_proj reads the gated activation


def split(model, sparsity: float, gate_up: float) -> float:
    """down_proj sparsity that, with gate_proj and up_proj at ``gate_up``, keeps the MLP at ``sparsity``."""
    family = find_family(model)
    sizes = {"hidden": 0, "down": 0}
    for name, _parent, _attr, module, _kind in _targets(model, family, si.SparsityConfig(targets="mlp")):
        sizes["hidden" if name.rsplit(".", 1)[-1] in HIDDEN else "down"] += module.weight.numel()
    if not sizes["hidden"] or not sizes["down"]:
        raise ValueError(f"this study needs an MLP with {' / '.join(HIDDEN)} and down_proj linears "
                         f"({family.name}: {', '.join(family.mlp_linears)})")
    total = sizes["hidden"] + sizes["down"]
    down = (sparsity * total - gate_up * sizes["hidden"]) / sizes["down"]
    if not 0.0 <= down < 1.0:
        raise ValueError(f"gate/up at {gate_up:.0%} cannot meet {sparsity:.0%} of the MLP: down_proj would need "
                         f"{down:.1%}; pick gate/up sparsities between "
                         f"{max(0.0, (sparsity * total - sizes['down']) / sizes['hidden']):.2f} and "
                         f"{min(1.0, sparsity * total / sizes['hidden']):.2f}")
    return down


def _serve(model, config, calibration, windows: torch.Tensor, batches: List[int], row: dict, label: str,
           progress: bool) -> dict:
    """Fill ``row`` with the perplexity of ``config`` with per-token masks at batch 1 and shared masks at
    each batch size (its mode replaced), and the model-level sparsity; the model is left dense."""
    for mode, bs in [("per_token", [1]), ("shared", batches)]:
        si.sparsify(model, config.replace(mode=mode), calibration=calibration, progress=False)
        try:
            row["bytes"] = si.model_sparsity(model)
            for b in bs:
                t = time.time()
                row[f"{mode}_b{b}"] = perplexity(model, windows, b)
                if progress:
                    print(f"  {label}: {mode} batch {b}: ppl {row[f'{mode}_b{b}']:.2f} ({time.time() - t:.0f} s)",
                          flush=True)
        finally:
            si.unsparsify(model)
    return row


def run(model, windows: torch.Tensor, sparsity: float, gate_ups: List[float], batches: List[int],
        progress: bool = True) -> List[dict]:
    rows = []
    for a in gate_ups:
        d = split(model, sparsity, a)
        over = {f"*{n}": {"sparsity": a} for n in HIDDEN}
        over["*down_proj"] = {"sparsity": d}
        cfg = si.SparsityConfig(method="topk", sparsity=sparsity, backend="reference", overrides=over)
        rows.append(_serve(model, cfg, None, windows, batches, dict(sparsity=sparsity, gate_up=a, down=d),
                           f"gate/up {a:.0%}, down {d:.1%}", progress))
    return rows


def _by_kind(model, cal) -> dict:
    """Byte-weighted mean sparsity a calibration gave the hidden-state readers and down_proj."""
    acc = {"hidden": [0.0, 0.0], "down": [0.0, 0.0]}
    for name, entry in cal.layers.items():
        n = model.get_submodule(name).weight.numel()
        a = acc["hidden" if name.rsplit(".", 1)[-1] in HIDDEN else "down"]
        a[0] += n * float(entry["sparsity"])
        a[1] += n
    return {k: v[0] / v[1] for k, v in acc.items()}


def calibrated(model, windows: torch.Tensor, sparsity: float, calib: List[torch.Tensor], batches: List[int],
               allocations: List[str], iterations: int = 8, seed: int = 0, progress: bool = True) -> List[dict]:
    """Rows whose split a calibration chose (top-k, one calibration per allocation, seeded; the
    search is bounded by candidates only, so the rows are reproducible).  Calibration scores
    its candidates one sequence at a time, so it tunes for per-token masks."""
    rows = []
    stats = None
    for alloc in allocations:
        cfg = si.SparsityConfig(method="topk", sparsity=sparsity, allocation=alloc, backend="reference", seed=seed)
        t = time.time()
        torch.manual_seed(seed)
        cal = si.calibrate(model, stats or calib, cfg, progress=progress, iterations=iterations, time_budget_s=1e9)
        stats = cal.stats  # one dense pass serves every allocation
        kinds = _by_kind(model, cal)
        row = dict(sparsity=sparsity, gate_up=kinds["hidden"], down=kinds["down"], allocation=alloc,
                   calib_seconds=round(time.time() - t, 1))
        label = f"{alloc} (calibrated, gate/up {kinds['hidden']:.1%}, down {kinds['down']:.1%})"
        _serve(model, cfg, cal, windows, batches, row, label, progress)
        rows.append(row)
    return rows


def markdown(rows: List[dict], dense: float, batches: List[int]) -> str:
    head = "| gate/up sparsity | down sparsity | MLP sparsity | per-token, batch 1 | " + \
        " | ".join(f"shared, batch {b}" for b in batches) + " |"
    lines = [head, "|" + "---:|" * (4 + len(batches)), f"| dense | | 0 % | {dense:.2f} |" + " |" * len(batches)]
    for r in rows:
        split = f"{r['gate_up']:.0%} | {r['down']:.0%}" if "allocation" not in r else \
            f"{r['allocation']}: {r['gate_up']:.1%} | {r['down']:.1%}"
        lines.append(f"| {split} | {r['bytes']:.1%} | {r['per_token_b1']:.2f} | " +
                     " | ".join(f"{r[f'shared_b{b}']:.2f}" for b in batches) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None, model=None, tokenizer=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    p.add_argument("--text-file", default=None, help="WikiText-2 raw test (default: $SPARSE_INFER_TEXT or ../shared)")
    p.add_argument("--sparsity", type=float, default=0.5, help="MLP budget: model-level sparsity in [0, 1)")
    p.add_argument("--gate-up", type=float, nargs="+", default=[0.5, 0.4, 0.3],
                   help="gate_proj/up_proj sparsities to try (down_proj takes the rest of the budget)")
    p.add_argument("--batches", type=int, nargs="+", default=[4, 16], help="batch sizes of the shared rows")
    p.add_argument("--sequences", type=int, default=16, help="windows (a multiple of every batch size)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--calibrated", nargs="*", default=[], choices=("uniform", "greedy", "search"),
                   help="also rows whose split a shared-mode calibration with this allocation chose")
    p.add_argument("--calib-windows", type=int, default=4, help="calibration windows of 512 tokens (held-out tail)")
    p.add_argument("--search-iterations", type=int, default=8, help="candidates of the calibrated search")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-row lines")
    args = p.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity must lie in [0, 1), got {args.sparsity}")
    if any(b < 1 or args.sequences % b for b in args.batches):
        p.error(f"every batch size must divide --sequences ({args.sequences})")
    if model is None:
        from sparse_infer.models import load_model

        model, tokenizer = load_model(args.model, progress=not args.no_progress)
    model.eval()
    for a in args.gate_up:
        try:
            split(model, args.sparsity, a)
        except ValueError as e:
            p.error(str(e))
    eval_ids, calib_ids, _ = D.split_tokens(D.tokenize(D.load_text(args.text_file).text, tokenizer))
    windows = torch.stack(_select_windows(eval_ids, args.window + 1, args.sequences))
    t = time.time()
    dense = perplexity(model, windows, max(args.batches))
    progress = not args.no_progress
    rows = run(model, windows, args.sparsity, args.gate_up, args.batches, progress=progress)
    if args.calibrated:
        calib = D.windows(calib_ids, 512, args.calib_windows)
        rows += calibrated(model, windows, args.sparsity, calib, args.batches, args.calibrated,
                           iterations=args.search_iterations, progress=progress)
    print(markdown(rows, dense, args.batches))
    print(f"{args.sequences} windows of {args.window} scored tokens, top-k masks, reference path, "
          f"{time.time() - t:.0f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(dense=dense, rows=rows, sequences=args.sequences, window=args.window), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
