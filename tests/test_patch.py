"""One-call patching of tiny random models of every supported family."""

import json

import pytest
import torch
import torch.nn as nn

import sparse_infer as si
from conftest import DEVICE
from sparse_infer import SparsityConfig
from sparse_infer.models import tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]
METHODS = ["topk", "threshold", "gate", "rsparse"]


def _ids(seed=0, batch=2, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, length), generator=g)


def _patch(model, method, sparsity, targets="all"):
    targets = "mlp" if method == "gate" and targets == "attn" else targets
    cfg = SparsityConfig(method=method, sparsity=sparsity, targets=targets)
    cal = [_ids(seed=1)] if cfg.needs_calibration else None
    return si.sparsify(model, cfg, calibration=cal, progress=False)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


@torch.no_grad()
def test_every_family_every_method(family_model):
    family, model = family_model
    ids = _ids()
    dense = model(ids).logits
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    for method in METHODS:
        _patch(model, method, 0.0)
        assert torch.allclose(model(ids).logits, dense, atol=1e-5), f"{family}/{method} differs at sparsity 0"
        si.unsparsify(model)
        _patch(model, method, 0.5)
        out = model(ids).logits
        assert torch.isfinite(out).all(), f"{family}/{method}"
        assert not torch.allclose(out, dense, atol=1e-4), f"{family}/{method} had no effect at 0.5"
        assert list(model.state_dict()) == keys
        assert all(p is params[n] for n, p in model.named_parameters())
        si.unsparsify(model)
        assert torch.equal(model(ids).logits, dense), f"{family}/{method}: unsparsify is not exact"
    assert not si.sparse_modules(model)


def test_each_family_is_found_by_its_own_entry(family_model):
    family, model = family_model
    from sparse_infer.patch import find_family

    found = find_family(model)
    assert family in found.model_types and found.name != "generic gate/up/down decoder"


def test_shared_threshold_needs_no_calibration():
    """Shared masks rank channels per decode step (top-k on the step's RMS), so no thresholds to calibrate."""
    model = tiny_model("llama")
    si.sparsify(model, SparsityConfig(method="threshold", sparsity=0.5, mode="shared"), progress=False)
    assert si.sparse_modules(model)


@torch.no_grad()
def test_generate_batch2_with_padding(family_model):
    family, model = family_model
    _patch(model, "topk", 0.5, targets="mlp")
    ids = _ids(length=6)
    attn = torch.ones_like(ids)
    ids[0, :2] = model.config.pad_token_id  # left padding on the first row
    attn[0, :2] = 0
    out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=4, do_sample=False, pad_token_id=model.config.pad_token_id)
    assert out.shape == (2, 10)
    si.unsparsify(model)


def test_state_dict_roundtrip_into_dense():
    model = tiny_model("llama")
    _patch(model, "rsparse", 0.5)
    sd = model.state_dict()
    dense = tiny_model("llama", seed=1)
    dense.load_state_dict(sd)  # keys and shapes of a dense model
    si.unsparsify(model)
    for (n, a), (_, b) in zip(model.state_dict().items(), dense.state_dict().items()):
        assert torch.equal(a, b), n


def test_model_sparsity_and_config_record():
    model = tiny_model("qwen2")
    si.sparsify(model, SparsityConfig(method="topk", sparsity=0.5, targets="all"))
    assert si.model_sparsity(model) == pytest.approx(0.5, abs=0.02)
    assert model.config.sparse_infer["config"]["method"] == "topk"
    si.unsparsify(model)
    assert not hasattr(model.config, "sparse_infer")


def test_gate_attn_uses_topk_and_mlp_is_replaced_whole():
    model = tiny_model("llama")
    si.sparsify(model, SparsityConfig(method="gate", sparsity=0.3, targets="all"))
    layer = model.model.layers[0]
    assert isinstance(layer.mlp, si.SparseGatedMLP)
    assert isinstance(layer.self_attn.q_proj, si.SparseLinear)
    si.unsparsify(model)


