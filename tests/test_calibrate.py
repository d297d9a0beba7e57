"""Calibration (issue 4): thresholds, allocation under one budget, search, bounded statistics."""

import math
import time

import pytest
import torch

import sparse_infer as si
from sparse_infer import SparsityConfig, allocate
from sparse_infer import reference as ref
from sparse_infer.calibrate import (
    CalibrationStats, chan_quantiles, collect_stats, calibrate, default_calibration_data, hist_quantile, _hist, _log_abs,
)
from sparse_infer.models import tiny_model
from conftest import ByteTokenizer, dense_after, nearly_lowrank_model, run_with_stats, short_text, token_ids
from sparse_infer.modules import SparseGatedMLP


def _data(seed, n=8, length=64):
    return token_ids(seed, n, length)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _achieved(model):
    """Model-level sparsity from the planned k and rank, counted with reference.linear_read_elements."""
    layers, mlp_read, mlp_dense = [], 0.0, 0.0
    for m in si.sparse_modules(model).values():
        if isinstance(m, SparseGatedMLP):
            mlp_read += m.read_elements(m.k / m.width if m.k is not None else None)
            mlp_dense += m.dense_elements()
        else:
            active = m.k if m.k is not None else m.nominal_density * m.in_features
            layers.append((m.in_features, m.out_features, active, m.rank))
    read = sum(ref.linear_read_elements(*t) for t in layers) + mlp_read
    dense = sum(i * o for i, o, _, _ in layers) + mlp_dense
    return 1 - read / dense, layers, dense


def test_histogram_quantile_matches_exact():
    x = torch.randn(20000).abs() * 3
    h = _hist(_log_abs(x))
    for q in (0.1, 0.5, 0.7, 0.95):
        t = hist_quantile(h, q)
        assert abs(float((x <= t).float().mean()) - q) < 0.005
    per = torch.randn(4000, 5).abs() * torch.tensor([0.01, 0.1, 1, 10, 100])
    from sparse_infer.calibrate import _chan_hist

    t = chan_quantiles(_chan_hist(_log_abs(per), 5), 0.5)
    frac = (per <= t).float().mean(0)
    assert torch.all((frac - 0.5).abs() < 0.03), frac


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("target", [0.5, 0.7])
def test_thresholds_hit_target_on_held_out_tokens(model, per_channel, target):
    cfg = SparsityConfig(method="threshold", sparsity=target, targets="all", per_channel=per_channel)
    cal = calibrate(model, _data(0, 48, 32), cfg, progress=False)
    with dense_after(model):
        si.sparsify(model, cfg, calibration=cal, progress=False)
        mods = run_with_stats(model, _data(1, 48, 32))  # held out: other tokens than the calibration ones
        for name, m in mods.items():
            assert abs((1 - m.measured_density) - target) <= 0.02, (name, m.measured_density)
        assert abs(si.model_sparsity(model, measured=True) - target) <= 0.02


def test_gate_thresholds_hit_target(model):
    cfg = SparsityConfig(method="gate", sparsity=0.5, targets="mlp")
    cal = calibrate(model, _data(0, 48, 32), cfg, progress=False)
    with dense_after(model):
        si.sparsify(model, cfg, calibration=cal, progress=False)
        mods = run_with_stats(model, _data(1, 48, 32))
        for m in mods.values():
            assert abs(m.measured_density - (1 - 1.5 * 0.5)) <= 0.02


@pytest.mark.parametrize("method", ["topk", "rsparse", "rsparse-topk", "threshold", "gate"])
@pytest.mark.parametrize("allocation", ["greedy", "search"])
def test_allocation_meets_budget_within_one_channel_per_layer(model, method, allocation):
    method, _, gating = method.partition("-")
    target = 0.4 if method == "gate" else 0.6
    cfg = SparsityConfig(method=method, sparsity=target, targets="all", allocation=allocation, seed=3)
    cal = calibrate(model, _data(0), cfg, progress=False, quick=True, gating=gating or None)
    sparsities = [v["sparsity"] for v in cal.layers.values()]
    assert max(sparsities) - min(sparsities) > 0.01  # not uniform
    with dense_after(model):
        si.sparsify(model, cfg, calibration=cal, progress=False)
        achieved, layers, dense = _achieved(model)
        one_channel_per_layer = sum(o for _, o, _, _ in layers) / dense
        assert target - 1e-9 <= achieved <= target + one_channel_per_layer + 1e-9
        assert abs(cal.meta["achieved_sparsity"] - achieved) < 1e-9
        assert target - 1e-9 <= si.model_sparsity(model) <= target + one_channel_per_layer + 1e-9
        if method == "rsparse":
            for m in si.sparse_modules(model).values():
                budget = (1 - cal.layers[_name(model, m)]["sparsity"]) * m.in_features * m.out_features
                active = m.k if m.k is not None else m.nominal_density * m.in_features
                assert active * m.out_features + m.rank * (m.in_features + m.out_features) <= budget + 1e-6


