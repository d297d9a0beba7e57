"""Drop-in replacements for `nn.Linear` and gated MLPs.

Each module keeps the very Parameter objects of the module it replaces
(``weight``, ``bias``, or the three projections of an MLP), so ``in_features``,
``out_features`` and the ``state_dict`` keys are unchanged: a patched model's
state dict loads into the dense model and back.  Thresholds, importance scales
and low-rank factors are *non-persistent* buffers (saved by
``sparse_infer.save_sparsity`` instead), and ``to_linear()`` / ``to_mlp()``
hand back the original module object.

On CUDA the weight is stored column-major once (same values, same Parameter):
the kernels then read each active input channel's weights as one contiguous
row, at no extra memory.  ``to_linear()`` restores the row-major layout.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from . import reference as ref

__all__ = ["SparseLinear", "RSparseLinear", "SparseGatedMLP", "activation_name"]


def _num_tokens(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])  # not numel // features: that is 0 / 0 for zero input features


def _positions(x: torch.Tensor) -> int:
    """Positions per sequence in a call: the sequence length of (..., seq, features) input, so a
    decode step counts 1 whatever the batch size; 2-D (tokens, features) input counts its rows."""
    return x.shape[-2] if x.dim() >= 3 else _num_tokens(x)


class BatchContext:
    """The attention mask of the model call in flight, for the sparse modules of one model.

    `sparsify` hooks it onto the module that owns the decoder layers: the forward pre-hook keeps
    the call's 2-D ``attention_mask`` and the forward hook drops it.  The modules read it to leave
    padding out of what they decide and count: the RMS a shared mask ranks channels by over the
    sequences of a batch, and the recorded sparsity.  Only calls over several positions use it
    (prefill, scoring whole sequences); a decode step counts every row, as a server batches them.
    """

    def __init__(self, arg_index: Optional[int] = None):
        self.arg_index = arg_index  # position of attention_mask in the hooked forward's arguments
        self.mask: Optional[torch.Tensor] = None
        self.use_cache: Optional[bool] = None
        self.warned_cacheless = False
        self.handles: list = []

    def enter(self, _module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None and self.arg_index is not None and len(args) > self.arg_index:
            mask = args[self.arg_index]
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.use_cache = kwargs.get("use_cache")

    def exit(self, _module, _args, _kwargs, _output):
        self.mask, self.use_cache = None, None

    def dense_call(self, limit: int, positions: int) -> None:
        """A module ran a call dense under ``dense_prefill_above``: without the KV cache that is every step."""
        if self.use_cache is False and not self.warned_cacheless:
            self.warned_cacheless = True
            warnings.warn(
                f"dense_prefill_above={limit} ran a call of {positions} positions dense with use_cache=False: without "
                "the KV cache every generation step runs the whole sequence, so every step counts as a prefill and "
                "runs dense. Generate with the cache (use_cache=True, the default) to run the decode steps sparse, "
                "or set dense_prefill_above=None",
                stacklevel=2,
            )

    def valid_rows(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """bool (batch, seq) of the tokens of ``x`` (batch, seq, features) that are not padding, or
        None: no mask, a one-position call, or a shape the mask does not describe."""
        mask = self.mask
        if mask is None or x.dim() != 3 or x.shape[1] < 2 or mask.shape[0] != x.shape[0] or mask.shape[1] < x.shape[1]:
            return None
        return mask[:, -x.shape[1]:] != 0


def _refit_hook(module: nn.Module, _incompatible) -> None:
    # a module-level function, not a lambda: a patched model must stay picklable (torch.save(model))
    module._refit_to_weight()


def _check_loaded(module: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> None:
    # PyTorch returns numbers for F.linear(cpu_input, meta_weight): a module built on the meta
    # device and called before its weights are loaded would compute garbage without this
    if weight.is_meta and not x.is_meta:
        raise RuntimeError(
            f"{type(module).__name__} was called on {x.device} input but its weights are on the meta device "
            "(not loaded): load them first, e.g. module.load_state_dict(state_dict, assign=True)"
        )


def _to_kernel_layout(param: torch.Tensor) -> None:
    """Store a CUDA weight column-major, in place (same Parameter, same values)."""
    if param.is_cuda and param.stride(0) != 1:
        param.data = param.data.t().contiguous().t()


def _to_row_major(param: torch.Tensor) -> None:
    if not param.is_contiguous():
        param.data = param.data.contiguous()


class _GatedBase(nn.Module):
    """Gating state shared by the sparse modules: top-k or threshold, per token or shared."""

    def _init_gate(
        self,
        width: int,
        *,
        k: Optional[int],
        threshold,
        scale: Optional[torch.Tensor],
        shared: bool,
        backend: str,
        dense_prefill_above: Optional[int],
        device,
    ):
        if (k is None) == (threshold is None):
            raise ValueError("give exactly one of k (top-k) or threshold")
        if k is not None and not 0 <= int(k) <= width:
            raise ValueError(f"k={k} is outside [0, {width}] for a layer with {width} input channels")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {ops.BACKENDS}")
        self.width = width
        self.k = None if k is None else int(k)
        t = None if threshold is None else torch.as_tensor(threshold, dtype=torch.float32, device=device)
        if t is not None and t.dim() == 1 and t.numel() != width:
            raise ValueError(f"a per-channel threshold needs {width} values, got {t.numel()}")
        if scale is not None and scale.numel() != width:
            raise ValueError(f"scale needs {width} values, got {scale.numel()}")
        self.register_buffer("threshold", t, persistent=False)
        self.register_buffer("scale", None if scale is None else scale.detach().float().to(device), persistent=False)
        self.shared = bool(shared)
        self.backend = backend
        self.dense_prefill_above = dense_prefill_above
        # Sparsity actually measured (reference path, while `record_stats` is set).
        self.record_stats = False
        self.reset_stats()
        # Density the planner aimed at (thresholds: the calibrated target); k/width when top-k.
        self.target_density: Optional[float] = None
        # set by `sparsify` (one per model): the attention mask of the call in flight
        object.__setattr__(self, "_batch", None)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) / .half() would round the calibrated thresholds and importance
        # scales (a threshold of 0.6745 becomes 0.6758 in bf16, and the density moves): they follow
        # the model's device but stay float32
        kept = {n: getattr(self, n) for n in ("threshold", "scale") if getattr(self, n, None) is not None}
        out = super()._apply(fn, recurse)
        for n, t in kept.items():
            moved = getattr(self, n)
            if moved.dtype != t.dtype:
                setattr(self, n, t.to(moved.device))
        return out

    def _valid_rows(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self._batch is None else self._batch.valid_rows(x)

    def gate(self, valid: Optional[torch.Tensor] = None) -> ops.Gate:
        # thresholds pass their calibrated density to the kernels as a launch hint (top-k: k/width)
        density = None
        if self.threshold is not None and self.target_density is not None:
            density = min(1.0, max(0.0, float(self.target_density)))  # planner arithmetic may round past 0
        return ops.Gate(k=self.k, threshold=self.threshold, scale=self.scale, shared=self.shared, density=density,
                        valid=valid if self.shared else None)

    def reset_stats(self):
        self.stats_tokens = 0
        self.stats_active = 0.0

    @property
    def measured_density(self) -> Optional[float]:
        """Mean fraction of active channels per token since the last `reset_stats`."""
        return self.stats_active / (self.stats_tokens * self.width) if self.stats_tokens and self.width else None

    @property
    def nominal_density(self) -> float:
        """Active-channel density by design: k/width for top-k, the calibrated target for thresholds."""
        if self.k is not None:
            return self.k / self.width if self.width else 1.0  # no channels: "all" of nothing is read
        if self.target_density is not None:
            return self.target_density
        d = self.measured_density
        return 1.0 if d is None else d

    def _runs_dense(self, x: torch.Tensor) -> bool:
        if self.dense_prefill_above is None:
            return False
        positions = _positions(x)
        dense = positions > self.dense_prefill_above
        if dense and self._batch is not None:
            self._batch.dense_call(self.dense_prefill_above, positions)
        return dense

    def _record(self, mask: torch.Tensor, tokens: int, dense: bool = False, valid: Optional[torch.Tensor] = None):
        """Count the active channels of a call; ``valid`` (batch, seq): only those tokens count (padding does not)."""
        if not self.record_stats:
            return
        if valid is not None:
            tokens = int(valid.sum())
        self.stats_tokens += tokens
        if self.width == 0:  # no channels: nothing active, and a density is undefined (None)
            return
        if dense:
            self.stats_active += tokens * self.width
        elif self.shared:  # one mask row per decode step, shared by its tokens
            if valid is not None:  # (seq, width) masks, each used by the step's valid tokens
                self.stats_active += float((mask.sum(-1).double() * valid.sum(0).double()).sum())
            else:
                rows = mask.numel() // self.width
                self.stats_active += float(mask.sum()) * tokens / rows
        elif valid is not None:
            self.stats_active += float(mask[valid].sum())
        else:
            self.stats_active += float(mask.sum())

    def _gate_repr(self) -> str:
        if self.k is not None:
            g = f"k={self.k}"
        else:
            g = "threshold=per-channel" if self.threshold.dim() else f"threshold={float(self.threshold):.4g}"
        extra = ", shared" if self.shared else ""
        extra += ", importance" if self.scale is not None else ""
        return f"{g}{extra}, backend={self.backend}"


class SparseLinear(_GatedBase):
    """`nn.Linear` whose input is gated per token (top-k or threshold); skips inactive weight columns."""

    def __init__(
        self,
        linear: nn.Linear,
        *,
        k: Optional[int] = None,
        threshold=None,
        importance: bool = False,
        shared: bool = False,
        backend: str = "auto",
        dense_prefill_above: Optional[int] = None,
    ):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{type(self).__name__} replaces nn.Linear, got {type(linear).__name__}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight  # the same Parameter objects, not copies
        self.bias = linear.bias
        scale = ref.column_norms(linear.weight) if importance else None
        self._init_gate(
            self.in_features, k=k, threshold=threshold, scale=scale, shared=shared,
            backend=backend, dense_prefill_above=dense_prefill_above, device=linear.weight.device,
        )
        object.__setattr__(self, "_original", linear)  # hidden from state_dict and children()
        # weights loaded into the patched model (fine-tuned ones, say) must not run with the
        # importance scale and low-rank factor of the weights it was patched with
        self.register_load_state_dict_post_hook(_refit_hook)

    def _refit_to_weight(self) -> None:
        """Recompute what is a function of the weight alone (the importance scale) after a load."""
        # `load_state_dict(..., assign=True)` puts new Parameters here: the hidden original must not keep
        # the old ones alive (twice the memory) nor hand them back in `to_linear`
        self._original.weight, self._original.bias = self.weight, self.bias
        if self.scale is not None:
            self.scale = ref.column_norms(self.weight).float().to(self.weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> "SparseLinear":
        return cls(linear, **kw)

    def to_linear(self) -> nn.Linear:
        """The original `nn.Linear` (the same object), with its weight back in row-major layout."""
        _to_row_major(self.weight)
        # Parameters assigned to this module directly (not through load_state_dict) go back too
        self._original.weight, self._original.bias = self.weight, self.bias
        return self._original

    @property
    def rank(self) -> int:
        return 0

    def read_elements(self, density: Optional[float] = None) -> float:
        """Weight elements read per token at a given active-channel density (default: the nominal one)."""
        if density is None:
            density = self.nominal_density
        return ref.linear_read_elements(self.in_features, self.out_features, density * self.in_features, self.rank)


    def _sparse_forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ref.sparse_linear(x, self.weight, self.bias, mask)

    def _kernel_forward(self, x: torch.Tensor, gate: ops.Gate) -> torch.Tensor:
        return ops.sparse_linear(x, self.weight, self.bias, gate, backend="triton")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_loaded(self, self.weight, x)
        tokens = _num_tokens(x)
        valid = self._valid_rows(x)
        if self._runs_dense(x):
            self._record(None, tokens, dense=True, valid=valid)
            return F.linear(x, self.weight, self.bias)
        gate = self.gate(valid)
        if ops.use_kernels(self.backend, x, gate, self.weight, self.bias):
            _to_kernel_layout(self.weight)
            return self._kernel_forward(x, gate)
        mask = gate.mask(x)
        self._record(mask, tokens, valid=valid)
        return self._sparse_forward(x, mask)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self._gate_repr()}"


class RSparseLinear(SparseLinear):
    """Rank-aware sparse linear (R-Sparse): active channels through W, the rest through a rank-r factor of W.

    ``y = W[:, S] x[S] + b + B^T (A^T x[~S])`` with ``A`` (in, r), ``B`` (r, out)
    from the SVD of the same weight (`reference.lowrank_factors`).
    """

    def __init__(self, linear: nn.Linear, *, rank: int, A: Optional[torch.Tensor] = None, B: Optional[torch.Tensor] = None,
                 svd_factors: Optional[bool] = None, **kw):
        kw.setdefault("importance", True)
        super().__init__(linear, **kw)
        limit = min(self.in_features, self.out_features)
        if not isinstance(rank, int) or not 0 <= rank <= limit:
            raise ValueError(
                f"rank={rank} is outside [0, min(in, out)={limit}] for a {self.out_features}x{self.in_features} layer"
            )
        # SVD factors are refitted when new weights are loaded; given A, B may be fitted to
        # activations (`lowrank="activation"`), so the caller says which (default: only computed ones)
        self.svd_factors = (A is None or B is None) if svd_factors is None else bool(svd_factors)
        if A is None or B is None:
            A, B = ref.lowrank_factors(linear.weight, rank)
        if tuple(A.shape) != (self.in_features, rank) or tuple(B.shape) != (rank, self.out_features):
            raise ValueError(
                f"low-rank factors must be A ({self.in_features}, {rank}) and B ({rank}, {self.out_features}); "
                f"got {tuple(A.shape)} and {tuple(B.shape)}"
            )
        dev, dt = linear.weight.device, linear.weight.dtype
        self.register_buffer("A", A.detach().to(dev, dt).contiguous(), persistent=False)
        self.register_buffer("B", B.detach().to(dev, dt).contiguous(), persistent=False)

    def _refit_to_weight(self) -> None:
        super()._refit_to_weight()
        if not self.rank:
            return
        if self.svd_factors:
            A, B = ref.lowrank_factors(self.weight, self.rank)
            self.A, self.B = A.detach().to(self.A).contiguous(), B.detach().to(self.B).contiguous()
        else:
            warnings.warn(
                "weights were loaded into an RSparseLinear whose low-rank factor was fitted to calibration "
                "activations of the previous weights; calibrate again (sparse_infer.sparsify on the dense model)",
                stacklevel=3,
            )

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def _sparse_forward(self, x, mask):
        return ref.rsparse_linear(x, self.weight, self.bias, mask, self.A, self.B)

    def _kernel_forward(self, x, gate):
        return ops.rsparse_linear(x, self.weight, self.bias, self.A, self.B, gate, backend="triton")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda t: F.gelu(t),
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


def activation_name(act) -> Optional[str]:
    """Name an activation module by what it computes ("silu", "gelu", "gelu_tanh"), or None.

    Gemma uses tanh-GELU, Llama SiLU: the activation is probed, never assumed.
    """
    probe = torch.linspace(-6, 6, 241, dtype=torch.float64)
    try:
        got = act(probe)
    except Exception:  # pragma: no cover - an activation that refuses float64
        return None
    for name, fn in _ACTIVATIONS.items():
        if torch.allclose(got, fn(probe), atol=1e-6, rtol=0):
            return name
    return None


class SparseGatedMLP(_GatedBase):
    """Gated MLP (`down(act(gate(x)) * up(x))`) with CATS gate-activation sparsity.

    The mask is on ``|act(gate(x))|`` over the intermediate channels (top-k or
    threshold); only the active rows of ``up_proj`` and columns of
    ``down_proj`` are needed.  Holds the original projections as children, so
    the state dict keys are those of the MLP it replaces.
    """

    def __init__(
        self,
        mlp: nn.Module,
        *,
        k: Optional[int] = None,
        threshold=None,
        shared: bool = False,
        backend: str = "auto",
        dense_prefill_above: Optional[int] = None,
        names=("gate_proj", "up_proj", "down_proj"),
    ):
        super().__init__()
        g, u, d = (getattr(mlp, n, None) for n in names)
        if not all(isinstance(m, nn.Linear) for m in (g, u, d)) or not hasattr(mlp, "act_fn"):
            raise TypeError(f"{type(mlp).__name__} is not a gated MLP with {names} linears and act_fn")
        self.gate_proj, self.up_proj, self.down_proj = g, u, d
        self.act_fn = mlp.act_fn
        self.act_name = activation_name(mlp.act_fn)
        self.hidden_size = g.in_features
        self.intermediate_size = g.out_features
        self._init_gate(
            self.intermediate_size, k=k, threshold=threshold, scale=None, shared=shared,
            backend=backend, dense_prefill_above=dense_prefill_above, device=g.weight.device,
        )
        object.__setattr__(self, "_original", mlp)

    @classmethod
    def from_mlp(cls, mlp: nn.Module, **kw) -> "SparseGatedMLP":
        return cls(mlp, **kw)

    def to_mlp(self) -> nn.Module:
        """The original MLP module (the same object), weights back in row-major layout."""
        _to_row_major(self.down_proj.weight)
        return self._original

    def read_elements(self, density: Optional[float] = None) -> float:
        """Elements read per token: all of gate_proj, the active rows of up_proj and columns of down_proj."""
        if density is None:
            density = self.nominal_density
        h, i = self.hidden_size, self.intermediate_size
        return h * i + 2 * density * i * h

    def dense_elements(self) -> float:
        return 3.0 * self.hidden_size * self.intermediate_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_loaded(self, self.gate_proj.weight, x)
        tokens = _num_tokens(x)
        valid = self._valid_rows(x)  # the gated hidden state has x's leading (batch, seq) dims
        if self._runs_dense(x):
            self._record(None, tokens, dense=True, valid=valid)
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        gate = self.gate(valid)
        projections = ops.linear_params(self.gate_proj, self.up_proj, self.down_proj)
        if self.act_name is not None and ops.use_kernels(self.backend, x, gate, *projections):
            _to_kernel_layout(self.down_proj.weight)
            return ops.gated_mlp(x, self.gate_proj, self.up_proj, self.down_proj, self.act_fn, self.act_name, gate, "triton")
        recorded = {}

        def mask_fn(h):
            m = gate.mask(h)
            recorded["mask"] = m
            return m

        out = ref.gated_mlp(
            x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, self.act_fn, mask_fn,
            self.gate_proj.bias, self.up_proj.bias, self.down_proj.bias,
        )
        self._record(recorded["mask"], tokens, valid=valid)
        return out

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, act={self.act_name}, {self._gate_repr()}"


def k_for_density(width: int, density: float) -> int:
    """Active channels for a density, rounded to the nearest channel and kept in [0, width]."""
    return int(min(width, max(0, math.floor(density * width + 0.5))))