def test_overrides_apply_per_layer():
    model = tiny_model("llama")
    cfg = SparsityConfig(sparsity=0.5, overrides={"*.layers.1.mlp.*": {"sparsity": 0.0}})
    si.sparsify(model, cfg)
    assert model.model.layers[1].mlp.up_proj.k == 64
    assert model.model.layers[0].mlp.up_proj.k == 32
    si.unsparsify(model)


class _NotADecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)


def test_unsupported_model_names_class_and_families():
    m = _NotADecoder()
    before = list(m.state_dict())
    with pytest.raises(ValueError, match=r"_NotADecoder .* not supported.*Llama, Mistral, Qwen2, Qwen3, Gemma"):
        si.sparsify(m, SparsityConfig())
    assert list(m.state_dict()) == before and isinstance(m.fc, nn.Linear)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sparsity": 1.0}, r"sparsity must lie in \[0, 1\)"),
        ({"sparsity": -0.1}, r"sparsity must lie in \[0, 1\)"),
        ({"method": "magic"}, "unknown method 'magic'"),
        ({"targets": "lm_head"}, "unknown targets"),
        ({"method": "gate", "sparsity": 0.7}, "at most 66.7%"),
        ({"method": "rsparse", "overrides": {"*": {"rank": -1}}}, "rank must be a non-negative int"),
        ({"overrides": {"*": {"rank": 4}}}, "'rank' applies to method 'rsparse' only"),
        ({"overrides": {1: {"sparsity": 0.5}}}, "overrides keys are fnmatch patterns"),
        ({"importance": "false"}, "importance must be bool or NoneType"),
        ({"per_channel": "yes"}, "per_channel must be bool"),
        ({"method": "gate", "per_channel": True}, "per_channel applies to method 'threshold' only, not 'gate'"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"version": True}, "version must be an int"),
        ({"rank_fraction": "0.3"}, r"rank_fraction must be a number in \[0, 1\)"),
        ({"method": "rsparse", "rank_fraction": 1.0}, r"rank_fraction must be a number in \[0, 1\)"),
        ({"method": "gate", "sparsity": 2 / 3}, "at most 66.7%"),
        ({"dense_prefill_above": 0}, "dense_prefill_above must be None or a positive token count"),
        ({"dense_prefill_above": True}, "dense_prefill_above must be None or a positive token count"),
        ({"allocation": "optimal"}, "unknown allocation 'optimal'; expected one of"),
        ({"backend": "cuda"}, "unknown backend 'cuda'; expected one of"),
        ({"mode": "batch"}, "unknown mode 'batch'; expected one of"),
        ({"lowrank": "pca"}, "unknown lowrank 'pca'; expected one of"),
        ({"overrides": [("*", {"sparsity": 0.5})]}, "overrides must be a dict"),
        ({"overrides": {"*": 0.5}}, r"overrides\['\*'\] must be a dict"),
        ({"overrides": {"*": {"density": 0.5}}}, r"unknown keys \['density'\]; allowed: 'sparsity', 'rank'"),
        ({"overrides": {"*": {"sparsity": 1.5}}}, r"overrides\['\*'\]: sparsity must lie in \[0, 1\)"),
        ({"version": 2}, "config version 2 is not supported"),
    ],
)
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SparsityConfig(**kwargs)


def test_bad_plan_leaves_model_untouched():
    model = tiny_model("llama")
    ids = _ids()
    dense = model(ids).logits
    cfg = SparsityConfig(method="rsparse", sparsity=0.5, overrides={"*.layers.1.mlp.down_proj": {"rank": 10_000}})
    with pytest.raises(ValueError, match="rank=10000 is outside"):
        si.sparsify(model, cfg)
    assert not si.sparse_modules(model)
    assert torch.equal(model(ids).logits, dense)