def _name(model, module):
    return next(n for n, m in model.named_modules() if m is module)


def test_search_beats_greedy_and_uniform_on_calibration_kl_and_is_reproducible(model):
    cfg = SparsityConfig(method="rsparse", sparsity=0.6, targets="mlp", allocation="search", seed=7)
    a = calibrate(model, _data(0), cfg, progress=False, quick=True, iterations=6)
    s = a.meta["search"]
    assert s["kl_best"] <= s["kl_greedy"] and s["kl_best"] <= s["kl_uniform"]
    assert set(s["kl_sensitivity"]) == set(allocate.SENSITIVITY_POWERS)
    assert s["kl_best"] <= min(s["kl_sensitivity"].values())
    assert s["candidates"] == 6
    b = calibrate(model, a.stats, cfg, progress=False, quick=True, iterations=6)
    assert [v["sparsity"] for v in a.layers.values()] == [v["sparsity"] for v in b.layers.values()]
    assert [v["rank"] for v in a.layers.values()] == [v["rank"] for v in b.layers.values()]


def test_sensitivities_single_out_the_layer_that_matters(model):
    """A layer whose output is scaled up moves the logits more when sparsified: its
    sensitivity rises, and the weighted greedy gives it less sparsity than the plain greedy."""
    cfg = SparsityConfig(method="threshold", sparsity=0.5, targets="mlp", allocation="greedy")
    loud = tiny_model("llama", seed=3)
    with torch.no_grad():
        loud.model.layers[1].mlp.down_proj.weight.mul_(8.0)
    cal = calibrate(loud, _data(1), cfg, progress=False, quick=True)
    curves = allocate.error_curves(loud, cal.stats, cfg, progress=False)
    sens = allocate.sensitivities(loud, cal.stats, curves, cfg, progress=False)
    assert len(sens) == len(curves) and all(v >= 0 and math.isfinite(v) for v in sens)
    assert allocate.sensitivities(loud, cal.stats, curves, cfg) is sens  # cached per statistics
    i = [c.name for c in curves].index("model.layers.1.mlp.down_proj")
    j = [c.name for c in curves].index("model.layers.0.mlp.down_proj")
    assert sens[i] > sens[j]
    w = allocate.sensitivity_weights(curves, sens, 1.0)
    plain, weighted = allocate.greedy(curves, 0.5), allocate.greedy(curves, 0.5, weights=w)
    for a in (plain, weighted):  # both exactly on budget
        assert allocate.allocation_sparsity(curves, a) == pytest.approx(0.5, abs=1e-9)
    assert weighted["sparsity"][i] < plain["sparsity"][i] - 0.1


def test_rsparse_factors_and_ranks():
    model = nearly_lowrank_model()
    cfg = SparsityConfig(method="rsparse", sparsity=0.5, targets="mlp", allocation="uniform")
    cal = calibrate(model, _data(0), cfg, progress=False)
    assert all(e["rank"] > 0 for e in cal.layers.values())
    for name, e in cal.layers.items():
        W = model.get_submodule(name).weight
        assert e["A"].dtype == W.dtype and e["A"].shape == (W.shape[1], e["rank"]) and e["B"].shape == (e["rank"], W.shape[0])
        A, B = ref.lowrank_factors(W, e["rank"])
        torch.testing.assert_close(e["A"] @ e["B"], A @ B, atol=1e-4, rtol=1e-3)


def test_stats_are_bounded_and_reusable(model):
    cfg = SparsityConfig(method="threshold", sparsity=0.5, targets="mlp")
    small = collect_stats(model, _data(0, n=2), cfg, progress=False, reservoir=32)
    big = collect_stats(model, _data(0, n=12), cfg, progress=False, reservoir=32)
    for name in small.layers:
        assert small.layers[name].hist_abs.shape == big.layers[name].hist_abs.shape
        assert big.layers[name].sample.shape[0] == 32
        assert big.layers[name].tokens == 12 * 64
    assert isinstance(big, CalibrationStats)
    # another level from the same statistics: no forward pass
    calls = []
    h = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        cal = calibrate(model, big, cfg.replace(sparsity=0.7), progress=False, refine_rounds=0)
    finally:
        h.remove()
    assert not calls and cal.layers
    with pytest.raises(ValueError, match="collected for"):
        calibrate(model, big, cfg.replace(method="gate", sparsity=0.3), progress=False)


