"""Compile every launched Triton kernel of sparse_infer.kernels for sm_90, without a GPU.

A device session is lost if a kernel fails to compile there (triton 3.6 on the H100): an API newer
than the device's triton, or a constexpr combination that does not type-check.  This script
compiles each kernel the launchers start with a grid (``_sparse_mm_kernel``, ``_topk_kernel``,
``_threshold_kernel``, ``_apply_mask_kernel``, ``_pregate_kernel``, ``_gate_up_kernel``,
``_down_kernel``, ``_finalize_kernel``; the @triton.jit helpers compile inside them) for sm_90 with
the ptxas of the triton wheel, as ``bench/sass_count.py`` does, over the combinations the launchers
produce on an H100 (132 SMs): the launch constexprs, pointer dtypes, integer specialisations
(``== 1``: constexpr, multiple of 16: divisible) and num_warps / num_stages / fp fusion are derived
from launch cases below through the launchers' own config code (``_autotune.matmul_config``,
``split_k``, ``_gate_plan``, ``compact_block``, the gated-MLP tile tables), including the config
overrides of ``bench/bench_kernels.py`` FINAL_VARIANTS; identical compiles are run once.  Each flag
and dtype (bf16 / fp16 / fp32) is covered at least once, not the full product.

    python bench/compile_check.py                 # all kernels; exit code 1 if any compile fails
    python bench/compile_check.py --list          # the combinations only
    python bench/compile_check.py --only pregate -j 1
    PYTHONPATH=. /path/to/triton-3.6-venv/bin/python bench/compile_check.py   # the device's triton

Compiles run in ``-j`` processes (default: up to 4, one per core).  Without the package installed,
this checkout's kernels/ is loaded as ``sparse_infer.kernels``.

Prints a markdown table: kernel, combination, ok or the error's first line, registers, stack
bytes (spills), shared memory bytes.  A kernel needing more shared memory than an H100 block can
have (227 KiB) counts as a failure: Triton refuses to load it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.util
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
H100_SMS = 132
H100_MAX_SHARED = 232448  # bytes per block (opt-in maximum)

if os.environ.get("TRITON_INTERPRET") == "1":  # interpreted kernels cannot be compiled: run again without it
    os.execve(sys.executable, [sys.executable, *sys.argv],
              {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sass_count import _ptx_bin  # noqa: E402


def _import_kernels():
    """``sparse_infer.kernels``; from this checkout's kernels/ when the package is not installed."""
    try:
        import sparse_infer.kernels as k
        return k
    except ModuleNotFoundError:
        pass
    try:
        import sparse_infer  # noqa: F401
    except ModuleNotFoundError:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location("sparse_infer.kernels", ROOT / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "kernels")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sparse_infer.kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


_import_kernels()
import torch  # noqa: E402
import triton  # noqa: E402

import importlib  # noqa: E402

# the modules themselves (the package's ``gated_mlp`` attribute is the function of that name)
at, gmlp, gt, sm = (importlib.import_module(f"sparse_infer.kernels.{m}")
                    for m in ("_autotune", "gated_mlp", "gating", "sparse_matmul"))

MODULES = (sm, gt, gmlp)
DEV = torch.device("cuda", 0)  # never touched: the config code only reads its type and index
at._SM_CACHE[0] = H100_SMS
TDT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IDS = {torch.int16: "i16", torch.int32: "i32"}
cdiv = triton.cdiv


def P(dtype: str) -> str:
    """A pointer argument (torch allocations: 16-byte aligned, as the launchers pass them)."""
    return "*" + dtype


@dataclass
class Launch:
    kernel: str
    label: str
    vals: dict  # runtime arguments: P(dtype) pointer, int, float
    const: dict  # constexpr arguments
    opts: dict = field(default_factory=dict)  # num_warps, num_stages, enable_fp_fusion

    def key(self):
        return (self.kernel, tuple(sorted(self.vals.items())),
                tuple(sorted((k, repr(v)) for k, v in self.const.items())),
                tuple(sorted(self.opts.items())))

    def describe(self) -> str:
        flags = []
        for k, v in self.const.items():
            if v is True:
                flags.append(k)
            elif v is not False:
                flags.append(f"{k}={getattr(v, 'name', v)}")
        opts = f"w{self.opts.get('num_warps', 4)}"
        if "num_stages" in self.opts:
            opts += f" s{self.opts['num_stages']}"
        return f"{self.label}: {' '.join(flags)} {opts}"


