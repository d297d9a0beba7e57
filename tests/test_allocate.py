"""Allocation (sparse_infer.allocate): error curves, greedy, sensitivities and the search.

Error curves are the measured relative output error, greedy spends the budget per
element saved and reaches each layer's limit, sensitivities are the KL of the model
with one layer sparsified, the search honours its seed, time budget and progress flag,
and every candidate it builds stays in range and on budget.
"""

import math
import warnings

import pytest
import torch

import sparse_infer as si
from sparse_infer import SparsityConfig, allocate
from sparse_infer import reference as ref
from sparse_infer.calibrate import calibrate, collect_stats
from sparse_infer.models import tiny_model
from conftest import dense_after, nearly_lowrank_model, run_with_stats, token_ids

FINE = allocate.FINE


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def lowrank_model():
    return nearly_lowrank_model(rank=6, noise=0.05)


def _rel_err(Z, W, drop):
    """||(Z * drop) W^T||^2 / ||Z W^T||^2 in float64."""
    Z, W = Z.double(), W.detach().double()
    return float(((Z * drop) @ W.T).pow(2).sum() / (Z @ W.T).pow(2).sum())


# --------------------------------------------------------------------------- error curves
@pytest.mark.parametrize("importance", [False, True])
def test_topk_error_curve_is_the_output_error_of_dropping_the_least_important_channels(model, importance):
    """At every 5 % of density the curve is the relative output error of keeping each token's top-k
    channels (by |x|, or |x|·||W[:, i]|| with importance), and linear in between."""
    cfg = SparsityConfig(method="topk", sparsity=0.5, targets="mlp", allocation="greedy", importance=importance)
    stats = collect_stats(model, token_ids(0), cfg, progress=False, reservoir=32)
    curves = allocate.error_curves(model, stats, cfg, progress=False)
    checked = 0
    for c in curves:
        if c.in_features % allocate.COARSE:  # grid nodes fall on the 1 % grid only when in % 20 == 0
            continue
        W = model.get_submodule(c.name).weight
        X = stats.layers[c.name].sample[: allocate.PROXY_TOKENS]
        scale = ref.column_norms(W) if importance else None
        errs = []
        for m in range(allocate.COARSE):  # sparsity m / 20
            k = c.in_features - m * c.in_features // allocate.COARSE
            keep = ref.topk_mask(X, k, scale)
            errs.append(_rel_err(X, W, ~keep))
        expected = torch.cummax(torch.tensor(errs, dtype=torch.float64), 0).values
        got = c.err[:: FINE // allocate.COARSE]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)
        # in between two nodes: linear
        mid = c.err[5 * 3 + 2]
        assert float(mid) == pytest.approx(float(c.err[15] + 0.4 * (c.err[20] - c.err[15])), rel=1e-9, abs=1e-12)
        checked += 1
    assert checked == 2  # both down_proj (in = 160)


def test_gate_error_curve_drops_the_smallest_activations_over_the_sample(model):
    """Gate (CATS) layers: at sparsity s the fraction 1.5·s of the smallest |act(gate(x))| of the
    sample is dropped (one threshold over the layer), and the error is that of the MLP's output."""
    cfg = SparsityConfig(method="gate", sparsity=0.4, targets="mlp", allocation="greedy")
    stats = collect_stats(model, token_ids(0), cfg, progress=False, reservoir=16)
    curves = allocate.error_curves(model, stats, cfg, progress=False)
    assert curves and all(c.kind == "mlp" for c in curves)
    for c in curves:
        mlp = model.get_submodule(c.name)
        X = stats.layers[c.name].sample[: allocate.PROXY_TOKENS].float()
        with torch.no_grad():
            H = mlp.act_fn(mlp.gate_proj(X))
            Z = H * mlp.up_proj(X)
        flat = H.abs().flatten()
        for j in range(0, 61, 10):  # s = j/100, drop fraction 1.5 s: a whole number of 5 % steps
            n = round(1.5 * j / 100 * flat.numel())
            drop = torch.zeros(flat.numel(), dtype=torch.bool)
            drop[flat.argsort()[:n]] = True
            want = _rel_err(Z, mlp.down_proj.weight, drop.reshape(H.shape))
            assert float(c.err[j]) == pytest.approx(want, rel=2e-5, abs=1e-9), (c.name, j)
        assert math.isinf(float(c.err[67])) and math.isfinite(float(c.err[66]))  # gate reaches 2/3 at most


def test_curve_depth_runs_from_first_to_last_layer():
    model = tiny_model("llama", num_hidden_layers=3)
    cfg = SparsityConfig(method="topk", sparsity=0.5, targets="attn", allocation="greedy")
    stats = collect_stats(model, token_ids(0, n=2), cfg, progress=False, reservoir=16)
    depth = {c.name: c.depth for c in allocate.error_curves(model, stats, cfg, progress=False)}
    for name, d in depth.items():
        layer = int(name.split("layers.")[1].split(".")[0])
        assert d == pytest.approx(layer / 2), name


def test_unknown_gating_is_a_clear_error(model):
    cfg = SparsityConfig(method="rsparse", sparsity=0.5, targets="mlp", allocation="greedy")
    with pytest.raises(ValueError, match="gating"):
        calibrate(model, token_ids(0, n=2), cfg, progress=False, gating="topK")


def _same_calibration(a, b):
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        ea, eb = a.layers[name], b.layers[name]
        assert ea.keys() == eb.keys(), name
        for key in ea:
            va, vb = ea[key], eb[key]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb), (name, key)
            else:
                assert va == vb, (name, key)