def test_calibration_is_seeded(model):
    cfg = SparsityConfig(method="topk", sparsity=0.5, targets="mlp", allocation="greedy", seed=1)
    a = calibrate(model, _data(0), cfg, progress=False, reservoir=64)
    b = calibrate(model, _data(0), cfg, progress=False, reservoir=64)
    assert [v["sparsity"] for v in a.layers.values()] == [v["sparsity"] for v in b.layers.values()]


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [1 + ord(c) % 127 for c in text]}


def test_bad_data_is_a_clear_error(model):
    cfg = SparsityConfig(method="threshold", sparsity=0.5)
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, [], cfg, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        calibrate(model, ["some text"], cfg, progress=False)
    with pytest.raises(ValueError, match="token ids"):
        calibrate(model, [torch.randn(10)], cfg, progress=False)
    with pytest.raises(ValueError, match=r"must lie in \[0, 128\) \(the model's vocabulary\), got \[1, 128\]"):
        calibrate(model, [torch.tensor([[1, 5, 128]])], cfg, progress=False)
    with dense_after(model):
        si.sparsify(model, SparsityConfig(), progress=False)
        with pytest.raises(ValueError, match="dense model"):
            calibrate(model, _data(0), cfg, progress=False)
    with pytest.raises(ValueError, match="out of reach"):
        calibrate(model, _data(0), SparsityConfig(method="topk", sparsity=0.995, allocation="greedy"), progress=False)


def test_strings_with_tokenizer(model):
    cfg = SparsityConfig(method="threshold", sparsity=0.5)
    cal = calibrate(model, ["The quick brown fox jumps over the lazy dog. " * 8], cfg, progress=False, tokenizer=_CharTokenizer())
    assert cal.meta["calibration"]["calibration_tokens"] == 45 * 8


def test_default_data_comes_from_the_calibration_tail(model):
    pytest.importorskip("sparse_infer.data")
    try:
        data = default_calibration_data(_CharTokenizer(), num_samples=2, seq_len=32)
    except FileNotFoundError:
        pytest.skip("no WikiText-2 text here")
    lo, hi = data.meta["calib_token_range"]
    assert data.meta["eval_token_range"][1] <= lo < hi
    cfg = SparsityConfig(method="threshold", sparsity=0.5)
    cal = calibrate(model, data, cfg, progress=False)
    split = cal.meta["calibration"]["split"]
    assert split["calib_token_range"] == [lo, hi] and len(split["text_sha256"]) == 64


def test_sparsify_calibrates_from_token_ids_and_is_fast(model):
    t = time.time()
    cfg = SparsityConfig(method="rsparse", sparsity=0.5, targets="all", allocation="search")
    cal = calibrate(model, _data(0), cfg, progress=False, quick=True)
    si.sparsify(model, cfg, calibration=cal, progress=False)
    si.unsparsify(model)
    assert time.time() - t < 30


def _factor_error(X, W, A, B):
    return float((X @ A @ B - X @ W.detach().T).pow(2).sum())


def test_activation_basis_beats_svd_on_the_inputs_it_sees():
    from sparse_infer.allocate import activation_basis, activation_factors

    g = torch.Generator().manual_seed(0)
    for out_f, in_f in ((48, 32), (32, 48)):  # both branches (out <= in, out > in)
        W = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
        X = torch.randn(400, in_f, generator=g) * torch.linspace(0.05, 3.0, in_f)  # anisotropic inputs
        Xd = X * (torch.rand(X.shape, generator=g) < 0.6)  # the inactive part the factor sees
        U, s, WtU = activation_basis(W, Xd)
        for r in (1, 4, 12):
            A, B = activation_factors(U, s, WtU, r, W)
            A0, B0 = ref.lowrank_factors(W, r)
            assert A.shape == (in_f, r) and B.shape == (r, out_f)
            assert _factor_error(Xd, W, A, B) < _factor_error(Xd, W, A0, B0)
        # full rank: exact; never-seen channels (all zero) do not break it
        A, B = activation_factors(U, s, WtU, min(in_f, out_f), W)
        torch.testing.assert_close(A @ B, W.T, atol=1e-4, rtol=1e-4)
        U, s, WtU = activation_basis(W, torch.zeros(10, in_f))
        A, B = activation_factors(U, s, WtU, 3, W)
        A0, B0 = ref.lowrank_factors(W, 3)
        torch.testing.assert_close(A @ B, A0 @ B0, atol=1e-4, rtol=1e-3)


