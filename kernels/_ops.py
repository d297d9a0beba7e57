"""torch.library custom ops around the sparse linears, for torch.compile.

Tested: torch 2.11 (CUDA) / 2.13 (CPU, Triton interpreter) with triton 3.6 / 3.9.

``sparse_infer::sparse_linear``, ``sparse_infer::rsparse_linear`` and
``sparse_infer::gated_mlp`` are opaque custom ops (``torch.library.custom_op``)
whose real implementation is the launcher in sparse_matmul.py /
rsparse_matmul.py / gated_mlp.py and whose fake (meta) implementation only
gives the output shape.  ``torch.compile`` then traces a
model that calls the kernels without graph breaks, and
``mode="reduce-overhead"`` can capture them in CUDA graphs (the launchers do
no host sync and allocate nothing data-dependent).  Eager calls skip the op
layer (it costs ~10-20 µs of dispatch per call); the public functions route
here only while compiling.

The ``Gate`` dataclass is flattened into schema types: ``k`` (-1: none),
``threshold`` (tensor or None), ``scale`` (tensor or None), ``shared``,
``density`` (the launch hint; -1: none).

Known limitation: the ops are not differentiable (inference kernels; no
autograd formula is registered).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from .gated_mlp import _gated_mlp_impl
from .gating import check_gate
from .rsparse_matmul import _rsparse_linear_impl
from .sparse_matmul import _sparse_linear_impl

__all__ = ["sparse_linear_op", "rsparse_linear_op", "gated_mlp_op"]


def _gate_of(k: int, threshold: Optional[torch.Tensor], scale: Optional[torch.Tensor], shared: bool,
             density: float):
    return SimpleNamespace(k=None if k < 0 else k, threshold=threshold, scale=scale, shared=shared,
                           density=None if density < 0 else density)


def _flatten(gate, x: torch.Tensor, width: int):
    """The gate as the custom ops' arguments; ``width``: the gated channels (input or intermediate)."""
    # checked before flattening: int() would truncate k=2.7, and -1 stands for "no k" below
    check_gate(gate, width, x.device)
    t = gate.threshold
    if t is not None and not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
    density = getattr(gate, "density", None)
    return ((-1 if gate.k is None else int(gate.k)), t, gate.scale, bool(gate.shared),
            -1.0 if density is None else float(density))


def _out_shape(x: torch.Tensor, weight: torch.Tensor):
    return (*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("sparse_infer::sparse_linear", mutates_args=())
def _sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], k: int,
                   threshold: Optional[torch.Tensor], scale: Optional[torch.Tensor], shared: bool,
                   density: float) -> torch.Tensor:
    return _sparse_linear_impl(x, weight, bias, _gate_of(k, threshold, scale, shared, density))


@_sparse_linear.register_fake
def _(x, weight, bias, k, threshold, scale, shared, density):
    return x.new_empty(_out_shape(x, weight))


@torch.library.custom_op("sparse_infer::rsparse_linear", mutates_args=())
def _rsparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: torch.Tensor,
                    B: torch.Tensor, k: int, threshold: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                    shared: bool, density: float) -> torch.Tensor:
    return _rsparse_linear_impl(x, weight, bias, A, B, _gate_of(k, threshold, scale, shared, density))


@_rsparse_linear.register_fake
def _(x, weight, bias, A, B, k, threshold, scale, shared, density):
    return x.new_empty(_out_shape(x, weight))


@torch.library.custom_op("sparse_infer::gated_mlp", mutates_args=())
def _gated_mlp(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor,
               act_name: str, k: int, threshold: Optional[torch.Tensor], scale: Optional[torch.Tensor], shared: bool,
               density: float, gate_bias: Optional[torch.Tensor], up_bias: Optional[torch.Tensor],
               down_bias: Optional[torch.Tensor]) -> torch.Tensor:
    gate = _gate_of(k, threshold, scale, shared, density)
    return _gated_mlp_impl(x, gate_weight, up_weight, down_weight, act_name, gate, gate_bias, up_bias, down_bias)


@_gated_mlp.register_fake
def _(x, gate_weight, up_weight, down_weight, act_name, k, threshold, scale, shared, density, gate_bias, up_bias,
      down_bias):
    return x.new_empty(_out_shape(x, down_weight))


def sparse_linear_op(x, weight, bias, gate) -> torch.Tensor:
    """``torch.ops.sparse_infer.sparse_linear`` with an ``ops.Gate``."""
    return torch.ops.sparse_infer.sparse_linear(x, weight, bias, *_flatten(gate, x, weight.shape[1]))


def rsparse_linear_op(x, weight, bias, A, B, gate) -> torch.Tensor:
    """``torch.ops.sparse_infer.rsparse_linear`` with an ``ops.Gate``."""
    return torch.ops.sparse_infer.rsparse_linear(x, weight, bias, A, B, *_flatten(gate, x, weight.shape[1]))


def gated_mlp_op(x, gate_weight, up_weight, down_weight, act_name, gate, gate_bias=None, up_bias=None,
                 down_bias=None) -> torch.Tensor:
    """``torch.ops.sparse_infer.gated_mlp`` with an ``ops.Gate``."""
    flat = _flatten(gate, x, gate_weight.shape[0])
    return torch.ops.sparse_infer.gated_mlp(x, gate_weight, up_weight, down_weight, act_name, *flat,
                                            gate_bias, up_bias, down_bias)
