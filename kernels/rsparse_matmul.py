"""Rank-aware (R-Sparse) linear: active channels through W, the rest through a rank-r factor.

Tested: triton 3.6 on an H100 (CUDA), triton 3.9 under ``TRITON_INTERPRET=1``.

``y = W[:, S] x[S] + b + B^T (A^T x[~S])``  (A: (in, r), B: (r, out)), equal to
``reference.rsparse_linear(x, W, b, mask, A, B)``.

Two launches of the split-K kernel of ``sparse_matmul.py``, no host sync:
1. ``z = x[~S] @ A`` (M, r) in fp32: the same kernel with W^T := A and the gate
   inverted (``INVERT``), so only the rows of A of inactive channels are read
   (each row of a row-major A is contiguous, the layout that kernel wants).
2. The sparse pass over W^T's active rows, with the B-expansion fused into the
   same output accumulation: rows of B act as r extra input channels whose
   activations are z (``LOWRANK``), split over the same split-K programs.
Bytes: active rows of W + inactive rows of A + all of B + x + y.

Known limitations: A and B are cast to x's dtype when they differ (a copy per
call - store them in the model's dtype); z is rounded to the weight dtype before
the tensor-core dot (M > 1 on the GPU), like the reference's ``(rest @ A)`` in
x's dtype.  Same workspace caveats as sparse_matmul.py (one stream at a time).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .gating import apply_mask, check_gate, token_mask
from .sparse_matmul import (
    _check_linear, _fused_block_m, _gate_args, _gate_plan, _launch, _pregated, _steps,
)
from . import sparse_matmul as _sm

__all__ = ["rsparse_linear"]


def _check_factors(A, B, K, N, x):
    if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
        raise TypeError("A and B must be torch.Tensors")
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != K or B.shape[1] != N or A.shape[1] != B.shape[0]:
        raise ValueError(f"expected A (in={K}, r) and B (r, out={N}) with the same r, got A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}")
    if A.device != x.device or B.device != x.device:
        raise ValueError(f"A ({A.device}) and B ({B.device}) must be on x's device ({x.device})")
    return A.to(x.dtype), B.to(x.dtype)


def rsparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   A: torch.Tensor, B: torch.Tensor, gate) -> torch.Tensor:
    """Equal to ``reference.rsparse_linear(x, weight, bias, gate.mask(x), A, B)``.

    Under ``torch.compile`` the call goes through the ``sparse_infer::rsparse_linear`` custom op."""
    if torch.compiler.is_compiling():
        from ._ops import rsparse_linear_op
        return rsparse_linear_op(x, weight, bias, A, B, gate)
    return _rsparse_linear_impl(x, weight, bias, A, B, gate)


def _rsparse_linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         A: torch.Tensor, B: torch.Tensor, gate) -> torch.Tensor:
    x2, bias = _check_linear(x, weight, bias)
    M, K = x2.shape
    N = weight.shape[0]
    check_gate(gate, K, x.device)
    A, B = _check_factors(A, B, K, N, x)
    R = A.shape[1]
    out_shape = (*x.shape[:-1], N)
    if R == 0:
        return _sm._sparse_linear_impl(x, weight, bias, gate)
    if _sm._fallback(M, gate) or K == 0:
        if K == 0:
            return F.linear(x2, weight, bias).reshape(out_shape)
        mask = token_mask(x2, gate, _steps(x, gate))
        dense = F.linear(apply_mask(x2, mask), weight, bias)
        rest = apply_mask(x2, mask, invert=True)
        return (dense + (rest @ A) @ B).reshape(out_shape)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y.reshape(out_shape)
    gargs = _gate_args(x2, gate, _fused_block_m(M, x2), _steps(x, gate))
    z = torch.empty((M, R), dtype=torch.float32, device=x.device)
    # no density hint: compaction measured slower here (43 against 36 us, run 4 in KERNEL_NOTES)
    separate, cblock = _gate_plan(M, N, K, x2)
    if separate:
        (xa, ga), (xi, gi) = _pregated(x2, gargs, invert=True, cblock=cblock)
        _launch(xi, A.t(), None, z, **gi)
        _launch(xa, weight, bias, y, z=z, lb=B, **ga)
    else:
        _launch(x2, A.t(), None, z, invert=True, **gargs)
        _launch(x2, weight, bias, y, z=z, lb=B, **gargs)
    return y.reshape(out_shape)
