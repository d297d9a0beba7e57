"""save_sparsity / load_sparsity / sparsify(calibration=path): safe, checked round trips."""

import json

import pytest
import torch
from conftest import dense_after

import sparse_infer as si
from sparse_infer import SparsityConfig
from sparse_infer.calibrate import calibrate
from sparse_infer.io import FORMAT_VERSION, load_calibration
from sparse_infer.models import tiny_model


def _data(seed, n=6, length=48):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (length,), generator=g) for _ in range(n)]


IDS = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(9))

CASES = {
    "rsparse-search": dict(method="rsparse", sparsity=0.5, targets="all", allocation="search"),
    "threshold-per-channel-greedy": dict(method="threshold", sparsity=0.6, targets="mlp", allocation="greedy", per_channel=True),
    "gate": dict(method="gate", sparsity=0.4, targets="all"),
    "topk-greedy": dict(method="topk", sparsity=0.5, targets="attn", allocation="greedy"),
    "rsparse-uniform-shared": dict(method="rsparse", sparsity=0.7, targets="mlp", mode="shared"),
    "rsparse-search-activation": dict(method="rsparse", sparsity=0.5, targets="mlp", allocation="search", lowrank="activation"),
}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """Each case calibrated, patched, its logits recorded and saved; the model left dense."""
    out = {}
    for name, kw in CASES.items():
        cfg = SparsityConfig(**kw)
        cal = calibrate(model, _data(0), cfg, progress=False, quick=True)
        si.sparsify(model, cfg, calibration=cal, progress=False)
        with torch.no_grad():
            logits = model(IDS).logits
        path = tmp_path_factory.mktemp(name)
        si.save_sparsity(model, path)
        hints = {n: m.target_density for n, m in si.sparse_modules(model).items()}
        si.unsparsify(model)
        out[name] = (cfg, logits, path, hints)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_identical_logits(model, saved, case):
    cfg, logits, path, hints = saved[case]
    with dense_after(model):
        si.load_sparsity(model, path)
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, logits)
        # the density each module tells the kernels (it picks the kernel's loop) survives the round trip
        loaded = {n: m.target_density for n, m in si.sparse_modules(model).items()}
        assert loaded.keys() == hints.keys()
        for n, d in hints.items():
            assert (d is None and loaded[n] is None) or loaded[n] == pytest.approx(d, abs=1e-9), n
        si.load_sparsity(model, path)  # an already patched model that matches: checked, kept
    with dense_after(model):
        si.sparsify(model, cfg, calibration=str(path), progress=False)  # the path form of sparsify
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, logits)


