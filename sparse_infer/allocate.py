"""Allocation of one model-level budget (weight elements read per token) over the patched layers.

Every allocation returns a per-layer sparsity ``s_l`` (the fraction of the
layer's dense weight elements it skips, counted as in
`reference.linear_read_elements`) with ``sum_l d_l (1 - s_l) = (1 - S) sum_l d_l``
exactly, ``d_l`` the layer's dense element count and ``S`` the budget; the
planner then rounds each layer's active channels down, so the realised
model-level sparsity is ``S`` to within one channel per layer.  For rsparse a
rank ``r_l`` is chosen too (``k_l * out + r_l * (in + out) <= d_l (1 - s_l)``).

Layer-local calibration error: for a layer with weight ``W`` and sampled
inputs ``X`` (the reservoir of `calibrate.collect_stats`), the relative error
``||Y_sparse - Y_dense||^2 / ||Y_dense||^2``.  With the SVD ``W = U S V^T`` the
error of dropping ``X_d`` (the inactive part of ``X``) and sending it through
the rank-r factor is ``sum_{j>=r} s_j^2 ||X_d v_j||^2``: one product gives the
error at every rank at once.

* `uniform`: every layer at ``S`` (rsparse: the rank of least error at that budget).
* `greedy` (TEAL): from dense, repeatedly raise by 1 % the sparsity of the layer
  whose (weighted) error grows least per element saved, until the budget is met
  (the last step is partial, so the budget is met exactly).
* `sensitivities`: how much each layer alone moves the model, the KL of the
  output logits when only that layer is sparsified (top-k at
  ``SENSITIVITY_PROBE``); the ratio of that KL to the layer's local error at the
  same sparsity converts layer-local error into model-level KL.
* `search` (R-Sparse): candidates scored by the KL divergence of the output
  logits against the dense model on calibration windows, each meeting the
  budget exactly: uniform, greedy, greedy weighted by the sensitivities
  (``w_l = (KL_l / err_l) ** p`` for p in `SENSITIVITY_POWERS`), then a
  (1+1) evolution strategy over a few shape parameters of the allocation (a
  sparsity offset per projection type, a tilt with depth, a scale on the
  rsparse ranks the error table picks).  The returned allocation has a
  calibration KL no higher than any earlier candidate; seeded, bounded by
  ``iterations`` and ``time_budget_s``.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import reference as ref
from .config import GATE_MAX_SPARSITY, SparsityConfig

__all__ = ["Curve", "error_curves", "uniform", "greedy", "sensitivities", "sensitivity_weights", "search", "to_calibration", "allocation_sparsity"]

FINE = 100  # allocation grid: steps of 1 % of a layer's dense elements
COARSE = 20  # error measured at every 5 % of density, interpolated in between
PROXY_TOKENS = 256  # reservoir rows used for the layer-local errors
# Sensitivity probe: each layer alone at this sparsity.  One probe serves every budget
# (the weight is a ratio of KL to local error, both measured at the probe).
SENSITIVITY_PROBE = 0.5
# Exponents of the sensitivity weights tried by the search, best first on SmolLM2 (50 %
# MLP thresholds, held-out perplexity over dense: greedy 1.41x, p=1 1.29x, p=0.5 1.26x).
SENSITIVITY_POWERS = (0.5, 1.0)


@dataclass
class Curve:
    """Calibration error of one layer as a function of its sparsity (grid ``j / FINE``)."""

    name: str
    kind: str  # "linear" / "mlp"
    method: str  # topk / threshold / rsparse / gate
    in_features: int
    out_features: int
    dense: float  # dense weight elements read per token
    err: torch.Tensor  # (FINE,) float64, relative output error at sparsity j / FINE; inf where unreachable
    rank: Optional[torch.Tensor]  # (FINE,) int64 rsparse rank at that budget
    group: str
    depth: float  # position of the layer in the model, 0..1
    gating: str = "topk"  # how the layer picks its channels: "topk" (exact k) or "threshold" (calibrated)

    @property
    def max_index(self) -> int:
        finite = torch.isfinite(self.err).nonzero()
        return int(finite.max()) if len(finite) else 0

    def rank_at(self, s: float) -> int:
        if self.rank is None:
            return 0
        j = min(FINE - 1, max(0, math.ceil(s * FINE - 1e-9)))
        return int(self.rank[j])


def _svd(weight: torch.Tensor):
    U, S, Vh = torch.linalg.svd(weight.detach().to("cpu", torch.float32), full_matrices=False)
    return U, S, Vh


ACT_EPS = 0.05  # ridge of the inactive-input covariance, relative to its mean diagonal
ACT_MIN_FIT = 64  # reservoir rows beyond PROXY_TOKENS needed to fit the factor on rows the error is not measured on
ACT_CACHE = 256  # activation-aware bases kept across search candidates (a few MB each)


def activation_basis(weight: torch.Tensor, Xd: torch.Tensor, eps: float = ACT_EPS, WW: Optional[torch.Tensor] = None):
    """Output-space basis of the activation-aware low-rank factor.

    With ``C = Xd^T Xd / n + λI`` the (ridge-regularized) second moments of the inputs
    the factor sees (``Xd``: the inactive part of the calibration rows, active
    channels zeroed), the rank-r matrix ``W_r`` minimizing ``E ||(W - W_r) x||^2`` is
    ``U_r U_r^T W`` with ``U_r`` the leading eigenvectors of ``W C W^T`` (the
    whitened / SVD-LLM solution, written without inverting ``C``).  ``λ = eps · mean
    diag(C)``, so channels never seen inactive still count (``eps → ∞``: plain SVD).

    Returns float64 ``(U (out, m), s (m,), WtU (in, m))``, ``m = min(in, out)``,
    ``s`` descending (square roots of the eigenvalues): the factors at rank r are
    ``A = WtU[:, :r] / sqrt(s_r)``, ``B = sqrt(s_r) U[:, :r]^T`` (`activation_factors`),
    and ``||x W^T u_j||^2`` summed over ``j >= r`` is the error of rank r on a row ``x``.
    """
    W = weight.detach().to("cpu", torch.float64)
    out_f, in_f = W.shape
    X = Xd.to("cpu", torch.float64)
    n = max(1, X.shape[0])
    scale = float(X.pow(2).sum()) / (n * in_f)  # mean diagonal of C
    if not scale > 0 or not math.isfinite(scale):
        X = torch.zeros(0, in_f, dtype=torch.float64)  # nothing inactive in the sample: plain SVD
        scale = 1.0
    lam = eps * scale
    m = min(in_f, out_f)
    if out_f <= in_f:
        Y = X @ W.T
        K = Y.T @ Y / n + lam * ((W @ W.T) if WW is None else WW)
        ev, U = torch.linalg.eigh(K)
        ev, U = ev.flip(0)[:m], U.flip(1)[:, :m]
        s = ev.clamp_min(0).sqrt()
        WtU = W.T @ U
    else:
        WtW = (W.T @ W) if WW is None else WW
        L = torch.linalg.cholesky(X.T @ X / n + lam * torch.eye(in_f, dtype=torch.float64))
        ev, V = torch.linalg.eigh(L.T @ WtW @ L)
        ev, V = ev.flip(0), V.flip(1)
        s = ev.clamp_min(0).sqrt()
        inv = torch.where(s > 0, 1.0 / s.clamp_min(1e-300), torch.zeros_like(s))
        LV = L @ V
        U = (W @ LV) * inv
        WtU = (WtW @ LV) * inv
    return U, s, WtU


def activation_factors(U: torch.Tensor, s: torch.Tensor, WtU: torch.Tensor, rank: int, like: torch.Tensor):
    """``A`` (in, r), ``B`` (r, out) from `activation_basis`, on ``like``'s device and dtype."""
    root = s[:rank].sqrt()
    inv = torch.where(root > 0, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    A = WtU[:, :rank] * inv
    B = root[:, None] * U[:, :rank].T
    return A.to(like.device, like.dtype).contiguous(), B.to(like.device, like.dtype).contiguous()


def _depths(names: List[str]) -> Dict[str, float]:
    import re

    idx = {}
    for n in names:
        m = re.search(r"layers\.(\d+)\.", n)
        idx[n] = int(m.group(1)) if m else 0
    top = max(idx.values()) or 1
    return {n: i / top for n, i in idx.items()}


def _drop_masks(imp: torch.Tensor, drops: List[int], by_threshold: bool):
    """Per grid point, the bool mask of dropped channels: the ``d`` least important per token
    (top-k), or those at or below the sample quantile that drops the same fraction (threshold)."""
    width = imp.shape[-1]
    if by_threshold:
        flat = imp.flatten().sort().values
        for d in drops:
            if d <= 0:
                yield torch.zeros_like(imp, dtype=torch.bool)
                continue
            q = flat[min(len(flat) - 1, max(0, int(round(d / width * len(flat))) - 1))]
            yield imp <= q
    else:
        order = torch.argsort(imp, dim=-1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(width).expand_as(order).contiguous())
        for d in drops:
            yield ranks >= width - d


def _interp(coarse_s: torch.Tensor, coarse_err: torch.Tensor, fine_s: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation; monotone non-decreasing after a running max."""
    e = torch.cummax(coarse_err, 0).values
    idx = torch.searchsorted(coarse_s, fine_s).clamp(1, len(coarse_s) - 1)
    s0, s1 = coarse_s[idx - 1], coarse_s[idx]
    e0, e1 = e[idx - 1], e[idx]
    w = ((fine_s - s0) / (s1 - s0)).clamp(0, 1)
    return e0 + w * (e1 - e0)


def default_gating(config: SparsityConfig) -> str:
    """Top-k for the topk method; calibrated thresholds (TEAL / R-Sparse) for the others."""
    return "topk" if config.method == "topk" else "threshold"


@torch.no_grad()
def error_curves(model: nn.Module, stats, config: SparsityConfig, *, progress: bool = True,
                 gating: Optional[str] = None) -> List[Curve]:
    """Per-layer error curves (cached in ``stats.cache``: computed once per method).

    The error of a layer is its relative output error on the sampled inputs.
    (Weighting it by the share of the residual stream its block writes was
    tried and misleads on SmolLM2, whose residual stream carries a few huge
    outlier channels in the middle layers.)
    """
    from .patch import _targets, find_family

    gating = gating or default_gating(config)
    if gating not in ("topk", "threshold"):
        raise ValueError(f"gating must be 'topk' or 'threshold', got {gating!r}")
    act = config.method == "rsparse" and config.lowrank == "activation"
    key = ("curves", config.method, config.use_importance, gating, config.allocation == "uniform" and config.method != "rsparse",
           "activation" if act else "svd")
    if key in stats.cache:
        return stats.cache[key]
    family = find_family(model, config.targets)
    targets = _targets(model, family, config)
    depth = _depths([t[0] for t in targets])
    fine_s = torch.arange(FINE, dtype=torch.float64) / FINE
    if config.allocation == "uniform" and config.method != "rsparse":
        # no error needed: only the shapes (the error curve is left at zero where reachable)
        out = []
        for name, _p, _a, module, kind in targets:
            st = stats.layers[name]
            err = torch.zeros(FINE, dtype=torch.float64)
            if kind == "mlp":
                err[fine_s >= GATE_MAX_SPARSITY - 1e-9] = float("inf")
            method = "gate" if kind == "mlp" else ("topk" if config.method == "gate" else config.method)
            out.append(Curve(name, kind, method, st.in_features, st.out_features, st.dense_elements, err, None,
                             name.rsplit(".", 1)[-1], depth[name], "threshold" if kind == "mlp" else gating))
        return out
    curves = []
    svds = stats.cache.setdefault("svd", {})
    for name, _p, _a, module, kind in tqdm(targets, desc="layer errors", disable=not progress):
        st = stats.layers[name]
        X = st.sample[:PROXY_TOKENS].float()
        group = name.rsplit(".", 1)[-1]
        if kind == "mlp":
            g, u, dn = (getattr(module, n) for n in family.mlp_linears)
            H = module.act_fn(F.linear(X.to(g.weight.dtype).to(g.weight.device), g.weight, g.bias)).float().cpu()
            Z = H * F.linear(X.to(u.weight.dtype).to(u.weight.device), u.weight, u.bias).float().cpu()
            Wd = dn.weight.detach().float().cpu()
            norm = float((Z @ Wd.T).pow(2).sum()) or 1.0
            width = st.width
            dens = torch.arange(COARSE + 1, dtype=torch.float64) / COARSE  # density of up/down
            drops = [width - int(round(float(d) * width)) for d in dens]
            errs = torch.empty(len(drops), dtype=torch.float64)
            for i, drop in enumerate(_drop_masks(H.abs(), drops, by_threshold=True)):
                errs[i] = float(((Z * drop) @ Wd.T).pow(2).sum()) / norm
            # MLP sparsity s = (1 - d) * 2/3
            cs = ((1 - dens) * GATE_MAX_SPARSITY).flip(0)
            err = _interp(cs, errs.flip(0), fine_s)
            err[fine_s >= GATE_MAX_SPARSITY - 1e-9] = float("inf")
            curves.append(Curve(name, kind, "gate", st.in_features, st.out_features, st.dense_elements, err, None, "mlp",
                                depth[name], "threshold"))
            continue
        W = module.weight.detach()
        in_f, out_f = module.in_features, module.out_features
        method = "topk" if config.method == "gate" else config.method
        if name not in svds:
            svds[name] = _svd(W)
        U, S, Vh = svds[name]
        VS = Vh.T * S  # (in, m)
        m = S.numel()
        imp = X.abs() * ref.column_norms(W).cpu() if config.use_importance else X.abs()
        norm = float((X @ VS).pow(2).sum()) or 1.0
        ks = [int(round(i / COARSE * in_f)) for i in range(COARSE + 1)]  # active channels
        drops = [in_f - k for k in ks]
        table = torch.empty(len(ks), m + 1, dtype=torch.float64)  # error at (k_i, rank r)
        lin_gating = "topk" if method == "topk" else gating
        by_t = lin_gating == "threshold"
        if act:
            # fit the factor on reservoir rows the error is not measured on (else in-sample optimism)
            Xf = st.sample[PROXY_TOKENS:].float() if len(st.sample) - PROXY_TOKENS >= ACT_MIN_FIT else X
            imp_f = Xf.abs() * ref.column_norms(W).cpu() if config.use_importance else Xf.abs()
            fit_masks = _drop_masks(imp_f, drops, by_threshold=by_t)
            W64 = W.detach().to("cpu", torch.float64)
            WW = W64 @ W64.T if out_f <= in_f else W64.T @ W64
        for i, drop in enumerate(_drop_masks(imp, drops, by_threshold=by_t)):
            if act:
                fdrop = next(fit_masks)
                if drops[i] == 0:
                    table[i] = 0.0
                    continue
                _U, _s, WtU = activation_basis(W64, Xf * fdrop, WW=WW)
                P = (X * drop).double() @ WtU
            else:
                P = (X * drop) @ VS
            e = P.double().pow(2).sum(0)  # (m,)
            tail = torch.flip(torch.cumsum(torch.flip(e, [0]), 0), [0])  # tail[r] = sum_{j>=r}
            table[i, :m] = tail / norm
            table[i, m] = 0.0
        if method == "rsparse":
            budget = (1 - fine_s) * in_f * out_f  # (FINE,)
            kt = torch.tensor(ks, dtype=torch.float64)
            r = torch.floor((budget[:, None] - kt[None, :] * out_f) / (in_f + out_f) + 1e-9)
            feasible = r >= 0
            r = r.clamp(0, m).long()
            cand = table.gather(1, r.T.contiguous()).T  # (FINE, K): error at (k_i, r)
            cand[~feasible] = float("inf")
            err, best = cand.min(1)
            rank = r.gather(1, best[:, None]).squeeze(1)
        else:
            errs = table[:, 0]
            cs = torch.tensor([1 - k / in_f for k in ks], dtype=torch.float64).flip(0)
            err = _interp(cs, errs.flip(0), fine_s)
            rank = None
        curves.append(Curve(name, kind, method, in_f, out_f, float(in_f * out_f), err, rank, group,
                            depth[name], lin_gating))
    stats.cache[key] = curves
    return curves


# --------------------------------------------------------------------------- allocations
def _check_budget(curves: List[Curve], target: float):
    total = sum(c.dense for c in curves)
    reachable = sum(c.dense * c.max_index / FINE for c in curves) / total
    if target > reachable + 1e-12:
        raise ValueError(f"model-level sparsity {target} is out of reach of these layers (at most {reachable:.3f})")


def uniform(curves: List[Curve], target: float) -> dict:
    """Every layer at the budget; rsparse layers at the rank of least error for it."""
    s = [float(target)] * len(curves)
    return {"sparsity": s, "rank": [c.rank_at(x) for c, x in zip(curves, s)], "label": "uniform"}


def greedy(curves: List[Curve], target: float, weights: Optional[List[float]] = None) -> dict:
    """TEAL greedy: raise by 1/FINE the layer whose weighted error grows least per element saved."""
    _check_budget(curves, target)
    n = len(curves)
    w = weights or [1.0] * n
    total = sum(c.dense for c in curves)
    goal = (1.0 - target) * total  # elements read
    j = [0] * n
    s = [0.0] * n
    read = total
    heap = []

    def push(i):
        c = curves[i]
        if j[i] + 1 > c.max_index:
            return
        step = c.dense / FINE
        cost = w[i] * float(c.err[j[i] + 1] - c.err[j[i]]) / step
        heapq.heappush(heap, (cost, i))

    for i in range(n):
        push(i)
    while read > goal + 1e-9 and heap:
        _cost, i = heapq.heappop(heap)
        step = curves[i].dense / FINE
        if read - step <= goal:
            s[i] = (j[i] + (read - goal) / step) / FINE
            read = goal
            break
        j[i] += 1
        s[i] = j[i] / FINE
        read -= step
        push(i)
    return {"sparsity": s, "rank": [c.rank_at(x) for c, x in zip(curves, s)], "label": "greedy"}


def allocation_sparsity(curves: List[Curve], alloc: dict) -> float:
    """Nominal model-level sparsity of an allocation (before rounding channels)."""
    total = sum(c.dense for c in curves)
    return 1.0 - sum(c.dense * (1 - s) for c, s in zip(curves, alloc["sparsity"])) / total


# --------------------------------------------------------------------------- search
def _kl_loss(model, stats, cal, config) -> float:
    from .patch import sparsify, unsparsify

    sparsify(model, config, calibration=cal, progress=False)
    try:
        device = next(model.parameters()).device
        total = 0.0
        count = 0
        for ids, dense in zip(stats.kl_inputs, stats.kl_dense):
            logp = F.log_softmax(model(ids.unsqueeze(0).to(device)).logits[0].float(), -1).cpu()
            total += float((dense.exp() * (dense - logp)).sum())
            count += len(ids)
        return total / max(count, 1)
    finally:
        unsparsify(model)


def _probe_index(c: Curve) -> int:
    """Grid index of the sensitivity probe for one layer (`SENSITIVITY_PROBE`, or the layer's reach)."""
    return min(int(round(SENSITIVITY_PROBE * FINE)), c.max_index)


@torch.no_grad()
def sensitivities(model: nn.Module, stats, curves: List[Curve], config: SparsityConfig, *,
                  progress: bool = True) -> List[float]:
    """Per layer, the calibration KL of the model with only that layer sparsified (top-k, or
    the gate method for whole MLPs, at `SENSITIVITY_PROBE`); cached in ``stats.cache``.

    One forward pass over the calibration KL windows per layer (90 layers: ~2 min for
    SmolLM2 on 2 CPU cores).
    """
    key = ("sensitivity", config.targets, config.use_importance, config.method == "gate")
    if key in stats.cache:
        return stats.cache[key]
    out = []
    for c in tqdm(curves, desc="layer sensitivities", disable=not progress):
        probe = _probe_index(c) / FINE
        cfg = SparsityConfig(method="gate" if c.kind == "mlp" else "topk", sparsity=probe, targets=config.targets,
                             importance=config.use_importance, backend=config.backend,
                             overrides={"*": {"sparsity": 0.0}, c.name: {"sparsity": probe}})
        out.append(_kl_loss(model, stats, None, cfg))
    stats.cache[key] = out
    return out


def sensitivity_weights(curves: List[Curve], sens: List[float], power: float) -> List[float]:
    """``(KL_l / err_l) ** power`` at the probe: the model-level KL per unit of the layer's local error."""
    w = []
    for c, kl in zip(curves, sens):
        err = float(c.err[_probe_index(c)])
        ratio = max(kl, 1e-12) / err if math.isfinite(err) and err > 1e-12 else 1.0
        w.append(ratio ** power)
    return w


def shaped(curves: List[Curve], target: float, offsets: Dict[str, float], tilt: float = 0.0,
           rank_scale: float = 1.0, label: str = "shaped") -> dict:
    """``s_l = S + offsets[group] + tilt * (depth - 1/2) + c``, clipped to each layer's range, with the
    constant ``c`` (bisection) that meets the budget exactly; rsparse ranks scaled by ``rank_scale``."""
    total = sum(c.dense for c in curves)
    base = [target + offsets.get(c.group, 0.0) + tilt * (c.depth - 0.5) for c in curves]
    hi_s = [c.max_index / FINE for c in curves]

    def saved(shift):
        return sum(c.dense * min(h, max(0.0, b + shift)) for c, b, h in zip(curves, base, hi_s))

    goal = target * total
    lo, hi = -2.0, 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if saved(mid) < goal:
            lo = mid
        else:
            hi = mid
    s = [min(h, max(0.0, b + hi)) for b, h in zip(base, hi_s)]
    # exact: spread the rounding residue of the bisection over the layers not at a bound
    residue = goal - sum(c.dense * x for c, x in zip(curves, s))
    free = [i for i, x in enumerate(s) if 0.0 < x < hi_s[i]]
    if free and abs(residue) > 0:
        room = sum(curves[i].dense for i in free)
        for i in free:
            s[i] = min(hi_s[i], max(0.0, s[i] + residue / room))
    ranks = []
    for c, x in zip(curves, s):
        r = c.rank_at(x)
        if c.rank is not None and r and rank_scale != 1.0:
            limit = int((1 - x) * c.in_features * c.out_features / (c.in_features + c.out_features))
            r = max(0, min(limit, min(c.in_features, c.out_features), int(round(r * rank_scale))))
        ranks.append(r)
    return {"sparsity": s, "rank": ranks, "label": label}


@torch.no_grad()
def search(model: nn.Module, stats, curves: List[Curve], config: SparsityConfig, *, iterations: Optional[int] = None,
           time_budget_s: Optional[float] = None, sigma: float = 0.06, progress: bool = True):
    """Evolutionary (1+1) search of the allocation, scored by logits KL against the dense model.

    Uniform, greedy and the sensitivity-weighted greedy allocations (one per
    exponent in `SENSITIVITY_POWERS`, after a `sensitivities` pass) are scored
    first, so the result never has a higher calibration KL than any of them.
    Then an evolutionary candidate shifts each projection type's sparsity
    (gate/up/down/q/k/v/o) by an offset, tilts sparsity with depth, scales the
    rsparse ranks chosen by the layer-local error table, and meets the budget
    exactly (`shaped`).  Returns ``(allocation, info)``; reproducible with
    ``config.seed`` when ``iterations`` (default 16 candidates), not
    ``time_budget_s`` (default 300 s, the sensitivity pass included), ends it.
    """
    from .config import _is_int

    if iterations is not None and not (_is_int(iterations) and iterations >= 1):  # 0 would quietly give uniform
        raise ValueError(f"search iterations must be a positive integer, got {iterations!r}")
    iterations = 16 if iterations is None else int(iterations)
    time_budget_s = 300.0 if time_budget_s is None else float(time_budget_s)
    t0 = time.time()
    gen = torch.Generator().manual_seed(int(config.seed))
    groups = sorted({c.group for c in curves})
    has_rank = any(c.rank is not None for c in curves)
    dims = len(groups) + 1 + (1 if has_rank else 0)
    scales = torch.tensor([sigma] * len(groups) + [2 * sigma] + ([0.4] if has_rank else []))
    target = config.sparsity
    history = []

    def decode(theta):
        offsets = {g: float(theta[i]) for i, g in enumerate(groups)}
        tilt = float(theta[len(groups)])
        rank_scale = math.exp(float(theta[-1])) if has_rank else 1.0
        return shaped(curves, target, offsets, tilt, rank_scale, label="search")

    def score(alloc, label):
        cal = to_calibration(model, stats, curves, alloc, config)
        loss = _kl_loss(model, stats, cal, config)
        history.append({"label": label, "kl": loss})
        return loss

    bar = tqdm(total=iterations, desc=f"allocation search ({config.method} {target:.0%})", disable=not progress)
    best_theta = torch.zeros(dims)
    best = uniform(curves, target)
    best_loss = kl_uniform = score(best, "uniform")
    bar.update(1)
    done = 1

    def has_room() -> bool:
        return done < iterations and time.time() - t0 < time_budget_s

    def consider(alloc, label):
        """Score one more candidate and keep it if it beats the best so far: ``(loss, improved)``."""
        nonlocal done, best, best_loss
        loss = score(alloc, label)
        done += 1
        bar.update(1)
        improved = loss < best_loss
        if improved:
            best, best_loss = alloc, loss
        return loss, improved

    kl_greedy = consider(greedy(curves, target), "greedy")[0] if has_room() else None
    kl_sensitivity = {}
    if has_room():
        bar.set_description(f"layer sensitivities ({config.method} {target:.0%})")
        sens = sensitivities(model, stats, curves, config, progress=False)
        bar.set_description(f"allocation search ({config.method} {target:.0%})")
        for power in SENSITIVITY_POWERS:
            if not has_room():
                break
            a = greedy(curves, target, weights=sensitivity_weights(curves, sens, power))
            kl_sensitivity[power] = consider(a, f"sensitivity p={power}")[0]
    # (1+1) evolution from the uniform shape: a step replaces its parent when it beats the parent, and
    # becomes the result when it beats every candidate so far.  (Until stop 26 a step had to beat the
    # best candidate to become the parent, so after a greedy won, steps that improved on their own
    # parent were thrown away and the evolution stood still.)
    theta_parent, parent_loss = torch.zeros(dims), kl_uniform
    step = 1.0
    while has_room():
        theta = theta_parent + step * scales * torch.randn(dims, generator=gen)
        loss, improved = consider(decode(theta), f"es{done}")
        if improved:
            best_theta = theta
        if loss < parent_loss:
            theta_parent, parent_loss = theta, loss
            step = min(2.0, step * 1.5)
        else:
            step = max(0.2, step * 0.85)
        bar.set_postfix(kl=f"{best_loss:.4f}")
    bar.close()
    best = dict(best)
    best["label"] = "search"
    info = {
        "kl_best": best_loss, "kl_greedy": kl_greedy, "kl_uniform": kl_uniform, "kl_sensitivity": kl_sensitivity,
        "best": next((h["label"] for h in history if h["kl"] == best_loss), None), "candidates": done,
        "offsets": {g: float(best_theta[i]) for i, g in enumerate(groups)}, "tilt": float(best_theta[len(groups)]),
        "rank_scale": math.exp(float(best_theta[-1])) if has_rank else None,
        "seconds": round(time.time() - t0, 2), "history": history,
    }
    return best, info


# --------------------------------------------------------------------------- calibration
def _activation_entry(stats, c: Curve, W: torch.Tensor, dropped: int, rank: int, config: SparsityConfig):
    """Activation-aware ``A, B`` of one layer, fitted on its whole reservoir with ``dropped`` channels
    inactive (as the layer gates them); the basis is cached per 1 % of dropped channels."""
    if rank == 0:
        z = W.new_zeros
        return z((c.in_features, 0)), z((0, c.out_features))
    pct = int(round(100 * dropped / c.in_features))
    cache = stats.cache.setdefault("act_basis", {})
    key = (c.name, pct, config.use_importance, c.gating)
    if key not in cache:
        st = stats.layers[c.name]
        X = st.sample.float()
        imp = X.abs() * ref.column_norms(W).cpu() if config.use_importance else X.abs()
        d = int(round(pct / 100 * c.in_features))
        drop = next(_drop_masks(imp, [d], by_threshold=(c.gating == "threshold")))
        U, s, WtU = activation_basis(W, X * drop)
        while len(cache) >= ACT_CACHE:
            cache.pop(next(iter(cache)))
        cache[key] = (U.float(), s.float(), WtU.float())
    U, s, WtU = cache[key]
    return activation_factors(U, s, WtU, rank, W)


def to_calibration(model: nn.Module, stats, curves: List[Curve], alloc: dict, config: SparsityConfig):
    """The `Calibration` of an allocation: per layer "sparsity", and "rank"/"A"/"B" (rsparse) or "threshold"."""
    from .calibrate import Calibration, _threshold_for

    layers = {}
    read = dense = 0.0
    for c, s, r in zip(curves, alloc["sparsity"], alloc["rank"]):
        st = stats.layers[c.name]
        entry = {"sparsity": float(s)}
        if c.kind == "mlp":
            entry["drop"] = 1.5 * s
            entry["threshold"] = _threshold_for(st, 1.5 * s, config, False)
            read += c.dense * (1 - s)
        else:
            method = "topk" if config.method == "gate" else config.method
            budget = (1 - s) * c.in_features * c.out_features
            if method == "rsparse":
                W = model.get_submodule(c.name).weight
                entry["rank"] = int(r)
                active = (budget - r * (c.in_features + c.out_features)) / c.out_features
                if c.gating == "threshold":
                    entry["drop"] = max(0.0, 1.0 - active / c.in_features)
                    entry["threshold"] = _threshold_for(st, entry["drop"], config, config.use_importance)
                    dropped = int(round(entry["drop"] * c.in_features))
                else:
                    active = math.floor(active + 1e-9)
                    dropped = c.in_features - int(min(c.in_features, max(0, active)))
                if config.lowrank == "activation":
                    entry["A"], entry["B"] = _activation_entry(stats, c, W, dropped, int(r), config)
                else:
                    U, S, Vh = stats.cache["svd"][c.name]
                    root = S[:r].sqrt()
                    entry["A"] = (Vh[:r].T * root).to(W.device, W.dtype).contiguous()
                    entry["B"] = (root[:, None] * U[:, :r].T).to(W.device, W.dtype).contiguous()
            elif method == "threshold":
                entry["drop"] = s
                entry["threshold"] = _threshold_for(st, s, config, config.use_importance)
                active = (1 - s) * c.in_features
            else:
                active = math.floor((1 - s) * c.in_features + 1e-9)
            read += ref.linear_read_elements(c.in_features, c.out_features, active, int(r or 0))
        layers[c.name] = entry
        dense += c.dense
    meta = {"achieved_sparsity": 1.0 - read / dense if dense else 0.0,
            "nominal_sparsity": allocation_sparsity(curves, alloc), "allocation_label": alloc.get("label")}
    return Calibration(layers=layers, meta=meta)