def test_threshold_without_calibration_is_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs calibration"):
        si.sparsify(model, SparsityConfig(method="threshold"))
    assert not si.sparse_modules(model)


def test_double_sparsify_is_refused():
    model = tiny_model("llama")
    si.sparsify(model, SparsityConfig())
    with pytest.raises(ValueError, match="already sparsified"):
        si.sparsify(model, SparsityConfig())


def test_config_json_roundtrip():
    cfg = SparsityConfig(method="rsparse", sparsity=0.7, overrides={"*.0.*": {"rank": 3}}, mode="shared")
    again = SparsityConfig.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["version"] == 1
    with pytest.raises(ValueError, match="unknown SparsityConfig fields"):
        SparsityConfig.from_dict({"methd": "topk"})


def test_register_family_is_one_entry():
    fam = si.Family("Toy", ("toy",))
    si.register_family(fam)
    try:
        assert si.FAMILIES[-1] is fam
    finally:
        si.FAMILIES.remove(fam)


@torch.no_grad()
@pytest.mark.parametrize("method", ["threshold", "rsparse", "gate"])
def test_shared_mode_holds_the_budget_at_any_batch(method):
    """One mask per decode step, sized by k: the measured sparsity is the target at batch 1 and 4."""
    model = tiny_model("llama")
    cfg = SparsityConfig(method=method, sparsity=0.4, mode="shared")
    si.sparsify(model, cfg, calibration=[_ids(seed=3, length=32)], progress=False)
    for batch in (1, 4):
        for m in si.sparse_modules(model).values():
            m.record_stats = True
            m.reset_stats()
        model(_ids(seed=4, batch=batch, length=8))
        assert si.model_sparsity(model, measured=True) == pytest.approx(0.4, abs=0.02), batch


@torch.no_grad()
@pytest.mark.parametrize("method,importance", [("topk", True), ("rsparse", None)])
def test_weights_loaded_into_a_patched_model_refit_its_derived_state(method, importance):
    """Importance scales and SVD factors follow weights loaded after patching; unsparsify hands them back."""
    ids = _ids()
    cfg = SparsityConfig(method=method, sparsity=0.5, importance=importance)
    other = tiny_model("llama", seed=1)
    want = si.sparsify(tiny_model("llama", seed=1), cfg, progress=False)(ids).logits
    for assign in (False, True):
        model = si.sparsify(tiny_model("llama", seed=0), cfg, progress=False)
        model.load_state_dict(other.state_dict(), assign=assign)
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
        si.unsparsify(model)
        torch.testing.assert_close(model(ids).logits, other(ids).logits, rtol=0, atol=0)


def test_activation_fitted_factors_warn_when_weights_change():
    model = si.sparsify(tiny_model("llama"), SparsityConfig(method="rsparse", sparsity=0.5, lowrank="activation"),
                        calibration=[_ids(seed=1)], progress=False)
    with pytest.warns(UserWarning, match="fitted to calibration activations"):
        model.load_state_dict(tiny_model("llama", seed=1).state_dict())


@pytest.mark.parametrize(
    "kwargs,calibration_kwargs,match",
    [
        ({"overrides": {"*.mlp.down": {"sparsity": 0.9}}}, None, r"overrides pattern '\*.mlp.down' matches none"),
        ({"method": "threshold", "sparsity": 0.2}, {"method": "threshold", "sparsity": 0.5}, "calibrated for sparsity 0.5"),
        ({"method": "topk", "sparsity": 0.5}, {"method": "threshold", "sparsity": 0.5}, r"(calibrated for method |holds method=)'threshold'"),
    ],
)
def test_config_and_calibration_must_agree(kwargs, calibration_kwargs, match, tmp_path):
    model = tiny_model("llama")
    cal = None
    if calibration_kwargs:
        cal_cfg = SparsityConfig(**calibration_kwargs)
        si.sparsify(model, cal_cfg, calibration=[_ids(seed=1)], progress=False)
        si.save_sparsity(model, tmp_path / "cal")
        si.unsparsify(model)
        cal = si.calibrate(model, [_ids(seed=1)], cal_cfg, progress=False)
    for calibration in ([cal, tmp_path / "cal"] if cal is not None else [None]):
        with pytest.raises(ValueError, match=match):
            si.sparsify(model, SparsityConfig(**kwargs), calibration=calibration, progress=False)
        assert not si.sparse_modules(model)


