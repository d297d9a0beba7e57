"""Union study (issues 3 and 7): how much of a weight a batch of per-token masks reads.

With one mask per token, a kernel serving B tokens at once must read every channel that any
of them keeps: the union of their masks.  For independent random masks of density d that is
1 - (1 - d)^B (94 % for four tokens at d = 0.5).  Real activations share their large channels,
so their union could be smaller; this measures it on a real model.  The B sequences are
different windows of the text, so the tokens decoded together are as unrelated as requests
of a server.

    python bench/union_study.py                              # SmolLM2-135M, top-k 30/50/70 %, MLP and all
    python bench/union_study.py --sparsities 0.5 --batches 1 4 --targets mlp --out union.json

Per (targets, sparsity): every patched linear's per-token top-k masks on 16 windows of
WikiText-2 (the evaluation part of the stream), grouped into batches of B windows position by
position; the union density is averaged over positions, batches and linears (and per kind of
linear), next to the random-mask figure.  The masks come from the sparsified model itself
(reference path), so each layer sees the activations that upstream sparsity leaves.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Dict, List

import torch

import sparse_infer as si
from sparse_infer import data as D
from sparse_infer import sparse_modules


def union_density(masks: torch.Tensor, batch: int) -> float:
    """Mean density of the union over groups of ``batch`` sequences: masks (S, T, C) bool, S % batch == 0."""
    S, T, C = masks.shape
    if S % batch:
        raise ValueError(f"{S} sequences do not split into batches of {batch}")
    return masks.reshape(S // batch, batch, T, C).any(dim=1).float().mean().item()


def random_union(density: float, batch: int) -> float:
    return 1.0 - (1.0 - density) ** batch


@torch.no_grad()
def measure(model, ids: torch.Tensor, sparsity: float, targets: str, batches: List[int]) -> List[dict]:
    """Rows of union density for ``ids`` (S sequences, T tokens) at one sparsity; leaves ``model`` dense."""
    si.sparsify(model, si.SparsityConfig(method="topk", sparsity=sparsity, targets=targets), progress=False)
    masks: Dict[str, torch.Tensor] = {}
    try:
        mods = sparse_modules(model)
        hooks = [m.register_forward_hook(lambda mod, inp, out, name=n: masks.__setitem__(name, mod.gate().mask(inp[0])))
                 for n, m in mods.items()]
        try:
            model(ids)
        finally:
            for h in hooks:
                h.remove()
    finally:
        si.unsparsify(model)
    rows = []
    for b in batches:
        kinds = defaultdict(list)
        for name, m in masks.items():
            kinds[name.rsplit(".", 1)[-1]].append(union_density(m, b))
        every = [v for vs in kinds.values() for v in vs]
        density = 1.0 - sparsity
        rows.append(dict(targets=targets, sparsity=sparsity, batch=b, union=sum(every) / len(every),
                         random=random_union(density, b), per_kind={k: sum(v) / len(v) for k, v in sorted(kinds.items())}))
    return rows


def markdown(rows: List[dict]) -> str:
    lines = ["| targets | sparsity | batch | union density | random masks | per linear |", "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        kinds = ", ".join(f"{k} {v:.3f}" for k, v in r["per_kind"].items())
        lines.append(f"| {r['targets']} | {r['sparsity']:.0%} | {r['batch']} | {r['union']:.3f} | {r['random']:.3f} | {kinds} |")
    return "\n".join(lines) + "\n"


def main(argv=None, model=None, tokenizer=None) -> List[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    p.add_argument("--text-file", default=None, help="WikiText-2 raw test (default: $SPARSE_INFER_TEXT or ../shared)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--targets", nargs="+", default=["mlp", "all"], choices=["mlp", "attn", "all"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--sequences", type=int, default=16, help="windows (a multiple of every batch size)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    if any(not 0.0 <= s < 1.0 for s in args.sparsities):
        p.error("sparsities must lie in [0, 1)")
    if any(b < 1 or args.sequences % b for b in args.batches):
        p.error(f"every batch size must divide --sequences ({args.sequences})")

    if model is None:
        from sparse_infer.models import load_model

        model, tokenizer = load_model(args.model)
    model.eval()
    from sparse_infer.evaluate import _select_windows

    eval_ids, _, _ = D.split_tokens(D.tokenize(D.load_text(args.text_file).text, tokenizer))
    ids = torch.stack(_select_windows(eval_ids, args.window, args.sequences))
    rows = []
    for targets in args.targets:
        for s in args.sparsities:
            rows += measure(model, ids, s, targets, args.batches)
            print(markdown(rows[-len(args.batches):]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
