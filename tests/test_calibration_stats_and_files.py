"""Calibration statistics and sparsity files: bounds, seeds and every check on reuse and load.

collect_stats honours its bounds (KL windows, refinement tokens, num_samples, reservoir) and
its seed, long strings are cut into windows, reused statistics are checked, NaN stays active
in the histograms; a sparsity file is refused when any part of it (format, version, model
type, tensor file, factor shapes) does not fit, and an already patched model is compared
with it value by value.
"""

import json
import shutil

import pytest
import torch

import sparse_infer as si
from sparse_infer import SparsityConfig
from sparse_infer.calibrate import BINS, Calibration, _hist, _log_abs, calibrate, collect_stats, hist_quantile
from sparse_infer.io import load_calibration
from sparse_infer.models import tiny_model
from conftest import dense_after, token_ids


IDS = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(9))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [1 + ord(c) % 127 for c in text]}


# --------------------------------------------------------------------------- statistics
THRESHOLD = SparsityConfig(method="threshold", sparsity=0.5, targets="mlp")


def test_kl_windows_and_refinement_tokens_are_bounded(model):
    stats = collect_stats(model, token_ids(0, n=4, length=32), THRESHOLD, progress=False, kl_samples=2, kl_tokens=20,
                          refine_tokens=40)
    assert [len(t) for t in stats.kl_inputs] == [20, 20] and stats.meta["kl_windows"] == [20, 20]
    assert [tuple(t.shape) for t in stats.kl_dense] == [(20, 128), (20, 128)]
    assert sum(len(t) for t in stats.refine_inputs) == 40 == stats.meta["refine_tokens"]


def test_num_samples_stops_the_pass(model):
    stats = collect_stats(model, token_ids(0, n=8), THRESHOLD, progress=False, num_samples=3)
    assert stats.meta["calibration_sequences"] == 3 and stats.meta["calibration_tokens"] == 3 * 32
    assert all(st.tokens == 3 * 32 for st in stats.layers.values())


def test_reservoir_is_all_tokens_when_there_are_fewer(model):
    stats = collect_stats(model, token_ids(0, n=2), THRESHOLD, progress=False, reservoir=512)
    assert stats.meta["reservoir_tokens"] == 64
    assert all(st.sample.shape[0] == 64 for st in stats.layers.values())


def test_reservoir_sample_follows_the_seed(model):
    def sample(seed):
        stats = collect_stats(model, token_ids(0, n=4), THRESHOLD.replace(seed=seed), progress=False, reservoir=16)
        return stats.layers["model.layers.0.mlp.up_proj"].sample

    a = sample(1)
    assert torch.equal(sample(1), a)
    assert not torch.equal(sample(2), a)


def test_long_strings_are_cut_into_windows_of_seq_len(model):
    text = "The quick brown fox jumps over the lazy dog. " * 2 + "!!!!!!!!!!"  # 100 characters
    stats = collect_stats(model, [text], THRESHOLD, tokenizer=_CharTokenizer(), progress=False, seq_len=32)
    assert stats.meta["calibration_tokens"] == 100 and stats.meta["calibration_sequences"] == 4  # 32 + 32 + 32 + 4


def test_three_dimensional_samples_are_a_clear_error(model):
    with pytest.raises(ValueError, match=r"1-D \(seq,\) or 2-D"):
        calibrate(model, [torch.randint(1, 128, (2, 2, 8))], THRESHOLD, progress=False)


