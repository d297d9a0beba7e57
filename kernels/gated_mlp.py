"""Fused gate-activation-sparse (CATS) gated MLP for decode, in Triton.

Computes exactly ``sparse_infer.reference.gated_mlp(x, Wg, Wu, Wd, act, gate.mask,
bg, bu, bd)``::

    h   = act(x Wg^T + bg)                 # dense: every row of Wg is read
    m   = gate.mask(h)                     # top-k / threshold, per token or shared
    out = ((h * m) * (x Wu^T + bu)) Wd^T + bd

reading only the rows of ``Wu`` and the columns of ``Wd`` of active channels.

Pipeline (no host sync, no data-dependent shapes: CUDA-graph capturable)
-----------------------------------------------------------------------
threshold gating (3 launches)
  1. ``_gate_up_kernel`` (PHASE=1): per block of intermediate channels, the gate
     GEMV, bias, activation, the threshold test, then the ``Wu`` rows of the
     channels active for any token through a masked load (inactive rows cost no
     memory traffic); writes ``p = h*m*u`` (fp32, M x N).
  2. ``_down_kernel``: split over the intermediate dimension; a channel is read
     from ``Wd`` only where some token has ``p != 0`` (NaN counts as non-zero);
     fp32 partial sums per split, no atomics (deterministic).
  3. ``_finalize_kernel``: sums the splits, adds ``bd``, propagates NaN, casts.
top-k gating (5 launches): 1. becomes PHASE=0 (gate GEMV, writes h), then the
  top-k kernel of ``gating`` (one program per token, or one for shared mode) finds
  the k-th largest score by a 31-step bitwise binary search on the fp32 bit
  pattern (scores are >= 0, so the bits order like the values; NaN ranks above +inf)
  and breaks ties at that value towards the lower index with a cumsum, exactly
  like the reference's stable descending sort; writes an int8 mask.  Then
  ``_gate_up_kernel`` (PHASE=2) reads h and the mask and does the up rows.

GEMV shapes: M = 1 uses a broadcast multiply accumulated elementwise (CUDA cores);
2 <= M <= 16 pads the tokens to 16 rows and uses ``tl.dot`` (bf16/fp16 operands,
exact products, fp32 accumulation; fp32 operands with ``input_precision="ieee"``).
Observed with triton 3.6: a per-iteration ``tl.sum(p[:, :, None] * w[None], 1)``
with 16 rows was computed at TF32 precision (rel. error 7e-4 in fp32), apparently
rewritten into a dot; hence the explicit dot with IEEE precision for fp32.

Numerics: every load is cast to fp32 before any arithmetic; accumulation is fp32.
The intermediate values are rounded to the input dtype where the reference
(which runs in that dtype) rounds them: ``x Wg^T + bg``, ``act(.)``,
``x Wu^T + bu`` and ``h*m*u``; so the mask is computed on the same numbers as
the reference's and ties/thresholds agree with it.  bf16 rounding is done by bit
arithmetic (round to nearest even): the interpreter's fp32 -> bf16 cast
truncates (triton 3.9), the GPU's rounds to nearest.

Tested with: triton 3.9 interpreter (TRITON_INTERPRET=1, torch 2.13 CPU) and
triton 3.6 / torch 2.11 on an NVIDIA H100 80GB HBM3 (sm_90): the test file
passes there and compute-sanitizer memcheck reports no error on odd shapes.
Uses no Triton API newer than 3.6.

Measured (H100, 2026-11-23, Llama-3-8B MLP 4096 x 14336, bf16, 50% active,
column-major Wd, 4 rotating weight copies, do_bench median, CUDA graph replay):
dense three F.linear + act 146 us; threshold 119 us (1.23x); top-k 143 us (1.02x,
of which the selection pass is 24 us); shared top-k 145 us.  M = 4 / 16: threshold
156 / 162 us, top-k 180 / 187 us, i.e. slower than dense (146 / 148 us): at
M > 1 the dense cuBLAS GEMM is the faster choice.  Eager (no graph) M = 1:
threshold 121 us, top-k 165 us (Triton launch overhead of the 5 launches).

Limitations
-----------
* M (tokens after flattening) <= 16 runs the kernels; above that, and for shared
  gating over (batch, seq > 1, hidden) inputs (one mask per position), the
  launcher falls back to the dense reference computation (same result).
* Weights are assumed finite.  Inactive channels are skipped, not multiplied by
  zero: the reference's ``0 * u`` turns a non-finite ``u`` of an *inactive*
  channel into NaN.  A non-finite ``x`` (the usual source) is handled: such a
  token's output is NaN like the reference's; a ``u`` that overflows fp16 from
  finite inputs on an inactive channel is not.
* Top-k selection runs one program per token (registers hold the whole row up
  to 32768 channels; above that it loops over chunks in global memory).  Its 31
  block-wide counts cost ~24 us at 14336 channels, which eats most of the top-k
  gain at M = 1; threshold gating (calibrated thresholds) is the fast mode.  A
  radix variant through ``tl.histogram`` was slower (82 us on the H100) and was
  removed when this pass became gating's top-k kernel.
* Offsets are int32: each weight must have fewer than 2**31 elements.
* Shared-mode scores are the RMS over tokens: squares summed in token order, divided
  by M, ``sqrt_rn``; torch's CUDA mean multiplies by 1/M instead, and the GPU may
  fuse a square into the sum (FMA), each of which can differ by one ulp (matters
  only for a threshold sitting exactly on a score, or two scores one ulp apart).
* The tile configurations come from a small sweep on H100 for Llama-3-8B shapes; the
  fastest layout for ``Wd`` is column-major (``stride(0) == 1``, i.e.
  ``w.t().contiguous().t()``); any strides are correct.
* Not registered as a torch custom op here (the dispatch layer owns that).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._autotune import cdiv, interpreting, num_sms
from .gating import _as_k, _check_scale, _topk_launch, check_gate

__all__ = ["gated_mlp", "MAX_KERNEL_TOKENS", "ACTIVATIONS"]

MAX_KERNEL_TOKENS = 16
# The dispatch layer (sparse_infer.ops) sends calls with more tokens than this to the
# dense path: at M = 4 and 16 the kernels were slower than cuBLAS (see the header).
GATED_MLP_FALLBACK_TOKENS = 1
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
_TORCH_ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# mask modes of _gate_up_kernel
_THRESH, _THRESH_SHARED, _MASK_BUF = 0, 1, 2
# threshold sources
_T_SCALAR_ARG, _T_SCALAR_PTR, _T_CHANNEL_PTR = 0, 1, 2


# --------------------------------------------------------------------------- jit helpers
@triton.jit
def _activation(g, ACT: tl.constexpr):
    """fp32 in, fp32 out.  0: silu, 1: gelu (erf), 2: gelu (tanh approximation)."""
    if ACT == 0:
        y = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        y = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        # tanh(z) = 1 - 2 / (exp(2z) + 1): libdevice.tanh fails under the interpreter;
        # exp overflow to inf gives 1 and underflow gives -1, NaN stays NaN.
        th = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
        y = 0.5 * g * (1.0 + th)
    return y


@triton.jit
def _round(v, DT: tl.constexpr):
    """Round fp32 ``v`` to dtype DT (round to nearest even) and return it as fp32.

    bf16 by bit arithmetic: the interpreter's fp32 -> bf16 cast truncates
    (measured with triton 3.9), the GPU's rounds to nearest even; this is both.
    """
    if DT == tl.bfloat16:
        b = v.to(tl.uint32, bitcast=True)
        r = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        out = tl.where(v != v, v, r.to(tl.float32, bitcast=True))
    elif DT == tl.float16:
        out = v.to(tl.float16).to(tl.float32)
    else:
        out = v
    return out


@triton.jit
def _gemv_rows(x_ptr, stride_xm, stride_xk, w_ptr, stride_wn, stride_wk, offs_m, m_ok, offs_n, row_ok, K,
               M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """fp32 [M_PAD, BLOCK_N] = x[offs_m] @ W[offs_n]^T; rows where ``row_ok`` is False are not read.

    USE_DOT (M_PAD = 16): tensor-core tl.dot, bf16/fp16 operands with fp32 accumulation
    (exact products), or fp32 operands in IEEE precision when DOT_F32 (fp32 inputs, and
    always under the interpreter, whose bf16 dot is wrong).  Otherwise (M = 1) a broadcast
    multiply accumulated elementwise and reduced once at the end: no TF32 anywhere.
    """
    if USE_DOT:
        acc = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
    else:
        acc3 = tl.zeros([M_PAD, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # masked load: rows of inactive channels cost no memory traffic
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if USE_DOT:
            if DOT_F32:
                acc += tl.dot(xk.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc = tl.dot(xk, tl.trans(w), acc)
        else:
            acc3 += xk.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)
    return acc


# --------------------------------------------------------------------------- kernels
@triton.jit
def _gate_up_kernel(
    x_ptr, stride_xm, stride_xk,
    wg_ptr, stride_wgn, stride_wgk, bg_ptr,
    wu_ptr, stride_wun, stride_wuk, bu_ptr,
    h_ptr, mask_ptr, stride_mask_m, p_ptr,
    thr_ptr, thr_val, scale_ptr,
    M, N, K,
    ACT: tl.constexpr, PHASE: tl.constexpr, MASK_MODE: tl.constexpr, T_MODE: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_BG: tl.constexpr, HAS_BU: tl.constexpr,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
):
    """PHASE 0: h = act(x Wg^T + bg) -> h_ptr.   PHASE 1: same + threshold mask + up rows -> p_ptr.
    PHASE 2: h and the mask from h_ptr / mask_ptr (top-k) + up rows -> p_ptr."""
    pid = tl.program_id(0)
    dt = x_ptr.dtype.element_ty
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    mn_ok = m_ok[:, None] & n_ok[None, :]
    mn_off = offs_m[:, None] * N + offs_n[None, :]

    if PHASE == 2:
        h = tl.load(h_ptr + mn_off, mask=mn_ok, other=0.0)
        act_mn = tl.load(mask_ptr + offs_m[:, None] * stride_mask_m + offs_n[None, :], mask=mn_ok, other=0) != 0
    else:
        g = _gemv_rows(x_ptr, stride_xm, stride_xk, wg_ptr, stride_wgn, stride_wgk, offs_m, m_ok, offs_n, n_ok, K,
                       M_PAD, BLOCK_N, BLOCK_K, USE_DOT, DOT_F32)
        if HAS_BG:
            g += tl.load(bg_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        g = _round(g, dt)  # F.linear's output in the input dtype
        h = _round(_activation(g, ACT), dt)
        if PHASE == 0:
            tl.store(h_ptr + mn_off, h, mask=mn_ok)
        else:
            # threshold test, written as not(score <= t) so that NaN stays active
            score = h
            if HAS_SCALE:
                score = score * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            score = tl.abs(score)
            if MASK_MODE == 1:  # shared: RMS over the tokens
                score = tl.sqrt_rn(tl.sum(tl.where(mn_ok, score * score, 0.0), axis=0)[None, :] / M)
            if T_MODE == 0:
                t = thr_val
                act_mn = ~(score <= t)
            elif T_MODE == 1:
                t = tl.load(thr_ptr).to(tl.float32)
                act_mn = ~(score <= t)
            else:
                t = tl.load(thr_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
                act_mn = ~(score <= t[None, :])
            act_mn = act_mn & mn_ok

    if PHASE != 0:
        row_act = tl.max(act_mn.to(tl.int32), axis=0) > 0  # channel active for some token
        n_act = tl.sum(row_act.to(tl.int32), axis=0)
        p = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
        if n_act > 0:
            u = _gemv_rows(x_ptr, stride_xm, stride_xk, wu_ptr, stride_wun, stride_wuk, offs_m, m_ok, offs_n, row_act,
                           K, M_PAD, BLOCK_N, BLOCK_K, USE_DOT, DOT_F32)
            if HAS_BU:
                u += tl.load(bu_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            u = _round(u, dt)
            p = tl.where(act_mn, _round(h * u, dt), 0.0)
        tl.store(p_ptr + mn_off, p, mask=mn_ok)


@triton.jit
def _down_kernel(
    p_ptr, wd_ptr, stride_wdo, stride_wdi, part_ptr,
    M, N, OUT, CHUNK,
    M_PAD: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
):
    """part[s, m, j] = sum over channels i of split s of p[m, i] * Wd[j, i], skipping channels with p == 0.

    p holds values already rounded to the weight dtype, so the bf16/fp16 tl.dot of
    the USE_DOT path is exact per product (fp32 accumulation).
    """
    pid_j = tl.program_id(0)
    s = tl.program_id(1)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < OUT
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    acc = tl.zeros([M_PAD, BLOCK_J], dtype=tl.float32)
    start = s * CHUNK
    for i0 in range(start, start + CHUNK, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        i_ok = offs_i < N
        p = tl.load(p_ptr + offs_m[:, None] * N + offs_i[None, :],
                    mask=m_ok[:, None] & i_ok[None, :], other=0.0)
        live = tl.max((p != 0.0).to(tl.int32), axis=0) > 0  # NaN != 0: NaN is read
        # masked load: columns of inactive channels are never read
        w = tl.load(wd_ptr + offs_i[:, None] * stride_wdi + offs_j[None, :] * stride_wdo,
                    mask=live[:, None] & j_ok[None, :], other=0.0)
        if USE_DOT:
            if DOT_F32:
                acc += tl.dot(p, w.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(p.to(w.dtype), w, acc)
        else:  # M = 1 (a size-1 dimension: no dot rewrite)
            acc += tl.sum(p[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    tl.store(part_ptr + s * M * OUT + offs_m[:, None] * OUT + offs_j[None, :], acc,
             mask=m_ok[:, None] & j_ok[None, :])


@triton.jit
def _finalize_kernel(
    part_ptr, bd_ptr, x_ptr, stride_xm, stride_xk, out_ptr,
    M, OUT, K, SPLITS,
    HAS_BD: tl.constexpr, M_PAD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """out[m, j] = sum_s part[s, m, j] + bd[j]; NaN where x[m] has a non-finite entry."""
    pid_j = tl.program_id(0)
    offs_j = pid_j * BLOCK + tl.arange(0, BLOCK)
    j_ok = offs_j < OUT
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    ok = m_ok[:, None] & j_ok[None, :]
    acc = tl.zeros([M_PAD, BLOCK], dtype=tl.float32)
    for s in range(0, SPLITS):
        acc += tl.load(part_ptr + s * M * OUT + offs_m[:, None] * OUT + offs_j[None, :], mask=ok, other=0.0)
    if HAS_BD:
        acc += tl.load(bd_ptr + offs_j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    # the reference multiplies the up projection of every channel by 0 (inactive) or h:
    # a non-finite x makes every u non-finite, hence an all-NaN output row
    nanacc = tl.zeros([M_PAD, BLOCK_X], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_X):
        offs_k = k0 + tl.arange(0, BLOCK_X)
        xv = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
        nanacc += xv * 0.0
    acc += tl.sum(nanacc, axis=1)[:, None]
    odt = out_ptr.dtype.element_ty
    tl.store(out_ptr + offs_m[:, None] * OUT + offs_j[None, :], _round(acc, odt).to(odt), mask=ok)


# --------------------------------------------------------------------------- launcher


# Tiles, best of a small H100 sweep for 4096 x 14336 bf16 (M=1: gate 32x128x4 + down 64x128x4
# 121 us eager vs 123-151 us for the others tried); key: "gemv" (M = 1,
# broadcast-multiply) or "dot" (2 <= M <= 16, padded to 16 rows for tl.dot).
# (BLOCK_N, BLOCK_K, num_warps) of the gate/up kernel
_GATE_CFG = {"gemv": (32, 128, 4), "dot": (32, 128, 4)}
# (BLOCK_I, BLOCK_J, num_warps) of the down kernel
_DOWN_CFG = {"gemv": (64, 128, 4), "dot": (64, 128, 4)}


def _check(x, gate_weight, up_weight, down_weight, act_name, gate, gate_bias, up_bias, down_bias):
    if act_name not in ACTIVATIONS:
        raise ValueError(f"act_name={act_name!r} is not one of {tuple(ACTIVATIONS)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"gated_mlp serves {_DTYPES}, got x.dtype={x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., hidden)")
    if x.device.type != "cuda" and not (interpreting() and x.device.type == "cpu"):
        raise RuntimeError(f"the Triton gated_mlp needs CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 "
                           "before importing to run it on the CPU, or use sparse_infer.reference.gated_mlp")
    hidden = x.shape[-1]
    for name, w in (("gate_weight", gate_weight), ("up_weight", up_weight), ("down_weight", down_weight)):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {getattr(w, 'shape', type(w))}")
        if w.dtype != x.dtype:
            raise TypeError(f"{name}.dtype={w.dtype} differs from x.dtype={x.dtype}; cast the weights or x")
        if w.device != x.device:
            raise ValueError(f"{name} is on {w.device}, x on {x.device}")
    inter = gate_weight.shape[0]
    if gate_weight.shape[1] != hidden:
        raise ValueError(f"gate_weight {tuple(gate_weight.shape)} expected (intermediate, {hidden}) for x {tuple(x.shape)}")
    if tuple(up_weight.shape) != (inter, hidden):
        raise ValueError(f"up_weight {tuple(up_weight.shape)} expected {(inter, hidden)} like gate_weight")
    if down_weight.shape[1] != inter:
        raise ValueError(f"down_weight {tuple(down_weight.shape)} expected (out_features, {inter})")
    for name, b, n in (("gate_bias", gate_bias, inter), ("up_bias", up_bias, inter),
                       ("down_bias", down_bias, down_weight.shape[0])):
        if b is not None:
            if tuple(b.shape) != (n,):
                raise ValueError(f"{name} has shape {tuple(b.shape)}, expected ({n},)")
            if b.device != x.device:
                raise ValueError(f"{name} is on {b.device}, x on {x.device}")
            if b.dtype != x.dtype:
                raise TypeError(f"{name}.dtype={b.dtype} differs from x.dtype={x.dtype}; cast the bias or x")
    if gate is None or (getattr(gate, "k", None) is None) == (getattr(gate, "threshold", None) is None):
        raise ValueError("gate must be a sparse_infer.ops.Gate with exactly one of k or threshold")
    if getattr(gate, "valid", None) is not None:
        check_gate(gate, inter, x.device)  # raises: the kernels do not serve Gate.valid
    if gate.k is not None:
        if isinstance(gate.k, torch.Tensor):  # operator.index would take a 0-d integer tensor
            raise TypeError(f"gate.k must be an int, got {type(gate.k).__name__}")
        _as_k(gate.k, inter, "intermediate channels")
    else:
        t = gate.threshold
        if isinstance(t, torch.Tensor):
            if t.numel() != 1 and tuple(t.shape) != (inter,):
                raise ValueError(f"threshold has shape {tuple(t.shape)}: expected a scalar or ({inter},)")
            if t.device != x.device:
                raise ValueError(f"threshold is on {t.device}, x on {x.device}")
        elif isinstance(t, bool) or not isinstance(t, numbers.Real):  # numpy scalars are Real, not float
            raise TypeError(f"threshold must be a float or a tensor, got {type(t).__name__}")
    if gate.scale is not None:
        s = gate.scale
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (inter,):
            raise ValueError(f"gate.scale must be a ({inter},) tensor, got {getattr(s, 'shape', type(s))}")
        if s.device != x.device:
            raise ValueError(f"gate.scale is on {s.device}, x on {x.device}")


def gated_mlp(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    act_name: str,
    gate,
    gate_bias: Optional[torch.Tensor] = None,
    up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """CATS gated MLP: ``reference.gated_mlp(x, Wg, Wu, Wd, act, gate.mask, bg, bu, bd)``.

    x: (..., hidden); gate_weight, up_weight: (intermediate, hidden) (row-major is
    fastest); down_weight: (out, intermediate) (column-major, ``stride(0) == 1``, is
    fastest); act_name: "silu" | "gelu" | "gelu_tanh"; gate: ``sparse_infer.ops.Gate``.
    All tensors on one device; weights in x's dtype (fp32/fp16/bf16).

    Under ``torch.compile`` the call goes through the ``sparse_infer::gated_mlp`` custom op
    (kernels/_ops.py): one opaque node, as for the sparse linears.
    """
    if torch.compiler.is_compiling():
        from ._ops import gated_mlp_op
        return gated_mlp_op(x, gate_weight, up_weight, down_weight, act_name, gate, gate_bias, up_bias, down_bias)
    return _gated_mlp_impl(x, gate_weight, up_weight, down_weight, act_name, gate, gate_bias, up_bias, down_bias)


def _gated_mlp_impl(x, gate_weight, up_weight, down_weight, act_name, gate, gate_bias=None, up_bias=None,
                    down_bias=None) -> torch.Tensor:
    _check(x, gate_weight, up_weight, down_weight, act_name, gate, gate_bias, up_bias, down_bias)
    # the kernels read per-channel vectors as ptr + channel: strided views must become contiguous
    gate_bias, up_bias, down_bias = (b if b is None else b.contiguous() for b in (gate_bias, up_bias, down_bias))
    hidden = x.shape[-1]
    inter = gate_weight.shape[0]
    out_f = down_weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), hidden)  # -1 cannot be inferred when hidden is 0
    M = x2.shape[0]
    # shared gating over (batch, seq>1, hidden) has one mask per position: not served here
    if M > MAX_KERNEL_TOKENS or (gate.shared and x.dim() >= 3 and x.shape[-2] > 1):
        from sparse_infer import reference as ref

        return ref.gated_mlp(x, gate_weight, up_weight, down_weight, _TORCH_ACTS[act_name], gate.mask,
                             gate_bias, up_bias, down_bias)
    out = torch.empty((M, out_f), device=x.device, dtype=x.dtype)
    if M == 0 or out_f == 0:
        return out.reshape(*lead, out_f)
    if hidden == 0 and inter > 0:  # h = act(gate bias), u = up bias: gated, then through down (the reference)
        from sparse_infer import reference as ref

        return ref.gated_mlp(x, gate_weight, up_weight, down_weight, _TORCH_ACTS[act_name], gate.mask,
                             gate_bias, up_bias, down_bias)
    if inter == 0:
        # reference: an empty sum
        res = torch.zeros((M, out_f), device=x.device, dtype=torch.float32)
        if down_bias is not None:
            res += down_bias.float()
        res += (x2.float() * 0).sum(dim=1, keepdim=True)
        return res.to(x.dtype).reshape(*lead, out_f)

    dev = x.device
    use_dot = M > 1
    m_pad = 16 if use_dot else 1
    mode = "dot" if use_dot else "gemv"
    dot_f32 = x.dtype == torch.float32 or interpreting()
    p = torch.empty((M, inter), device=dev, dtype=torch.float32)
    dummy = p  # placeholder pointer for absent optional tensors (never read)
    interp = interpreting()
    # under the interpreter: few, large programs (its cost is per program and op)
    bn, bk, nw = (32, 32, 4) if interp else _GATE_CFG[mode]
    grid_n = (cdiv(inter, bn),)
    act = ACTIVATIONS[act_name]
    scale = dummy if gate.scale is None else _check_scale(gate.scale, inter, dev)
    common = dict(ACT=act, HAS_SCALE=gate.scale is not None, HAS_BG=gate_bias is not None,
                  HAS_BU=up_bias is not None, M_PAD=m_pad, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot,
                  DOT_F32=dot_f32, num_warps=nw, enable_fp_fusion=True)
    args_w = (x2, x2.stride(0), x2.stride(1),
              gate_weight, gate_weight.stride(0), gate_weight.stride(1),
              gate_bias if gate_bias is not None else dummy,
              up_weight, up_weight.stride(0), up_weight.stride(1),
              up_bias if up_bias is not None else dummy)

    if gate.k is not None:
        h = torch.empty((M, inter), device=dev, dtype=torch.float32)
        _gate_up_kernel[grid_n](*args_w, h, dummy, 0, p, dummy, 0.0, scale, M, inter, hidden,
                                PHASE=0, MASK_MODE=_MASK_BUF, T_MODE=0, **common)
        # the selection pass is gating's top-k kernel over h (same scores, ties and NaN rules):
        # an int8 mask of one row per token, or one row shared by all of them
        mask = _topk_launch(h, gate.k, gate.scale, bool(gate.shared))
        _gate_up_kernel[grid_n](*args_w, h, mask, 0 if gate.shared else mask.stride(0), p, dummy, 0.0, scale, M,
                                inter, hidden,
                                PHASE=2, MASK_MODE=_MASK_BUF, T_MODE=0, **common)
    else:
        t = gate.threshold
        if isinstance(t, torch.Tensor):
            t_mode = _T_SCALAR_PTR if t.numel() == 1 else _T_CHANNEL_PTR
            t_ptr, t_val = t.reshape(-1).contiguous(), 0.0
        else:
            # rounded to float32 first, as the reference compares (1e39 is inf there, not a finite bound)
            t_mode, t_ptr, t_val = _T_SCALAR_ARG, dummy, torch.tensor(float(t), dtype=torch.float32).item()
        _gate_up_kernel[grid_n](*args_w, dummy, dummy, 0, p, t_ptr, t_val, scale, M, inter, hidden,
                                PHASE=1, MASK_MODE=_THRESH_SHARED if gate.shared else _THRESH, T_MODE=t_mode,
                                **common)

    bi, bj, dw = (32, 32, 4) if interp else _DOWN_CFG[mode]
    grid_j = cdiv(out_f, bj)
    want = max(1, (4 * num_sms(dev)) // grid_j)
    chunk = cdiv(cdiv(inter, want), bi) * bi
    splits = cdiv(inter, chunk)
    part = torch.empty((splits, M, out_f), device=dev, dtype=torch.float32)
    _down_kernel[(grid_j, splits)](p, down_weight, down_weight.stride(0), down_weight.stride(1), part,
                                   M, inter, out_f, chunk, M_PAD=m_pad, BLOCK_I=bi, BLOCK_J=bj, USE_DOT=use_dot,
                                   DOT_F32=dot_f32, num_warps=dw, enable_fp_fusion=True)
    fb = 64 if interp else max(64, 1024 // m_pad)
    _finalize_kernel[(cdiv(out_f, fb),)](part, down_bias if down_bias is not None else dummy,
                                                x2, x2.stride(0), x2.stride(1), out, M, out_f, hidden, splits,
                                                HAS_BD=down_bias is not None, M_PAD=m_pad, BLOCK=fb, BLOCK_X=fb,
                                                num_warps=4)
    return out.reshape(*lead, out_f)
