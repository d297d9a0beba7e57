"""Benchmark the sparse-infer kernels against F.linear on the GPU.

    python bench/bench_kernels.py [--quick] [--out DIR] [--graph] [--sweep] [--fallback]

Per row: median time (triton.testing.do_bench), speedup over F.linear measured
in the same run, achieved GB/s over the bytes actually needed (active weight
rows + low-rank factors + x + y), and that as % of the device-to-device copy
bandwidth measured in the same run (bytes read + written).  Several copies of
each weight are rotated (and do_bench flushes L2 before each call) so the 50 MB
L2 does not serve the reads.  Writes ``kernels.md`` and ``kernels.csv`` (GPU
name, torch/triton versions, timestamp) under ``--out`` (default results/).

``build_cases`` / ``write_results`` / ``parse_args`` need no GPU (tested on the CPU).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import itertools
import json
import math
import os
import shlex
import sys

import torch

# name -> (hidden, intermediate, kv_dim)
MODELS = {
    "llama-2-7b": (4096, 11008, 4096),
    "llama-3-8b": (4096, 14336, 1024),
    "llama-2-13b": (5120, 13824, 5120),
    "llama-3-70b": (8192, 28672, 1024),
    "qwen2.5-7b": (3584, 18944, 512),
}
KERNELS = ("input-sparse", "rank-aware", "shared", "input-sparse-topk")
DEFAULT_KERNELS = ("input-sparse", "rank-aware", "shared")
SPARSITIES = (0.0, 0.25, 0.5, 0.7, 0.9)
TOKENS = (1, 4, 16)
DTYPES = ("bf16", "fp16")
CSV_FIELDS = [
    "model", "proj", "in_features", "out_features", "M", "dtype", "kernel", "variant", "sparsity", "active", "rank",
    "dense_us", "kernel_us", "speedup", "bytes", "gbps", "pct_copy_bw", "graph_dense_us", "graph_kernel_us",
    "graph_speedup", "rel_err", "status", "copy_gbps", "gpu", "torch", "triton", "timestamp", "command",
]
MAX_REL_ERR = 2e-2  # bf16/fp16 against the fp32 reference: a row above it is marked WRONG, not a result
L2_BYTES = 50 * 2**20  # H100 L2; each rotation reads >= 4x this, so L2 cannot serve the weights


def projections(model: str):
    """(proj name, in, out) of one decoder layer; gate/up share a shape, so do q/o and k/v."""
    h, i, kv = MODELS[model]
    return [("mlp_gate_up", h, i), ("mlp_down", i, h), ("attn_q_o", h, h), ("attn_k_v", h, kv)]


def rank_for(sparsity: float, in_f: int, out_f: int) -> tuple[float, int]:
    """Rank-aware split of a byte budget of (1 - sparsity) of the dense weight.

    80 % of the budget goes to active rows of W, 20 % to the rank-r factors:
    ``active*out*in + r*(in+out) = (1-sparsity)*in*out``.  Returns (active fraction, r).
    """
    budget = 1.0 - sparsity
    r = 0.2 * budget * in_f * out_f / (in_f + out_f)
    r = int(round(r / 16.0)) * 16 if r >= 16 else int(math.ceil(r))
    active = budget - r * (in_f + out_f) / (in_f * out_f)
    return max(0.0, active), r


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="Llama-3-8B MLP shapes only")
    p.add_argument("--out", default="results", help="output folder for kernels.md / kernels.csv")
    p.add_argument("--models", nargs="*", default=None, choices=sorted(MODELS))
    p.add_argument("--tokens", nargs="*", type=int, default=None)
    p.add_argument("--sparsities", nargs="*", type=float, default=None)
    p.add_argument("--dtypes", nargs="*", default=None, choices=DTYPES)
    p.add_argument("--kernels", nargs="*", default=None, choices=KERNELS)
    p.add_argument("--projs", nargs="*", default=None)
    p.add_argument("--graph", action="store_true", help="also time CUDA-graph replays (do_bench_cudagraph)")
    p.add_argument("--sweep", action="store_true", help="sweep launch configs for the M=1/16 buckets instead")
    p.add_argument("--fallback", action="store_true", help="measure the dense-fallback token cutoff instead")
    p.add_argument("--fallback-tokens", nargs="*", type=int, default=None)
    p.add_argument("--final", action="store_true", help="target rows + path variants (Llama-3-8B MLP, bf16)")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    return p.parse_args(argv)


def build_cases(args) -> list[dict]:
    """The benchmark grid as a list of dicts (no GPU needed)."""
    if args.quick:
        models = args.models or ["llama-3-8b"]
        projs = args.projs or ["mlp_gate_up", "mlp_down"]
    else:
        models = args.models or list(MODELS)
        projs = args.projs
    tokens = args.tokens or list(TOKENS)
    sparsities = args.sparsities if args.sparsities is not None else list(SPARSITIES)
    dtypes = args.dtypes or list(DTYPES)
    kernels = args.kernels or list(DEFAULT_KERNELS)
    cases = []
    for model in models:
        for proj, in_f, out_f in projections(model):
            if projs and proj not in projs:
                continue
            for dtype in dtypes:
                for M in tokens:
                    for kernel in kernels:
                        for s in sparsities:
                            active, rank = (1.0 - s, 0)
                            if kernel == "rank-aware":
                                active, rank = rank_for(s, in_f, out_f)
                            cases.append(dict(model=model, proj=proj, in_features=in_f, out_features=out_f, M=M,
                                              dtype=dtype, kernel=kernel, sparsity=s, active=round(active, 4),
                                              rank=rank))
    return cases


def _fmt(v, nd=1):
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{nd}f}"
    return str(v)


def _bandwidth(row: dict, copy_gbps: float) -> None:
    """GB/s and % of the copy bandwidth over the bytes the call needs, from the CUDA-graph time where
    measured (eager do_bench times of one launch include the host's launch overhead: stop-8 M=1 rows read
    77.6 us eager for a 28.6 us kernel), else from the eager time."""
    us = row.get("graph_kernel_us") or row.get("kernel_us")
    if us and row.get("bytes") is not None:
        row["gbps"] = row["bytes"] / us / 1e3
        row["pct_copy_bw"] = 100.0 * row["gbps"] / copy_gbps
    if row.get("graph_kernel_us"):
        row["graph_speedup"] = row["graph_dense_us"] / row["graph_kernel_us"]


def _status(err: float) -> str:
    return "ok" if err < MAX_REL_ERR else f"WRONG: rel err {err:.2g} >= {MAX_REL_ERR:g}"


def write_results(rows: list[dict], out_dir: str) -> tuple[str, str]:
    """Write ``kernels.csv`` (all fields, every row) and ``kernels.md`` under ``out_dir``; returns the paths.

    The markdown's first table holds the default rows (what the modules run); rows with a ``variant``
    other than "default" (launch-config alternatives of ``--final``) go to a second table."""
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, "kernels.csv")
    md_path = os.path.join(out_dir, "kernels.md")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    meta = rows[0] if rows else {}
    main = [r for r in rows if r.get("variant", "default") == "default"]
    variants = [r for r in rows if r.get("variant", "default") != "default"]
    lines = [
        "# sparse-infer kernel benchmark", "",
        f"GPU: {meta.get('gpu', '?')} | torch {meta.get('torch', '?')} | triton {meta.get('triton', '?')} | "
        f"{meta.get('timestamp', '?')} | copy bandwidth {_fmt(meta.get('copy_gbps'), 0)} GB/s", "",
        f"Command: `{meta.get('command', '?')}`", "",
        "Eager: triton.testing.do_bench median (L2 flushed, includes Python launch overhead when it exceeds the "
        "flush); graph: do_bench_cudagraph median (weights rotated).  GB/s and % copy BW from the graph time where "
        f"measured, else the eager time.  Status: output against the fp32 reference (relative error < {MAX_REL_ERR:g}).",
        "",
        "| model | proj | in→out | M | dtype | kernel | sparsity | rank | dense µs | kernel µs | speedup | GB/s "
        "| % copy BW | graph dense µs | graph kernel µs | graph speedup | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in main:
        lines.append(
            f"| {r['model']} | {r['proj']} | {r['in_features']}→{r['out_features']} | {r['M']} | {r['dtype']} | "
            f"{r['kernel']} | {_fmt(r['sparsity'], 2)} | {r.get('rank', 0)} | {_fmt(r.get('dense_us'))} | "
            f"{_fmt(r.get('kernel_us'))} | {_fmt(r.get('speedup'), 2)} | {_fmt(r.get('gbps'), 0)} | "
            f"{_fmt(r.get('pct_copy_bw'), 0)} | {_fmt(r.get('graph_dense_us'))} | {_fmt(r.get('graph_kernel_us'))} | "
            f"{_fmt(r['graph_dense_us'] / r['graph_kernel_us'], 2) if r.get('graph_kernel_us') else ''} | "
            f"{r.get('status', '')} |")
    if variants:
        lines += ["", "## Launch-config variants (CUDA-graph time; same inputs as the default row above them)", "",
                  "| in→out | M | kernel | sparsity | variant | graph dense µs | graph kernel µs | graph speedup | GB/s "
                  "| % copy BW | rel. err | status |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in variants:
            err = "" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"
            lines.append(
                f"| {r['in_features']}→{r['out_features']} | {r['M']} | {r['kernel']} | {_fmt(r['sparsity'], 2)} | "
                f"{r['variant']} | {_fmt(r.get('graph_dense_us'))} | {_fmt(r.get('graph_kernel_us'))} | "
                f"{_fmt(r.get('graph_speedup'), 2)} | {_fmt(r.get('gbps'), 0)} | {_fmt(r.get('pct_copy_bw'), 0)} | "
                f"{err} | "
                f"{r.get('status', '')} |")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return md_path, csv_path


# --------------------------------------------------------------------------- GPU part
_DEV = "cuda"  # the CPU dry run of the benchmark logic (tests) swaps this
_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def copy_bandwidth_gbps() -> float:
    import triton.testing as tt
    n = 1 << 29  # 1 GiB of bytes
    a = torch.empty(n, dtype=torch.uint8, device=_DEV)
    b = torch.empty_like(a)
    ms = tt.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    del a, b
    return 2 * n / (ms * 1e-3) / 1e9


def _copies(case, elt: int, max_bytes: float = 12 * 2**30) -> int:
    """Weight copies to rotate: enough that the bytes one pass over them reads exceed 4x the L2 (a
    fixed cap of 16 left small or very sparse layers' rotations L2-resident), within ``max_bytes`` of
    weights (each copy is held twice: kernel layout and F.linear's row-major)."""
    in_f, out_f, r = case["in_features"], case["out_features"], case.get("rank") or 0
    density = case["active"] if case["kernel"] == "rank-aware" else 1.0 - case["sparsity"]
    read = (in_f * out_f * max(density, 0.05) + r * (in_f + out_f)) * elt
    return int(max(2, min(math.ceil(4 * L2_BYTES / read), max_bytes // (2 * in_f * out_f * elt))))


def _make_inputs(case, gen):
    """x (M, in), lists of weight copies (kernel layout, row-major) and of their low-rank factors (A, B,
    rotated with the weight: ~20 % of a rank-aware call's bytes), the gate, and the reference mask."""
    from sparse_infer.kernels import to_kernel_layout
    from sparse_infer.ops import Gate
    from sparse_infer import reference as ref

    dt = _DT[case["dtype"]]
    M, in_f, out_f, r = case["M"], case["in_features"], case["out_features"], case["rank"]
    x = torch.randn(M, in_f, device=_DEV, generator=gen).to(dt)
    copies = _copies(case, x.element_size())
    ws = [to_kernel_layout((torch.randn(out_f, in_f, device=_DEV, generator=gen) * in_f ** -0.5).to(dt))
          for _ in range(copies)]
    ws_dense = [w.contiguous() for w in ws]  # row-major: F.linear's layout
    sparsity = 1.0 - case["active"] if case["kernel"] == "rank-aware" else case["sparsity"]
    absx = x.float().abs()
    if case["kernel"] == "shared":
        agg = ref._step_importance(x.float(), None)  # the score shared masks rank channels by
        t = torch.quantile(agg, sparsity) if sparsity > 0 else torch.tensor(-1.0, device=_DEV)
        gate = Gate(threshold=t.reshape(()).float(), shared=True, density=1.0 - sparsity)
    elif case["kernel"] == "input-sparse-topk":
        gate = Gate(k=int(round((1 - sparsity) * in_f)))
    else:
        # per-token threshold: a per-channel vector would also do; a scalar at the global quantile
        t = torch.quantile(absx.flatten()[:1 << 20], sparsity) if sparsity > 0 else torch.tensor(-1.0, device=_DEV)
        # the density hint a calibrated module passes (it picks the M=1 loop, as in sparse_infer)
        gate = Gate(threshold=t.reshape(()).float(), density=1.0 - sparsity)
    As = Bs = [None] * copies
    if r:
        As = [(torch.randn(in_f, r, device=_DEV, generator=gen) * in_f ** -0.5).to(dt) for _ in range(copies)]
        Bs = [(torch.randn(r, out_f, device=_DEV, generator=gen) * r ** -0.5).to(dt) for _ in range(copies)]
    mask = gate.mask(x)
    return x, ws, ws_dense, gate, As, Bs, mask


def _calls(case, x, ws, As, Bs, gate, mask):
    """(fn: one call on the next copy, y_of: the call on copy 0, yr: its fp32 reference)."""
    from sparse_infer import kernels as K
    from sparse_infer import reference as ref

    it = itertools.cycle(range(len(ws)))
    if case["kernel"] == "rank-aware":
        def fn():
            i = next(it)
            return K.rsparse_linear(x, ws[i], None, As[i], Bs[i], gate)
        y_of = lambda: K.rsparse_linear(x, ws[0], None, As[0], Bs[0], gate)
        yr = ref.rsparse_linear(x.float(), ws[0].float(), None, mask, As[0].float(), Bs[0].float())
    else:
        fn = lambda: K.sparse_linear(x, ws[next(it)], None, gate)
        y_of = lambda: K.sparse_linear(x, ws[0], None, gate)
        yr = ref.sparse_linear(x.float(), ws[0].float(), None, mask)
    return fn, y_of, yr


def _rel_err(y, yr) -> float:
    """Relative error; against an all-zero reference (sparsity 1) the largest |y| (it must be 0)."""
    ref_norm = float(yr.float().norm())
    if ref_norm == 0.0:
        return float(y.float().abs().max())
    return float((y.float() - yr.float()).norm()) / ref_norm


class _cutoffs:
    """Set the ops' dense-fallback cutoffs for a block: ``NEVER`` runs the sparse kernel at any token
    count (what the per-token M=16 row and the fallback study time as "kernel"), ``ALWAYS`` sends every
    call to gate + cuBLAS, ``None`` leaves the cutoffs as they are."""

    NEVER, ALWAYS = 1 << 30, 0

    def __init__(self, tokens=None):
        self.tokens = tokens

    def __enter__(self):
        from sparse_infer.kernels import sparse_matmul as sm
        self.saved = (sm.DENSE_FALLBACK_TOKENS, sm.PER_TOKEN_FALLBACK_TOKENS)
        if self.tokens is not None:
            sm.DENSE_FALLBACK_TOKENS = sm.PER_TOKEN_FALLBACK_TOKENS = self.tokens
        return self

    def __exit__(self, *exc):
        from sparse_infer.kernels import sparse_matmul as sm
        sm.DENSE_FALLBACK_TOKENS, sm.PER_TOKEN_FALLBACK_TOKENS = self.saved
        return False


def _needed_bytes(case, x, mask, elt):
    M, in_f, out_f, r = case["M"], case["in_features"], case["out_features"], case["rank"]
    m2 = mask.reshape(-1, in_f)
    union = m2.any(0)
    active_rows = int(union.sum())
    b = active_rows * out_f * elt + M * in_f * elt + M * out_f * elt
    if r:
        inactive_rows = int((~m2).any(0).sum())
        b += inactive_rows * r * elt + r * out_f * elt
    return b


def run_case(case, copy_gbps, meta, graph=False, rep=100, check=True):
    import triton.testing as tt
    import torch.nn.functional as F

    gen = torch.Generator(device=_DEV).manual_seed(hash((case["in_features"], case["M"], case["sparsity"])) % 2**31)
    x, ws, ws_dense, gate, As, Bs, mask = _make_inputs(case, gen)
    fn, y_of, yr = _calls(case, x, ws, As, Bs, gate, mask)
    err = _rel_err(y_of(), yr)
    itd = itertools.cycle(range(len(ws)))
    dfn = lambda: F.linear(x, ws_dense[next(itd)])
    dense_ms = tt.do_bench(dfn, warmup=25, rep=rep, return_mode="median")
    k_ms = tt.do_bench(fn, warmup=25, rep=rep, return_mode="median")
    row = dict(case, variant="default")
    row.update(meta)
    row.update(dense_us=dense_ms * 1e3, kernel_us=k_ms * 1e3, speedup=dense_ms / k_ms,
               bytes=_needed_bytes(case, x, mask, x.element_size()), rel_err=err, status=_status(err))
    if graph:
        row["graph_dense_us"] = tt.do_bench_cudagraph(dfn, rep=rep, return_mode="median") * 1e3
        row["graph_kernel_us"] = tt.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3
    _bandwidth(row, copy_gbps)
    if check and row["status"] != "ok":
        print(f"WRONG: rel err {err:.3g} for {case}", file=sys.stderr)
    del ws, ws_dense
    return row


def _meta():
    import triton
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def _graph_us(fn, rep=30):
    import triton.testing as tt
    return tt.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3


def sweep(args, copy_gbps, meta):
    """Try launch configs on the Llama-3-8B MLP shapes (M=1 and 16), CUDA-graph timing; prints µs per config."""
    import torch.nn.functional as F
    from sparse_infer.kernels import _autotune as at
    variants = {
        # (BLOCK_N, BLOCK_K, programs_per_sm, num_warps, num_stages[, compact])
        1: [(128, 64, 8, 1, 1), (128, 64, 8, 1, 1, True), (128, 32, 8, 1, 1, True), (128, 64, 16, 1, 1, True),
            (256, 64, 8, 2, 1, True), (128, 64, 4, 1, 1, True), (256, 64, 8, 2, 1), (128, 128, 4, 2, 1)],
        16: [(128, 64, 4, 4, 2), (128, 64, 4, 4, 2, True), (128, 32, 8, 4, 2, True), (256, 64, 4, 4, 2, True),
             (128, 64, 8, 4, 3)],
    }
    out = []
    for bucket, vs in variants.items():
        for in_f, out_f in [(4096, 14336), (14336, 4096)]:
            kcases = ([("input-sparse", 0.5), ("input-sparse", 0.9), ("rank-aware", 0.5)] if bucket == 1
                      else [("input-sparse", 0.5), ("shared", 0.5)])
            prepared = []
            for kernel, sp in kcases:
                active, rank = (1 - sp, 0) if kernel != "rank-aware" else rank_for(sp, in_f, out_f)
                case = dict(model="llama-3-8b", proj="", in_features=in_f, out_features=out_f, M=bucket,
                            dtype="bf16", kernel=kernel, sparsity=sp, active=active, rank=rank)
                gen = torch.Generator(device=_DEV).manual_seed(0)
                x, ws, ws_dense, gate, As, Bs, mask = _make_inputs(case, gen)
                nbytes = _needed_bytes(case, x, mask, 2)
                fn = _calls(case, x, ws, As, Bs, gate, mask)[0]
                itd = itertools.cycle(range(len(ws_dense)))
                dense = _graph_us(lambda: F.linear(x, ws_dense[next(itd)]))
                prepared.append((kernel, sp, fn, dense, nbytes))
            for v in vs:
                at.set_override(bucket, **dict(zip(["BLOCK_N", "BLOCK_K", "programs_per_sm", "num_warps",
                                                    "num_stages", "compact"], v)))
                for kernel, sp, fn, dense, nbytes in prepared:
                    fn()
                    us = _graph_us(fn)
                    out.append((bucket, v, in_f, out_f, kernel, sp, us, dense))
                    print(f"SWEEP M={bucket} cfg={v} {in_f}->{out_f} {kernel:12s} s={sp}: {us:6.1f} us "
                          f"(dense {dense:5.1f}) x{dense / us:.2f} {nbytes / us / 1e3:.0f} GB/s", flush=True)
            del prepared
            torch.cuda.empty_cache()
        at.set_override(bucket)
    return out


# wgmma with the operands swapped (stop 22, untimed): the W^T tile is the MMA's M side, the tokens padded to 16
# its N side, the weight stream pipelined through shared memory by cp.async (2 copy groups in flight); 128x64
# tiles take 55-66 KB of shared memory (3-4 programs per SM), 128x128 tiles 110 KB (2 per SM) and issue 67
# instead of 100 warp-instructions per 1k weights (bench/sass_count.py).  One token: gate in-kernel on its
# row with the next block's gate prefetched (4 stages; masked loop at every density), or a gate pass
# (compacted ids at <= 35 %).  Several tokens always take the gate pass.  They come first in each list, so
# a timeout of the step loses the older variants, not these.
_SWAP = [dict(swap_ab=True, num_warps=4, num_stages=3, programs_per_sm=4),
         dict(swap_ab=True, BLOCK_K=128, num_warps=4, num_stages=3, programs_per_sm=2)]
_SWAP_ONE = [dict(swap_ab=True, prefetch=True, compact_below=0.0, num_warps=4, num_stages=4, programs_per_sm=3),
             *(dict(v, pregate=True) for v in _SWAP)]
FINAL_VARIANTS = {  # per token bucket: config overrides timed next to the table's default by --final
    # default = the table's policy (compacted ids at density <= compact_below); then the swapped wgmma tiles;
    # then each loop forced; then the instruction-count variants (bf16 column pairs widened with bit ops; a
    # 2-D accumulator with 4 warps: KERNEL_NOTES "Issue work per tile"; the next block's gate loaded one block
    # ahead: "Latency work"), untimed until a device run; M=4/16: deeper
    # cp.async pipelines (more weight bytes in flight per SM; 4 stages of the masked loop take 57 KB of
    # shared memory, so 3 programs per SM), for the compacted loop too since its ids are int16 (stop 17)
    # (run 4's compacted BLOCK_K=32 and M=16 2-stage compacted rows are dropped: measured, a draw or worse;
    # so is pairs with compaction forced at 50-70 %, where compaction was a draw)
    1: [None, *_SWAP_ONE, dict(compact_below=0.0), dict(compact=True),
        dict(bf16_pairs=True),  # (at <= 35 % density with compacted ids, as the default)
        dict(acc_2d=True, bf16_pairs=True, num_warps=4, programs_per_sm=4),
        dict(prefetch=True), dict(prefetch=True, bf16_pairs=True)],
    8: [None, *_SWAP, dict(compact_below=0.0), dict(compact=True), dict(num_stages=3)],
    16: [None, *_SWAP, dict(swap_ab=True, compact=True, num_stages=3), dict(num_stages=3),
         dict(num_stages=4, programs_per_sm=3), dict(compact=True, num_stages=3), dict(compact=True, num_stages=4)],
}


FINAL_PLAN = [(1, "input-sparse", 0.5), (1, "input-sparse", 0.7), (1, "input-sparse", 0.9), (1, "input-sparse", 1.0),
              (1, "rank-aware", 0.5), (1, "input-sparse-topk", 0.5), (4, "shared", 0.5), (4, "input-sparse", 0.5),
              (16, "shared", 0.5), (16, "input-sparse", 0.5)]


def final(args, copy_gbps, meta):
    """Target rows (Llama-3-8B MLP, bf16): eager do_bench + CUDA-graph times, path variants for
    M=4/16, M=1 config alternatives.  Returns table rows: one "default" row per case (what the modules
    run) and one per variant.  A variant that raises or computes a wrong output becomes a row saying so
    and the run goes on; ``args.out`` (if set) is rewritten after every case, so a timeout keeps what
    was measured."""
    import triton.testing as tt
    import torch.nn.functional as F
    from sparse_infer.kernels import _autotune as at
    from sparse_infer.kernels import sparse_matmul as sm
    rows = []
    for in_f, out_f in getattr(args, "final_shapes", None) or [(4096, 14336), (14336, 4096)]:
        dense_cache = {}
        for M, kernel, sp in getattr(args, "final_plan", None) or FINAL_PLAN:
            active, rank = (1 - sp, 0) if kernel != "rank-aware" else rank_for(sp, in_f, out_f)
            case = dict(model="llama-3-8b", proj="mlp_gate_up" if in_f == 4096 else "mlp_down", in_features=in_f,
                        out_features=out_f, M=M, dtype="bf16", kernel=kernel, sparsity=sp, active=round(active, 4),
                        rank=rank)
            gen = torch.Generator(device=_DEV).manual_seed(M)
            x, ws, ws_dense, gate, As, Bs, mask = _make_inputs(case, gen)
            nbytes = _needed_bytes(case, x, mask, 2)
            fn, y_of, yr = _calls(case, x, ws, As, Bs, gate, mask)
            if M not in dense_cache:
                itd = itertools.cycle(range(len(ws_dense)))
                dfn = lambda: F.linear(x, ws_dense[next(itd)])
                dense_cache[M] = (tt.do_bench(dfn, rep=50, return_mode="median") * 1e3, _graph_us(dfn))
            d_eager, d_graph = dense_cache[M]
            bucket = at.token_bucket(M)
            variants = [(None, False)] + [(v, False) for v in FINAL_VARIANTS[bucket][1:]]
            if kernel == "input-sparse-topk":
                variants = variants[:1]
            if sm._fallback(M, gate):  # the default row is gate + cuBLAS: time the kernel itself too
                variants += [(v, True) for v in FINAL_VARIANTS[bucket]]
            for vi, (v, forced) in enumerate(variants):
                if vi and sp == 1.0:
                    continue
                tag = ("default" if v is None else ",".join(f"{k}={val}" for k, val in v.items()))
                tag = (tag + " (no fallback: the kernel)") if forced else tag
                row = dict(case, variant=tag, bytes=nbytes, graph_dense_us=d_graph, **meta,
                           overrides=dict(v or {}), forced=forced, fallback=sm._fallback(M, gate))
                try:
                    if v:
                        at.set_override(bucket, **v)
                    with _cutoffs(_cutoffs.NEVER if forced else None):
                        err = _rel_err(y_of(), yr)
                        g_us = _graph_us(fn)
                        e_us = tt.do_bench(fn, rep=50, return_mode="median") * 1e3 if vi == 0 else None
                    row.update(graph_kernel_us=g_us, rel_err=err, status=_status(err))
                    if e_us is not None:
                        row.update(dense_us=d_eager, kernel_us=e_us, speedup=d_eager / e_us)
                    _bandwidth(row, copy_gbps)
                    print(f"FINAL {in_f}->{out_f} M={M:2d} {kernel:17s} s={sp:.1f} r={rank:3d} [{tag}]: graph {g_us:6.1f} us "
                          f"(dense {d_graph:5.1f}, x{d_graph / g_us:.2f})"
                          + (f" eager {e_us:6.1f} us (dense {d_eager:5.1f}, x{d_eager / e_us:.2f})" if e_us else "")
                          + f" {row['gbps']:.0f} GB/s {row['pct_copy_bw']:.0f}% err={err:.1e} {row['status']}", flush=True)
                except Exception as e:  # a variant never run on this GPU may fail to compile or launch
                    row.update(status=f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
                    print(f"FINAL {in_f}->{out_f} M={M:2d} {kernel:17s} s={sp:.1f} [{tag}]: {row['status']}", flush=True)
                finally:
                    if v:
                        at.set_override(bucket)
                rows.append(row)
            del ws, ws_dense, As, Bs
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if getattr(args, "out", None):  # after every case: a timeout keeps what was measured
                write_results(rows, args.out)
                write_tuning(pick_tuning(rows), meta, args.out, quiet=True)
    if getattr(args, "out", None):
        write_tuning(pick_tuning(rows), meta, args.out)
    return rows


TUNING_MIN_GAIN = 0.02  # a variant replaces the table's config only if it is this much faster (timing noise)


def pick_tuning(rows: list[dict]) -> dict:
    """Per token bucket, the config with the lowest geometric-mean CUDA-graph time over the bucket's cases.

    Counted: rows of ``final`` whose kernel runs with the bucket's config (not the rows where the ops fall back
    to gate + cuBLAS, not the "no fallback" rows that time the kernel past that cutoff, not top-k or 100 %
    rows, which time the default only); a variant competes only if it ran correctly ("ok") on every case the
    default did.  The default stays unless a variant is ``TUNING_MIN_GAIN`` faster.  Returns {bucket:
    dict(config=MatmulConfig, variant=tag, geomean_us, default_geomean_us, cases, candidates)}."""
    from dataclasses import replace
    from sparse_infer.kernels import _autotune as at
    times: dict = {}  # bucket -> variant tag -> {case: graph us}
    overrides: dict = {}
    for r in rows:
        if r.get("forced") or r.get("fallback") or r.get("status") != "ok" or not r.get("graph_kernel_us"):
            continue
        if r["kernel"] == "input-sparse-topk" or r["sparsity"] >= 1.0:
            continue
        b = at.token_bucket(int(r["M"]))
        case = (r["in_features"], r["out_features"], r["M"], r["kernel"], r["sparsity"], r.get("rank", 0))
        times.setdefault(b, {}).setdefault(r["variant"], {})[case] = float(r["graph_kernel_us"])
        overrides[(b, r["variant"])] = r.get("overrides") or {}
    picked = {}
    for b, by_variant in sorted(times.items()):
        cases = sorted(by_variant.get("default", {}))
        if not cases:
            continue

        def geomean(t):
            return math.exp(sum(math.log(t[c]) for c in cases) / len(cases))

        scored = {tag: geomean(t) for tag, t in by_variant.items() if all(c in t for c in cases)}
        best = min(scored, key=scored.get)
        if best != "default" and scored[best] > scored["default"] * (1 - TUNING_MIN_GAIN):
            best = "default"
        picked[b] = dict(config=replace(at._table(b), **overrides[(b, best)]), variant=best,
                         geomean_us=round(scored[best], 2), default_geomean_us=round(scored["default"], 2),
                         cases=len(cases), candidates=len(scored))
    return picked


def write_tuning(picked: dict, meta: dict, out_dir: str, quiet: bool = False) -> str:
    """Write ``tuning.json`` (what ``sparse_infer.kernels._autotune.load_tuning`` and ``$SPARSE_INFER_TUNING``
    read) under ``out_dir`` and, unless ``quiet``, print one line per bucket; returns the path."""
    from sparse_infer.kernels import _autotune as at
    measured = {b: {k: v for k, v in p.items() if k != "config"} for b, p in picked.items()}
    data = at.tuning_dict({b: p["config"] for b, p in picked.items()}, measured,
                          device=meta.get("gpu"), torch=meta.get("torch"), triton=meta.get("triton"),
                          timestamp=meta.get("timestamp"), command=meta.get("command"),
                          rule=f"per token bucket: lowest geometric-mean CUDA-graph time over the bucket's --final "
                               f"cases among variants correct on all of them; the default unless "
                               f"{TUNING_MIN_GAIN:.0%} faster")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tuning.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    if quiet:
        return path
    for b, p in picked.items():
        print(f"TUNING bucket {b}: {p['variant']} {p['geomean_us']:.1f} us geomean over {p['cases']} cases "
              f"(default {p['default_geomean_us']:.1f} us, x{p['default_geomean_us'] / p['geomean_us']:.2f}; "
              f"{p['candidates']} candidates)", flush=True)
        print(f"TUNING   _GPU[{b}] = {p['config']!r}", flush=True)  # the line for kernels/_autotune.py's table
    print(f"wrote {path} (use it: SPARSE_INFER_TUNING={path})", flush=True)
    return path


def launch_overhead():
    """CPU microseconds per call of the launchers (no GPU sync), vs F.linear."""
    import time
    import torch.nn.functional as F
    from sparse_infer import kernels as K
    from sparse_infer.ops import Gate
    x = torch.randn(1, 4096, device=_DEV, dtype=torch.bfloat16)
    w = K.to_kernel_layout(torch.randn(4096, 4096, device=_DEV, dtype=torch.bfloat16))
    A = torch.randn(4096, 64, device=_DEV, dtype=torch.bfloat16)
    B = torch.randn(64, 4096, device=_DEV, dtype=torch.bfloat16)
    g = Gate(threshold=torch.tensor(0.5, device=_DEV))
    for name, fn in [("F.linear", lambda: F.linear(x, w)), ("sparse_linear", lambda: K.sparse_linear(x, w, None, g)),
                     ("rsparse_linear", lambda: K.rsparse_linear(x, w, None, A, B, g)),
                     ("sparse_linear topk", lambda: K.sparse_linear(x, w, None, Gate(k=2048)))]:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(200):
            fn()
        cpu = (time.perf_counter() - t) / 200 * 1e6
        torch.cuda.synchronize()
        print(f"LAUNCH {name}: {cpu:.1f} us CPU per call", flush=True)


def fallback(args, meta):
    """Sparse kernel vs gate + dense cuBLAS per M: where does dense win?  Per-token rows use a threshold
    with its density hint (as a calibrated module does), shared rows top-k of the step's RMS (the shared
    mode's gate); weights rotate (L2) and both paths are checked against the reference first."""
    import torch.nn.functional as F
    from sparse_infer.ops import Gate
    res = []
    for in_f, out_f in [(4096, 14336), (14336, 4096)][: 1 if args.fallback_tokens else 2]:
        for M in (args.fallback_tokens or (16, 32, 48, 64, 96, 128, 256)):
            for shared in (False, True):
                case = dict(in_features=in_f, out_features=out_f, M=M, dtype="bf16", kernel="input-sparse",
                            sparsity=0.5, active=0.5, rank=0)
                gen = torch.Generator(device=_DEV).manual_seed(M)
                x, ws, ws_dense, gate, As, Bs, _ = _make_inputs(case, gen)
                if shared:
                    gate = Gate(k=in_f // 2, shared=True)
                mask = gate.mask(x)
                fn, y_of, yr = _calls(case, x, ws, As, Bs, gate, mask)
                times, errs = {}, {}
                # gate + cuBLAS on the kernel-layout weight: what a patched module's fallback runs
                for name, cutoff in (("sparse", _cutoffs.NEVER), ("gate+dense", _cutoffs.ALWAYS)):
                    with _cutoffs(cutoff):
                        errs[name] = _rel_err(y_of(), yr)
                        times[name] = _graph_us(fn)
                it = itertools.cycle(range(len(ws_dense)))
                dd = _graph_us(lambda: F.linear(x, ws_dense[next(it)]))
                res.append((in_f, out_f, M, shared, times["sparse"], times["gate+dense"], dd))
                bad = [f"{n} WRONG (rel err {e:.2g})" for n, e in errs.items() if e >= MAX_REL_ERR]
                print(f"FALLBACK {in_f}->{out_f} M={M} shared={shared}: sparse {times['sparse']:.1f} us, "
                      f"gate+dense {times['gate+dense']:.1f} us, dense {dd:.1f} us" + (f" {'; '.join(bad)}" if bad else ""),
                      flush=True)
                del ws, ws_dense
    return res


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (build_cases/write_results work without one)", file=sys.stderr)
        return 2
    meta = _meta()
    tuning = os.environ.get("SPARSE_INFER_TUNING")  # launch configs from a tuning file: part of what reruns it
    meta["command"] = ((f"SPARSE_INFER_TUNING={shlex.quote(tuning)} " if tuning else "")
                       + shlex.join(["python", "bench/bench_kernels.py", *(sys.argv[1:] if argv is None else argv)]))
    copy_gbps = copy_bandwidth_gbps()
    meta["copy_gbps"] = copy_gbps
    print(f"{meta['gpu']} torch {meta['torch']} triton {meta['triton']}: copy bandwidth {copy_gbps:.0f} GB/s",
          flush=True)
    if args.final:
        launch_overhead()
        rows = final(args, copy_gbps, meta)
        md, csv_path = write_results(rows, args.out)
        print(f"wrote {md} and {csv_path}")
        if args.fallback:
            fallback(args, meta)
        return 0
    if args.sweep:
        launch_overhead()
        sweep(args, copy_gbps, meta)
        if not args.fallback:
            return 0
        fallback(args, meta)
        return 0
    if args.fallback:
        fallback(args, meta)
        if not args.sweep:
            return 0
    rows = []
    for case in build_cases(args):
        label = (f"{case['model']} {case['proj']} {case['in_features']}->{case['out_features']} M={case['M']} "
                 f"{case['dtype']} {case['kernel']} s={case['sparsity']} r={case['rank']}")
        try:
            r = run_case(case, copy_gbps, meta, graph=args.graph, rep=args.rep)
        except Exception as e:  # one case that fails to compile or launch does not lose the others
            rows.append(dict(case, variant="default", status=f"FAILED: {type(e).__name__}: {str(e)[:120]}", **meta))
            print(f"{label}: {rows[-1]['status']}", flush=True)
            continue
        rows.append(r)
        print(f"{label}: dense {r['dense_us']:.1f} kernel {r['kernel_us']:.1f} us x{r['speedup']:.2f} "
              f"{r['gbps']:.0f} GB/s ({r['pct_copy_bw']:.0f}%) err={r['rel_err']:.1e} {r['status']}"
              + (f" graph {r['graph_dense_us']:.1f}/{r['graph_kernel_us']:.1f}" if args.graph else ""), flush=True)
        write_results(rows, args.out)  # after every case: a timeout keeps what was measured
    md, csv_path = write_results(rows, args.out)
    print(f"wrote {md} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