@pytest.mark.parametrize("first, second", [
    (dict(gating="threshold"), dict(gating="topk")),
    (dict(gating="topk"), dict(gating="threshold")),
    (dict(importance=True), dict(importance=False)),
])
def test_reused_statistics_give_the_calibration_of_fresh_ones(lowrank_model, first, second):
    """Statistics reused for another setting (gating, importance) give exactly what a fresh dense pass gives:
    nothing cached for the first setting leaks into the second."""
    base = dict(method="rsparse", sparsity=0.6, targets="mlp", allocation="greedy", lowrank="activation")
    data = token_ids(0)

    def run(stats, kw):
        kw = dict(kw)
        gating = kw.pop("gating", None)
        cfg = SparsityConfig(**base, **kw)
        return calibrate(lowrank_model, stats, cfg, progress=False, refine_rounds=0, gating=gating, reservoir=64)

    shared = run(data, first).stats
    reused = run(shared, second)
    fresh = run(data, second)
    assert any(e["rank"] > 0 for e in fresh.layers.values())  # factors are part of what is compared
    _same_calibration(reused, fresh)
    assert reused.meta["gating"] == fresh.meta["gating"]


def test_activation_factor_is_fitted_on_what_topk_gating_leaves_inactive(lowrank_model):
    """lowrank="activation" with top-k gating: the factor is the activation-aware factor of the inputs the
    layer's top-k actually drops (k per token), not of a thresholded sample."""
    model = lowrank_model
    cfg = SparsityConfig(method="rsparse", sparsity=0.5, targets="mlp", allocation="uniform", lowrank="activation")
    cal = calibrate(model, token_ids(0), cfg, progress=False, gating="topk", reservoir=64)
    with dense_after(model):
        si.sparsify(model, cfg, calibration=cal, progress=False)
        ks = {n: m.k for n, m in si.sparse_modules(model).items()}
    checked = 0
    for name, e in cal.layers.items():
        W = model.get_submodule(name).weight
        if not e["rank"] or W.shape[1] != 64:  # in = 64: the fit's 1 % grid holds every k exactly
            continue
        X = cal.stats.layers[name].sample
        inactive = ~ref.topk_mask(X, ks[name], ref.column_norms(W))
        U, s, WtU = allocate.activation_basis(W, X * inactive)
        A, B = allocate.activation_factors(U, s, WtU, e["rank"], W)
        torch.testing.assert_close(e["A"] @ e["B"], A @ B, rtol=1e-3, atol=1e-5)
        checked += 1
    assert checked


