"""Calibration study (issue 4): perplexity of SmolLM2-135M on held-out WikiText-2 windows at
50 % and 70 % MLP sparsity, for top-k, calibrated thresholds (TEAL, uniform and greedy) and
rank-aware R-Sparse (default rank split, and the searched allocation), all at the same budget.
A method name ending in ``-act`` (``rsparse-search-act``, ``rsparse-act``) uses the
activation-aware low-rank factor (``SparsityConfig(lowrank="activation")``).

    python bench/calibration_study.py                       # defaults: 50 % and 70 %
    python bench/calibration_study.py --levels 0.5 --eval-windows 8 --out results.json
    python bench/calibration_study.py --levels 0.5 --targets all   # budget over q/k/v/o and the MLP

Evaluation reads the first 80 % of the token stream (`sparse_infer.data.split_tokens`),
calibration 16 x 512 tokens of the last 20 %: the two never overlap.  One dense
calibration pass serves every method and level (`Calibration.stats`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import sparse_infer as si
from sparse_infer import SparsityConfig
from sparse_infer import data as D
from sparse_infer.calibrate import calibrate, default_calibration_data
from sparse_infer.evaluate import perplexity


@torch.no_grad()  # not set_grad_enabled(False): tests call main in-process
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    p.add_argument("--text-file", default=None)
    p.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--iterations", type=int, default=None, help="search candidates (default of calibrate)")
    p.add_argument("--time-budget", type=float, default=None, help="search seconds (default of calibrate)")
    p.add_argument("--methods", nargs="+", default=["topk", "threshold", "threshold-greedy", "threshold-search", "rsparse", "rsparse-uniform", "rsparse-greedy", "rsparse-search"])
    p.add_argument("--targets", default="mlp", choices=["mlp", "attn", "all"],
                   help="which linears share the budget (all: TEAL's model-level sparsity over q/k/v/o and the MLP)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    from sparse_infer.models import load_model

    model, tok = load_model(args.model)
    text = D.load_text(args.text_file)
    ids = D.tokenize(text.text, tok)
    eval_ids, _calib_ids, cut = D.split_tokens(ids)
    windows = D.windows(eval_ids, args.window, args.eval_windows)
    calib = default_calibration_data(tok, args.calib_samples, args.window, args.text_file)
    rows = []
    t = time.time()
    dense_ppl = perplexity(model, windows)
    rows.append({"method": "dense", "sparsity": 0.0, "ppl": dense_ppl, "ratio": 1.0, "seconds_eval": round(time.time() - t, 1)})
    print(f"dense ppl {dense_ppl:.3f}", flush=True)

    stats = None
    for level in args.levels:
        for name in args.methods:
            method, _, alloc = name.partition("-")
            alloc = alloc or "uniform"
            lowrank = "svd"
            for suffix, kind in (("-act", "activation"), ("-svd", "svd")):  # "rsparse-search-act": activation-aware factor
                if alloc.endswith(suffix):
                    alloc, lowrank = alloc[: -len(suffix)], kind
            if alloc in ("act", "svd"):
                alloc, lowrank = "uniform", {"act": "activation", "svd": "svd"}[alloc]
            cfg = SparsityConfig(method=method, sparsity=level, targets=args.targets, allocation=alloc, seed=args.seed, lowrank=lowrank)
            t0 = time.time()
            cal = None
            if cfg.needs_calibration or "-" in name:  # "rsparse-uniform": calibrated rank split and thresholds
                cal = calibrate(model, stats if stats is not None else calib, cfg, progress=True,
                                iterations=args.iterations, time_budget_s=args.time_budget)
                stats = cal.stats
            t_cal = time.time() - t0
            si.sparsify(model, cfg, calibration=cal, progress=False)
            nominal = si.model_sparsity(model)
            for m in si.sparse_modules(model).values():
                m.record_stats = True
                m.reset_stats()
            t1 = time.time()
            ppl = perplexity(model, windows)
            measured = si.model_sparsity(model, measured=True)
            si.unsparsify(model)
            row = {"method": name, "sparsity": level, "ppl": ppl, "ratio": ppl / dense_ppl,
                   "nominal_sparsity": nominal, "measured_sparsity": measured,
                   "seconds_calibrate": round(t_cal, 1), "seconds_eval": round(time.time() - t1, 1)}
            if cal is not None and cal.meta.get("search"):
                s = cal.meta["search"]
                row["search"] = {k: s[k] for k in ("kl_best", "kl_greedy", "kl_uniform", "candidates", "offsets", "tilt", "rank_scale", "seconds") if k in s}
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\n{args.model or 'SmolLM2-135M'}, {text.source} held-out: {len(windows)} x {args.window} tokens "
          f"(first 80 % of the stream), "
          f"calibration {len(calib)} x {args.window} tokens from the last 20 % (tokens {calib.meta['calib_token_range']})")
    print(f"{'method':<18}{'sparsity':>9}{'measured':>9}{'ppl':>10}{'x dense':>9}")
    for r in rows:
        print(f"{r['method']:<18}{r['sparsity']:>9.2f}{r.get('measured_sparsity', 0.0):>9.3f}{r['ppl']:>10.3f}{r['ratio']:>9.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "targets": args.targets, "split": calib.meta, "eval_windows": len(windows), "window": args.window,
                       "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                       "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