# --------------------------------------------------------------------------- _sparse_mm_kernel (sparse_matmul._launch)
class _override:
    """``_autotune.set_override`` for one bucket inside a block."""

    def __init__(self, M, fields):
        self.bucket, self.fields = at.token_bucket(M), fields or {}

    def __enter__(self):
        at.set_override(self.bucket, **self.fields)

    def __exit__(self, *exc):
        at.set_override(self.bucket)


def _mm(label, dt, M, N, K, cfg, *, mode, w="col", y_dt=None, bias=False, scale=False, t_stride=0, gm=None,
        gm_rows=1, invert=False, R=0, cblock=0):
    """One ``_sparse_mm_kernel`` launch as ``sparse_matmul._launch`` makes it.  w: "col" (column-major
    (N, K), also A.t() of a row-major A) or "row"."""
    y_dt = y_dt or dt
    use_dot = cfg.use_dot
    dot_native = use_dot and dt in ("bf16", "fp16")
    n_tiles, m_tiles = cdiv(N, cfg.BLOCK_N), cdiv(M, cfg.BLOCK_M)
    if mode == sm.MODE_COMPACT:
        per, split = cblock // cfg.BLOCK_K, cdiv(K, cblock)
    else:
        split, per = at.split_k(n_tiles, m_tiles, max(1, cdiv(K, cfg.BLOCK_K)), cfg, DEV)
    r_per = cdiv(cdiv(R, cfg.BLOCK_K), split) if R else 0
    stride_wk, stride_wn = (N, 1) if w == "col" else (1, K)
    pairs_ok = dt == "bf16" and stride_wn == 1 and stride_wk % 2 == 0 and N % 2 == 0
    gm_s0 = K if (mode == sm.MODE_MASK and gm_rows > 1) else 0
    vals = dict(x_ptr=P(dt), w_ptr=P(dt), y_ptr=P(y_dt), b_ptr=P(dt),
                t_ptr=P("fp32") if mode in (sm.MODE_THRESH, sm.MODE_SHARED_THRESH) else P(dt),
                s_ptr=P("fp32") if scale else P(dt), gm_ptr=P(gm) if gm else P(dt),
                cc_ptr=P("i32") if mode == sm.MODE_COMPACT else P(dt),
                z_ptr=P("fp32") if R else P(dt), lb_ptr=P(dt),
                ws_ptr=P("fp32") if split > 1 else P(y_dt), cnt_ptr=P("i32") if split > 1 else P(y_dt),
                M=M, N=N, K=K, R=R, stride_xm=K, stride_xk=1, stride_wk=stride_wk, stride_wn=stride_wn,
                stride_ym=N, stride_yn=1, stride_t=t_stride, stride_gm=gm_s0, stride_gk=1 if gm else 0,
                stride_zm=R, stride_zr=1 if R else 0, stride_br=N if R else 0, stride_bn=1 if R else 0,
                K_BLOCKS_PER_SPLIT=per, R_BLOCKS_PER_SPLIT=r_per)
    const = dict(MODE=mode, INVERT=invert, HAS_SCALE=scale, HAS_BIAS=bias, LOWRANK=R > 0, BLOCK_M=cfg.BLOCK_M,
                 BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, SPLIT_K=split, USE_DOT=use_dot, DOT_NATIVE=dot_native,
                 ACC_2D=cfg.acc_2d and cfg.BLOCK_M == 1, EVEN_N=N % cfg.BLOCK_N == 0,
                 BF16_PAIRS=cfg.bf16_pairs and not use_dot and pairs_ok, PREFETCH=cfg.prefetch,
                 SWAP_AB=cfg.swap_ab and use_dot, ONE_TOKEN=M == 1 and cfg.BLOCK_M > 1 and mode < sm.MODE_DENSE)
    return Launch("_sparse_mm_kernel", label, vals, const,
                  dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True))


