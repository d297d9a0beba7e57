"""Backend dispatch: one entry point per operation, routed to the Triton kernels or the reference.

The modules call only these functions.  ``backend="auto"`` takes the Triton
kernels for CUDA tensors and the reference (``sparse_infer.reference``)
elsewhere; ``"triton"`` forces the kernels (a clear error where they cannot
run); ``"reference"`` forces the PyTorch path on any device.

Gating is described by a :class:`Gate`: top-k (``k``) or threshold
(``threshold``), optionally scaled per channel (``scale``), per token or shared
by all tokens of the call.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import reference as ref

BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Gate:
    """How a call picks its active channels.

    Exactly one of ``k`` (top-k per token, or of the batch in shared mode) and
    ``threshold`` (scalar or per-channel tensor) is set.  ``scale`` is an
    optional per-channel importance (``|x_i * s_i|`` is what is ranked).
    ``density`` is a launch hint only: the fraction of channels a threshold is
    expected to keep (its calibration target), from which the kernels pick their
    loop (the mask itself never depends on it).  ``valid`` (bool, ``(batch, seq)``
    for ``(batch, seq, in)`` input) marks the tokens a shared mask is decided by:
    padding is left out of the RMS over the batch (None: every token counts).
    """

    k: Optional[int] = None
    threshold: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    shared: bool = False
    density: Optional[float] = None
    valid: Optional[torch.Tensor] = None

    def __post_init__(self):
        if (self.k is None) == (self.threshold is None):
            raise ValueError("Gate needs exactly one of k (top-k) or threshold")
        if self.density is not None and not 0.0 <= self.density <= 1.0:
            raise ValueError(f"Gate.density is a fraction of channels in [0, 1], got {self.density}")

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The reference mask: shaped like ``x`` per token; when shared, one row per decode step
        (``(in,)`` for 2-D ``x``, ``(seq, in)`` for ``(batch, seq, in)``), broadcasting against ``x``."""
        if self.shared:
            if self.k is not None:
                return ref.shared_topk_mask(x, self.k, self.scale, self.valid)
            return ref.shared_threshold_mask(x, self.threshold, self.scale, self.valid)
        if self.k is not None:
            return ref.topk_mask(x, self.k, self.scale)
        return ref.threshold_mask(x, self.threshold, self.scale)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can serve this tensor (CUDA, or the CPU interpreter)."""
    return x.is_cuda or (_interpreting() and x.device.type == "cpu")


def shared_prefill(x: torch.Tensor, gate: Gate) -> bool:
    """A shared-mask call over several positions (prefill, or evaluation of whole
    sequences): its masks differ per position, which the kernels do not serve,
    so it runs the reference."""
    return gate.shared and x.dim() >= 3 and x.shape[-2] > 1


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_params(*linears) -> tuple:
    """The weights and biases of some linears, for `use_kernels`' gradient check."""
    return tuple(t for m in linears for t in (m.weight, m.bias))


def use_kernels(backend: str, x: torch.Tensor, gate: Gate, *params) -> bool:
    """Whether a call runs the Triton kernels: the backend resolves to them, they serve the call's
    shape, and no gradient is asked for (the kernels have no backward; the reference path does)."""
    # a shared mask over several positions, or one that leaves padding out (`Gate.valid`): the reference
    if resolve_backend(backend, x) != "triton" or shared_prefill(x, gate) or gate.valid is not None:
        return False
    if needs_grad(x, *params):
        warnings.warn(
            "the sparse-infer Triton kernels are inference-only (no backward): a call that needs gradients "
            "runs the PyTorch reference path instead; wrap inference in torch.no_grad() or torch.inference_mode()",
            stacklevel=3,
        )
        return False
    return True


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if x.is_cuda and x.dtype in TRITON_DTYPES else "reference"
    if not triton_available(x):
        raise RuntimeError(
            f"backend='triton' needs a CUDA tensor (got device {x.device}); use backend='auto' or "
            "'reference' on this device, or set TRITON_INTERPRET=1 to run the kernels on the CPU (slow, for tests)"
        )
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton kernels serve {TRITON_DTYPES}, not {x.dtype}; cast the model or use backend='reference'")
    return "triton"


def _kernels():
    try:
        from sparse_infer import kernels  # installed from the top-level kernels/ folder
    except ImportError as e:  # pragma: no cover - only if triton itself is missing
        raise RuntimeError(f"backend='triton' needs the triton package ({e}); pip install triton") from e
    return kernels


def sparse_linear(x, weight, bias, gate: Gate, backend: str = "auto") -> torch.Tensor:
    """``F.linear(x * mask, W, b)`` with the mask given by ``gate``."""
    if use_kernels(backend, x, gate, weight, bias):
        return _kernels().sparse_linear(x, weight, bias, gate)
    return ref.sparse_linear(x, weight, bias, gate.mask(x))


def rsparse_linear(x, weight, bias, A, B, gate: Gate, backend: str = "auto") -> torch.Tensor:
    """Rank-aware linear: active channels through ``W``, the rest through ``A @ B``."""
    if use_kernels(backend, x, gate, weight, bias, A, B):
        return _kernels().rsparse_linear(x, weight, bias, A, B, gate)
    return ref.rsparse_linear(x, weight, bias, gate.mask(x), A, B)


def gated_mlp(
    x, gate_proj, up_proj, down_proj, act: Callable, act_name: Optional[str], gate: Gate, backend: str = "auto"
) -> torch.Tensor:
    """CATS gated MLP with gating on ``|act(x Wg^T)|``.

    ``act_name`` names the activation for the fused kernel ("silu", "gelu",
    "gelu_tanh"); an activation the kernel does not know, and calls of more
    tokens than the kernel serves faster than cuBLAS, run the reference.
    """
    if (
        act_name is not None
        and use_kernels(backend, x, gate, *linear_params(gate_proj, up_proj, down_proj))
        and math.prod(x.shape[:-1]) <= _kernels().GATED_MLP_FALLBACK_TOKENS
    ):
        return _kernels().gated_mlp(
            x, gate_proj.weight, up_proj.weight, down_proj.weight, act_name, gate,
            gate_proj.bias, up_proj.bias, down_proj.bias,
        )
    return ref.gated_mlp(
        x, gate_proj.weight, up_proj.weight, down_proj.weight, act, gate.mask,
        gate_proj.bias, up_proj.bias, down_proj.bias,
    )


def dense_linear(x, weight, bias) -> torch.Tensor:
    return F.linear(x, weight, bias)
