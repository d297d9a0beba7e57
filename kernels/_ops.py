"""torch.library custom ops around the sparse linears, for torch.compile.

Tested: torch 2.11 (CUDA) / 2.13 (CPU, Triton interpreter) with triton 3.6 / 3.9.

``sparse_infer::sparse_linear`` and ``sparse_infer::rsparse_linear`` are opaque
custom ops (``torch.library.custom_op``) whose real implementation is the
launcher in sparse_matmul.py / rsparse_matmul.py and whose fake (meta)
implementation only gives the output shape.  ``torch.compile`` then traces a
model that calls the kernels without graph breaks, and
``mode="reduce-overhead"`` can capture them in CUDA graphs (the launchers do
no host sync and allocate nothing data-dependent).  Eager calls skip the op
layer (it costs ~10-20 µs of dispatch per call); the public functions route
here only while compiling.

The ``Gate`` dataclass is flattened into schema types: ``k`` (-1: none),
``threshold`` (tensor or None), ``scale`` (tensor or None), ``shared``.

Known limitation: the ops are not differentiable (inference kernels; no
autograd formula is registered).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from .rsparse_matmul import _rsparse_linear_impl
from .sparse_matmul import _sparse_linear_impl

__all__ = ["sparse_linear_op", "rsparse_linear_op"]


def _gate_of(k: int, threshold: Optional[torch.Tensor], scale: Optional[torch.Tensor], shared: bool):
    return SimpleNamespace(k=None if k < 0 else k, threshold=threshold, scale=scale, shared=shared)


def _flatten(gate, x: torch.Tensor):
    t = gate.threshold
    if t is not None and not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
    return (-1 if gate.k is None else int(gate.k)), t, gate.scale, bool(gate.shared)


def _out_shape(x: torch.Tensor, weight: torch.Tensor):
    return (*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("sparse_infer::sparse_linear", mutates_args=())
def _sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], k: int,
                   threshold: Optional[torch.Tensor], scale: Optional[torch.Tensor], shared: bool) -> torch.Tensor:
    return _sparse_linear_impl(x, weight, bias, _gate_of(k, threshold, scale, shared))


@_sparse_linear.register_fake
def _(x, weight, bias, k, threshold, scale, shared):
    return x.new_empty(_out_shape(x, weight))


@torch.library.custom_op("sparse_infer::rsparse_linear", mutates_args=())
def _rsparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                    B: torch.Tensor, k: int, threshold: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                    shared: bool) -> torch.Tensor:
    return _rsparse_linear_impl(x, weight, bias, A, B, _gate_of(k, threshold, scale, shared))


@_rsparse_linear.register_fake
def _(x, weight, bias, A, B, k, threshold, scale, shared):
    return x.new_empty(_out_shape(x, weight))


def sparse_linear_op(x, weight, bias, gate) -> torch.Tensor:
    """``torch.ops.sparse_infer.sparse_linear`` with an ``ops.Gate``."""
    return torch.ops.sparse_infer.sparse_linear(x, weight, bias, *_flatten(gate, x))


def rsparse_linear_op(x, weight, bias, A, B, gate) -> torch.Tensor:
    """``torch.ops.sparse_infer.rsparse_linear`` with an ``ops.Gate``."""
    return torch.ops.sparse_infer.rsparse_linear(x, weight, bias, A, B, *_flatten(gate, x))
