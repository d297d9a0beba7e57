"""`SparsityConfig`: every knob of `sparsify`, validated on construction and serializable to JSON."""

from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

METHODS = ("topk", "threshold", "gate", "rsparse")
TARGETS = ("mlp", "attn", "all")
MODES = ("per_token", "shared")
ALLOCATIONS = ("uniform", "greedy", "search")
BACKENDS = ("auto", "triton", "reference")
LOWRANKS = ("svd", "activation")
CONFIG_VERSION = 1

# The gate method (CATS) always reads all of gate_proj: over the three MLP
# linears it can skip at most the up rows and down columns, two thirds of the bytes.
GATE_MAX_SPARSITY = 2.0 / 3.0


def _is_real(value: Any) -> bool:
    """A real number, numpy scalars included (np.float32 is no Python float); bools are not numbers here."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_sparsity(value: Any, where: str) -> float:
    if not _is_real(value):
        raise TypeError(f"{where}: sparsity must be a number in [0, 1), got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"{where}: sparsity must lie in [0, 1), got {value}; 0 keeps every channel, "
            "0.5 skips half of the weight bytes (1.0 would skip the whole layer)"
        )
    return float(value)


@dataclass
class SparsityConfig:
    """What `sparse_infer.sparsify` does to a model.

    Attributes:
        method: ``"topk"`` (per-token top-k of |x|), ``"threshold"`` (calibrated
            |x| > t, TEAL), ``"gate"`` (CATS: threshold/top-k on the gated MLP's
            activation; with targets "all" the attention linears take per-token
            top-k of |x|, where CATS leaves them dense), ``"rsparse"`` (R-Sparse:
            top channels by |x_i|·||W[:, i]|| through the weight, the rest through
            its rank-r SVD factor).
        sparsity: target model-level sparsity in [0, 1): the fraction of weight
            bytes per token that the patched linears skip (see
            ``reference.model_sparsity``).
        targets: which linears: ``"mlp"`` (gate/up/down), ``"attn"`` (q/k/v/o), ``"all"``.
        mode: ``"per_token"`` (each token its own mask) or ``"shared"`` (one
            mask for all tokens of a decode step, the top-k channels of their
            RMS importance: the bytes read stay at the budget whatever the
            batch size; calibrated thresholds are not used in this mode).
        dense_prefill_above: a call over more positions per sequence than this runs
            dense (decode-only sparsity, as R-Sparse evaluates: prefill dense, every decode
            step sparse whatever the batch size; 2-D input counts its rows);
            ``None`` sparsifies every token.
        backend: ``"auto"`` (Triton on CUDA, reference elsewhere), ``"triton"``, ``"reference"``.
        rank_fraction: rsparse only, the share of each layer's byte budget spent on
            the low-rank factor when no calibration chose it (the R-Sparse paper's
            uniform setting spends about 5 %).
        importance: rank channels by ``|x_i|·||W[:, i]||`` (R-Sparse) instead of
            ``|x_i|``; ``None`` means True for rsparse, False otherwise.
        per_channel: threshold only, one threshold per input channel, each at the
            layer's quantile so every channel is dropped at the same rate, instead
            of one per layer (TEAL).  Channel-wise like CHESS, but not its formula
            (CHESS scales one layer quantile by each channel's mean |up| on the gate
            activation).
        overrides: per-layer settings, ``{fnmatch pattern over module names:
            {"sparsity": float, "rank": int}}``, applied last.
        allocation: how calibration spreads the model-level budget over layers:
            ``"uniform"`` (every layer at ``sparsity``), ``"greedy"`` (after TEAL:
            raise sparsity where the calibration error grows least, one global
            greedy over all linears scored by each one's own output error; TEAL's
            greedy runs per block, on the block's output error, and gives every
            block the same sparsity), ``"search"`` (an evolution strategy over the
            allocation's shape - per-projection offsets, a depth tilt, a rank
            scale - scored by the logits KL to the dense model; R-Sparse searches
            per-layer genes directly; rsparse layers take, at their sparsity, the
            rank of least layer-local error, which can be 0).
            Anything but uniform needs calibration data.
        seed: seed for anything random (calibration search).
        lowrank: rsparse only, how the low-rank factor is made: ``"svd"`` (plain
            truncated SVD of ``W``, needs no data) or ``"activation"`` (the rank-r
            factor of least output error on the calibration inputs that the factor
            actually sees, the inactive channels ``x[~S]``; needs calibration).
    """

    method: str = "topk"
    sparsity: float = 0.5
    targets: str = "mlp"
    mode: str = "per_token"
    dense_prefill_above: Optional[int] = None
    backend: str = "auto"
    rank_fraction: float = 0.3
    importance: Optional[bool] = None
    per_channel: bool = False
    overrides: dict = field(default_factory=dict)
    allocation: str = "uniform"
    seed: int = 0
    lowrank: str = "svd"
    version: int = CONFIG_VERSION

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.targets not in TARGETS:
            raise ValueError(f"unknown targets {self.targets!r}; expected one of {TARGETS}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; expected one of {ALLOCATIONS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {BACKENDS}")
        if self.lowrank not in LOWRANKS:
            raise ValueError(f"unknown lowrank {self.lowrank!r}; expected one of {LOWRANKS}")
        self.sparsity = _check_sparsity(self.sparsity, "SparsityConfig")
        if self.per_channel is True and self.method != "threshold":  # (its type is checked below)
            raise ValueError(f"per_channel applies to method 'threshold' only, not {self.method!r}: drop it, or use "
                             "method='threshold'")
        if self.method == "gate" and self.targets == "attn":
            raise ValueError("method 'gate' sparsifies the gated MLP's activation; use targets 'mlp' or 'all'")
        if self.method == "gate" and self.sparsity >= GATE_MAX_SPARSITY:
            raise ValueError(
                f"method 'gate' reads all of gate_proj, so it reaches at most {GATE_MAX_SPARSITY:.1%} "
                f"sparsity over the MLP; got {self.sparsity}. Use a lower sparsity or method 'rsparse'/'topk'"
            )
        if self.dense_prefill_above is not None:
            if not _is_int(self.dense_prefill_above) or self.dense_prefill_above < 1:
                raise ValueError(f"dense_prefill_above must be None or a positive token count, got {self.dense_prefill_above!r}")
            self.dense_prefill_above = int(self.dense_prefill_above)
        if not _is_real(self.rank_fraction):
            raise TypeError(f"rank_fraction must be a number in [0, 1), got {self.rank_fraction!r}")
        if not 0.0 <= float(self.rank_fraction) < 1.0:
            raise ValueError(f"rank_fraction must be a number in [0, 1), got {self.rank_fraction!r}")
        self.rank_fraction = float(self.rank_fraction)
        for name, allowed in (("importance", (bool, type(None))), ("per_channel", (bool,))):
            value = getattr(self, name)
            if not isinstance(value, allowed):  # a string such as "false" would otherwise read as True
                raise TypeError(f"{name} must be {' or '.join(t.__name__ for t in allowed)}, got {value!r}")
        for name in ("seed", "version"):
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"{name} must be an int, got {value!r}")
            setattr(self, name, int(value))  # numpy integers too; stored as int so the config stays JSON
        if not isinstance(self.overrides, dict):
            raise TypeError(f"overrides must be a dict {{pattern: {{'sparsity': ..., 'rank': ...}}}}, got {type(self.overrides).__name__}")
        for pattern, spec in self.overrides.items():
            if not isinstance(pattern, str):  # JSON would turn it into a string, and fnmatch needs one
                raise TypeError(f"overrides keys are fnmatch patterns over module names (str), got {pattern!r}")
            if not isinstance(spec, dict):
                raise TypeError(f"overrides[{pattern!r}] must be a dict, got {spec!r}")
            unknown = set(spec) - {"sparsity", "rank"}
            if unknown:
                raise ValueError(f"overrides[{pattern!r}] has unknown keys {sorted(unknown)}; allowed: 'sparsity', 'rank'")
            if "sparsity" in spec:
                _check_sparsity(spec["sparsity"], f"overrides[{pattern!r}]")
            if "rank" in spec and self.method != "rsparse":
                raise ValueError(f"overrides[{pattern!r}]: 'rank' applies to method 'rsparse' only, not {self.method!r}")
            if "rank" in spec and (not _is_int(spec["rank"]) or spec["rank"] < 0):
                raise ValueError(f"overrides[{pattern!r}]: rank must be a non-negative int, got {spec['rank']!r}")
        # plain floats and ints (numpy scalars included), in a dict of our own: the config stays JSON
        self.overrides = {pattern: {k: int(v) if k == "rank" else float(v) for k, v in spec.items()}
                          for pattern, spec in self.overrides.items()}
        if self.version != CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is not supported (this sparse-infer reads version {CONFIG_VERSION})")

    def validate(self) -> "SparsityConfig":
        """Check every field again (a config is a plain dataclass: fields set after construction are
        checked here; `sparsify` and `calibrate` call it) and return the config."""
        self.__post_init__()
        return self

    @property
    def use_importance(self) -> bool:
        return self.method == "rsparse" if self.importance is None else bool(self.importance)

    @property
    def needs_calibration(self) -> bool:
        """Methods whose thresholds come from data: they raise without calibration."""
        return ((self.method == "threshold" and self.mode == "per_token") or self.allocation != "uniform"
                or (self.method == "rsparse" and self.lowrank == "activation"))

    def replace(self, **changes) -> "SparsityConfig":
        d = self.to_dict()
        d.update(changes)
        return SparsityConfig.from_dict(d)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SparsityConfig":
        if not isinstance(d, dict):
            raise TypeError(f"SparsityConfig.from_dict expects a dict of fields, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SparsityConfig fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "SparsityConfig":
        return cls.from_dict(json.loads(s))