def test_calibrated_activation_factor_has_lower_error_on_inactive_inputs():
    model = nearly_lowrank_model(noise=0.3)
    data = _data(0)
    base = SparsityConfig(method="rsparse", sparsity=0.5, targets="mlp", allocation="uniform")
    cal_a = calibrate(model, data, base.replace(lowrank="activation"), progress=False, refine_rounds=0)
    better = total = 0
    for name, e in cal_a.layers.items():
        r = e["rank"]
        if not r:
            continue
        W = model.get_submodule(name).weight
        X = cal_a.stats.layers[name].sample
        inactive = ref.threshold_mask(X, e["threshold"], ref.column_norms(W)).logical_not()
        Xd = X * inactive  # what the factor sees under the calibrated gating
        A0, B0 = ref.lowrank_factors(W, r)
        err_a, err_s = _factor_error(Xd, W, e["A"], e["B"]), _factor_error(Xd, W, A0, B0)
        better += err_a < err_s
        total += 1
    assert total and better == total


def test_lowrank_config_validation_and_json():
    cfg = SparsityConfig(method="rsparse", lowrank="activation", allocation="search")
    assert SparsityConfig.from_json(cfg.to_json()) == cfg
    assert SparsityConfig.from_json(cfg.to_json()).lowrank == "activation"
    assert SparsityConfig().lowrank == "svd"
    assert SparsityConfig(method="rsparse", lowrank="activation").needs_calibration
    assert not SparsityConfig(method="rsparse").needs_calibration
    with pytest.raises(ValueError, match="lowrank"):
        SparsityConfig(method="rsparse", lowrank="asvd")
    d = cfg.to_dict()
    del d["lowrank"]  # configs written before the field: plain SVD
    assert SparsityConfig.from_dict(d).lowrank == "svd"


def test_activation_lowrank_without_calibration_is_a_clear_error(model):
    with pytest.raises(ValueError, match="needs calibration"):
        si.sparsify(model, SparsityConfig(method="rsparse", sparsity=0.5, lowrank="activation"), progress=False)
    assert not si.sparse_modules(model)


def test_importance_thresholds_hit_their_density_before_refinement(model):
    """R-Sparse gates on |x|·‖W[:, i]‖: thresholds read off the importance histogram hit each layer's density
    without the refinement passes (which would hide a histogram that ignored the scale)."""
    cfg = SparsityConfig(method="rsparse", sparsity=0.5, targets="mlp", allocation="uniform")
    data = _data(0, 48, 32)
    cal = calibrate(model, data, cfg, progress=False, refine_rounds=0)
    with dense_after(model):
        si.sparsify(model, cfg, calibration=cal, progress=False)
        for name, m in run_with_stats(model, data).items():
            assert m.target_density is not None and abs(m.measured_density - m.target_density) <= 0.02, name


def test_rank_at_reads_the_grid_point_of_a_sparsity():
    """A sparsity maps to the grid point at or above it, robust to float error (0.58 * 100 = 57.999...)."""
    curve = allocate.Curve(name="l", kind="linear", method="rsparse", in_features=8, out_features=8, dense=64.0,
                           err=torch.zeros(allocate.FINE, dtype=torch.float64), rank=torch.arange(allocate.FINE),
                           group="mlp", depth=0.0)
    assert [curve.rank_at(s) for s in (0.0, 0.29, 0.5, 0.505, 0.58, 0.99)] == [0, 29, 50, 51, 58, 99]


def test_calibrate_without_data_reads_the_calibration_tail_of_the_default_text(tmp_path, monkeypatch):
    model = tiny_model("llama")
    cfg = SparsityConfig(method="threshold", sparsity=0.5)
    with pytest.raises(ValueError, match="calibration data is None: pass token-id tensors, or tokenizer="):
        calibrate(model, None, cfg, progress=False, quick=True)
    text = tmp_path / "corpus.txt"
    text.write_text(short_text(2000), encoding="utf-8")  # ASCII: byte ids inside the tiny vocabulary
    monkeypatch.setenv("SPARSE_INFER_TEXT", str(text))
    cal = calibrate(model, None, cfg, tokenizer=ByteTokenizer(), progress=False, quick=True, num_samples=2, seq_len=64)
    split = cal.meta["calibration"]["split"]
    n = len(text.read_text(encoding="utf-8"))
    assert split["total_tokens"] == n and split["num_samples"] == 2 and split["seq_len"] == 64
    cut = split["eval_token_range"][1]
    assert cut == split["calib_token_range"][0] and abs(cut - 0.8 * n) <= 1  # evaluation never reads past the cut
    assert split["calib_token_range"][1] == cut + 2 * 64
    assert cal.layers and all(layer["threshold"] is not None for layer in cal.layers.values())