def test_file_contents(saved):
    _cfg, _logits, path, _hints = saved["rsparse-search"]
    doc = json.loads((path / "sparsity.json").read_text())
    assert doc["version"] == FORMAT_VERSION and doc["model"]["class"] == "LlamaForCausalLM"
    assert doc["method"] == "rsparse" and doc["budget_sparsity"] == 0.5
    assert abs(doc["achieved_sparsity"] - 0.5) < 0.05
    layer = doc["layers"]["model.layers.0.mlp.down_proj"]
    assert (layer["in"], layer["out"]) == (160, 64) and "rank" in layer
    assert doc["calibration"]["calibration"]["calibration_tokens"] == 6 * 48  # the split / data record
    assert doc["calibration"]["search"]["kl_best"] <= doc["calibration"]["search"]["kl_greedy"]
    raw = (path / "sparsity.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + header_len])["__metadata__"]["format"] == "sparse-infer/sparsity"  # plain safetensors


def _untouched(model):
    assert not si.sparse_modules(model)


@pytest.mark.parametrize("other, match", [
    (lambda: tiny_model("qwen2"), "made for a LlamaForCausalLM"),
    (lambda: tiny_model("llama", intermediate_size=96), "160x64 in the file but linear 96x64"),
    (lambda: tiny_model("llama", num_hidden_layers=3), "other layers"),
    (lambda: tiny_model("llama", seed=1), "another checkpoint"),
])
def test_wrong_model_is_rejected(saved, other, match):
    m = other()
    _cfg, _logits, path, _hints = saved["rsparse-search"]
    with pytest.raises(ValueError, match=match):
        si.load_sparsity(m, path)
    _untouched(m)
    with pytest.raises(ValueError, match=match):
        si.sparsify(m, SparsityConfig(**CASES["rsparse-search"]), calibration=path, progress=False)
    _untouched(m)


def test_config_mismatch_and_patched_mismatch(model, saved):
    _cfg, _logits, path, _hints = saved["rsparse-search"]
    with pytest.raises(ValueError, match="method='rsparse'"):
        load_calibration(model, path, SparsityConfig(method="topk", targets="all"))
    with dense_after(model):
        si.sparsify(model, SparsityConfig(method="rsparse", sparsity=0.5, targets="all"), progress=False)
        with pytest.raises(ValueError, match="patched differently|other"):
            si.load_sparsity(model, path)
    # the same layers, k, rank and factors, but per-token masks where the file says shared
    cfg, _logits, path, _hints = saved["rsparse-uniform-shared"]
    with dense_after(model):
        si.sparsify(model, cfg.replace(mode="per_token"), calibration=path, progress=False)
        with pytest.raises(ValueError, match=r"patched with other settings .*mode: 'per_token' here, 'shared' in the file"):
            si.load_sparsity(model, path)


def test_corrupted_and_unknown_version(model, saved, tmp_path):
    import shutil

    _cfg, _logits, path, _hints = saved["gate"]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    t = bad / "sparsity.safetensors"
    t.write_bytes(t.read_bytes()[:-7])
    with pytest.raises(ValueError, match="corrupted"):
        si.load_sparsity(model, bad)
    _untouched(model)

    shutil.rmtree(bad)
    shutil.copytree(path, bad)
    (bad / "sparsity.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        si.load_sparsity(model, bad)

    with pytest.raises(ValueError, match="format version 99"):
        si.load_sparsity(model, _edit(path, tmp_path, lambda d: d.update(version=99)))
    with pytest.raises(ValueError, match="not a sparsity file"):
        si.load_sparsity(model, tmp_path / "missing")
    _untouched(model)


def test_save_needs_a_patched_model(model, tmp_path):
    with pytest.raises(ValueError, match="patched by sparse_infer.sparsify"):
        si.save_sparsity(model, tmp_path)


def test_single_file_form(model, tmp_path):
    cfg = SparsityConfig(method="topk", sparsity=0.5)
    si.sparsify(model, cfg, progress=False)
    with torch.no_grad():
        ref = model(IDS).logits
    si.save_sparsity(model, tmp_path / "s.safetensors")
    si.unsparsify(model)
    assert (tmp_path / "s.json").is_file()
    with dense_after(model):
        si.load_sparsity(model, tmp_path / "s.safetensors")
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref)


def _edit(path, tmp_path, change):
    """A copy of the saved files at ``path`` with ``change(doc)`` applied to its JSON (not hashed: only
    the tensors file carries a SHA-256, so these edits reach the per-field checks)."""
    import shutil

    bad = tmp_path / "edited"
    shutil.copytree(path, bad)
    doc = json.loads((bad / "sparsity.json").read_text())
    change(doc)
    (bad / "sparsity.json").write_text(json.dumps(doc))
    return bad


def _first_layer(doc):
    return next(iter(doc["layers"]))


@pytest.mark.parametrize("change, match", [
    (lambda d: d["layers"].update({_first_layer(d): 3}), r"is corrupted: the entry of layer .* is 3, not a dict"),
    (lambda d: d["layers"][_first_layer(d)].update(sparsity="half"),
     r"is corrupted: the sparsity of layer .* is 'half', not a number"),
    (lambda d: d["layers"][_first_layer(d)].update(fingerprint="x"),
     r"is corrupted: the fingerprint of .* is 'x', not a number"),
    (lambda d: d["config"].update(method="magic"), r"its config is invalid \(unknown method 'magic'.*save the sparsity file again"),
    (lambda d: d.pop("layers"), r"its 'layers' entry is missing"),
])
def test_edited_json_is_refused_by_load_and_sparsify(model, saved, tmp_path, change, match):
    cfg, _logits, path, _hints = saved["rsparse-search"]
    bad = _edit(path, tmp_path, change)
    with pytest.raises(ValueError, match=match):
        si.load_sparsity(model, bad)
    _untouched(model)
    with pytest.raises(ValueError, match=match):
        si.sparsify(model, cfg, calibration=bad, progress=False)
    _untouched(model)


def test_loading_into_a_model_patched_on_other_layers_is_refused(model, saved):
    _cfg, _logits, path, _hints = saved["rsparse-search"]  # targets "all"
    with dense_after(model):
        si.sparsify(model, SparsityConfig(method="rsparse", sparsity=0.5, targets="mlp"), progress=False)
        before = {n: (m.k, m.rank) for n, m in si.sparse_modules(model).items()}
        with pytest.raises(ValueError, match="sparsified on other layers than .*; unsparsify it first"):
            si.load_sparsity(model, path)
        assert {n: (m.k, m.rank) for n, m in si.sparse_modules(model).items()} == before
