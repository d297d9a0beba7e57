"""Reference semantics of every sparse-infer operation, in plain PyTorch.

This module is the specification: each Triton kernel in ``sparse_infer.kernels``
is tested against the function here of the same name, and the drop-in modules
run these functions on any device the kernels do not serve (the CPU path).
Everything here runs on any device and dtype; nothing here is tuned for speed.

Conventions used throughout
---------------------------
* ``x`` has shape ``(..., in_features)``; a *token* is one row of ``x``
  flattened to ``(M, in_features)``.
* A *mask* is a bool tensor shaped like ``x`` (per-token) or ``(in_features,)``
  (shared by all tokens of the call): True marks an *active* input channel.
* Inactive channels are skipped, not multiplied by zero: an inactive ``inf`` or
  ``NaN`` contributes nothing, exactly as a kernel that never reads the weight
  column of an inactive channel.  Active ``NaN`` propagates to the output.
* Gating never drops a ``NaN``: top-k ranks ``NaN`` above every number and the
  threshold test is written ``not (|x·s| <= t)``, so a NaN activation stays
  active and shows up in the output instead of being silently zeroed.
* Low-rank factors follow ``W ≈ (A @ B).T`` with ``A`` of shape
  ``(in_features, rank)`` and ``B`` of shape ``(rank, out_features)``, so
  ``x @ A @ B ≈ F.linear(x, W)``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "topk_mask",
    "threshold_mask",
    "shared_topk_mask",
    "shared_threshold_mask",
    "apply_mask",
    "topk_gate",
    "threshold_gate",
    "sparse_linear",
    "rsparse_linear",
    "gated_mlp",
    "lowrank_factors",
    "column_norms",
    "linear_read_elements",
    "model_sparsity",
]


# --------------------------------------------------------------------------- gating
def _importance(x: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """|x|, or |x * s| when a per-channel importance scale is given (R-Sparse: s_i = ||W[:, i]||)."""
    xf = x.float()
    if scale is not None:
        xf = xf * scale.float()
    return xf.abs()


_NAN_BITS = 0x7FC00000  # a quiet NaN's float32 bit pattern


def topk_mask(x: torch.Tensor, k: int, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per token, True for the ``k`` channels of largest ``|x·s|``.

    Ties are broken towards the lower channel index (a stable descending sort),
    so the mask is deterministic; +inf ranks above every finite score and NaN
    above +inf.
    """
    n = x.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must lie in [0, {n}] (the number of input channels)")
    if k == n:
        return torch.ones_like(x, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    score = _importance(x, scale)
    # Ranked by float32 bit pattern: for scores >= 0 it orders like the value, +inf above every
    # finite score, and NaN takes the quiet-NaN pattern above +inf (no float stands above inf).
    score = torch.where(score.isnan(), _NAN_BITS, score.view(torch.int32))
    # The k-th largest score; everything above it is active.  Of the scores equal
    # to it, the lowest indices are kept, as a stable descending sort would
    # (torch.topk finds the value several times faster than a full sort on the CPU).
    kth = torch.topk(score, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    mask = score >= kth
    extra = mask.sum(dim=-1, keepdim=True) - k
    # Skipping the tie pass when there are no ties is worth it eagerly; under torch.compile
    # it would be a data-dependent branch (a graph break), and the pass is exact either way.
    if torch.compiler.is_compiling() or bool((extra > 0).any()):
        tie = score == kth
        ties_from_here = tie.flip(-1).cumsum(-1).flip(-1)  # ties at this index or after it
        mask &= ~(tie & (ties_from_here <= extra))  # drop the highest-index surplus ties
    return mask


def threshold_mask(
    x: torch.Tensor, threshold: torch.Tensor | float, scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """True where ``|x·s| > t``; ``t`` is a scalar or a per-channel ``(in_features,)`` vector.

    Written as ``not (|x·s| <= t)`` so that NaN stays active (see module doc).
    """
    t = torch.as_tensor(threshold, device=x.device, dtype=torch.float32)
    return ~(_importance(x, scale) <= t)


def _step_importance(x: torch.Tensor, scale: Optional[torch.Tensor], valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Root mean square of ``x·s`` over the tokens of one decode step.

    Why RMS rather than the mean of ``|x·s|``: dropping channel ``i`` for the
    whole step removes ``x_mi·W[:, i]`` from every token ``m``, a squared error
    of ``sum_m x_mi^2 ||W[:, i]||^2`` over the step (cross-channel terms aside),
    so ranking by the mean square of ``x·s`` with ``s_i = ||W[:, i]||`` drops
    the channels that cost the batch least.  Measured on SmolLM2 (issue 7 note):
    lower perplexity and KL than the mean of ``|x·s|`` in every row.  For one
    token it equals ``|x·s|``.  fp32: squares summed in token order, divided by
    the token count, then the correctly rounded square root (IEEE, as the
    kernels' ``div_rn`` and ``sqrt_rn``).

    A decode step is what one batched call of a server computes: for ``x`` of
    shape ``(batch, seq, in)`` the tokens at the same position ``seq`` of every
    sequence (so a prefill of B sequences is scored like B sequences decoded
    together, step by step); for a 2-D ``(M, in)`` input, all M tokens.
    Returns ``(seq, in)`` for 3-D and higher inputs, ``(in,)`` for 2-D and 1-D.

    ``valid`` (bool, ``x.shape[:-1]``): only those tokens are scored, the mean
    taken over their count per step (padding of a batch of unequal sequences
    must not steer the mask the real tokens get); a step with none scores 0.
    """
    imp = _importance(x, scale)
    sq = imp * imp
    count = None
    if valid is not None:
        if tuple(valid.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"valid has shape {tuple(valid.shape)}, expected x's token dims {tuple(x.shape[:-1])}")
        sq = torch.where(valid.unsqueeze(-1), sq, torch.zeros((), dtype=sq.dtype, device=sq.device))
        per_step = valid.reshape(-1) if x.dim() <= 2 else valid.reshape(-1, x.shape[-2])
        count = per_step.sum(dim=0).clamp_min(1).to(torch.float32).unsqueeze(-1)
    rows = sq.reshape(-1, x.shape[-1]) if x.dim() <= 2 else sq.reshape(-1, x.shape[-2], x.shape[-1])
    # token order, as written in the spec (torch's mean reduces in another order from 5 rows on,
    # and a score one ulp off flips a channel sitting on a threshold)
    acc = rows[0] if len(rows) else rows.sum(dim=0)  # the loop makes new tensors: no copy needed
    for r in rows[1:]:
        acc = acc + r
    # torch's vectorised float32 sqrt on the CPU may be 1 ulp off; the float64 root rounded to
    # float32 is the correctly rounded one (the kernels' sqrt_rn)
    return (acc / (len(rows) if count is None else count)).double().sqrt().float()


def shared_topk_mask(x: torch.Tensor, k: int, scale: Optional[torch.Tensor] = None,
                     valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Batch-shared top-k: per decode step, the ``k`` channels of largest RMS of ``x·s``.

    Every token of the step uses that one mask, so the bytes of weight read per
    step are fixed by ``k`` whatever the batch size, instead of growing with the
    union of per-token masks.  Shape: ``(in,)`` for 2-D ``x``, ``(seq, in)``
    for ``(batch, seq, in)``; broadcasts against ``x``.  ``valid``: the tokens
    that count (see `_step_importance`).
    """
    if _no_tokens(x):  # nothing to score: no channel is needed (all of them when k keeps every one)
        return torch.full(_step_shape(x), k >= x.shape[-1], dtype=torch.bool, device=x.device)
    return topk_mask(_step_importance(x, scale, valid), k)


def _no_tokens(x: torch.Tensor) -> bool:
    return math.prod(x.shape[:-1]) == 0


def _step_shape(x: torch.Tensor) -> tuple:
    return (x.shape[-2], x.shape[-1]) if x.dim() >= 3 else (x.shape[-1],)


def shared_threshold_mask(
    x: torch.Tensor, threshold: torch.Tensor | float, scale: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Batch-shared threshold: per decode step, channels whose RMS of ``x·s`` exceeds ``t``."""
    if _no_tokens(x):
        return torch.zeros(_step_shape(x), dtype=torch.bool, device=x.device)
    return threshold_mask(_step_importance(x, scale, valid), threshold)


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` where the mask is True, exact zero elsewhere (inactive inf/NaN dropped)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def topk_gate(x: torch.Tensor, k: int, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Top-k activation gating: ``x`` with all but its ``k`` largest-|x·s| entries per token zeroed."""
    return apply_mask(x, topk_mask(x, k, scale))


def threshold_gate(
    x: torch.Tensor, threshold: torch.Tensor | float, scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Threshold activation gating: ``x`` with entries where ``|x·s| <= t`` zeroed."""
    return apply_mask(x, threshold_mask(x, threshold, scale))


# --------------------------------------------------------------------------- linears
def sparse_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """Input-sparse linear: ``F.linear(x * mask, W, b)``; only the weight columns of active channels matter."""
    return F.linear(apply_mask(x, mask), weight, bias)


def rsparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
) -> torch.Tensor:
    """Rank-aware (R-Sparse) linear.

    ``y = W[:, S] x[S] + b + B^T (A^T x[~S])``: active channels go through the
    full weight, the rest through its rank-r factor.  ``A``: (in, r), ``B``: (r, out).
    """
    dense_part = F.linear(apply_mask(x, mask), weight, bias)
    if A.shape[1] == 0:
        return dense_part
    rest = apply_mask(x, ~mask)
    return dense_part + (rest @ A.to(x.dtype)) @ B.to(x.dtype)


def gated_mlp(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    mask_fn: Callable[[torch.Tensor], torch.Tensor],
    gate_bias: Optional[torch.Tensor] = None,
    up_bias: Optional[torch.Tensor] = None,
    down_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gate-activation sparsity for a gated MLP (CATS).

    ``h = act(x Wg^T)``; ``m = mask_fn(h)`` on the gate activation; then
    ``out = ((h * m) * (x Wu^T)) Wd^T``.  Only the rows of ``Wu`` and the
    columns of ``Wd`` of active intermediate channels are needed.
    """
    h = act(F.linear(x, gate_weight, gate_bias))
    m = mask_fn(h)
    u = F.linear(x, up_weight, up_bias)
    return F.linear(apply_mask(h, m) * u, down_weight, down_bias)


# --------------------------------------------------------------------------- factors
def lowrank_factors(weight: torch.Tensor, rank: int, dtype: Optional[torch.dtype] = None):
    """Rank-``rank`` SVD factors ``A`` (in, r), ``B`` (r, out) with ``(A @ B).T ≈ W``.

    The truncated SVD is taken in float64 through the eigendecomposition of
    the smaller Gram matrix (``WᵀW`` or ``WWᵀ``): on a CPU that is ~40× faster
    than a float64 SVD, and the leading singular pairs it keeps come out to
    ~1e-13 of it.  The singular values are split evenly (sqrt) between the
    factors, which come back on ``weight.device`` in ``dtype`` (default: the
    weight's dtype).
    """
    out_f, in_f = weight.shape
    if not 0 <= rank <= min(out_f, in_f):
        raise ValueError(f"rank={rank} must lie in [0, min(out, in)={min(out_f, in_f)}] for a {out_f}x{in_f} weight")
    dtype = dtype or weight.dtype
    if rank == 0:
        z = weight.new_zeros
        return z((in_f, 0), dtype=dtype), z((0, out_f), dtype=dtype)
    W = weight.detach().to(torch.float64)
    small_in = in_f <= out_f
    evals, evecs = torch.linalg.eigh(W.T @ W if small_in else W @ W.T)  # ascending
    evecs = evecs[:, -rank:].flip(1)  # leading vectors first
    sv = evals[-rank:].flip(0).clamp_min(0).sqrt()
    root = sv.sqrt()
    inv_root = torch.where(sv > 0, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    if small_in:  # evecs = V_r (in, r); U_r S_r = W V_r
        A = evecs * root
        B = (W @ evecs).T * inv_root[:, None]
    else:  # evecs = U_r (out, r); V_r S_r = Wᵀ U_r
        A = (W.T @ evecs) * inv_root
        B = root[:, None] * evecs.T
    return A.to(weight.device, dtype).contiguous(), B.to(weight.device, dtype).contiguous()


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """``||W[:, i]||_2`` per input channel, float32: the importance scale R-Sparse multiplies |x_i| by."""
    return weight.detach().float().norm(dim=0)


# --------------------------------------------------------------------------- accounting
def linear_read_elements(in_features: int, out_features: int, active: float, rank: int = 0) -> float:
    """Weight elements read per token: ``active * out + rank * (in + out)`` (dense: ``in * out``)."""
    return active * out_features + rank * (in_features + out_features)


def model_sparsity(layers) -> float:
    """Model-level sparsity ``1 - read / dense`` over ``(in, out, active, rank)`` tuples of the patched linears."""
    read = dense = 0.0
    for in_f, out_f, active, rank in layers:
        read += linear_read_elements(in_f, out_f, active, rank)
        dense += in_f * out_f
    return 1.0 - read / dense if dense else 0.0
