"""Activation gating kernels: top-k and threshold masks, per token or shared by the call.

Tested: triton 3.6 on an H100 (CUDA), triton 3.9 under ``TRITON_INTERPRET=1``.

Semantics are those of ``sparse_infer.reference`` (the spec):
* importance ``|x * s|`` computed in fp32 (``x.float() * s.float()``, then abs);
* top-k keeps the ``k`` largest scores per row, NaN ranked above every number,
  ties broken towards the lower channel index (stable descending sort);
* threshold keeps ``not (score <= t)`` (NaN stays active), ``t`` scalar or (in,);
* shared mode ranks / thresholds the root mean square of ``x * s`` over the
  tokens of one decode step (squares rounded and summed in token order, IEEE ``div_rn``
  by M, ``sqrt_rn``: bit-equal to the reference, GPU included, in these gating passes):
  all tokens of a 2-D ``x``; for ``(batch, seq, in)`` one mask per position
  ``seq`` (RMS over the batch), as ``reference.shared_topk_mask``.

Top-k selection (``_topk_kernel``) is a 31-step bisection on the IEEE bit
pattern of the non-negative fp32 scores (monotone as int32), which finds the
exact k-th largest score; ties at the cutoff are resolved with a running
``cumsum`` in index order.  One program per row (one program in shared mode);
rows up to ``RESIDENT_MAX`` channels are held in registers, longer rows are
streamed in chunks for each step (slower, still exact).  No host sync.

Known limitations: one program per row, so top-k of a single row runs on one
SM (a few microseconds for 4096-14336 channels); shared mode reads all M rows
in that one program (fine for decode, slow for long prefill).  Threshold
gating needs no kernel of its own inside the matmul: the matmul kernels test
the threshold in their own pass over ``x``.
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import triton
import triton.language as tl

from ._autotune import cdiv, interpreting, next_pow2

__all__ = ["topk_mask", "threshold_mask", "topk_gate", "threshold_gate", "gate_mask", "token_mask", "RESIDENT_MAX"]

RESIDENT_MAX = 32768


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def _score(x_ptr, s_ptr, row_off, offs, ok, stride_xk, HAS_SCALE: tl.constexpr):
    """fp32 |x * s| of one row chunk (0 outside ``ok``); the row starts at element ``row_off``."""
    x = tl.load(x_ptr + row_off + offs * stride_xk, mask=ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        x = x * tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    return tl.abs(x)


# Launch options of the gating passes: no fused square-add in the shared RMS, so each square is
# rounded before it is summed, as the reference does (with div_rn and sqrt_rn: bit-equal masks).
EXACT_RMS = dict(enable_fp_fusion=False)


@triton.jit
def _row_score(x_ptr, s_ptr, row, offs, ok, M, stride_xr, stride_xm, stride_xk,
               HAS_SCALE: tl.constexpr, SHARED: tl.constexpr):
    """Score of one chunk: row ``row``'s own, or (shared mode) the RMS over the M
    tokens ``row * stride_xr + m * stride_xm`` of decode step ``row``."""
    if SHARED:
        acc = tl.zeros(offs.shape, tl.float32)
        for m in range(0, M):
            v = _score(x_ptr, s_ptr, row * stride_xr + m * stride_xm, offs, ok, stride_xk, HAS_SCALE)
            acc += v * v
        sc = tl.sqrt_rn(tl.div_rn(acc, tl.full(acc.shape, M, tl.float32)))
    else:
        sc = _score(x_ptr, s_ptr, row * stride_xr, offs, ok, stride_xk, HAS_SCALE)
    return sc


@triton.jit
def _as_bits(sc, ok):
    """int32 bit pattern of a non-negative score, which orders like its value (+inf above every
    finite score); NaN takes the quiet-NaN pattern, above +inf, as in the reference; -1 where not ``ok``."""
    bits = tl.where(sc != sc, 0x7FC00000, sc.to(tl.int32, bitcast=True))
    return tl.where(ok, bits, -1)


# --------------------------------------------------------------------------- kernels
@triton.jit
def _topk_kernel(
    x_ptr, s_ptr, mask_ptr, M, K, k,
    stride_xr, stride_xm, stride_xk, stride_mm,
    HAS_SCALE: tl.constexpr, SHARED: tl.constexpr, RESIDENT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs0 = tl.arange(0, BLOCK)
    T = k * 0  # int32 scalar: the k-th largest score's bits
    if RESIDENT:
        ok = offs0 < K
        bits = _as_bits(_row_score(x_ptr, s_ptr, row, offs0, ok, M, stride_xr, stride_xm, stride_xk, HAS_SCALE, SHARED), ok)
        for b in tl.static_range(30, -1, -1):
            cand = T | (1 << b)
            c = tl.sum((bits >= cand).to(tl.int32), axis=0)
            T = tl.where(c >= k, cand, T)
        gt = bits > T
        need = k - tl.sum(gt.to(tl.int32), axis=0)
        eq = bits == T
        rank = tl.cumsum(eq.to(tl.int32), axis=0)
        keep = gt | (eq & (rank <= need))
        tl.store(mask_ptr + row * stride_mm + offs0, keep.to(tl.int8), mask=ok)
    else:
        for b in tl.static_range(30, -1, -1):
            cand = T | (1 << b)
            c = k * 0
            for k0 in range(0, K, BLOCK):
                offs = k0 + offs0
                ok = offs < K
                bits = _as_bits(_row_score(x_ptr, s_ptr, row, offs, ok, M, stride_xr, stride_xm, stride_xk, HAS_SCALE, SHARED), ok)
                c += tl.sum((bits >= cand).to(tl.int32), axis=0)
            T = tl.where(c >= k, cand, T)
        c_gt = k * 0
        for k0 in range(0, K, BLOCK):
            offs = k0 + offs0
            ok = offs < K
            bits = _as_bits(_row_score(x_ptr, s_ptr, row, offs, ok, M, stride_xr, stride_xm, stride_xk, HAS_SCALE, SHARED), ok)
            c_gt += tl.sum((bits > T).to(tl.int32), axis=0)
        need = k - c_gt
        seen = k * 0
        for k0 in range(0, K, BLOCK):
            offs = k0 + offs0
            ok = offs < K
            bits = _as_bits(_row_score(x_ptr, s_ptr, row, offs, ok, M, stride_xr, stride_xm, stride_xk, HAS_SCALE, SHARED), ok)
            eq = bits == T
            rank = seen + tl.cumsum(eq.to(tl.int32), axis=0)
            keep = (bits > T) | (eq & (rank <= need))
            tl.store(mask_ptr + row * stride_mm + offs, keep.to(tl.int8), mask=ok)
            seen += tl.sum(eq.to(tl.int32), axis=0)


@triton.jit
def _threshold_kernel(
    x_ptr, t_ptr, s_ptr, mask_ptr, M, K,
    stride_xr, stride_xm, stride_xk, stride_t, stride_mm,
    HAS_SCALE: tl.constexpr, SHARED: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < K
    sc = _row_score(x_ptr, s_ptr, row, offs, ok, M, stride_xr, stride_xm, stride_xk, HAS_SCALE, SHARED)
    t = tl.load(t_ptr + offs * stride_t, mask=ok, other=0.0).to(tl.float32)
    keep = (sc > t) | (sc != sc) | (t != t)  # == not (score <= t)
    tl.store(mask_ptr + row * stride_mm + offs, keep.to(tl.int8), mask=ok)


@triton.jit
def _apply_mask_kernel(
    x_ptr, mask_ptr, out_ptr, M, K,
    stride_xm, stride_xk, stride_mm, stride_mk, stride_om,
    INVERT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs * stride_xk, mask=ok, other=0.0)
    keep = tl.load(mask_ptr + row * stride_mm + offs * stride_mk, mask=ok, other=0) != 0
    if INVERT:
        keep = keep == 0
    tl.store(out_ptr + row * stride_om + offs, tl.where(keep, x, tl.zeros_like(x)), mask=ok)


@triton.jit
def _pregate_kernel(
    x_ptr, t_ptr, s_ptr, gm_ptr, xe_ptr, any_ptr, xi_ptr, anyi_ptr,
    idx_ptr, cnt_ptr, idxi_ptr, cnti_ptr, M, K,
    stride_xm, stride_xk, stride_t, stride_gm, stride_gk,
    MODE: tl.constexpr, HAS_SCALE: tl.constexpr, WRITE_INV: tl.constexpr, COMPACT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Gate a block of channels for all M tokens: writes where(keep, x, 0) (M, K) and the union
    of active channels (K,) int8; with WRITE_INV also where(keep, 0, x) and the union of inactive
    channels.  MODE as in sparse_matmul: 0 threshold, 1 int8 mask (M, K), 2 shared threshold
    (RMS over the M tokens), 3 shared int8 mask (K,)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < K
    if MODE == 0 or MODE == 2:
        t = tl.load(t_ptr + offs * stride_t, mask=ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s = tl.load(s_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    shared_keep = ok
    if MODE == 2:
        acc = tl.zeros((BLOCK,), tl.float32)
        for m in range(0, M):
            xf = tl.load(x_ptr + m * stride_xm + offs * stride_xk, mask=ok, other=0.0).to(tl.float32)
            if HAS_SCALE:
                xf = xf * s
            acc += xf * xf
        rms = tl.sqrt_rn(tl.div_rn(acc, tl.full(acc.shape, M, tl.float32)))
        shared_keep = ((rms > t) | (rms != rms) | (t != t)) & ok
    elif MODE == 3:
        shared_keep = (tl.load(gm_ptr + offs * stride_gk, mask=ok, other=0) != 0) & ok
    any_v = tl.zeros((BLOCK,), tl.int32)
    any_i = tl.zeros((BLOCK,), tl.int32)
    for m in range(0, M):
        x = tl.load(x_ptr + m * stride_xm + offs * stride_xk, mask=ok, other=0.0)
        if MODE == 0:
            sc = x.to(tl.float32)
            if HAS_SCALE:
                sc = sc * s
            sc = tl.abs(sc)
            keep = ((sc > t) | (sc != sc) | (t != t)) & ok
        elif MODE == 1:
            keep = (tl.load(gm_ptr + m * stride_gm + offs * stride_gk, mask=ok, other=0) != 0) & ok
        else:
            keep = shared_keep
        zero = tl.zeros_like(x)
        tl.store(xe_ptr + m * K + offs, tl.where(keep, x, zero), mask=ok)
        any_v = tl.maximum(any_v, keep.to(tl.int32))
        if WRITE_INV:
            tl.store(xi_ptr + m * K + offs, tl.where(keep, zero, x), mask=ok)
            any_i = tl.maximum(any_i, (ok & (keep == 0)).to(tl.int32))
    tl.store(any_ptr + offs, any_v.to(tl.int8), mask=ok)
    if WRITE_INV:
        tl.store(anyi_ptr + offs, any_i.to(tl.int8), mask=ok)
    if COMPACT:  # this block's active channel ids (relative to the block), in order, and their count
        base = tl.program_id(0) * BLOCK
        rel = tl.arange(0, BLOCK).to(idx_ptr.dtype.element_ty)
        pos = tl.cumsum(any_v, axis=0) - 1
        tl.store(idx_ptr + base + pos, rel, mask=any_v > 0)
        tl.store(cnt_ptr + tl.program_id(0), tl.sum(any_v, axis=0))
        if WRITE_INV:
            pos_i = tl.cumsum(any_i, axis=0) - 1
            tl.store(idxi_ptr + base + pos_i, rel, mask=any_i > 0)
            tl.store(cnti_ptr + tl.program_id(0), tl.sum(any_i, axis=0))


# --------------------------------------------------------------------------- launchers
def pregate(x2: torch.Tensor, mode: int, t=None, stride_t: int = 0, scale=None, gm=None, invert: bool = False,
            compact_block: int = 0, ids_dtype: torch.dtype = torch.int32):
    """Run ``_pregate_kernel``.

    Returns a dict: ``xe`` (M, K) masked x, ``any`` (K,) int8 union of active channels, and with
    ``invert`` also ``xi``/``anyi`` for the complement.  With ``compact_block`` (a power of two),
    also ``idx``/``cnt`` (and ``idxi``/``cnti``): per block of that many channels, the ids of the
    active channels in order, relative to the block (at ``block * compact_block``), and their count.
    ``ids_dtype``: see ``compact_ids_dtype``.
    """
    M, K = x2.shape
    dev = x2.device
    xe = torch.empty((M, K), dtype=x2.dtype, device=dev)
    anyv = torch.empty((K,), dtype=torch.int8, device=dev)
    out = dict(xe=xe, any=anyv)
    if invert:
        out.update(xi=torch.empty_like(xe), anyi=torch.empty_like(anyv))
    block = compact_block or (128 if interpreting() else 512)
    nblocks = cdiv(K, block)
    if compact_block:
        out.update(idx=torch.empty(nblocks * block, dtype=ids_dtype, device=dev),
                   cnt=torch.empty(nblocks, dtype=torch.int32, device=dev))
        if invert:
            out.update(idxi=torch.empty_like(out["idx"]), cnti=torch.empty_like(out["cnt"]))
    gm_s0 = gm.stride(0) if gm is not None and gm.dim() == 2 and gm.shape[0] > 1 else 0
    _pregate_kernel[(nblocks,)](
        x2, t if t is not None else x2, scale if scale is not None else x2, gm if gm is not None else x2,
        xe, anyv, out.get("xi", xe), out.get("anyi", anyv),
        out.get("idx", anyv), out.get("cnt", anyv), out.get("idxi", anyv), out.get("cnti", anyv), M, K,
        x2.stride(0), x2.stride(1), stride_t, gm_s0, gm.stride(-1) if gm is not None else 0,
        MODE=mode, HAS_SCALE=scale is not None, WRITE_INV=invert, COMPACT=bool(compact_block), BLOCK=block,
        num_warps=4, **EXACT_RMS,
    )
    return out


def compact_ids_dtype(block: int, deep_pipeline: bool) -> torch.dtype:
    """dtype of the compacted (block-relative, so < ``block``) ids a matmul path reads.

    int16 for the tensor-core loop with 3 or more cp.async stages: it would fetch 4-byte ids in the
    copy groups of the weight rows they address and, waiting for the ids, drain every copy in flight
    (0 groups in flight at any depth; int16 ids stay register loads: 1 group at 3 stages, 2 at 4).
    int32 elsewhere: the one-token loop spends ~7 more instructions per 1k weights sign-extending
    int16 ids, and the 2-stage tensor-core loop would put the id load's round trip in front of each
    weight copy.  (bench/sass_count.py, triton 3.6, sm_90.)"""
    return torch.int16 if deep_pipeline and block <= 2 ** 15 else torch.int32


def _check_x(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"gating kernels serve float16/bfloat16/float32 activations, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., in_features)")
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # -1 cannot be inferred when in_features is 0


def check_gate(gate, K: int, device) -> None:
    """What every kernel entry point checks of a gate before any early return (empty outputs included):
    a valid k, a threshold and scale of the gated width, and no ``valid`` rows (padding left out of a
    shared mask is served by the reference path only: `sparse_infer.ops` routes such calls there)."""
    if getattr(gate, "valid", None) is not None:
        raise ValueError("Gate.valid (tokens a shared mask leaves out) is not served by the Triton kernels: "
                         "call sparse_infer.ops (it runs the reference for such gates) or drop valid")
    if gate.k is not None:
        _as_k(gate.k, K, "gated channels")
    else:
        _threshold_tensor(gate.threshold, K, device)
    _check_scale(gate.scale, K, device)


def _as_k(k, K: int, what: str = "input channels") -> int:
    """``k`` as an int in [0, K]: numpy integers too, while a bool or 2.7 is refused, not truncated."""
    if isinstance(k, bool):
        raise TypeError("k must be an int, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an int, got {type(k).__name__}") from None
    if not 0 <= k <= K:
        raise ValueError(f"k={k} must lie in [0, {K}] (the number of {what})")
    return k


def _check_scale(scale: Optional[torch.Tensor], K: int, device) -> Optional[torch.Tensor]:
    if scale is None:
        return None
    if not isinstance(scale, torch.Tensor) or scale.shape != (K,):
        raise ValueError(f"scale must be a tensor of shape ({K},) (one value per input channel), got "
                         f"{getattr(scale, 'shape', type(scale).__name__)}")
    if scale.device != device:
        raise ValueError(f"scale is on {scale.device}, x on {device}")
    return scale.contiguous()


def _threshold_tensor(threshold, K: int, device) -> tuple[torch.Tensor, int]:
    """(fp32 threshold tensor on device, element stride: 0 for a scalar)."""
    if isinstance(threshold, torch.Tensor) and threshold.dtype == torch.float32 and threshold.device == device:
        t = threshold
    else:
        t = torch.as_tensor(threshold, device=device, dtype=torch.float32)
    if t.dim() == 0:
        return t, 0
    if t.numel() == 1 and t.dim() == 1 and K != 1:
        return t.reshape(()), 0
    if t.shape != (K,):
        raise ValueError(f"threshold must be a scalar or a ({K},) tensor (one per input channel), got shape {tuple(t.shape)}")
    t = t.contiguous()
    return t, 1


def _rows_and_strides(x2: torch.Tensor, shared: bool, steps: int):
    """(programs, tokens per program M, row stride, member stride) for per-token or shared gating.

    Shared mode scores the RMS over the tokens of each decode step: ``x2`` is the
    flattened ``(batch, steps, K)`` input, step ``s`` owns rows ``b * steps + s``.
    """
    N = x2.shape[0]
    if not shared:
        return N, 1, x2.stride(0), 0
    if steps < 1 or N % steps:
        raise ValueError(f"shared gating: {N} tokens do not split into {steps} decode steps")
    return steps, N // steps, x2.stride(0), steps * x2.stride(0)


def _topk_launch(x2: torch.Tensor, k: int, scale, shared: bool, steps: int = 1) -> torch.Tensor:
    """int8 mask (rows, K): rows = tokens, or decode steps when ``shared``."""
    N, K = x2.shape
    k = _as_k(k, K)
    rows, M, s_row, s_mem = _rows_and_strides(x2, shared, steps)
    if k == K or k == 0 or N == 0:
        fill = torch.ones if k == K else torch.zeros
        return fill((rows, K), dtype=torch.int8, device=x2.device)
    s = _check_scale(scale, K, x2.device)
    mask = torch.empty((rows, K), dtype=torch.int8, device=x2.device)
    resident = K <= RESIDENT_MAX
    if interpreting():
        block = next_pow2(K) if resident else 1024
    else:
        block = next_pow2(K) if resident else 4096
    warps = 1 if interpreting() else max(4, min(16, block // 1024))
    _topk_kernel[(rows,)](
        x2, s if s is not None else x2, mask, M, K, k,
        s_row, s_mem, x2.stride(1), mask.stride(0),
        HAS_SCALE=s is not None, SHARED=shared, RESIDENT=resident, BLOCK=block, num_warps=warps, **EXACT_RMS,
    )
    return mask


def _threshold_launch(x2: torch.Tensor, threshold, scale, shared: bool, steps: int = 1) -> torch.Tensor:
    """int8 mask (rows, K): rows = tokens, or decode steps when ``shared``."""
    N, K = x2.shape
    rows, M, s_row, s_mem = _rows_and_strides(x2, shared, steps)
    t, st = _threshold_tensor(threshold, K, x2.device)
    s = _check_scale(scale, K, x2.device)
    mask = torch.empty((rows, K), dtype=torch.int8, device=x2.device)
    if N == 0 or K == 0:
        return mask.fill_(0)
    block = 128 if interpreting() else 1024
    _threshold_kernel[(rows, cdiv(K, block))](
        x2, t, s if s is not None else x2, mask, M, K,
        s_row, s_mem, x2.stride(1), st, mask.stride(0),
        HAS_SCALE=s is not None, SHARED=shared, BLOCK=block, num_warps=4, **EXACT_RMS,
    )
    return mask


def shared_steps(x: torch.Tensor) -> int:
    """Decode steps of a shared-mask call: ``x.shape[-2]`` for 3-D and higher ``x``, else 1."""
    return x.shape[-2] if x.dim() >= 3 else 1


def gate_mask(x2: torch.Tensor, gate, steps: int = 1) -> torch.Tensor:
    """int8 mask of a ``sparse_infer.ops.Gate`` on flattened ``x2`` (M, K): (M, K), or (steps, K) when shared."""
    if gate.k is not None:
        return _topk_launch(x2, gate.k, gate.scale, gate.shared, steps)
    return _threshold_launch(x2, gate.threshold, gate.scale, gate.shared, steps)


def token_mask(x2: torch.Tensor, gate, steps: int = 1) -> torch.Tensor:
    """int8 mask (M, K) per token (a shared mask repeated over the tokens of its decode step)."""
    m = gate_mask(x2, gate, steps)
    if gate.shared:
        m = m.unsqueeze(0).expand(x2.shape[0] // max(steps, 1), steps, x2.shape[1]).reshape(x2.shape)
    return m


def apply_mask(x2: torch.Tensor, mask: torch.Tensor, invert: bool = False) -> torch.Tensor:
    """``where(mask, x, 0)`` (or ``where(mask, 0, x)``) for an int8 mask of shape (M, K) or (1, K)."""
    M, K = x2.shape
    out = torch.empty((M, K), dtype=x2.dtype, device=x2.device)
    if M == 0 or K == 0:
        return out
    if mask.shape[0] not in (1, M):
        raise ValueError(f"mask has {mask.shape[0]} rows for {M} tokens")
    stride_mm = 0 if mask.shape[0] == 1 else mask.stride(0)
    block = 128 if interpreting() else 1024
    _apply_mask_kernel[(M, cdiv(K, block))](
        x2, mask, out, M, K, x2.stride(0), x2.stride(1), stride_mm, mask.stride(1), out.stride(0),
        INVERT=invert, BLOCK=block, num_warps=4,
    )
    return out


# --------------------------------------------------------------------------- public API
def _shape_mask(m: torch.Tensor, x: torch.Tensor, shared: bool) -> torch.Tensor:
    if not shared:
        return m.reshape(x.shape)
    return m.reshape(x.shape[-2], x.shape[-1]) if x.dim() >= 3 else m.reshape(x.shape[-1])


def topk_mask(x: torch.Tensor, k: int, scale: Optional[torch.Tensor] = None, shared: bool = False) -> torch.Tensor:
    """Bool mask equal to ``reference.topk_mask`` (or ``shared_topk_mask`` when ``shared``)."""
    x2 = _check_x(x)
    steps = shared_steps(x) if shared else 1
    m = _topk_launch(x2, k, scale, shared, steps).view(torch.bool)
    return _shape_mask(m, x, shared)


def threshold_mask(x: torch.Tensor, threshold, scale: Optional[torch.Tensor] = None, shared: bool = False) -> torch.Tensor:
    """Bool mask equal to ``reference.threshold_mask`` (or ``shared_threshold_mask`` when ``shared``)."""
    x2 = _check_x(x)
    steps = shared_steps(x) if shared else 1
    m = _threshold_launch(x2, threshold, scale, shared, steps).view(torch.bool)
    return _shape_mask(m, x, shared)


def topk_gate(x: torch.Tensor, k: int, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` with all but its ``k`` largest-|x·s| entries per token zeroed (== ``reference.topk_gate``)."""
    x2 = _check_x(x)
    return apply_mask(x2, _topk_launch(x2, k, scale, False)).reshape(x.shape)


def threshold_gate(x: torch.Tensor, threshold, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` with entries where ``|x·s| <= t`` zeroed (== ``reference.threshold_gate``)."""
    x2 = _check_x(x)
    return apply_mask(x2, _threshold_launch(x2, threshold, scale, False)).reshape(x.shape)