# --------------------------------------------------------------------------- greedy / budget
def _curve(name, dense, reach=FINE - 1, slope=1.0, in_features=10, out_features=10):
    err = torch.arange(FINE, dtype=torch.float64) / FINE * slope
    err[reach + 1:] = float("inf")
    return allocate.Curve(name=name, kind="linear", method="topk", in_features=in_features, out_features=out_features,
                          dense=float(dense), err=err, rank=None, group="x", depth=0.0)


def test_greedy_spends_the_budget_where_error_grows_least_per_element_saved():
    """Same error curve, a 4x bigger layer: each of its steps saves 4x the elements for the same error,
    so the greedy takes all of the budget from it."""
    small, big = _curve("small", 100), _curve("big", 400)
    a = allocate.greedy([small, big], 0.4)
    assert a["sparsity"] == pytest.approx([0.0, 0.5], abs=1e-9)


def test_allocation_sparsity_weights_layers_by_their_dense_elements():
    curves = [_curve("small", 100), _curve("big", 400)]
    assert allocate.allocation_sparsity(curves, {"sparsity": [0.5, 0.0]}) == pytest.approx(0.1)
    assert allocate.allocation_sparsity(curves, {"sparsity": [0.0, 0.5]}) == pytest.approx(0.4)


def test_greedy_reaches_each_layers_limit_and_no_further():
    """The budget at the reach of the layers (a topk layer 99 %, one whose curve ends at 60 %) is met
    exactly with each layer at its limit; beyond it is a clear error."""
    curves = [_curve("a", 100), _curve("b", 300, reach=60)]
    reach = (100 * 0.99 + 300 * 0.60) / 400
    a = allocate.greedy(curves, reach)
    assert allocate.allocation_sparsity(curves, a) == pytest.approx(reach, abs=1e-9)
    assert a["sparsity"] == pytest.approx([0.99, 0.60], abs=1e-9)
    with pytest.raises(ValueError, match="out of reach"):
        allocate.greedy(curves, reach + 0.002)


def test_sensitivity_weights_are_the_kl_per_local_error_to_the_power():
    curves = [_curve("a", 100), _curve("b", 100, slope=2.0)]  # local error at the 50 % probe: 0.5 and 1.0
    sens = [0.2, 0.8]
    assert allocate.sensitivity_weights(curves, sens, 1.0) == pytest.approx([0.4, 0.8])
    assert allocate.sensitivity_weights(curves, sens, 0.5) == pytest.approx([math.sqrt(0.4), math.sqrt(0.8)])


# --------------------------------------------------------------------------- sensitivities
def _kl_per_token(model, stats):
    """Mean over the calibration KL windows' tokens of KL(dense || model)."""
    total = count = 0.0
    with torch.no_grad():
        for ids, dense in zip(stats.kl_inputs, stats.kl_dense):
            logq = torch.log_softmax(model(ids.unsqueeze(0)).logits[0].double(), -1)
            p = dense.double()
            total += float((p.exp() * (p - logq)).sum())
            count += len(ids)
    return total / count