def test_calibration_of_another_model_is_refused():
    """An in-memory calibration is checked against the model like a file is."""
    cfg = SparsityConfig(method="rsparse", sparsity=0.5)
    cal = si.calibrate(tiny_model("llama", intermediate_size=96), [_ids(seed=1)], cfg, progress=False)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="made for another model; calibrate this one"):
        si.sparsify(model, cfg, calibration=cal, progress=False)
    assert not si.sparse_modules(model)
    other_layers = si.calibrate(tiny_model("llama", num_hidden_layers=3), [_ids(seed=1)], cfg, progress=False)
    with pytest.raises(ValueError, match="holds layers this model does not patch"):
        si.sparsify(model, cfg, calibration=other_layers, progress=False)


def test_triton_backend_on_weights_it_cannot_serve_fails_at_patch_time(monkeypatch):
    model = tiny_model("llama", dtype=torch.float64).to(DEVICE)
    with pytest.raises(ValueError, match=r"serves .* not torch.float64: cast the model"):
        si.sparsify(model, SparsityConfig(backend="triton"))
    assert not si.sparse_modules(model)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU model without the interpreter: no kernel can run
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        si.sparsify(tiny_model("llama"), SparsityConfig(backend="triton"))


def test_mixture_of_experts_layers_are_named_in_the_error():
    """A decoder whose first layer is a dense gated MLP but later ones are MoE blocks is refused whole."""
    model = tiny_model("qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, mlp_only_layers=[0])
    with pytest.raises(ValueError, match=r"layer 1: its mlp is a Qwen2MoeSparseMoeBlock.*supported are Llama"):
        si.sparsify(model, SparsityConfig())
    assert not si.sparse_modules(model)


class _NormedMLP(nn.Module):
    """BitNet's shape: a norm between the gated product and down_proj."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.sub_norm = nn.LayerNorm(mlp.gate_proj.out_features)

    def forward(self, x):
        return self.down_proj(self.sub_norm(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class _SelfSparseMLP(nn.Module):
    """Gemma 3n's shape: the MLP gates its own activation (no extra weights to give it away)."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def forward(self, x):
        g = self.gate_proj(x)
        g = torch.where(g > g.mean(-1, keepdim=True), g, torch.zeros_like(g))
        return self.down_proj(self.act_fn(g) * self.up_proj(x))


class _DropoutMLP(nn.Module):
    """Seed-OSS's shape: dropout on the product, inactive in eval mode."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.down_proj(self.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


def _with_mlp(wrap, layer=1):
    model = tiny_model("llama", num_hidden_layers=2)
    mlp = model.model.layers[layer].mlp
    model.model.layers[layer].mlp = wrap(mlp)
    return model


@pytest.mark.parametrize("wrap,match", [
    (_NormedMLP, r"layers\.1\.mlp \(_NormedMLP\) also holds \['sub_norm\.weight', 'sub_norm\.bias'\]"),
    (_SelfSparseMLP, r"layers\.1\.mlp \(_SelfSparseMLP\) computes something other than down\(act\(gate\(x\)\) \* up\(x\)\)"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_refuses_an_mlp_it_would_change_and_leaves_the_model_untouched(wrap, match, dtype):
    """Method 'gate' swaps the whole MLP for its own formula: an MLP that computes more would change silently."""
    model = _with_mlp(wrap).to(dtype)
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=match + r".*use method 'topk', 'threshold' or 'rsparse'"):
        si.sparsify(model, SparsityConfig(method="gate", sparsity=0.3), progress=False)
    assert not si.sparse_modules(model) and list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)
    with pytest.raises(ValueError, match=match):  # calibration for gate refuses it before its pass, too
        si.calibrate(model, [_ids(seed=1)], SparsityConfig(method="gate", sparsity=0.3, allocation="uniform"), progress=False)
    # the per-linear methods keep the MLP's own forward: exact at sparsity 0
    si.sparsify(model, SparsityConfig(method="topk", sparsity=0.0), progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)


def test_gate_accepts_a_gated_mlp_with_dropout_and_keeps_its_training_mode():
    model = _with_mlp(_DropoutMLP)
    model.model.layers[1].mlp.train()
    ids = _ids()
    si.sparsify(model, SparsityConfig(method="gate", sparsity=0.0), progress=False)
    assert isinstance(model.model.layers[1].mlp, si.SparseGatedMLP)
    si.unsparsify(model)
    mlp = model.model.layers[1].mlp
    assert isinstance(mlp, _DropoutMLP) and mlp.training and mlp.dropout.training
    model.eval()
    with torch.no_grad():
        dense = model(ids).logits
        si.sparsify(model, SparsityConfig(method="gate", sparsity=0.0), progress=False)
        assert torch.allclose(model(ids).logits, dense, atol=1e-5)


class _LinearAttention(nn.Module):
    """A layer's attention that is not q/k/v/o linears (a stand-in for linear attention or MLA)."""

    def __init__(self, attn):
        super().__init__()
        self.inner = attn
        self.in_proj_qkvz = nn.Linear(4, 4)

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_mlp_targets_need_no_qkvo_attention():
    """Hybrid decoders (linear-attention layers, MLA) keep gate/up/down MLPs: targets='mlp' patches them."""
    from sparse_infer.patch import find_family

    model = _with_mlp(lambda m: m)
    model.model.layers[0].self_attn = _LinearAttention(model.model.layers[0].self_attn)
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
    with pytest.raises(ValueError, match=r"layer 0: its self_attn is a _LinearAttention.*targets='mlp' patches its MLPs only"):
        si.sparsify(model, SparsityConfig(targets="all"), progress=False)
    assert not si.sparse_modules(model)
    assert find_family(model, "mlp").name == "Llama"
    for method in ("topk", "gate"):
        si.sparsify(model, SparsityConfig(method=method, sparsity=0.0, targets="mlp"), progress=False)
        assert len(si.sparse_modules(model)) == (6 if method == "topk" else 2)
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, dense, atol=1e-5)
        si.unsparsify(model)
    with pytest.raises(ValueError, match="targets must be one of"):
        find_family(model, "lm_head")


class _PrefixElsewhere(nn.Module):
    """Mllama's causal LM: base_model_prefix names no attribute; the decoder is at `model`."""

    base_model_prefix = "language_model"

    def __init__(self, inner):
        super().__init__()
        self.model = inner.model
        self.lm_head = inner.lm_head
        self.config = inner.config

    def get_decoder(self):
        return self

    def forward(self, ids):
        return self.lm_head(self.model(ids).last_hidden_state)


def test_decoder_layers_found_at_model_when_the_prefix_names_nothing():
    from sparse_infer.patch import decoder_layers

    inner = tiny_model("llama")
    model = _PrefixElsewhere(inner)
    assert decoder_layers(model) is inner.model.layers
    si.sparsify(model, SparsityConfig(), progress=False)
    assert len(si.sparse_modules(model)) == 3 * len(inner.model.layers)


def test_no_layer_list_is_said_in_the_error():
    with pytest.raises(ValueError, match=r"_NotADecoder .*\(no list of decoder layers found under the model\)"):
        si.sparsify(_NotADecoder(), SparsityConfig())