def _topk(label, dt, rows, M, K, *, shared, scale=None):
    """``gating._topk_launch``: ``rows`` masks over K channels (M tokens per mask when shared)."""
    resident = K <= gt.RESIDENT_MAX
    block = triton.next_power_of_2(K) if resident else 4096
    vals = dict(x_ptr=P(dt), s_ptr=P(scale or dt), mask_ptr=P("i8"), M=M, K=K, k=K // 2,
                stride_xr=K, stride_xm=(rows * K) if shared else 0, stride_xk=1, stride_mm=K)
    return Launch("_topk_kernel", label, vals,
                  dict(HAS_SCALE=scale is not None, SHARED=shared, RESIDENT=resident, BLOCK=block),
                  dict(num_warps=max(4, min(16, block // 1024)), **gt.EXACT_RMS))


def _threshold(label, dt, rows, M, K, *, shared, scale=None, t_stride=0):
    vals = dict(x_ptr=P(dt), t_ptr=P("fp32"), s_ptr=P(scale or dt), mask_ptr=P("i8"), M=M, K=K,
                stride_xr=K, stride_xm=(rows * K) if shared else 0, stride_xk=1, stride_t=t_stride, stride_mm=K)
    return Launch("_threshold_kernel", label, vals, dict(HAS_SCALE=scale is not None, SHARED=shared, BLOCK=1024),
                  dict(num_warps=4, **gt.EXACT_RMS))


def _apply(label, dt, M, K, *, mask_rows, invert=False):
    vals = dict(x_ptr=P(dt), mask_ptr=P("i8"), out_ptr=P(dt), M=M, K=K, stride_xm=K, stride_xk=1,
                stride_mm=0 if mask_rows == 1 else K, stride_mk=1, stride_om=K)
    return Launch("_apply_mask_kernel", label, vals, dict(INVERT=invert, BLOCK=1024), dict(num_warps=4))


def _pregate(label, dt, M, K, *, mode, scale=False, t_stride=0, gm_rows=1, invert=False, cblock=0, ids=None):
    """``gating.pregate`` as ``sparse_matmul._pregated`` calls it (mode: the fused gate's mode 0-3)."""
    dummy = "i8"  # absent outputs: the union buffer
    vals = dict(x_ptr=P(dt), t_ptr=P("fp32") if mode in (0, 2) else P(dt), s_ptr=P("fp32") if scale else P(dt),
                gm_ptr=P("i8") if mode in (1, 3) else P(dt), xe_ptr=P(dt), any_ptr=P("i8"),
                xi_ptr=P(dt), anyi_ptr=P("i8"),
                idx_ptr=P(IDS[ids]) if cblock else P(dummy), cnt_ptr=P("i32") if cblock else P(dummy),
                idxi_ptr=P(IDS[ids]) if cblock and invert else P(dummy),
                cnti_ptr=P("i32") if cblock and invert else P(dummy),
                M=M, K=K, stride_xm=K, stride_xk=1, stride_t=t_stride,
                stride_gm=K if (mode == 1 and gm_rows > 1) else 0, stride_gk=1 if mode in (1, 3) else 0)
    return Launch("_pregate_kernel", label, vals,
                  dict(MODE=mode, HAS_SCALE=scale, WRITE_INV=invert, COMPACT=bool(cblock), BLOCK=cblock or 512),
                  dict(num_warps=4, **gt.EXACT_RMS))


def sparse_linear(label, dt, M, K, N, gate, *, density=None, ov=None, bias=False, scale=False, t_stride=0, w="col",
                  rank=0):
    """The launches of ``sparse_linear`` (``rank``: ``rsparse_linear`` with A (K, rank), B (rank, N)) on an H100:
    gate: "thr" | "thr-shared" | "topk" | "topk-shared" (one decode step)."""
    tdt = TDT[dt]
    x2 = SimpleNamespace(dtype=tdt, device=DEV, shape=(M, K))
    out = []
    with _override(M, ov):
        cfg = at.matmul_config(M, N, K, tdt, DEV)
        shared = gate.endswith("shared")
        # _gate_args
        if gate.startswith("topk"):
            out.append(_topk(f"{label}, top-k pass", dt, 1 if shared else M, M if shared else 1, K, shared=shared,
                             scale="fp32" if scale else None))
            fmode, gm = (sm.MODE_SHARED_MASK if shared else sm.MODE_MASK), "i8"
        elif shared and M > sm._fused_block_m(M, x2):
            out.append(_threshold(f"{label}, threshold pass", dt, 1, M, K, shared=True,
                                  scale="fp32" if scale else None, t_stride=t_stride))
            fmode, gm = sm.MODE_SHARED_MASK, "i8"
        else:
            fmode, gm = (sm.MODE_SHARED_THRESH if shared else sm.MODE_THRESH), None
        fscale = scale and gm is None
        separate, cblock = sm._gate_plan(M, N, K, x2, None if rank else sm.density_hint(
            SimpleNamespace(k=(round(density * K) if density else K // 2) if gate.startswith("topk") else None,
                            shared=shared, density=density), K, M))
        mm = dict(bias=bias, w=w)
        if separate:  # sparse_matmul._pregated
            ids = None
            if cblock:
                c1 = at.matmul_config(M, 1, 1, tdt, DEV)
                ids = gt.compact_ids_dtype(cblock, c1.use_dot and c1.num_stages >= 3)
            out.append(_pregate(f"{label}, gate pass", dt, M, K, mode=fmode, scale=fscale,
                                t_stride=t_stride if gm is None else 0,
                                gm_rows=M, invert=bool(rank), cblock=cblock, ids=ids))
            g = (dict(mode=sm.MODE_COMPACT, gm=IDS[ids], cblock=cblock) if cblock
                 else dict(mode=sm.MODE_PREGATED, gm="i8"))
            if rank:
                out.append(_mm(f"{label}, z pass", dt, M, rank, K, at.matmul_config(M, rank, K, tdt, DEV),
                               y_dt="fp32", **g))
            out.append(_mm(label + (", W pass" if rank else ""), dt, M, N, K, cfg, R=rank, **g, **mm))
        else:
            g = dict(mode=fmode, gm=gm, gm_rows=1 if shared else M, scale=fscale,
                     t_stride=t_stride if gm is None else 0)
            if rank:
                out.append(_mm(f"{label}, z pass", dt, M, rank, K, at.matmul_config(M, rank, K, tdt, DEV),
                               y_dt="fp32", invert=True, **g))
            out.append(_mm(label + (", W pass" if rank else ""), dt, M, N, K, cfg, R=rank, **g, **mm))
    return out


# --------------------------------------------------------------------------- gated MLP (gated_mlp._gated_mlp_impl)
def gated_mlp(label, dt, M, gate, act="silu", *, t="float", scale=False, biases=False, wd="col",
              hidden=4096, inter=14336, out_f=4096):
    """gate: "thr" | "thr-shared" | "topk" | "topk-shared"; t: "float" | "scalar-tensor" | "channel-tensor"."""
    use_dot = M > 1
    m_pad, mode = (16, "dot") if use_dot else (1, "gemv")
    dot_f32 = dt == "fp32"
    bn, bk, nw = gmlp._GATE_CFG[mode]
    shared = gate.endswith("shared")
    common = dict(ACT=gmlp.ACTIVATIONS[act], HAS_SCALE=scale, HAS_BG=biases, HAS_BU=biases, M_PAD=m_pad,
                  BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot, DOT_F32=dot_f32)
    opts = dict(num_warps=nw, enable_fp_fusion=True)
    bias_p = P(dt) if biases else P("fp32")
    args_w = dict(x_ptr=P(dt), stride_xm=hidden, stride_xk=1, wg_ptr=P(dt), stride_wgn=hidden, stride_wgk=1,
                  bg_ptr=bias_p, wu_ptr=P(dt), stride_wun=hidden, stride_wuk=1, bu_ptr=bias_p,
                  p_ptr=P("fp32"), scale_ptr=P("fp32"), M=M, N=inter, K=hidden)
    out = []
    if gate.startswith("topk"):
        out.append(Launch("_gate_up_kernel", f"{label}, phase 0", dict(args_w, h_ptr=P("fp32"), mask_ptr=P("fp32"),
                          stride_mask_m=0, thr_ptr=P("fp32"), thr_val=0.0),
                          dict(common, PHASE=0, MASK_MODE=gmlp._MASK_BUF, T_MODE=0), opts))
        out.append(_topk(f"{label}, top-k of h", "fp32", 1 if shared else M, M if shared else 1, inter, shared=shared,
                         scale="fp32" if scale else None))
        out.append(Launch("_gate_up_kernel", f"{label}, phase 2", dict(args_w, h_ptr=P("fp32"), mask_ptr=P("i8"),
                          stride_mask_m=0 if shared else inter, thr_ptr=P("fp32"), thr_val=0.0),
                          dict(common, PHASE=2, MASK_MODE=gmlp._MASK_BUF, T_MODE=0), opts))
    else:
        t_mode = {"float": gmlp._T_SCALAR_ARG, "scalar-tensor": gmlp._T_SCALAR_PTR,
                  "channel-tensor": gmlp._T_CHANNEL_PTR}[t]
        out.append(Launch("_gate_up_kernel", f"{label}, phase 1", dict(args_w, h_ptr=P("fp32"), mask_ptr=P("fp32"),
                          stride_mask_m=0, thr_ptr=P("fp32"), thr_val=0.5 if t == "float" else 0.0),
                          dict(common, PHASE=1, MASK_MODE=gmlp._THRESH_SHARED if shared else gmlp._THRESH,
                               T_MODE=t_mode), opts))
    bi, bj, dw = gmlp._DOWN_CFG[mode]
    grid_j = cdiv(out_f, bj)
    want = max(1, (4 * H100_SMS) // grid_j)
    chunk = cdiv(cdiv(inter, want), bi) * bi
    splits = cdiv(inter, chunk)
    stride_wdo, stride_wdi = (1, out_f) if wd == "col" else (inter, 1)
    out.append(Launch("_down_kernel", f"{label}, down", dict(p_ptr=P("fp32"), wd_ptr=P(dt), stride_wdo=stride_wdo,
                      stride_wdi=stride_wdi, part_ptr=P("fp32"), M=M, N=inter, OUT=out_f, CHUNK=chunk),
                      dict(M_PAD=m_pad, BLOCK_I=bi, BLOCK_J=bj, USE_DOT=use_dot, DOT_F32=dot_f32),
                      dict(num_warps=dw, enable_fp_fusion=True)))
    fb = max(64, 1024 // m_pad)
    out.append(Launch("_finalize_kernel", f"{label}, finalize", dict(part_ptr=P("fp32"), bd_ptr=bias_p, x_ptr=P(dt),
                      stride_xm=hidden, stride_xk=1, out_ptr=P(dt), M=M, OUT=out_f, K=hidden, SPLITS=splits),
                      dict(HAS_BD=biases, M_PAD=m_pad, BLOCK=fb, BLOCK_X=fb), dict(num_warps=4)))
    return out


# --------------------------------------------------------------------------- the cases
# (K, N): Llama-3-8B up projection, its down projection, and one K block (SPLIT_K 1) with N % BLOCK_N != 0
LL, DOWN, ODD = (4096, 14336), (14336, 4096), (64, 1000)
RANK = 320  # bench_kernels.rank_for(0.5, 4096, 14336)


def cases() -> list[Launch]:
    L = []
    sl = lambda *a, **k: L.extend(sparse_linear(*a, **k))  # noqa: E731
    # M = 1, the table's config: fused gate of each mode, every dtype, both weight layouts
    sl("bf16 M=1 threshold", "bf16", 1, *LL, "thr")
    sl("fp16 M=1 threshold, scale, per-channel t, bias, row-major W", "fp16", 1, *LL, "thr", scale=True, t_stride=1,
       bias=True, w="row")
    sl("fp32 M=1 threshold", "fp32", 1, *LL, "thr")
    sl("bf16 M=1 top-k", "bf16", 1, *LL, "topk")
    sl("fp16 M=1 shared threshold, scale", "fp16", 1, *LL, "thr-shared", scale=True)
    sl("fp32 M=1 shared top-k, scale", "fp32", 1, *LL, "topk-shared", scale=True)
    sl("bf16 M=1 threshold density 0.1 (compacted)", "bf16", 1, *LL, "thr", density=0.1)
    sl("fp16 M=1 top-k 14336->4096 density 0.1 (compacted)", "fp16", 1, *DOWN, "topk", density=0.1)
    sl("fp32 M=1 threshold density 0.1 (compacted), bias, row-major W", "fp32", 1, *LL, "thr", density=0.1,
       bias=True, w="row")
    sl("bf16 M=1 64->1000 threshold, bias", "bf16", 1, *ODD, "thr", bias=True)
    sl("fp32 M=1 64->1000 shared top-k, bias", "fp32", 1, *ODD, "topk-shared", bias=True)
    for dt in ("bf16", "fp16", "fp32"):
        sl(f"{dt} M=1 rank-aware r={RANK}", dt, 1, *LL, "thr", rank=RANK, bias=dt == "fp16")
    # M = 2..16: gate pass + tensor-core loop
    sl("bf16 M=4 shared threshold density 0.5 (compacted)", "bf16", 4, *LL, "thr-shared", density=0.5)
    sl("bf16 M=4 threshold, bias", "bf16", 4, *LL, "thr", bias=True)
    sl("fp16 M=4 top-k, scale", "fp16", 4, *LL, "topk", scale=True)
    sl("fp32 M=4 shared top-k density 0.5 (compacted)", "fp32", 4, *LL, "topk-shared", density=0.5)
    sl("fp32 M=4 threshold, scale, per-channel t", "fp32", 4, *LL, "thr", scale=True, t_stride=1)
    sl("bf16 M=16 64->1000 shared threshold, bias", "bf16", 16, *ODD, "thr-shared", bias=True)
    for dt in ("bf16", "fp32"):
        sl(f"{dt} M=4 rank-aware r={RANK}", dt, 4, *LL, "thr", rank=RANK)
    # FINAL_VARIANTS of bench_kernels.py (bf16, the Llama shapes): each config on the paths it runs
    from bench_kernels import FINAL_VARIANTS  # this folder is on sys.path
    for bucket, variants in FINAL_VARIANTS.items():
        for v in variants[1:]:
            tag = ",".join(f"{k}={x}" for k, x in v.items())
            if bucket == 1:
                sl(f"bf16 M=1 threshold [{tag}]", "bf16", 1, *LL, "thr", density=0.5, ov=v)
                sl(f"bf16 M=1 threshold density 0.1 [{tag}]", "bf16", 1, *LL, "thr", density=0.1, ov=v)
                sl(f"bf16 M=1 rank-aware [{tag}]", "bf16", 1, *LL, "thr", rank=RANK, ov=v)
            else:
                M = 4 if bucket == 8 else 16
                sl(f"bf16 M={M} shared threshold density 0.5 [{tag}]", "bf16", M, *LL, "thr-shared", density=0.5, ov=v)
                sl(f"bf16 M={M} threshold [{tag}]", "bf16", M, *LL, "thr", ov=v)
    # swapped wgmma operands in the other dtypes (fp16 native, fp32 the IEEE dot), one token and several
    sl("fp16 M=1 top-k, bias [swap_ab]", "fp16", 1, *LL, "topk", bias=True, ov=dict(swap_ab=True, num_warps=4, num_stages=3))
    sl("fp32 M=3 threshold [swap_ab]", "fp32", 3, *LL, "thr", ov=dict(swap_ab=True, num_warps=4, num_stages=3))
    # above the dense-fallback cutoffs (reachable when they are raised): BLOCK_M 32 and 64
    sl("bf16 M=32 shared threshold (cutoffs raised)", "bf16", 32, *LL, "thr-shared")
    sl("bf16 M=64 threshold (cutoffs raised)", "bf16", 64, *LL, "thr")
    # configurable paths outside the table: few-token fp32 FMAs, in-kernel gate with tl.dot
    sl("bf16 M=4 threshold [use_dot=False,pregate=False]", "bf16", 4, *LL, "thr", ov=dict(use_dot=False, pregate=False))
    sl("bf16 M=16 shared threshold [pregate=False]", "bf16", 16, *LL, "thr-shared", ov=dict(pregate=False))
    # gating API and the dense fallback (gate mask + apply_mask), tokens above the cutoffs
    L += [_topk("bf16 top-k mask, K=4096", "bf16", 1, 1, 4096, shared=False),
          _topk("fp16 shared top-k mask, 4 tokens, fp16 scale", "fp16", 1, 4, 4096, shared=True, scale="fp16"),
          # rows above RESIDENT_MAX channels are streamed; the streamed shared variant (its RMS loop inside
          # the 31 unrolled steps) alone takes 16 s to compile and adds no branch: left out
          _topk("bf16 top-k mask, K=65536 (streamed)", "bf16", 20, 1, 65536, shared=False, scale="fp32"),
          _threshold("bf16 threshold mask", "bf16", 20, 1, 4096, shared=False),
          _threshold("fp16 shared threshold mask, per-channel t, scale", "fp16", 1, 20, 4096, shared=True,
                     scale="fp32", t_stride=1),
          _threshold("fp32 threshold mask, scale", "fp32", 20, 1, 4096, shared=False, scale="fp32"),
          _apply("bf16 apply_mask, 20 tokens", "bf16", 20, 4096, mask_rows=20),
          _apply("fp16 apply_mask, one mask row", "fp16", 1, 4096, mask_rows=1),
          _apply("fp32 apply_mask inverted (rank-aware fallback)", "fp32", 20, 4096, mask_rows=20, invert=True)]
    # gated MLP (Llama-3-8B 4096 x 14336): M = 1 GEMV, M = 2..16 tl.dot
    gm = lambda *a, **k: L.extend(gated_mlp(*a, **k))  # noqa: E731
    gm("bf16 M=1 threshold silu", "bf16", 1, "thr")
    gm("bf16 M=1 top-k silu, biases, scale", "bf16", 1, "topk", biases=True, scale=True)
    gm("fp16 M=1 shared threshold (tensor) gelu, scale, row-major Wd", "fp16", 1, "thr-shared", "gelu",
       t="scalar-tensor", scale=True, wd="row")
    gm("fp32 M=1 per-channel threshold gelu_tanh, biases", "fp32", 1, "thr", "gelu_tanh", t="channel-tensor",
       biases=True)
    gm("fp32 M=1 shared top-k", "fp32", 1, "topk-shared")
    gm("bf16 M=4 shared per-channel threshold silu, scale", "bf16", 4, "thr-shared", t="channel-tensor", scale=True)
    gm("bf16 M=4 shared top-k, biases", "bf16", 4, "topk-shared", biases=True)
    gm("fp16 M=4 top-k gelu", "fp16", 4, "topk", "gelu")
    gm("fp32 M=4 threshold gelu_tanh, biases", "fp32", 4, "thr", "gelu_tanh", biases=True)
    gm("fp32 M=4 top-k, scale", "fp32", 4, "topk", scale=True)
    seen, uniq = set(), []
    for c in L:
        if c.key() not in seen:
            seen.add(c.key())
            uniq.append(c)
    return sorted(uniq, key=lambda c: LAUNCHED.index(c.kernel) if c.kernel in LAUNCHED else 99)


def launched_kernels() -> list[str]:
    """@triton.jit functions of kernels/ that the launchers start with a grid (``name[grid](...)``)."""
    sources = [Path(mod.__file__).read_text() for mod in MODULES]
    return [name for src in sources for name in re.findall(r"@triton\.jit\s*\ndef (\w+)", src)
            if any(re.search(rf"\b{name}\[", s) for s in sources)]


LAUNCHED = launched_kernels()


# --------------------------------------------------------------------------- compile
def _kernel_fn(name):
    for mod in MODULES:
        if hasattr(mod, name):
            return getattr(mod, name)
    raise LookupError(name)


def compile_launch(c: Launch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kern = _kernel_fn(c.kernel)
    sig, constexprs, attrs = {}, {}, {}
    missing = [n for n in kern.arg_names if n not in c.const and n not in c.vals]
    extra = [n for n in {**c.vals, **c.const} if n not in kern.arg_names]
    if missing or extra:
        raise TypeError(f"this script's arguments are out of date: missing {missing}, unknown {extra}")
    for i, name in enumerate(kern.arg_names):
        v = c.const.get(name, c.vals.get(name))
        if name in c.const:
            sig[name], constexprs[(i,)] = "constexpr", v
        elif isinstance(v, str):
            sig[name], attrs[(i,)] = v, [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            raise TypeError(f"{name}: bool runtime argument")
        elif isinstance(v, int):
            if v == 1:  # Triton specialises integer arguments equal to 1
                sig[name], constexprs[(i,)] = "constexpr", 1
            else:
                sig[name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {v!r}")
    src = ASTSource(fn=kern, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(c.opts))


def resources(compiled) -> tuple[str, str]:
    """(registers, stack bytes) from the cubin; "?" when cuobjdump is unavailable."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([_ptx_bin("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
        return (m.group(1), m.group(2)) if m else ("?", "?")
    except (OSError, subprocess.CalledProcessError):
        return "?", "?"
    finally:
        os.unlink(f.name)


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    # CompilationError: "at L:C:" + source + the error on its last line; others: the first line says it
    text = f"{lines[0]} {lines[-1]}" if type(e).__name__ == "CompilationError" and len(lines) > 1 else lines[0]
    return f"{type(e).__name__}: {text}".replace("|", "\\|")[:300]


def check(c: Launch) -> dict:
    """Compile one combination: result ("ok" or "error: ..."), registers, stack, shared memory, seconds,
    traceback of a failure."""
    t1 = time.time()
    try:
        compiled = compile_launch(c)
        regs, stack = resources(compiled)
        smem, result, tb = compiled.metadata.shared, "ok", None
        if smem > H100_MAX_SHARED:
            result = tb = f"error: needs {smem} B of shared memory, an H100 block has {H100_MAX_SHARED}"
    except Exception as e:  # report and go on
        regs = stack = smem = "-"
        result, tb = "error: " + _first_line(e), traceback.format_exc()
    return dict(result=result, regs=regs, stack=stack, smem=smem, secs=time.time() - t1, tb=tb)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--list", action="store_true", help="print the combinations only")
    p.add_argument("--only", metavar="NAME", help="one kernel: _pregate_kernel, pregate_kernel or pregate")
    p.add_argument("-j", "--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compile processes")
    args = p.parse_args(argv)
    todo = cases()
    covered = {c.kernel for c in todo}
    uncovered = [k for k in LAUNCHED if k not in covered]
    if args.only:
        hits = [k for k in LAUNCHED if args.only in (k, k.lstrip("_"), k.lstrip("_").removesuffix("_kernel"))]
        if not hits:
            p.error(f"--only: {args.only!r} is not a launched kernel: {', '.join(LAUNCHED)}")
        want = hits[0]
        todo = [c for c in todo if c.kernel == want]
        uncovered = [k for k in uncovered if k == want]
    if args.list:
        print("| kernel | combination |\n|---|---|")
        for c in todo:
            print(f"| {c.kernel} | {c.describe()} |")
        print(f"\n{len(todo)} combinations of {len({c.kernel for c in todo})} kernels")
        return 0
    print(f"triton {triton.__version__}, sm_90 (compiled here without a GPU), {len(todo)} combinations of "
          f"{len({c.kernel for c in todo})} kernels, {max(1, min(args.jobs, len(todo)))} processes")
    print("| kernel | combination | result | registers | stack B | shared B | compile s |\n"
          "|---|---|---|---:|---:|---:|---:|")
    failed, t0 = [], time.time()
    jobs = max(1, min(args.jobs, len(todo)))
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) if jobs > 1 \
            else contextlib.nullcontext() as pool:
        # the streamed top-k loops take longest: start them first, print in table order
        order = sorted(range(len(todo)), key=lambda i: not (todo[i].kernel == "_topk_kernel"
                                                            and not todo[i].const["RESIDENT"]))
        futs = {i: pool.submit(check, todo[i]) for i in order} if pool else {}
        for i, c in enumerate(todo):
            try:
                r = futs[i].result() if pool else check(c)
            except Exception as e:  # a compile process died (BrokenProcessPool)
                r = dict(result="error: " + _first_line(e), regs="-", stack="-", smem="-", secs=0.0,
                         tb=traceback.format_exc())
            if r["tb"]:
                failed.append((c, r["tb"]))
            print(f"| {c.kernel} | {c.describe()} | {r['result']} | {r['regs']} | {r['stack']} | {r['smem']} | "
                  f"{r['secs']:.1f} |", flush=True)
    for k in uncovered:
        print(f"| {k} | (none: this script has no case launching it) | error: not covered | - | - | - | - |")
    print(f"\n{len(todo) - len(failed)} of {len(todo)} compiled in {time.time() - t0:.0f} s"
          + (f"; {len(failed)} failed" if failed else "")
          + (f"; not covered: {', '.join(uncovered)}" if uncovered else ""))
    for c, tb in failed:
        print(f"\n=== {c.kernel}: {c.describe()}\n{tb}", file=sys.stderr)
    return 1 if failed or uncovered else 0


if __name__ == "__main__":
    sys.exit(main())
