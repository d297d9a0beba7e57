"""A calibration serves the config it was made for: per-layer overrides are calibrated, a config that
differs in what the calibration depends on is refused, a sparsity file recognises its checkpoint by
its weights, and a file saved for the GPU backend still loads on the CPU when asked to."""

import pytest
import torch

import sparse_infer as si
from sparse_infer import SparsityConfig
from sparse_infer.models import tiny_model


def _calib(n=3, length=48):
    return [torch.randint(1, 128, (1, length), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def _measured(model, name_part):
    """Measured density of the patched modules whose name contains ``name_part``, over the calibration text."""
    si.record_stats(model)
    with torch.no_grad():
        for ids in _calib():
            model(ids)
    mods = [m for n, m in si.sparse_modules(model).items() if name_part in n]
    return sum(m.measured_density for m in mods) / len(mods)


@pytest.mark.parametrize("method", ["threshold", "rsparse"])
def test_calibrate_applies_sparsity_overrides(method):
    """An override is applied last, by calibrate as by sparsify: the overridden layers get thresholds
    (and ranks) fitted at their own sparsity, and the model runs at it."""
    model = tiny_model("llama")
    cfg = SparsityConfig(method=method, sparsity=0.5, overrides={"*down_proj": {"sparsity": 0.1}})
    cal = si.calibrate(model, _calib(), cfg, progress=False, quick=True)
    assert all(e["sparsity"] == pytest.approx(0.1) for n, e in cal.layers.items() if n.endswith("down_proj"))
    assert all(e["sparsity"] == pytest.approx(0.5) for n, e in cal.layers.items() if not n.endswith("down_proj"))
    si.sparsify(model, cfg, calibration=cal, progress=False)
    if method == "threshold":  # thresholds fitted on this very text: the density lands near the target
        assert _measured(model, "down_proj") == pytest.approx(0.9, abs=0.05)
        assert _measured(model, "up_proj") == pytest.approx(0.5, abs=0.05)
    else:  # the rank-aware layer spends part of its budget on the factor: fewer channels than 1 - s
        down = [m for n, m in si.sparse_modules(model).items() if n.endswith("down_proj")]
        assert all(m.nominal_density + m.rank * (m.in_features + m.out_features) / (m.in_features * m.out_features)
                   == pytest.approx(0.9, abs=0.02) for m in down)


def test_an_override_the_calibration_was_not_made_with_is_refused():
    model = tiny_model("llama")
    cfg = SparsityConfig(method="threshold", sparsity=0.5)
    cal = si.calibrate(model, _calib(), cfg, progress=False, quick=True)
    with_override = cfg.replace(overrides={"*down_proj": {"sparsity": 0.1}})
    with pytest.raises(ValueError, match=r"calibrated with overrides=\{\}; the config asks for overrides=\{'\*down_proj'"):
        si.sparsify(model, with_override, calibration=cal, progress=False)
    # a calibration that does not record its config (older files): the layer's threshold is checked instead
    cal.meta.pop("config")
    with pytest.raises(ValueError, match=r"down_proj: overrides set sparsity 0.1, but its calibrated threshold was "
                                         r"fitted for sparsity 0.5: calibrate with these overrides"):
        si.sparsify(model, with_override, calibration=cal, progress=False)
    assert not si.sparse_modules(model)


def test_a_calibration_file_made_with_other_settings_is_refused(tmp_path):
    model = tiny_model("llama")
    made = SparsityConfig(method="threshold", sparsity=0.5, allocation="greedy", per_channel=True)
    si.sparsify(model, made, calibration=_calib(), progress=False)
    si.save_sparsity(model, tmp_path / "greedy")
    si.unsparsify(model)
    asked = SparsityConfig(method="threshold", sparsity=0.5)
    with pytest.raises(ValueError, match=r"calibrated with allocation='greedy', per_channel=True; the config asks for "
                                         r"allocation='uniform', per_channel=False: use config.replace\("):
        si.sparsify(model, asked, calibration=tmp_path / "greedy", progress=False)
    assert not si.sparse_modules(model)
    si.sparsify(model, made, calibration=tmp_path / "greedy", progress=False)  # the matching config loads
    assert model.config.sparse_infer["config"]["allocation"] == "greedy"


def test_a_file_from_another_checkpoint_of_the_same_shapes_is_refused(tmp_path):
    """At real sizes the mean |w| of two random inits agrees within 1 %: 64 sampled weights tell them apart,
    while a bf16 cast of the same checkpoint still loads."""
    shape = dict(hidden_size=256, intermediate_size=1024, head_dim=64)
    model = si.sparsify(tiny_model("llama", seed=0, **shape), SparsityConfig(sparsity=0.5), progress=False)
    si.save_sparsity(model, tmp_path / "s")
    other = tiny_model("llama", seed=1, **shape)
    with pytest.raises(ValueError, match=r"mlp.gate_proj differ from those the file was made for \(64 sampled values "
                                         r"correlate at -?0\.\d\d.*another checkpoint"):
        si.load_sparsity(other, tmp_path / "s")
    assert not si.sparse_modules(other)
    same = tiny_model("llama", seed=0, dtype=torch.bfloat16, **shape)
    si.load_sparsity(same, tmp_path / "s")
    assert len(si.sparse_modules(same)) == 3 * len(same.model.layers)


def test_a_file_saved_for_the_triton_backend_loads_on_the_cpu_when_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would serve backend='triton' on the CPU
    model = si.sparsify(tiny_model("llama"), SparsityConfig(sparsity=0.5), progress=False)
    si.save_sparsity(model, tmp_path / "s")
    doc = tmp_path / "s" / "sparsity.json"
    doc.write_text(doc.read_text().replace('"backend": "auto"', '"backend": "triton"'))
    dense = tiny_model("llama")
    with pytest.raises(ValueError, match=r"saved with backend='triton', which needs the model on a CUDA device.*"
                                         r"load_sparsity\(model, path, backend='auto'\)"):
        si.load_sparsity(dense, tmp_path / "s")
    assert not si.sparse_modules(dense)
    si.load_sparsity(dense, tmp_path / "s", backend="auto")
    assert dense.config.sparse_infer["config"]["backend"] == "auto"
    ids = torch.randint(1, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, model(ids).logits)


def test_a_config_changed_after_construction_is_checked_again():
    model = tiny_model("llama")
    for field, value, match in [("method", "TopK", "unknown method 'TopK'"), ("mode", "Shared", "unknown mode"),
                                ("importance", "false", "importance must be bool"), ("sparsity", 1.5, "sparsity must lie")]:
        cfg = SparsityConfig()
        setattr(cfg, field, value)
        with pytest.raises((ValueError, TypeError), match=match):
            si.sparsify(model, cfg, progress=False)
        with pytest.raises((ValueError, TypeError), match=match):
            si.calibrate(model, _calib(1), cfg, progress=False)
    assert not si.sparse_modules(model) and not hasattr(model.config, "sparse_infer")


def test_numpy_scalars_are_numbers_and_from_dict_wants_a_dict():
    np = pytest.importorskip("numpy")
    cfg = SparsityConfig(sparsity=np.float32(0.25), seed=np.int64(3), rank_fraction=np.float32(0.5), method="rsparse",
                         dense_prefill_above=np.int64(8), overrides={"*": {"rank": np.int64(2)}})
    assert (cfg.sparsity, cfg.seed, cfg.rank_fraction, cfg.dense_prefill_above) == (0.25, 3, 0.5, 8)
    assert type(cfg.seed) is int and type(cfg.dense_prefill_above) is int
    assert SparsityConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(TypeError, match="sparsity must be a number"):
        SparsityConfig(sparsity=np.bool_(True))
    for bad in ("abc", [("method", "topk")], None):
        with pytest.raises(TypeError, match=r"from_dict expects a dict of fields, got"):
            SparsityConfig.from_dict(bad)


def test_calibration_of_the_wrong_type_is_named():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=r"calibration must be None, the path of a file .* got int"):
        si.sparsify(model, SparsityConfig(method="threshold"), calibration=5, progress=False)
    assert not si.sparse_modules(model)


def test_calibration_runs_without_autograd(monkeypatch):
    """calibrate is @torch.no_grad(): the allocation and refit passes build no graphs."""
    from sparse_infer import allocate

    seen = []
    real = allocate.to_calibration
    monkeypatch.setattr(allocate, "to_calibration", lambda *a, **k: (seen.append(torch.is_grad_enabled()), real(*a, **k))[1])
    si.calibrate(tiny_model("llama"), _calib(1), SparsityConfig(method="threshold"), progress=False, quick=True)
    assert seen == [False]