def test_histogram_counts_nan_as_active():
    """NaN inputs stay active in every mask, so the threshold that drops a fraction q of all values must
    count them above it: 30 % NaN, q = 0.5 drops half of all values, all finite."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10000, generator=g) + 0.1
    x[:3000] = float("nan")
    t = hist_quantile(_hist(_log_abs(x)), 0.5)
    assert abs(float((x <= t).float().mean()) - 0.5) < 0.005


def test_empty_histogram_is_a_clear_error():
    with pytest.raises(ValueError, match="no calibration values"):
        hist_quantile(torch.zeros(BINS, dtype=torch.float64), 0.5)


def test_reused_statistics_are_checked_against_config_and_model(model):
    stats = collect_stats(model, token_ids(0, n=2), THRESHOLD, progress=False)
    with pytest.raises(ValueError, match="collected for"):  # per-channel thresholds need per-channel histograms
        calibrate(model, stats, THRESHOLD.replace(per_channel=True), progress=False)
    deeper = tiny_model("llama", num_hidden_layers=3)
    deep_stats = collect_stats(deeper, token_ids(0, n=2), THRESHOLD, progress=False)
    with pytest.raises(ValueError, match="another model"):
        calibrate(model, deep_stats, THRESHOLD, progress=False)


@pytest.mark.parametrize("other", [
    lambda: tiny_model("llama", seed=1),  # same architecture and layer names, other checkpoint
    lambda: tiny_model("llama", intermediate_size=96),  # same layer names, other shapes
], ids=["other_checkpoint", "other_shapes"])
def test_statistics_of_other_weights_are_refused(model, other):
    """Statistics cache SVDs and error tables of the weights they saw: another checkpoint needs its own pass."""
    rsparse = SparsityConfig(method="rsparse", sparsity=0.8, targets="mlp", allocation="greedy")
    stats = collect_stats(model, token_ids(0, n=2), rsparse, progress=False)
    calibrate(model, stats, rsparse, progress=False)  # the model they came from takes them
    with pytest.raises(ValueError, match=r"collected on other weights \(model\.layers\.0\.mlp\.gate_proj differs"):
        calibrate(other(), stats, rsparse, progress=False)


def test_refine_rounds_are_honoured(model):
    stats = collect_stats(model, token_ids(0, n=2), THRESHOLD, progress=False)
    for rounds in (1, 3):
        cal = calibrate(model, stats, THRESHOLD, progress=False, refine_rounds=rounds)
        assert len(cal.meta["refine_gaps"]) == rounds


def test_topk_gating_gives_exact_k_per_token(model):
    cfg = SparsityConfig(method="rsparse", sparsity=0.5, targets="mlp", allocation="greedy")
    cal = calibrate(model, token_ids(0, n=2), cfg, progress=False, gating="topk")
    assert cal.meta["gating"] == "topk"
    assert all(e.get("threshold") is None for e in cal.layers.values())
    with dense_after(model):
        si.sparsify(model, cfg, calibration=cal, progress=False)
        assert all(m.k is not None and m.threshold is None for m in si.sparse_modules(model).values())


# --------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    """name -> (config, folder, logits of the patched model); the model is left dense."""
    cases = {
        "threshold-a": (THRESHOLD, token_ids(0)),
        "threshold-b": (THRESHOLD, token_ids(1)),
        "rsparse": (SparsityConfig(method="rsparse", sparsity=0.5, targets="mlp"), None),
        "topk-greedy": (SparsityConfig(method="topk", sparsity=0.55, targets="mlp", allocation="greedy"), token_ids(0)),
        "topk-uniform": (SparsityConfig(method="topk", sparsity=0.55, targets="mlp"), None),
    }
    out = {}
    for name, (cfg, data) in cases.items():
        with dense_after(model):
            si.sparsify(model, cfg, calibration=data, progress=False)
            with torch.no_grad():
                logits = model(IDS).logits
            path = tmp_path_factory.mktemp(name)
            si.save_sparsity(model, path)
        out[name] = (cfg, path, logits)
    return out


def _copy(path, tmp_path, edit=None):
    bad = tmp_path / "copy"
    shutil.copytree(path, bad)
    if edit is not None:
        doc = json.loads((bad / "sparsity.json").read_text())
        edit(doc)
        (bad / "sparsity.json").write_text(json.dumps(doc))
    return bad


def _refused(model, path, match):
    with dense_after(model):
        with pytest.raises(ValueError, match=match):
            si.load_sparsity(model, path)
        assert not si.sparse_modules(model)  # refused before the model is touched


def test_json_path_names_the_pair(model, files):
    _cfg, path, logits = files["topk-greedy"]
    with dense_after(model):
        si.load_sparsity(model, path / "sparsity.json")
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, logits)


def test_file_records_the_achieved_sparsity(model, files):
    _cfg, path, _logits = files["topk-uniform"]
    doc = json.loads((path / "sparsity.json").read_text())
    with dense_after(model):
        si.load_sparsity(model, path)
        achieved = si.model_sparsity(model)
    assert doc["achieved_sparsity"] == pytest.approx(achieved, abs=1e-12)
    assert doc["achieved_sparsity"] != doc["budget_sparsity"]  # k is rounded down: 0.55 is not hit exactly


def test_explicit_calibration_meta_is_recorded(model, files, tmp_path):
    _cfg, path, _logits = files["threshold-a"]
    with dense_after(model):
        si.load_sparsity(model, path)
        si.save_sparsity(model, tmp_path / "out", calibration=Calibration(meta={"note": "mine"}))
    doc = json.loads((tmp_path / "out" / "sparsity.json").read_text())
    assert doc["calibration"] == {"note": "mine"}


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(format="something-else"), "not a sparse-infer sparsity file"),
    (lambda d: d.update(version=0), "format version 0"),
    (lambda d: d.pop("version"), "format version None"),
    (lambda d: d.update(model=None), "'model' entry is missing"),
    (lambda d: d["model"].update(model_type="mistral"), "made for a LlamaForCausalLM"),
])
def test_json_that_does_not_fit_is_refused(model, files, tmp_path, edit, match):
    _cfg, path, _logits = files["rsparse"]
    _refused(model, _copy(path, tmp_path, edit), match)


def test_misshapen_factors_are_refused(model, files, tmp_path):
    _cfg, path, _logits = files["rsparse"]

    def edit(doc):
        layer = doc["layers"]["model.layers.0.mlp.up_proj"]
        assert layer["rank"] > 1
        layer["rank"] -= 1

    _refused(model, _copy(path, tmp_path, edit), "corrupted: the low-rank factors of model.layers.0.mlp.up_proj")


def test_tensor_file_of_another_save_is_refused(model, files, tmp_path):
    """Both files are valid and have the same keys and shapes; only the SHA-256 recorded in the JSON tells them apart."""
    a, b = files["threshold-a"][1], files["threshold-b"][1]
    bad = _copy(a, tmp_path)
    shutil.copy(b / "sparsity.safetensors", bad / "sparsity.safetensors")
    _refused(model, bad, "does not match")


def test_a_file_for_other_targets_is_refused(model, files):
    _cfg, path, _logits = files["threshold-a"]
    with pytest.raises(ValueError, match="targets='mlp'"):
        load_calibration(model, path, THRESHOLD.replace(targets="all"))
    with dense_after(model):
        with pytest.raises(ValueError, match="targets"):
            si.sparsify(model, THRESHOLD.replace(targets="all"), calibration=path, progress=False)
        assert not si.sparse_modules(model)


def test_patched_model_is_compared_with_the_file_value_by_value(model, files):
    """load_sparsity on an already patched model accepts it only when it is patched as the file says."""
    cfg, a, _ = files["threshold-a"]
    _cfg, b, _ = files["threshold-b"]
    with dense_after(model):
        si.sparsify(model, cfg, calibration=b, progress=False)  # same layers and method, other thresholds
        with pytest.raises(ValueError, match="other thresholds"):
            si.load_sparsity(model, a)

    cfg, greedy, _ = files["topk-greedy"]
    with dense_after(model):
        si.sparsify(model, cfg.replace(allocation="uniform"), progress=False)  # same modules, other k
        with pytest.raises(ValueError, match="patched with other settings .*allocation: 'uniform' here, 'greedy'"):
            si.load_sparsity(model, greedy)

    _cfg, rs, _ = files["rsparse"]
    with dense_after(model):
        si.load_sparsity(model, rs)
        m = si.sparse_modules(model)["model.layers.1.mlp.down_proj"]
        with torch.no_grad():
            m.A.mul_(1.01)  # the factors changed after loading
        with pytest.raises(ValueError, match="other low-rank factors"):
            si.load_sparsity(model, rs)
