"""Input-sparse linear (decode GEMV / small-M GEMM) that never reads inactive weight rows.

Tested: triton 3.6 on an H100 (CUDA, bf16/fp16/fp32), triton 3.9 under
``TRITON_INTERPRET=1`` (CPU).

``y = F.linear(where(mask, x, 0), W, b)`` for a per-token mask (M, K), or one
mask (K,) shared by the M tokens of the call.  W is (N, K) like ``nn.Linear``;
the kernel walks the rows of W^T (one row per input channel), so the fastest
layout is column-major W (``to_kernel_layout``): each active channel is then
one contiguous run of N elements.  Any strides are accepted.

Design (one launch):
* grid ``(N tiles, SPLIT_K, M tiles)``; each program owns BLOCK_N outputs and a
  contiguous range of input channels.  Per BLOCK_K channels it loads x for its
  tokens, evaluates the gate (threshold tested in-kernel, or a precomputed
  int8 mask from the top-k selection pass), forms the union of active
  channels over its tokens, and loads the W^T rows with ``mask=active[:, None]``:
  an inactive row costs no memory traffic and no index list is built (no host
  sync, CUDA-graph capturable).
* M == 1: fp32 multiply + reduction over K (GEMV).  M > 1: ``tl.dot`` with the
  tokens padded to BLOCK_M (>= 16); bf16/fp16 operands on tensor cores with an
  fp32 accumulator on the GPU, fp32 operands (IEEE) under the interpreter and
  for fp32 inputs.  Each token's inactive entries are zeroed before the dot,
  so every token equals the reference token by token.  (A few-token fp32-FMA
  path exists too; measured slower on the H100, used only if configured.)
* Where the gate is evaluated is a config choice (``_autotune``): in the
  matmul's own pass over x (M == 1 default: no extra launch), or in a separate
  pass (``gating.pregate``: masked x + union of active channels; the default
  for M > 1, it keeps cross-warp reductions out of the matmul loop), which can
  also compact the active channel ids per K-block (MODE 6: the matmul then
  loops over active rows only; chosen by the gate's expected density,
  ``MatmulConfig.compact_below``).
* ``SWAP_AB`` (``MatmulConfig.swap_ab``, opt-in, untimed): the tensor-core dot
  with the W^T tile as the MMA's M side (BLOCK_N outputs) and the tokens,
  padded to 16, as its N side; with 4 warps and BLOCK_N >= 64 Triton emits
  sm_90 wgmma that reads W from shared memory, filled by cp.async over
  ``num_stages`` (a masked row is a zero-filled copy: no DRAM traffic).  One
  token takes this path too: its gate in a separate pass, or in-kernel on the
  one row (``ONE_TOKEN``), with ``prefetch`` so the copies still pipeline.
* ``PREFETCH`` (opt-in, untimed): the loads that decide the next block's
  rows (x and its gate, or the next active ids) are issued while this
  block's rows are in flight: one memory round trip per iteration, not two.
* Split-K partial sums go to an fp32 workspace with fp32 atomics (never
  bf16 atomics); the last program to finish a tile (an acq_rel counter per
  tile) reads the tile back with plain L2 loads, re-zeroes it for the next
  call, adds the bias and stores y in x's dtype.  The counter's release and
  acquire order the partial sums before the read-back: one GPU-wide fence
  per program, not one per element group (``bench/sass_count.py`` counts them).
* Optional low-rank rows (``LOWRANK``): extra "input channels" z (M, R) fp32
  against rows of B (R, N), accumulated in the same tile - this is how the
  rank-aware op fuses its B-expansion (see rsparse_matmul.py).
* ``INVERT``: use the complement of the gate (the rank-aware op's pass that
  computes z = x[~S] A uses this kernel with W^T := A).

Known limitations / races:
* The workspace and tile counters are cached per device and shared by all
  calls: calls must not run concurrently on two CUDA streams.  Call each op
  once before capturing a CUDA graph (the first call may allocate).
* fp32 atomics make the split-K sum order nondeterministic (run-to-run bitwise
  differences at fp32 rounding level).
* NaN/inf *weights* in inactive rows are skipped (the reference's dense
  ``0 * NaN`` would propagate them); NaN activations follow the reference.
* Element offsets are int32 except in the compacted path: weights must have
  fewer than 2**31 elements.
* Performance (H100, bf16, M=1, CUDA graphs): ~2 TB/s at 50 % sparsity, a
  ~15 µs floor even at 100 % sparsity (per-iteration latency chain and issue
  work on masked-off rows) - see bench/KERNEL_NOTES.md.
* Eager launches cost ~45 µs of CPU each (Triton's launcher, ~40 arguments):
  use CUDA graphs for decode.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _autotune
from ._autotune import interpreting
from .gating import (
    _check_scale, _threshold_launch, _threshold_tensor, _topk_launch, apply_mask, check_gate, compact_ids_dtype,
    pregate, shared_steps, token_mask,
)

__all__ = ["sparse_linear", "to_kernel_layout", "DENSE_FALLBACK_TOKENS", "PER_TOKEN_FALLBACK_TOKENS", "MODE_THRESH", "MODE_MASK",
           "MODE_SHARED_THRESH", "MODE_SHARED_MASK"]

MODE_THRESH, MODE_MASK, MODE_SHARED_THRESH, MODE_SHARED_MASK, MODE_DENSE, MODE_PREGATED, MODE_COMPACT = (
    0, 1, 2, 3, 4, 5, 6)

# Above this many tokens per call the ops run the gate kernel and then a dense
# cuBLAS matmul on the masked input (prefill).  Measured on the H100 (bf16,
# Llama-3-8B MLP, 50 % sparsity, CUDA-graph timing, bench/KERNEL_NOTES.md):
# shared masks (bytes fixed by the mask): sparse 35-39 us vs gate+dense 45.9 us
# at M=4, 48-52 us vs 49.5 us at M=16 -> break-even at 16 tokens.
DENSE_FALLBACK_TOKENS = 16
# Per-token masks read the UNION of the tokens' active channels, which grows
# with M (random 50 % masks: 94 % at M=4, ~100 % at M=16): measured sparse
# 47-49 us vs gate+dense 45 us at M=4, 63-66 us vs 46 us at M=16.  Above this
# many tokens a per-token gate takes the dense fallback.
PER_TOKEN_FALLBACK_TOKENS = 4


def _fallback(M: int, gate) -> bool:
    return M > (DENSE_FALLBACK_TOKENS if gate.shared else min(PER_TOKEN_FALLBACK_TOKENS, DENSE_FALLBACK_TOKENS))


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def _gate_tile(x, xf, xmask, offs_m, offs_k, k_ok, M, t_ptr, s_ptr, gm_ptr,
               stride_t, stride_gm, stride_gk,
               MODE: tl.constexpr, HAS_SCALE: tl.constexpr, INVERT: tl.constexpr):
    """(keep (BLOCK_M, BLOCK_K) per token, any (BLOCK_K,) union over the tile's tokens)."""
    if MODE == 0 or MODE == 2:
        t = tl.load(t_ptr + offs_k * stride_t, mask=k_ok, other=0.0).to(tl.float32)
        sc = xf
        if HAS_SCALE:
            s = tl.load(s_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            sc = sc * s[None, :]
        sc = tl.abs(sc)
        if MODE == 0:
            keep = (sc > t[None, :]) | (sc != sc) | (t != t)[None, :]
        else:
            rms = tl.sqrt_rn(tl.sum(tl.where(xmask, sc * sc, 0.0), axis=0) / M)
            k1 = (rms > t) | (rms != rms) | (t != t)
            keep = k1[None, :] & xmask
    elif MODE == 1:
        g = tl.load(gm_ptr + offs_m[:, None] * stride_gm + offs_k[None, :] * stride_gk, mask=xmask, other=0)
        keep = g != 0
    elif MODE == 3:
        g = tl.load(gm_ptr + offs_k * stride_gk, mask=k_ok, other=0)
        keep = (g != 0)[None, :] & xmask
    else:
        keep = xmask
    if MODE == 5:  # pre-gated: x already masked, union of active channels loaded
        any_k = tl.load(gm_ptr + offs_k * stride_gk, mask=k_ok, other=0) != 0
    else:
        if INVERT:
            keep = keep == 0
        keep = keep & xmask
        any_k = tl.max(keep.to(tl.int32), axis=0) > 0
    return keep, any_k


@triton.jit
def _x_gate(x_ptr, k0, k_end, offs_m, m_ok, M, t_ptr, s_ptr, gm_ptr, stride_xm, stride_xk, stride_t, stride_gm,
            stride_gk, MODE: tl.constexpr, HAS_SCALE: tl.constexpr, INVERT: tl.constexpr, BLOCK_K: tl.constexpr):
    """x of the BLOCK_K channels from ``k0`` (zero at and past ``k_end``) and their gate: (x, xf, keep, any_k)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < k_end
    xmask = m_ok[:, None] & k_ok[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=xmask, other=0.0)
    xf = x.to(tl.float32)
    keep, any_k = _gate_tile(x, xf, xmask, offs_m, offs_k, k_ok, M, t_ptr, s_ptr, gm_ptr,
                             stride_t, stride_gm, stride_gk, MODE, HAS_SCALE, INVERT)
    return x, xf, keep, any_k


@triton.jit
def _x_gate_tile(x_ptr, k0, k_end, offs_m, m_ok, M, t_ptr, s_ptr, gm_ptr, stride_xm, stride_xk, stride_t, stride_gm,
                 stride_gk, MODE: tl.constexpr, HAS_SCALE: tl.constexpr, INVERT: tl.constexpr,
                 BLOCK_K: tl.constexpr, ONE_TOKEN: tl.constexpr):
    """``_x_gate`` over the token tile; ``ONE_TOKEN`` (M == 1 in a tile of BLOCK_M > 1 tokens, the swapped
    tensor-core path): load and gate the one row, then place it as row 0 of a zero tile, so the gate costs
    one token's work and no reduction over the padded rows."""
    if ONE_TOKEN:
        one = tl.arange(0, 1)
        x1, xf1, keep1, any_k = _x_gate(x_ptr, k0, k_end, one, one < M, M, t_ptr, s_ptr, gm_ptr, stride_xm,
                                        stride_xk, stride_t, stride_gm, stride_gk, MODE, HAS_SCALE, INVERT, BLOCK_K)
        row0 = (offs_m == 0)[:, None]
        x = tl.where(row0, x1, tl.zeros_like(x1))
        keep = row0 & keep1
        xf = x.to(tl.float32)
    else:
        x, xf, keep, any_k = _x_gate(x_ptr, k0, k_end, offs_m, m_ok, M, t_ptr, s_ptr, gm_ptr, stride_xm,
                                     stride_xk, stride_t, stride_gm, stride_gk, MODE, HAS_SCALE, INVERT, BLOCK_K)
    return x, xf, keep, any_k


@triton.jit
def _active_ids(ids_ptr, r, n_act):
    """Entries ``r`` of a compacted block's active channel ids, relative to the block (0 from its
    ``n_act``-th on)."""
    return tl.load(ids_ptr + r, mask=r < n_act, other=0).to(tl.int64)


@triton.jit
def _store_tile(res, y_ptr, b_ptr, offs_m, offs_n, n_ok, omask, stride_ym, stride_yn, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        res = res + b[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             res.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _load_rows(w_ptr, rows, row_ok, n0, offs_n, n_ok, N, stride_wk, stride_wn,
               BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, BF16_PAIRS: tl.constexpr):
    """The W^T rows ``rows`` (BLOCK_K, BLOCK_N) of this program's columns, zero where masked off.

    ``BF16_PAIRS`` (bf16, unit column stride, even N and row stride): read each pair of columns as one
    int32 and widen both halves to fp32 with one bit operation each; Triton's own bf16 -> fp32
    conversion spends two instructions on the upper half (sm_90 SASS: PRMT then IMAD.U32).
    ``EVEN_N`` (N a multiple of BLOCK_N): the row predicate alone masks the loads."""
    if BF16_PAIRS:
        offs_p = n0 // 2 + tl.arange(0, BLOCK_N // 2)
        pmask = row_ok[:, None] if EVEN_N else row_ok[:, None] & (offs_p < N // 2)[None, :]
        p = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_wk // 2) + offs_p[None, :],
                    mask=pmask, other=0)
        lo = (p << 16).to(tl.float32, bitcast=True)  # little-endian: column 2j is the low half
        hi = (p & -65536).to(tl.float32, bitcast=True)
        return tl.join(lo, hi).reshape(BLOCK_K, BLOCK_N)
    else:
        wmask = row_ok[:, None] if EVEN_N else row_ok[:, None] & n_ok[None, :]
        return tl.load(w_ptr + rows[:, None] * stride_wk + offs_n[None, :] * stride_wn, mask=wmask, other=0.0)


@triton.jit
def _accumulate(acc, x, xf, keep, w, BLOCK_M: tl.constexpr, USE_DOT: tl.constexpr, DOT_NATIVE: tl.constexpr,
                ACC_2D: tl.constexpr, SWAP_AB: tl.constexpr, ZERO_FILLED: tl.constexpr):
    """acc += where(keep, x, 0) @ w in fp32 (tensor-core dot, GEMV, or few-token FMAs).

    GEMV with ``ACC_2D``: acc is (BLOCK_K, BLOCK_N) and takes elementwise FMAs; the K reduction
    happens once after the loop instead of every iteration (with several warps per program that
    per-iteration reduction is a shared-memory exchange and barriers).
    ``SWAP_AB``: acc is (BLOCK_N, BLOCK_M), the W^T tile is the MMA's M side.  ``ZERO_FILLED``: x was
    loaded with ``keep`` as its mask and zero elsewhere, so the select is the identity; the swapped
    path then hands x's shared-memory copy to the MMA as it is (no round trip through registers)."""
    if USE_DOT:
        if DOT_NATIVE:
            if SWAP_AB and ZERO_FILLED:
                xe = x.to(w.dtype)
            else:
                xe = tl.where(keep, x, tl.zeros_like(x)).to(w.dtype)
            if SWAP_AB:
                acc = tl.dot(tl.trans(w), tl.trans(xe), acc)
            else:
                acc = tl.dot(xe, w, acc)
        else:
            xe = tl.where(keep, xf, 0.0)
            if SWAP_AB:
                acc = tl.dot(tl.trans(w.to(tl.float32)), tl.trans(xe), acc, input_precision="ieee")
            else:
                acc = tl.dot(xe, w.to(tl.float32), acc, input_precision="ieee")
    elif BLOCK_M == 1:
        xe = tl.sum(tl.where(keep, xf, 0.0), axis=0)
        if ACC_2D:
            acc += xe[:, None] * w.to(tl.float32)
        else:
            acc += tl.sum(xe[:, None] * w.to(tl.float32), axis=0)
    else:  # few tokens: fp32 FMAs on a (BLOCK_M, BLOCK_K, BLOCK_N) broadcast
        xe = tl.where(keep, xf, 0.0)
        acc += tl.sum(xe[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return acc


# --------------------------------------------------------------------------- kernel
@triton.jit
def _sparse_mm_kernel(
    x_ptr, w_ptr, y_ptr, b_ptr,
    t_ptr, s_ptr, gm_ptr, cc_ptr,
    z_ptr, lb_ptr,
    ws_ptr, cnt_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_ym, stride_yn,
    stride_t, stride_gm, stride_gk, stride_zm, stride_zr, stride_br, stride_bn,
    K_BLOCKS_PER_SPLIT, R_BLOCKS_PER_SPLIT,
    MODE: tl.constexpr, INVERT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    LOWRANK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_NATIVE: tl.constexpr, ACC_2D: tl.constexpr, EVEN_N: tl.constexpr,
    BF16_PAIRS: tl.constexpr, PREFETCH: tl.constexpr, SWAP_AB: tl.constexpr,
    ONE_TOKEN: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    if BLOCK_M > 1 and SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    elif BLOCK_M > 1:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif ACC_2D:
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    # ---- sparse part: rows of W^T of active channels only
    # PREFETCH: the loads that decide which rows to read (x and its gate, or the next active ids) are
    # issued one block ahead, while this block's weight rows are in flight, so each iteration waits
    # for one memory round trip instead of two dependent ones
    k_base = pid_k * K_BLOCKS_PER_SPLIT * BLOCK_K  # this split's first channel
    if MODE == 6:  # compacted: loop over this block's active channel ids only
        n_act = tl.load(cc_ptr + pid_k)
        ids_ptr = gm_ptr + k_base  # this block's compacted ids, relative to k_base
        xb_ptr = x_ptr + k_base * stride_xk  # the block's first channel: ids index from here
        wb_ptr = w_ptr + k_base.to(tl.int64) * stride_wk
        if PREFETCH:
            ids = _active_ids(ids_ptr, tl.arange(0, BLOCK_K), n_act)
        for i in range(0, n_act, BLOCK_K):
            r = i + tl.arange(0, BLOCK_K)
            valid = r < n_act
            if not PREFETCH:
                ids = _active_ids(ids_ptr, r, n_act)
            xmask = m_ok[:, None] & valid[None, :]
            x = tl.load(xb_ptr + offs_m[:, None] * stride_xm + ids[None, :] * stride_xk, mask=xmask, other=0.0)
            w = _load_rows(wb_ptr, ids, valid, pid_n * BLOCK_N, offs_n, n_ok, N, stride_wk, stride_wn,
                           BLOCK_K, BLOCK_N, EVEN_N, BF16_PAIRS)
            if PREFETCH:  # offsets as r + BLOCK_K: written as (i + BLOCK_K) + arange, sm_90 code had ~60 more
                ids = _active_ids(ids_ptr, r + BLOCK_K, n_act)
            acc = _accumulate(acc, x, x.to(tl.float32), xmask, w, BLOCK_M, USE_DOT, DOT_NATIVE, ACC_2D, SWAP_AB,
                              True)
    else:
        k_end = tl.minimum(K, k_base + K_BLOCKS_PER_SPLIT * BLOCK_K)  # this split's channels
        if PREFETCH:
            x, xf, keep, any_k = _x_gate_tile(x_ptr, k_base, k_end, offs_m, m_ok, M, t_ptr, s_ptr, gm_ptr, stride_xm,
                                              stride_xk, stride_t, stride_gm, stride_gk, MODE, HAS_SCALE, INVERT,
                                              BLOCK_K, ONE_TOKEN)
        for kb in range(0, K_BLOCKS_PER_SPLIT):
            k0 = k_base + kb * BLOCK_K
            if not PREFETCH:
                x, xf, keep, any_k = _x_gate_tile(x_ptr, k0, k_end, offs_m, m_ok, M, t_ptr, s_ptr, gm_ptr, stride_xm,
                                                  stride_xk, stride_t, stride_gm, stride_gk, MODE, HAS_SCALE, INVERT,
                                                  BLOCK_K, ONE_TOKEN)
            w = _load_rows(w_ptr, k0 + tl.arange(0, BLOCK_K), any_k, pid_n * BLOCK_N, offs_n, n_ok, N, stride_wk,
                           stride_wn, BLOCK_K, BLOCK_N, EVEN_N, BF16_PAIRS)
            if PREFETCH:
                xn, xfn, keepn, anyn = _x_gate_tile(x_ptr, k0 + BLOCK_K, k_end, offs_m, m_ok, M, t_ptr, s_ptr, gm_ptr,
                                                    stride_xm, stride_xk, stride_t, stride_gm, stride_gk, MODE,
                                                    HAS_SCALE, INVERT, BLOCK_K, ONE_TOKEN)
            acc = _accumulate(acc, x, xf, keep, w, BLOCK_M, USE_DOT, DOT_NATIVE, ACC_2D, SWAP_AB, MODE == 5)
            if PREFETCH:
                x, xf, keep, any_k = xn, xfn, keepn, anyn

    # ---- low-rank rows: z (M, R) against B (R, N), fused into the same accumulator
    if LOWRANK:
        r_base = pid_k * R_BLOCKS_PER_SPLIT * BLOCK_K
        for rb in range(0, R_BLOCKS_PER_SPLIT):
            offs_r = r_base + rb * BLOCK_K + tl.arange(0, BLOCK_K)
            r_ok = offs_r < R
            zmask = m_ok[:, None] & r_ok[None, :]
            z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_r[None, :] * stride_zr, mask=zmask, other=0.0)
            bw = _load_rows(lb_ptr, offs_r, r_ok, pid_n * BLOCK_N, offs_n, n_ok, N, stride_br, stride_bn,
                            BLOCK_K, BLOCK_N, EVEN_N, False)
            acc = _accumulate(acc, z, z, zmask, bw, BLOCK_M, USE_DOT, DOT_NATIVE, ACC_2D, SWAP_AB, True)

    # ---- split-K reduction in fp32, finished by the last program of the tile
    if BLOCK_M > 1 and SWAP_AB:
        out = tl.trans(acc)
    elif BLOCK_M > 1:
        out = acc
    elif ACC_2D:
        out = tl.sum(acc, axis=0)[None, :]
    else:
        out = acc[None, :]
    omask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        _store_tile(out, y_ptr, b_ptr, offs_m, offs_n, n_ok, omask, stride_ym, stride_yn, HAS_BIAS)
    else:
        ws_offs = offs_m[:, None] * N + offs_n[None, :]
        tl.atomic_add(ws_ptr + ws_offs, out, mask=omask, sem="relaxed")
        tl.debug_barrier()
        tile = pid_m * tl.num_programs(0) + pid_n
        done = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            # Plain (vector, L2-only) reads suffice: every program's adds precede its barrier and its
            # release on the counter, and this program's acquire precedes Triton's barrier that
            # broadcasts `done`, so all partial sums are visible here.  (An acq_rel atomic_xchg per
            # element, as before, put one GPU-wide fence and one serial L2 round trip per element
            # group on the kernel's tail: 16 of them at M=16.)
            res = tl.load(ws_ptr + ws_offs, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(ws_ptr + ws_offs, tl.zeros_like(out), mask=omask, cache_modifier=".cg")  # ready for the next call
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed")
            _store_tile(res, y_ptr, b_ptr, offs_m, offs_n, n_ok, omask, stride_ym, stride_yn, HAS_BIAS)


# --------------------------------------------------------------------------- workspace
_WS: dict = {}


def _workspace(device: torch.device, n_ws: int, n_cnt: int):
    """Zero-initialised fp32 workspace and int32 tile counters, cached per device; kernels leave them zeroed."""
    key = (device.type, device.index)
    ws, cnt = _WS.get(key, (None, None))
    if ws is None or ws.numel() < n_ws:
        ws = torch.zeros(max(n_ws, 1 << 16), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < n_cnt:
        cnt = torch.zeros(max(n_cnt, 4096), dtype=torch.int32, device=device)
    _WS[key] = (ws, cnt)
    return ws, cnt


# --------------------------------------------------------------------------- launcher
def _pairs_ok(w: torch.Tensor) -> bool:
    """Can the kernel read W^T rows of ``w`` (N, K) as int32 column pairs?"""
    return (w.dtype == torch.bfloat16 and w.stride(0) == 1 and w.stride(1) % 2 == 0 and w.shape[0] % 2 == 0
            and w.data_ptr() % 4 == 0)


def _launch(x2, w, bias, y, *, mode, t=None, stride_t=0, scale=None, gm=None, invert=False,
            z=None, lb=None, cc=None, cblock=0):
    """Run ``_sparse_mm_kernel``: x2 (M, K), w (N, K) any strides, y (M, N) preallocated."""
    M, K = x2.shape
    N = w.shape[0]
    dev = x2.device
    cfg = _autotune.matmul_config(M, N, K, x2.dtype, dev)
    block_m = cfg.BLOCK_M
    use_dot = cfg.use_dot
    dot_native = use_dot and x2.is_cuda and not interpreting() and x2.dtype in (torch.float16, torch.bfloat16)
    n_tiles = _autotune.cdiv(N, cfg.BLOCK_N)
    m_tiles = _autotune.cdiv(M, block_m)
    k_blocks = max(1, _autotune.cdiv(K, cfg.BLOCK_K))
    if mode == MODE_COMPACT:  # one program per compaction block of ``cblock`` channels
        per = cblock // cfg.BLOCK_K
        split = _autotune.cdiv(K, cblock)
    else:
        split, per = _autotune.split_k(n_tiles, m_tiles, k_blocks, cfg, dev)
    R = 0 if z is None else z.shape[1]
    r_per = _autotune.cdiv(_autotune.cdiv(R, cfg.BLOCK_K), split) if R else 0
    ws, cnt = _workspace(dev, M * N, n_tiles * m_tiles) if split > 1 else (y, y)
    dummy = x2
    gm_s0 = gm.stride(0) if gm is not None and gm.dim() == 2 and gm.shape[0] > 1 else 0
    gm_s1 = gm.stride(-1) if gm is not None else 0
    _sparse_mm_kernel[(n_tiles, split, m_tiles)](
        x2, w, y, bias if bias is not None else dummy,
        t if t is not None else dummy, scale if scale is not None else dummy, gm if gm is not None else dummy,
        cc if cc is not None else dummy,
        z if z is not None else dummy, lb if lb is not None else dummy,
        ws, cnt,
        M, N, K, R,
        x2.stride(0), x2.stride(1), w.stride(1), w.stride(0), y.stride(0), y.stride(1),
        stride_t, gm_s0, gm_s1,
        z.stride(0) if z is not None else 0, z.stride(1) if z is not None else 0,
        lb.stride(0) if lb is not None else 0, lb.stride(1) if lb is not None else 0,
        per, r_per,
        MODE=mode, INVERT=invert, HAS_SCALE=scale is not None, HAS_BIAS=bias is not None,
        LOWRANK=z is not None,
        BLOCK_M=block_m, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, SPLIT_K=split,
        USE_DOT=use_dot, DOT_NATIVE=dot_native, ACC_2D=cfg.acc_2d and block_m == 1,
        EVEN_N=N % cfg.BLOCK_N == 0, BF16_PAIRS=cfg.bf16_pairs and not use_dot and _pairs_ok(w),
        PREFETCH=cfg.prefetch, SWAP_AB=cfg.swap_ab and use_dot,
        # one token in a tile of 16 (swap_ab) gated in-kernel; a pregated x pipelines better as the whole tile
        ONE_TOKEN=M == 1 and block_m > 1 and mode < MODE_DENSE,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=True,  # the GEMV loop is FMAs; Triton 3.10 turns fusion off by default (3.9 warns)
    )
    return y


def _check_linear(x, weight, bias):
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("x and weight must be torch.Tensors")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"sparse kernels serve float16/bfloat16/float32, got x.dtype={x.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim ({x.shape[-1] if x.dim() else 'scalar'}) must equal weight's in_features "
                         f"({weight.shape[1]}); weight is (out, in) = {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise TypeError(f"bias must be {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")
        bias = bias.contiguous()
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), bias  # -1 cannot be inferred when in_features is 0


def _gate_args(x2: torch.Tensor, gate, block_m_fused: int, steps: int = 1) -> dict:
    """Kernel arguments describing the gate: fused threshold, or a precomputed int8 mask."""
    M, K = x2.shape
    scale = _check_scale(gate.scale, K, x2.device)
    if gate.shared and steps > 1:  # one mask per decode step: per-token masks
        return dict(mode=MODE_MASK, gm=token_mask(x2, gate, steps))
    if gate.k is not None:
        gm = _topk_launch(x2, gate.k, gate.scale, gate.shared)
        return dict(mode=MODE_SHARED_MASK if gate.shared else MODE_MASK, gm=gm)
    if gate.shared and M > block_m_fused:
        gm = _threshold_launch(x2, gate.threshold, gate.scale, True)
        return dict(mode=MODE_SHARED_MASK, gm=gm)
    t, st = _threshold_tensor(gate.threshold, K, x2.device)
    return dict(mode=MODE_SHARED_THRESH if gate.shared else MODE_THRESH, t=t, stride_t=st, scale=scale)


def _fused_block_m(M: int, x2: torch.Tensor) -> int:
    return _autotune.matmul_config(M, 1, 1, x2.dtype, x2.device).BLOCK_M


def compact_block(M: int, N: int, K: int, x2: torch.Tensor) -> int:
    """Channels per compaction block (a power of two, a multiple of BLOCK_K): one K-split each."""
    cfg = _autotune.matmul_config(M, N, K, x2.dtype, x2.device)
    n_tiles = _autotune.cdiv(N, cfg.BLOCK_N) * _autotune.cdiv(M, cfg.BLOCK_M)
    _, per = _autotune.split_k(n_tiles, 1, max(1, _autotune.cdiv(K, cfg.BLOCK_K)), cfg, x2.device)
    return cfg.BLOCK_K * _autotune.next_pow2(per)


def _pregated(x2: torch.Tensor, gargs: dict, invert: bool, cblock: int = 0):
    """Run the gate as its own pass: ((x for the kernel, kernel gate args), same for the complement).

    With ``cblock`` the pass also compacts the active channel ids per block and the kernel loops
    over those only (MODE_COMPACT)."""
    keys = ("mode", "t", "stride_t", "scale", "gm")
    kw = {k: gargs[k] for k in keys if k in gargs}
    if cblock:
        cfg = _autotune.matmul_config(x2.shape[0], 1, 1, x2.dtype, x2.device)
        kw.update(compact_block=cblock, ids_dtype=compact_ids_dtype(cblock, cfg.use_dot and cfg.num_stages >= 3))
    o = pregate(x2, **kw, invert=invert)
    if cblock:
        fwd = (o["xe"], dict(mode=MODE_COMPACT, gm=o["idx"], cc=o["cnt"], cblock=cblock))
        inv = (o["xi"], dict(mode=MODE_COMPACT, gm=o["idxi"], cc=o["cnti"], cblock=cblock)) if invert else None
    else:
        fwd = (o["xe"], dict(mode=MODE_PREGATED, gm=o["any"]))
        inv = (o["xi"], dict(mode=MODE_PREGATED, gm=o["anyi"])) if invert else None
    return fwd, inv


def _gate_plan(M: int, N: int, K: int, x2: torch.Tensor, density: Optional[float] = None) -> tuple[bool, int]:
    """(run the gate as a separate pass?, compaction block or 0) from the config table and, when
    known, the fraction of channels the gate is expected to keep (`density_hint`)."""
    cfg = _autotune.matmul_config(M, N, K, x2.dtype, x2.device)
    if cfg.compact or (density is not None and density <= cfg.compact_below):
        return True, compact_block(M, N, K, x2)
    return cfg.pregate, 0  # the config table pregates one token only on the swap_ab path


def density_hint(gate, K: int, M: int = 1, steps: int = 1) -> Optional[float]:
    """Expected fraction of the channels the kernel reads: k/K for top-k, else the gate's own hint.

    None when unknown, and for per-token masks over several tokens: the kernel reads their union,
    which is far denser than one token's mask (94 % for four random 50 % masks)."""
    if M > 1 and not (gate.shared and steps == 1):
        return None
    if gate.k is not None:
        return gate.k / K if K else 1.0
    return getattr(gate, "density", None)


def _steps(x: torch.Tensor, gate) -> int:
    return shared_steps(x) if gate.shared else 1


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gate) -> torch.Tensor:
    """Equal to ``reference.sparse_linear(x, weight, bias, gate.mask(x))``; ``gate`` is an ``ops.Gate``.

    Eager calls run the launcher directly; under ``torch.compile`` the call goes through the
    ``sparse_infer::sparse_linear`` custom op (kernels/_ops.py), one opaque node, no graph break.
    """
    if torch.compiler.is_compiling():
        from ._ops import sparse_linear_op
        return sparse_linear_op(x, weight, bias, gate)
    return _sparse_linear_impl(x, weight, bias, gate)


def _sparse_linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gate) -> torch.Tensor:
    x2, bias = _check_linear(x, weight, bias)
    M, K = x2.shape
    N = weight.shape[0]
    check_gate(gate, K, x.device)
    out_shape = (*x.shape[:-1], N)
    if _fallback(M, gate) or K == 0:
        xs = apply_mask(x2, token_mask(x2, gate, _steps(x, gate))) if K else x2
        return F.linear(xs, weight, bias).reshape(out_shape)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(out_shape)
    steps = _steps(x, gate)
    gargs = _gate_args(x2, gate, _fused_block_m(M, x2), steps)
    separate, cblock = _gate_plan(M, N, K, x2, density_hint(gate, K, M, steps))
    if separate:
        (x2, gargs), _ = _pregated(x2, gargs, invert=False, cblock=cblock)
    _launch(x2, weight, bias, y, **gargs)
    return y.reshape(out_shape)


def to_kernel_layout(weight: torch.Tensor) -> torch.Tensor:
    """Same values, column-major (each input channel's weights one contiguous row of W^T)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if weight.stride(0) == 1 and weight.stride(1) == weight.shape[0]:
        return weight
    return weight.t().contiguous().t()