def test_sensitivity_is_the_kl_of_the_model_with_only_that_layer_at_the_probe():
    """KL(dense || model) per token, the dense distribution first: peaked logits (a scaled-up head) make it
    large enough that float32 noise stays far below the gap to the reverse KL."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    cfg = SparsityConfig(method="topk", sparsity=0.5, targets="mlp", allocation="greedy", importance=False)
    stats = collect_stats(model, token_ids(2), cfg, progress=False, reservoir=32, kl_tokens=32)
    curves = allocate.error_curves(model, stats, cfg, progress=False)
    sens = allocate.sensitivities(model, stats, curves, cfg, progress=False)
    for c, got in zip(curves, sens):
        lin = model.get_submodule(c.name)
        k = round((1 - allocate.SENSITIVITY_PROBE) * c.in_features)

        def keep_topk(_m, args, k=k):
            x = args[0]
            return (x * ref.topk_mask(x, k),)

        h = lin.register_forward_pre_hook(keep_topk)
        try:
            want = _kl_per_token(model, stats)
        finally:
            h.remove()
        assert want > 1e-4
        assert got == pytest.approx(want, rel=1e-4), c.name


# --------------------------------------------------------------------------- search
@pytest.fixture(scope="module")
def searched(model):
    cfg = SparsityConfig(method="topk", sparsity=0.6, targets="mlp", allocation="search", seed=1)
    stats = collect_stats(model, token_ids(0), cfg, progress=False, reservoir=32, kl_tokens=32)
    curves = allocate.error_curves(model, stats, cfg, progress=False)
    return cfg, stats, curves


def test_search_meets_the_budget_whichever_candidate_wins(model, searched):
    cfg, stats, curves = searched
    alloc, info = allocate.search(model, stats, curves, cfg, iterations=8, sigma=0.3, progress=False)
    assert info["candidates"] == 8 and sum(h["label"].startswith("es") for h in info["history"]) == 4
    assert allocate.allocation_sparsity(curves, alloc) == pytest.approx(cfg.sparsity, abs=1e-9)
    assert all(0.0 <= s <= c.max_index / FINE for c, s in zip(curves, alloc["sparsity"]))


def test_search_seed_changes_the_candidates_and_repeats_them(model, searched):
    cfg, stats, curves = searched

    def es_losses(seed):
        _a, info = allocate.search(model, stats, curves, cfg.replace(seed=seed), iterations=6, progress=False)
        return [h["kl"] for h in info["history"] if h["label"].startswith("es")]

    one = es_losses(1)
    assert len(one) == 2 and es_losses(1) == one
    assert es_losses(2) != one


def test_search_follows_the_loss_to_a_better_shape(model, searched, monkeypatch):
    """With a loss whose minimum is a known shape (down_proj 15 points below the budget, gate/up above it:
    the opposite of what greedy picks on this model), the evolution steps beat uniform, greedy and the
    sensitivity candidates, and move toward that shape."""
    cfg, stats, curves = searched
    want = {"down_proj": cfg.sparsity - 0.15, "gate_proj": cfg.sparsity + 0.075, "up_proj": cfg.sparsity + 0.075}

    def shape_loss(model, stats, cal, config):
        if cal is None:  # the sensitivity pass: any constant
            return 1.0
        return sum((e["sparsity"] - want[n.rsplit(".", 1)[-1]]) ** 2 for n, e in cal.layers.items()) / len(cal.layers)

    monkeypatch.setattr(allocate, "_kl_loss", shape_loss)
    alloc, info = allocate.search(model, stats, curves, cfg, iterations=30, progress=False)
    assert info["best"].startswith("es")
    assert info["kl_best"] < 0.5 * min(info["kl_uniform"], info["kl_greedy"], *info["kl_sensitivity"].values())
    assert info["offsets"]["down_proj"] < info["offsets"]["gate_proj"] and info["offsets"]["down_proj"] < info["offsets"]["up_proj"]
    assert allocate.allocation_sparsity(curves, alloc) == pytest.approx(cfg.sparsity, abs=1e-9)


@pytest.mark.parametrize("quick", [False, True])
def test_search_time_budget_zero_scores_only_uniform(model, quick):
    cfg = SparsityConfig(method="topk", sparsity=0.5, targets="mlp", allocation="search")
    cal = calibrate(model, token_ids(0, n=2), cfg, progress=False, iterations=10, time_budget_s=0, quick=quick, reservoir=32)
    s = cal.meta["search"]
    assert s["candidates"] == 1 and s["kl_greedy"] is None and s["kl_sensitivity"] == {}
    assert all(e["sparsity"] == 0.5 for e in cal.layers.values())


def test_progress_false_prints_nothing(model, capfd):
    cfg = SparsityConfig(method="rsparse", sparsity=0.5, targets="mlp", allocation="search")
    calibrate(model, token_ids(0, n=2), cfg, progress=False, quick=True, iterations=5, reservoir=32)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    calibrate(model, token_ids(0, n=2), cfg, progress=True, quick=True, iterations=5, reservoir=32)
    assert "calibration pass" in capfd.readouterr().err  # the capture does see the bars


@pytest.mark.parametrize("offsets, tilt", [({"down_proj": 3.0, "gate_proj": -3.0}, 0.0), ({}, 4.0), ({"up_proj": -5.0}, -2.0)])
def test_shaped_allocation_stays_in_range_and_on_budget(searched, offsets, tilt):
    """Extreme shape parameters (what a large search step draws) are clipped to each layer's range,
    and the budget is still met exactly."""
    _cfg, _stats, curves = searched
    a = allocate.shaped(curves, 0.6, offsets, tilt)
    assert allocate.allocation_sparsity(curves, a) == pytest.approx(0.6, abs=1e-9)
    for c, s in zip(curves, a["sparsity"]):
        assert 0.0 <= s <= c.max_index / FINE, (c.name, s)


def test_scaled_ranks_stay_within_each_layers_budget():
    curves = []
    for i in range(3):
        rank = torch.full((FINE,), 4, dtype=torch.int64)
        c = _curve(f"model.layers.{i}.mlp.up_proj", 64 * 160, in_features=64, out_features=160)
        c.rank, c.method = rank, "rsparse"
        curves.append(c)
    for scale, want in ((0.5, 2), (20.0, 13)):  # 20 x 4 = 80, cut to the 13 that 30 % of 64 x 160 elements pay for
        a = allocate.shaped(curves, 0.7, {}, 0.0, rank_scale=scale)
        assert a["rank"] == [want] * 3
        for c, s, r in zip(curves, a["sparsity"], a["rank"]):
            assert r * (c.in_features + c.out_features) <= (1 - s) * c.in_features * c.out_features + 1e-6


# --------------------------------------------------------------------------- to_calibration
def test_gate_thresholds_hit_their_density_before_refinement(model):
    """Gate layers at sparsity s skip the fraction 1.5·s of up/down channels: the thresholds read off the
    histogram give that density on the calibration tokens without the refinement passes."""
    cfg = SparsityConfig(method="gate", sparsity=0.4, targets="mlp", allocation="uniform")
    data = token_ids(0, 16, 32)
    cal = calibrate(model, data, cfg, progress=False, refine_rounds=0)
    with dense_after(model):
        si.sparsify(model, cfg, calibration=cal, progress=False)
        for name, m in run_with_stats(model, data).items():
            assert abs(m.measured_density - (1 - 1.5 * 0.4)) <= 0.02, (name, m.measured_density)


def test_error_curves_build_no_autograd_graph(model):
    """error_curves is public: called outside no_grad it must not track the model's weights."""
    cfg = SparsityConfig(method="gate", sparsity=0.3, allocation="greedy")
    stats = collect_stats(model, token_ids(0, n=2), cfg, progress=False)
    assert torch.is_grad_enabled()
    with warnings.catch_warnings():  # float() of a tensor that requires grad warns: make that a failure
        warnings.simplefilter("error", UserWarning)
        curves = allocate.error_curves(model, stats, cfg, progress=False)
    assert curves and torch.is_grad_enabled()
    assert not any(isinstance(v, torch.Tensor) and v.requires_grad for c in curves for v in vars(c).values())
