"""Calibration: per-layer thresholds, R-Sparse low-rank factors and the allocation of one
model-level budget over layers, from a short dense pass over a few calibration sequences.

    cal = sparse_infer.calibrate(model, data, SparsityConfig(method="rsparse", sparsity=0.5, allocation="search"))
    sparse_infer.sparsify(model, config, calibration=cal)

Two stages:

1. `collect_stats` runs the dense model once over the data and keeps, per patched
   module, statistics of bounded size whatever the number of samples:
   log-spaced histograms of ``|x|`` and of ``|x|·||W[:, i]||`` (per layer, and
   per channel when ``config.per_channel``), and a uniform reservoir sample of
   input rows (the same tokens for every layer) on which layer-local errors are
   measured.  It also keeps the dense log-probabilities of a few short windows
   for the logits-KL loss of the search.
2. `calibrate` turns the statistics into per-layer settings for one config:
   the allocation of the budget (``sparse_infer.allocate``), thresholds at
   each layer's allocated sparsity (histogram quantiles), ranks and SVD
   factors for rsparse.

The statistics do not depend on the target sparsity: pass ``cal.stats`` (or a
`CalibrationStats`) as ``data`` to calibrate again at another level without
running the dense model again.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as textdata
from . import reference as ref
from .config import SparsityConfig

__all__ = [
    "Calibration",
    "CalibrationStats",
    "LayerStats",
    "calibrate",
    "collect_stats",
    "default_calibration_data",
    "CalibrationData",
]

STATS_VERSION = 1
DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 512
# log-domain histogram of |x| (natural log): [LOG_MIN, LOG_MAX], values below go to the first bin
LOG_MIN, LOG_MAX, BINS = -20.0, 12.0, 4096
CH_LOG_MIN, CH_LOG_MAX, CH_BINS = -16.0, 8.0, 128


@dataclass
class Calibration:
    """Per-layer settings found on calibration data: ``layers[name]`` may hold
    "sparsity", "rank", "k", "threshold", "A", "B"; ``meta`` describes how it was made.

    ``stats`` (not saved) holds the statistics it came from: pass it back to
    `calibrate` to calibrate another sparsity level without a new dense pass."""

    layers: Dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    stats: Optional["CalibrationStats"] = field(default=None, repr=False, compare=False)


class CalibrationData(list):
    """A list of token-id tensors that also records where they came from (``meta``)."""

    def __init__(self, items=(), meta: Optional[dict] = None):
        super().__init__(items)
        self.meta = dict(meta or {})


def default_calibration_data(tokenizer, num_samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                             text_file: Optional[str] = None, calib_fraction: Optional[float] = None) -> CalibrationData:
    """``num_samples`` windows of ``seq_len`` tokens from the calibration part of the corpus.

    The corpus is split by `sparse_infer.data.split_tokens`: evaluation reads the
    first ``1 - calib_fraction`` of the token stream, calibration the rest, so the
    two never overlap; the split is recorded in ``meta``.
    """
    frac = textdata.CALIB_FRACTION if calib_fraction is None else calib_fraction
    text = textdata.load_text(text_file)
    ids = textdata.tokenize(text.text, tokenizer)
    _eval, calib, cut = textdata.split_tokens(ids, frac)
    wins = textdata.windows(calib, seq_len, num_samples)
    meta = {
        "source": text.source, "text_sha256": text.sha256, "total_tokens": int(len(ids)),
        "calib_fraction": frac, "calib_token_range": [int(cut), int(cut + len(wins) * seq_len)],
        "eval_token_range": [0, int(cut)], "num_samples": len(wins), "seq_len": seq_len,
    }
    return CalibrationData(wins, meta)


# --------------------------------------------------------------------------- statistics
@dataclass
class LayerStats:
    """Bounded-size statistics of the gated input of one patched module."""

    name: str
    kind: str  # "linear" or "mlp" (gate method: the MLP's intermediate activation)
    in_features: int  # linear: in; mlp: hidden size
    out_features: int  # linear: out; mlp: intermediate size
    width: int  # gated channels
    hist_abs: torch.Tensor  # (BINS,) float64 counts of log|x|
    hist_imp: Optional[torch.Tensor]  # (BINS,) of log(|x|·||W[:, i]||), linear only
    chan_hist: Optional[torch.Tensor] = None  # (width, CH_BINS) per-channel counts of the scored value
    chan_scaled: bool = False  # whether chan_hist counts |x|·s (True) or |x|
    sample: Optional[torch.Tensor] = None  # (R, in_features) reservoir of module inputs
    tokens: int = 0
    block_ratio: float = 1.0  # ||output of its block (MLP / attention)||^2 / ||residual stream||^2

    @property
    def dense_elements(self) -> float:
        return 3.0 * self.in_features * self.out_features if self.kind == "mlp" else float(self.in_features * self.out_features)


@dataclass
class CalibrationStats:
    """What `collect_stats` gathered: per-layer `LayerStats`, KL windows and dense log-probs, meta."""

    layers: Dict[str, LayerStats]
    meta: dict
    kl_inputs: List[torch.Tensor] = field(default_factory=list)
    kl_dense: List[torch.Tensor] = field(default_factory=list)  # log-probs, float32
    refine_inputs: List[torch.Tensor] = field(default_factory=list)  # a few sequences for the threshold refinement
    key: tuple = ()  # (targets, gate-kind, per_channel, importance) the stats were collected for
    cache: dict = field(default_factory=dict, repr=False)  # error tables / SVDs, reused across levels
    weights: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # name -> weight_probe at collection


def weight_probe(module: nn.Module) -> torch.Tensor:
    """Shapes and 64 evenly spaced values of every weight a target module holds, float64.

    Statistics (and the SVDs cached with them) are only valid for the weights they were
    collected on; this tells two checkpoints of one architecture apart, cheaply.
    """
    parts = []
    for p in module.parameters():
        parts += [torch.tensor(p.shape, dtype=torch.float64), sampled_values(p)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64)


def sampled_values(t: torch.Tensor, n: int = 64) -> torch.Tensor:
    """``n`` evenly spaced values of ``t`` in row-major order (whatever its layout), float64 on the CPU."""
    flat = t.detach().reshape(-1)
    if not flat.numel():
        return flat.double().cpu()
    idx = torch.linspace(0, flat.numel() - 1, n).round().long().to(flat.device)
    return flat[idx].double().cpu()


def _log_abs(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().abs().clamp_min(1e-30).log()


def _hist(logv: torch.Tensor) -> torch.Tensor:
    v = logv.nan_to_num(nan=LOG_MAX, posinf=LOG_MAX, neginf=LOG_MIN).clamp(LOG_MIN, LOG_MAX)
    return torch.histc(v, bins=BINS, min=LOG_MIN, max=LOG_MAX).double()


def _chan_hist(logv: torch.Tensor, width: int) -> torch.Tensor:
    v = logv.reshape(-1, width).nan_to_num(nan=CH_LOG_MAX, posinf=CH_LOG_MAX, neginf=CH_LOG_MIN)
    idx = ((v - CH_LOG_MIN) / (CH_LOG_MAX - CH_LOG_MIN) * CH_BINS).floor().clamp(0, CH_BINS - 1).long()
    idx = idx + torch.arange(width, device=idx.device) * CH_BINS
    return torch.bincount(idx.flatten(), minlength=width * CH_BINS).reshape(width, CH_BINS).to(torch.int32).cpu()


def hist_quantile(hist: torch.Tensor, q: float, lo: float = LOG_MIN, hi: float = LOG_MAX) -> float:
    """Value ``t`` with a fraction ``q`` of the counted values ``<= t`` (log-linear within a bin)."""
    hist = hist.double()
    total = float(hist.sum())
    if total <= 0:
        raise ValueError("no calibration values were counted: give at least one sequence of token ids")
    if q <= 0:
        return float("-inf")
    width = (hi - lo) / hist.numel()
    cum = torch.cumsum(hist, 0)
    target = q * total
    i = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)).clamp(max=hist.numel() - 1))
    before = float(cum[i - 1]) if i > 0 else 0.0
    frac = (target - before) / float(hist[i]) if float(hist[i]) > 0 else 1.0
    return math.exp(lo + (i + min(max(frac, 0.0), 1.0)) * width)


def chan_quantiles(hist: torch.Tensor, q: float) -> torch.Tensor:
    """Per-channel version of `hist_quantile` over ``(width, CH_BINS)`` counts (float32 thresholds)."""
    if q <= 0:
        return torch.full((hist.shape[0],), float("-inf"))
    h = hist.double()
    total = h.sum(1, keepdim=True).clamp_min(1)
    cum = torch.cumsum(h, 1)
    target = q * total
    i = torch.searchsorted(cum, target).clamp(max=CH_BINS - 1)
    before = torch.where(i > 0, cum.gather(1, (i - 1).clamp_min(0)), torch.zeros_like(target))
    cnt = h.gather(1, i)
    frac = torch.where(cnt > 0, (target - before) / cnt.clamp_min(1e-30), torch.ones_like(cnt)).clamp(0, 1)
    width = (CH_LOG_MAX - CH_LOG_MIN) / CH_BINS
    return (CH_LOG_MIN + (i.double() + frac) * width).exp().squeeze(1).float()


def _stats_key(config: SparsityConfig) -> tuple:
    per_channel = bool(config.per_channel and config.method == "threshold")
    return (config.targets, config.method == "gate", per_channel, per_channel and config.use_importance)


def _iter_batches(data, tokenizer, seq_len: int, vocab_size: Optional[int] = None):
    """Token-id batches (2-D long tensors) from tensors, lists of ids or strings (with a tokenizer)."""
    if isinstance(data, (str, torch.Tensor)):
        data = [data]
    for item in data:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("calibration data holds strings: pass tokenizer=... to calibrate (or give token-id tensors)")
            ids = torch.tensor(tokenizer(item, add_special_tokens=False)["input_ids"], dtype=torch.long)
            for s in range(0, len(ids), seq_len):
                if len(ids[s:s + seq_len]) >= 2:
                    yield ids[s:s + seq_len].unsqueeze(0)
            continue
        t = torch.as_tensor(item)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"calibration data must be token ids (integer tensors) or strings, got a {t.dtype} tensor")
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2:
            raise ValueError(f"a calibration sample must be 1-D (seq,) or 2-D (batch, seq) token ids, got shape {tuple(t.shape)}")
        bad = textdata.outside_vocab(t, vocab_size)
        if bad:
            raise ValueError(f"calibration token ids must lie in [0, {vocab_size}) (the model's vocabulary), got "
                             f"{bad}: tokenize with this model's tokenizer")
        if t.numel():
            yield t.long()


def _hash_batches(h, batch: torch.Tensor):
    h.update(batch.cpu().numpy().tobytes())


@torch.no_grad()
def collect_stats(model: nn.Module, data, config: SparsityConfig, *, tokenizer=None, progress: bool = True,
                  reservoir: int = 512, kl_samples: int = 2, kl_tokens: int = 256, seq_len: int = DEFAULT_SEQ_LEN,
                  num_samples: Optional[int] = None, refine_tokens: int = 2048) -> CalibrationStats:
    """One dense pass of ``model`` over ``data``: bounded statistics of every target module's input.

    ``data``: an iterable of token-id tensors (1-D or 2-D), strings (with
    ``tokenizer``), or ``None`` for the default: ``num_samples`` (16) windows
    of ``seq_len`` (512) tokens from the calibration tail of WikiText-2
    (`default_calibration_data`, never read by the evaluation).
    """
    from .patch import _targets, check_gated_mlp, decoder_layers, find_family, sparse_modules

    if sparse_modules(model):
        raise ValueError("calibrate needs the dense model, and this one is already sparsified: call sparse_infer.unsparsify(model) first")
    family = find_family(model, config.targets)
    if data is None:
        if tokenizer is None:
            raise ValueError("calibration data is None: pass token-id tensors, or tokenizer=... to use the default calibration text")
        data = default_calibration_data(tokenizer, num_samples or DEFAULT_SAMPLES, seq_len)
    data_meta = dict(getattr(data, "meta", {}) or {})
    targets = _targets(model, family, config)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(config.seed))
    imp = config.use_importance
    per_channel = config.per_channel and config.method == "threshold"

    layers: Dict[str, LayerStats] = {}
    scales: Dict[str, torch.Tensor] = {}
    for name, _parent, _attr, module, kind in targets:
        if kind == "mlp":
            check_gated_mlp(name, module, family)
            g = getattr(module, family.mlp_linears[0])
            layers[name] = LayerStats(name, kind, g.in_features, g.out_features, g.out_features,
                                      torch.zeros(BINS, dtype=torch.float64), None)
        else:
            layers[name] = LayerStats(name, kind, module.in_features, module.out_features, module.in_features,
                                      torch.zeros(BINS, dtype=torch.float64), torch.zeros(BINS, dtype=torch.float64))
            scales[name] = ref.column_norms(module.weight).to(device)
        if per_channel:
            layers[name].chan_hist = torch.zeros(layers[name].width, CH_BINS, dtype=torch.int32)
            layers[name].chan_scaled = imp and kind == "linear"

    state = {"sel_old": None, "sel_new": None}
    kept_keys = torch.empty(0)

    def keep_rows(st: LayerStats, x2: torch.Tensor):
        new = x2[state["sel_new"].to(x2.device)].float().cpu()
        old = st.sample[state["sel_old"]] if st.sample is not None else new[:0]
        st.sample = torch.cat([old, new]).contiguous()

    def lin_hook(name):
        st = layers[name]

        def hook(_m, inp, _out):
            x2 = inp[0].detach().reshape(-1, inp[0].shape[-1])
            la = _log_abs(x2)
            st.hist_abs += _hist(la).cpu()
            li = la + scales[name].clamp_min(1e-30).log()
            st.hist_imp += _hist(li).cpu()
            if st.chan_hist is not None:
                st.chan_hist += _chan_hist(li if st.chan_scaled else la, st.width)
            st.tokens += x2.shape[0]
            keep_rows(st, x2)

        return hook

    def mlp_hooks(name, mlp):
        st = layers[name]
        act = mlp.act_fn

        def pre(_m, args):
            x = args[0]
            keep_rows(st, x.detach().reshape(-1, x.shape[-1]))

        def gate_out(_m, _inp, out):
            la = _log_abs(act(out.detach()).reshape(-1, out.shape[-1]))
            st.hist_abs += _hist(la).cpu()
            if st.chan_hist is not None:
                st.chan_hist += _chan_hist(la, st.width)
            st.tokens += la.shape[0]

        return pre, gate_out

    hooks = []
    for name, _parent, _attr, module, kind in targets:
        if kind == "mlp":
            pre, gate_out = mlp_hooks(name, module)
            hooks.append(module.register_forward_pre_hook(pre))
            hooks.append(getattr(module, family.mlp_linears[0]).register_forward_hook(gate_out))
        else:
            hooks.append(module.register_forward_hook(lin_hook(name)))

    # block weights: how much of the residual stream each block writes (for the layer-local errors)
    norms: Dict[tuple, float] = {}

    def add(key, t):
        norms[key] = norms.get(key, 0.0) + float(t.detach().float().pow(2).sum())

    for li, layer in enumerate(decoder_layers(model)):
        def layer_pre(_m, args, kwargs, li=li):
            h = args[0] if args else kwargs.get("hidden_states")
            if isinstance(h, torch.Tensor):
                add((li, "resid"), h)

        hooks.append(layer.register_forward_pre_hook(layer_pre, with_kwargs=True))
        for attr in (family.mlp_attr, family.attn_attr):
            block = getattr(layer, attr, None)
            if block is not None:
                def block_out(_m, _i, out, li=li, attr=attr):
                    o = out[0] if isinstance(out, (tuple, list)) else out
                    if isinstance(o, torch.Tensor):
                        add((li, attr), o)

                hooks.append(block.register_forward_hook(block_out))

    sha = hashlib.sha256()
    n_seq = n_tok = 0
    kl_inputs: List[torch.Tensor] = []
    refine_inputs: List[torch.Tensor] = []
    refine_kept = 0
    try:
        total = len(data) if hasattr(data, "__len__") and not isinstance(data, (str, torch.Tensor)) else None
        bar = tqdm(_iter_batches(data, tokenizer, seq_len, getattr(model.get_input_embeddings(), "num_embeddings", None)), total=total, desc="calibration pass", disable=not progress)
        for batch in bar:
            n = batch.numel()
            keys = torch.rand(n, generator=gen)
            allk = torch.cat([kept_keys, keys])
            order = torch.argsort(allk)[:reservoir].sort().values
            state["sel_old"] = order[order < len(kept_keys)]
            state["sel_new"] = order[order >= len(kept_keys)] - len(kept_keys)
            kept_keys = allk[order]
            model(batch.to(device))
            _hash_batches(sha, batch)
            n_seq += batch.shape[0]
            n_tok += n
            for row in batch:
                if len(kl_inputs) < kl_samples and len(row) >= 2:
                    kl_inputs.append(row[:kl_tokens].clone())
                if refine_kept < refine_tokens:
                    refine_inputs.append(row[: refine_tokens - refine_kept].clone())
                    refine_kept += len(refine_inputs[-1])
            if num_samples is not None and n_seq >= num_samples:
                break
    finally:
        for h in hooks:
            h.remove()
    if n_tok == 0:
        raise ValueError("calibration data is empty: give at least one sequence of token ids (or strings with tokenizer=...)")
    import re

    for name, st in layers.items():
        m = re.search(r"layers\.(\d+)\.", name)
        li = int(m.group(1)) if m else -1
        attr = family.attn_attr if f".{family.attn_attr}." in name + "." else family.mlp_attr
        resid, out = norms.get((li, "resid")), norms.get((li, attr))
        if resid and out is not None:
            st.block_ratio = out / resid
    kl_dense = []
    for ids in kl_inputs:
        kl_dense.append(F.log_softmax(model(ids.unsqueeze(0).to(device)).logits[0].float(), -1).cpu())
    meta = {
        "stats_version": STATS_VERSION,
        "calibration_sequences": n_seq,
        "calibration_tokens": n_tok,
        "calibration_ids_sha256": sha.hexdigest(),
        "reservoir_tokens": int(min(reservoir, n_tok)),
        "kl_windows": [len(t) for t in kl_inputs],
        "split": data_meta or {"source": "caller-supplied token ids (not split by sparse-infer)"},
    }
    meta["refine_tokens"] = refine_kept
    weights = {name: weight_probe(module) for name, _parent, _attr, module, _kind in targets}
    return CalibrationStats(layers, meta, kl_inputs, kl_dense, refine_inputs, _stats_key(config), weights=weights)


# --------------------------------------------------------------------------- calibration
def _threshold_for(st: LayerStats, density_drop: float, config: SparsityConfig, kind_scaled: bool):
    """Threshold dropping a fraction ``density_drop`` of the channels of this layer."""
    if density_drop <= 0:
        return torch.tensor(float("-inf"))
    if st.chan_hist is not None:
        return chan_quantiles(st.chan_hist, density_drop)
    hist = st.hist_imp if kind_scaled else st.hist_abs
    return torch.tensor(hist_quantile(hist, density_drop), dtype=torch.float32)


@torch.no_grad()
def refine_thresholds(model: nn.Module, stats: CalibrationStats, cal: Calibration, config: SparsityConfig,
                      rounds: int = 2, progress: bool = False) -> List[float]:
    """Re-fit thresholds on the activations of the *sparsified* model.

    Thresholds fitted on dense activations drift once upstream layers are
    sparse (their outputs shrink, so more entries fall under the threshold).
    Each round patches the model with the current thresholds, runs the
    refinement sequences, histograms every gated input as the sparse model
    sees it and re-fits the threshold at the layer's target.  Returns the
    largest |measured - target| sparsity gap per round (before re-fitting).
    """
    from .modules import SparseGatedMLP
    from .patch import sparse_modules, sparsify, unsparsify

    names = [n for n, e in cal.layers.items() if e.get("threshold") is not None and float(torch.as_tensor(e["threshold"]).max()) > float("-inf")]
    if not names or not stats.refine_inputs:
        return []
    gaps = []
    device = next(model.parameters()).device
    for _ in tqdm(range(rounds), desc="refining thresholds", disable=not progress):
        sparsify(model, config, calibration=cal, progress=False)
        try:
            mods = sparse_modules(model)
            hists, hooks = {}, []
            for n in names:
                m = mods[n]
                st = stats.layers[n]
                per_channel = st.chan_hist is not None
                hists[n] = torch.zeros(m.width, CH_BINS, dtype=torch.int32) if per_channel else torch.zeros(BINS, dtype=torch.float64)
                m.record_stats = True
                m.reset_stats()
                if isinstance(m, SparseGatedMLP):
                    act = m.act_fn

                    def pre(mod, args, n=n, act=act, pc=per_channel):
                        g = F.linear(args[0], mod.gate_proj.weight, mod.gate_proj.bias)  # the module calls F.linear, not gate_proj
                        la = _log_abs(act(g).reshape(-1, g.shape[-1]))
                        hists[n] += _chan_hist(la, la.shape[-1]) if pc else _hist(la).cpu()

                    hooks.append(m.register_forward_pre_hook(pre))
                else:
                    def hook(mod, inp, _o, n=n, pc=per_channel):
                        la = _log_abs(inp[0].reshape(-1, inp[0].shape[-1]))
                        if mod.scale is not None:
                            la = la + mod.scale.clamp_min(1e-30).log()
                        hists[n] += _chan_hist(la, la.shape[-1]) if pc else _hist(la).cpu()

                    hooks.append(m.register_forward_pre_hook(lambda mod, args, h=hook: h(mod, args, None)))
            try:
                for ids in stats.refine_inputs:
                    model(ids.unsqueeze(0).to(device))
            finally:
                for h in hooks:
                    h.remove()
            gap = 0.0
            for n in names:
                m, e = mods[n], cal.layers[n]
                drop = e.get("drop", 1.5 * e["sparsity"] if isinstance(m, SparseGatedMLP) else e["sparsity"])
                if m.measured_density is not None:
                    gap = max(gap, abs((1 - m.measured_density) - drop))
                h = hists[n]
                e["threshold"] = chan_quantiles(h, drop) if h.dim() == 2 else torch.tensor(hist_quantile(h, drop), dtype=torch.float32)
            gaps.append(gap)
        finally:
            unsparsify(model)
    return gaps


def _apply_overrides(curves, alloc: dict, config: SparsityConfig) -> dict:
    """The allocation with ``config.overrides`` applied last, as `sparsify` applies them (the same
    `patch._layer_setting`): an overridden layer gets its thresholds (and, for rsparse, the rank of
    least error at its sparsity, unless the override names a rank) fitted at the overridden sparsity."""
    if not config.overrides:
        return alloc
    from .patch import _layer_setting

    sparsity, rank = list(alloc["sparsity"]), list(alloc["rank"])
    for i, c in enumerate(curves):
        lowrank = config.method == "rsparse" and c.kind != "mlp"
        s = _layer_setting(c.name, "sparsity", None, None, config)
        if s is not None:
            sparsity[i] = float(s)
            if c.kind == "mlp" and 1.5 * sparsity[i] > 1.0:
                raise ValueError(f"{c.name}: method 'gate' cannot reach sparsity {sparsity[i]} (at most 2/3 over the MLP)")
            if lowrank:
                rank[i] = c.rank_at(sparsity[i])
        r = _layer_setting(c.name, "rank", None, None, config) if lowrank else None
        if r is not None:
            rank[i] = int(r)
        if lowrank:
            budget = (1.0 - sparsity[i]) * c.in_features * c.out_features
            if rank[i] * (c.in_features + c.out_features) > budget or rank[i] > min(c.in_features, c.out_features):
                raise ValueError(f"{c.name}: rank={rank[i]} alone reads more than the budget at sparsity {sparsity[i]} "
                                 "(or exceeds the layer); lower the override's rank")
    return {**alloc, "sparsity": sparsity, "rank": rank, "label": f"{alloc.get('label')} + overrides"}


@torch.no_grad()
def calibrate(model: nn.Module, data, config: SparsityConfig, *, progress: bool = True, tokenizer=None,
              num_samples: Optional[int] = None, seq_len: int = DEFAULT_SEQ_LEN, reservoir: int = 512,
              kl_samples: int = 2, kl_tokens: int = 256, iterations: Optional[int] = None,
              time_budget_s: Optional[float] = None, quick: bool = False,
              refine_rounds: int = 2, refine_tokens: int = 2048, gating: Optional[str] = None) -> Calibration:
    """Per-layer settings of ``config`` from calibration ``data`` (dense ``model``; it is left unchanged).

    Args:
        data: token-id tensors (1-D or 2-D) or strings (with ``tokenizer``); ``None``
            with a tokenizer for the default 16 x 512 tokens from the calibration
            tail of WikiText-2; or a `CalibrationStats` / a `Calibration` with
            ``.stats`` to reuse an earlier dense pass.
        config: method, model-level ``sparsity`` (the budget) and ``allocation``:
            ``"uniform"`` every layer at the budget (rsparse: the per-layer rank split
            of least calibration error); ``"greedy"`` (TEAL) raise sparsity where
            the layer-local calibration error grows least; ``"search"`` (R-Sparse)
            an evolutionary search over the shape of the allocation (per projection
            type offsets, depth tilt, rank scale), scored by the KL divergence of the
            output logits against the dense model (uniform, greedy and the greedy
            weighted by each layer's measured sensitivity are its first candidates,
            so it never returns a worse calibration loss than any of them).
        iterations / time_budget_s: bounds of the search (default 16 candidates,
            300 s); ``quick``: a few candidates on a small sample (tests, CI).
        reservoir, kl_samples, kl_tokens: sizes of the kept statistics.
        gating: "threshold" (default for threshold, gate and rsparse: per-layer
            thresholds at the allocated density, re-fitted on the sparsified model
            over ``refine_rounds`` passes so the measured sparsity hits the target)
            or "topk" (default for topk; exact k per token, for rsparse too).
    Returns:
        a `Calibration`; ``cal.layers[name]`` holds "sparsity" (and "rank", "A",
        "B" for rsparse, "threshold" for threshold/gate), ``cal.meta`` the split,
        the budget and the achieved model-level sparsity.
    """
    from . import allocate

    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig, got {type(config).__name__}")
    config.validate()
    if quick:
        reservoir = min(reservoir, 128)
        kl_tokens = min(kl_tokens, 64)
        iterations = 4 if iterations is None else iterations
        time_budget_s = 20.0 if time_budget_s is None else time_budget_s
    t0 = time.time()
    stats = data.stats if isinstance(data, Calibration) else data
    if isinstance(stats, CalibrationStats):
        if stats.key != _stats_key(config):
            raise ValueError(
                f"these calibration statistics were collected for (targets, gate, per_channel, importance)={stats.key}, "
                f"the config needs {_stats_key(config)}: calibrate again from token ids"
            )
        from .patch import _targets, find_family

        targets = _targets(model, find_family(model, config.targets), config)
        if [t[0] for t in targets] != list(stats.layers):
            raise ValueError("these calibration statistics were collected on another model (layer names differ): calibrate again from token ids")
        for name, _parent, _attr, module, _kind in targets:
            if name not in stats.weights or not torch.equal(weight_probe(module), stats.weights[name]):
                raise ValueError(f"these calibration statistics were collected on other weights ({name} differs: another "
                                 "checkpoint, or the model was changed or cast since): calibrate again from token ids")
    else:
        stats = collect_stats(model, data, config, tokenizer=tokenizer, progress=progress, reservoir=reservoir,
                              kl_samples=kl_samples, kl_tokens=kl_tokens, seq_len=seq_len, num_samples=num_samples,
                              refine_tokens=refine_tokens)
    t_stats = time.time() - t0

    curves = allocate.error_curves(model, stats, config, progress=progress, gating=gating)
    search_info = {}
    if config.allocation == "uniform":
        alloc = allocate.uniform(curves, config.sparsity)
    elif config.allocation == "greedy":
        alloc = allocate.greedy(curves, config.sparsity)
    else:
        alloc, search_info = allocate.search(model, stats, curves, config, iterations=iterations,
                                             time_budget_s=time_budget_s, progress=progress)
    alloc = _apply_overrides(curves, alloc, config)
    cal = allocate.to_calibration(model, stats, curves, alloc, config)
    gaps = refine_thresholds(model, stats, cal, config, rounds=refine_rounds, progress=progress) if refine_rounds else []
    cal.meta.update({
        "config": config.to_dict(),  # what `sparsify` checks a config against before using these settings
        "method": config.method, "allocation": config.allocation, "budget_sparsity": config.sparsity,
        "seed": config.seed, "gating": curves[0].gating if curves else None, "calibration": stats.meta, "search": search_info, "refine_gaps": gaps,
        "seconds": {"statistics": round(t_stats, 2), "total": round(time.time() - t0, 2)},
    })
    cal.stats = stats
    return cal
