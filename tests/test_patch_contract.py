"""What `sparsify` / `unsparsify` promise beyond the happy path: which decoders are found, which MLPs
method 'gate' accepts, how calibrated and configured per-layer settings combine, and that bad input
raises a ValueError naming the cause while the model stays untouched."""

import pytest
import torch
import torch.nn as nn

import sparse_infer as si
from sparse_infer import SparsityConfig
from sparse_infer.calibrate import Calibration
from sparse_infer.models import tiny_model


def _ids(seed=0, batch=2, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 128, (batch, length), generator=g)


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


def _refused(model, config, match, calibration=None, forward=True):
    """sparsify raises a ValueError matching ``match`` and leaves the model as it was (same modules, same
    parameters, same logits where the model can run at all)."""
    ids = _ids()
    dense = _logits(model, ids) if forward else None
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match=match):
        si.sparsify(model, config, calibration=calibration, progress=False)
    assert not si.sparse_modules(model) and not hasattr(model.config, "sparse_infer")
    assert all(modules[n] is m for n, m in model.named_modules()) and len(modules) == len(dict(model.named_modules()))
    assert all(params[n] is p for n, p in model.named_parameters())
    if forward:
        assert torch.equal(_logits(model, ids), dense)


# --------------------------------------------------------------------------- finding the decoder layers
class _Wrapper(nn.Module):
    """No get_decoder and no base_model_prefix: the layers sit right under the model, or a
    multimodal wrapper keeps the text decoder at ``model.language_model``."""

    def __init__(self, inner, multimodal=False):
        super().__init__()
        self.config = inner.config
        if multimodal:
            self.model = nn.Module()
            self.model.language_model = inner.model
            self.model.vision_proj = nn.Linear(8, 8)
        else:
            self.embed_tokens, self.layers, self.norm = inner.model.embed_tokens, inner.model.layers, inner.model.norm
        self.lm_head = inner.lm_head


@pytest.mark.parametrize("multimodal", [False, True])
def test_layers_are_found_on_a_bare_decoder_and_under_language_model(multimodal):
    inner = tiny_model("llama")
    layers = inner.model.layers
    model = _Wrapper(inner, multimodal)
    from sparse_infer.patch import decoder_layers

    assert decoder_layers(model) is layers
    si.sparsify(model, SparsityConfig(sparsity=0.5), progress=False)
    mods = si.sparse_modules(model)
    assert len(mods) == 3 * len(layers)
    assert all(isinstance(layers[i].mlp.up_proj, si.SparseLinear) for i in range(len(layers)))
    si.unsparsify(model)
    assert all(isinstance(layers[i].mlp.up_proj, nn.Linear) for i in range(len(layers)))


class _EmptyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList()
        self.fc = nn.Linear(4, 4)


def test_an_empty_layer_list_is_refused_not_silently_left_dense():
    model = _EmptyDecoder()
    with pytest.raises(ValueError, match=r"no list of decoder layers found"):
        si.sparsify(model, SparsityConfig(), progress=False)
    assert not si.sparse_modules(model)


class _Quantized(nn.Module):
    """A projection that is not an nn.Linear (a quantized or fused kernel, say)."""

    def __init__(self, linear):
        super().__init__()
        self.inner = linear

    def forward(self, x):
        return self.inner(x)


def test_an_mlp_with_a_projection_that_is_not_a_linear_is_refused():
    model = tiny_model("llama")
    model.model.layers[0].mlp.down_proj = _Quantized(model.model.layers[0].mlp.down_proj)
    _refused(model, SparsityConfig(sparsity=0.5),
             r"layer 0: its mlp is a LlamaMLP, not gate_proj/up_proj/down_proj linears")


# --------------------------------------------------------------------------- weights the modules cannot compute with
@pytest.mark.parametrize("method", ["topk", "threshold", "rsparse", "gate"])
def test_offloaded_weights_are_refused_before_calibration(method):
    """accelerate's offload leaves the weights on the meta device and swaps them in per forward: a
    sparse module would compute with the meta tensor (PyTorch returns numbers for that)."""
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model("llama")
    accelerate.cpu_offload(model, execution_device="cpu")
    calibration = [_ids(seed=s, batch=1, length=16)[0] for s in range(2)] if method != "topk" else None
    _refused(model, SparsityConfig(method=method, sparsity=0.3), r"model\.layers\.0\.mlp\.\w+\.weight is on the meta "
             r"device.*load the model without offloading", calibration=calibration)


def test_a_weight_left_on_the_meta_device_is_refused():
    model = tiny_model("llama")
    up = model.model.layers[1].mlp.up_proj
    up.weight = nn.Parameter(torch.empty_like(up.weight, device="meta"))
    _refused(model, SparsityConfig(targets="all", sparsity=0.5), r"layers\.1\.mlp\.up_proj\.weight is on the meta device",
             forward=False)


class _Int8Linear(nn.Linear):
    """An nn.Linear subclass with int8 storage, as quantization libraries make them."""

    def __init__(self, linear):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.weight = nn.Parameter((linear.weight.detach() * 64).round().to(torch.int8), requires_grad=False)

    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype) / 64, self.bias)


class _Packed(torch.Tensor):
    """A weight held as a tensor subclass (quantized or sharded storage)."""


@pytest.mark.parametrize("which", ["int8", "subclass"])
def test_quantized_weights_are_refused(which):
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    if which == "int8":
        mlp.down_proj = _Int8Linear(mlp.down_proj)
        match = r"mlp\.down_proj\.weight is a tensor of dtype torch\.int8 in a _Int8Linear.*load the model unquantized"
    else:
        mlp.down_proj.weight = nn.Parameter(mlp.down_proj.weight.detach().as_subclass(_Packed))
        match = r"mlp\.down_proj\.weight is a _Packed of dtype torch\.float32 in a Linear.*not quantized or sharded"
    for method in ("topk", "gate"):
        _refused(model, SparsityConfig(method=method, sparsity=0.3), match)


class _OtherAttention(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.inner = attn

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def test_attention_targets_need_qkvo_linears():
    """targets='attn' on a decoder whose attention is not q/k/v/o linears: a ValueError naming the layer."""
    model = tiny_model("llama")
    model.model.layers[1].self_attn = _OtherAttention(model.model.layers[1].self_attn)
    _refused(model, SparsityConfig(targets="attn", sparsity=0.5),
             r"layer 1: its self_attn is a _OtherAttention.*targets='mlp' patches its MLPs only")


# --------------------------------------------------------------------------- method 'gate': which MLPs it may replace
def _with_mlp(wrap, layer=1, dtype=torch.float32):
    model = tiny_model("llama")
    model.model.layers[layer].mlp = wrap(model.model.layers[layer].mlp)
    return model.to(dtype)


class _Parts(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn

    def plain(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _ScaledMLP(_Parts):
    """A residual multiplier on the MLP output (5 %): not down(act(gate(x)) * up(x))."""

    def forward(self, x):
        return 1.05 * self.plain(x)


class _ScaleParamMLP(_Parts):
    """A learned per-channel scale named like a projection, initialised to one: the probe cannot see it, so
    only the state-dict check stops gate from dropping it (a loaded checkpoint would hold other values)."""

    def __init__(self, mlp):
        super().__init__(mlp)
        self.up_proj_scale = nn.Parameter(torch.ones(mlp.up_proj.out_features))

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * self.up_proj_scale)


class _LearnedAct(nn.Module):
    """An activation with weights of its own (xIELU-like)."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.25))

    def forward(self, x):
        return torch.where(x > 0, x, self.alpha * x)


class _LearnedActMLP(_Parts):
    def __init__(self, mlp):
        super().__init__(mlp)
        self.act_fn = _LearnedAct()

    def forward(self, x):
        return self.plain(x)


class _NaNMLP(_Parts):
    """Its output is NaN on some inputs: no probe can show it equals the gated formula."""

    def forward(self, x):
        return self.plain(x) * torch.sqrt(self.gate_proj(x).sum(-1, keepdim=True))


class _RoutedMLP(_Parts):
    """A forward that needs more than the hidden states."""

    def forward(self, x, router_logits):
        return self.plain(x) * router_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_refuses_an_mlp_that_scales_its_output(dtype):
    model = _with_mlp(_ScaledMLP, dtype=dtype)
    _refused(model, SparsityConfig(method="gate", sparsity=0.3),
             r"layers\.1\.mlp \(_ScaledMLP\) computes something other than down\(act\(gate\(x\)\) \* up\(x\)\)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_accepts_plain_gated_mlps_at_every_dtype(dtype):
    model = tiny_model("llama").to(dtype)
    ids = _ids()
    dense = _logits(model, ids)
    si.sparsify(model, SparsityConfig(method="gate", sparsity=0.0), progress=False)
    assert all(isinstance(layer.mlp, si.SparseGatedMLP) for layer in model.model.layers)
    torch.testing.assert_close(_logits(model, ids), dense, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("wrap,match", [
    (_ScaleParamMLP, r"\(_ScaleParamMLP\) also holds \['up_proj_scale'\]"),
    (_NaNMLP, r"\(_NaNMLP\) computes something other than"),
    (_RoutedMLP, r"\(_RoutedMLP\) cannot be probed with one input \(TypeError"),
])
def test_gate_refuses_mlps_it_cannot_show_to_be_the_gated_formula(wrap, match):
    _refused(_with_mlp(wrap), SparsityConfig(method="gate", sparsity=0.3), match + r".*use method 'topk'", forward=False)


def test_gate_keeps_an_activation_with_its_own_weights():
    """The activation's own weights are part of what gate computes (it calls act_fn): not a reason to refuse."""
    model = _with_mlp(_LearnedActMLP)
    ids = _ids()
    dense = _logits(model, ids)
    keys = list(model.state_dict())
    si.sparsify(model, SparsityConfig(method="gate", sparsity=0.0), progress=False)
    assert isinstance(model.model.layers[1].mlp, si.SparseGatedMLP)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(_logits(model, ids), dense, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- per-layer settings: calibration, overrides, budget
MLP = ("gate_proj", "up_proj", "down_proj")


def _mlp_names(model):
    return [f"model.layers.{i}.mlp.{n}" for i in range(len(model.model.layers)) for n in MLP]


def test_overrides_apply_after_calibrated_settings():
    model = tiny_model("llama")
    cal = Calibration(layers={n: {"sparsity": 0.8} for n in _mlp_names(model)})
    si.sparsify(model, SparsityConfig(sparsity=0.8, overrides={"*.layers.1.mlp.*": {"sparsity": 0.0}}),
                calibration=cal, progress=False)
    l0, l1 = model.model.layers[0].mlp, model.model.layers[1].mlp
    assert (l1.gate_proj.k, l1.up_proj.k, l1.down_proj.k) == (64, 64, 160)  # the override
    assert (l0.gate_proj.k, l0.down_proj.k) == (12, 32)  # the calibration: floor(0.2 * width)


def test_a_calibrated_sparsity_of_one_is_refused():
    model = tiny_model("llama")
    cal = Calibration(layers={"model.layers.0.mlp.up_proj": {"sparsity": 1.0}})
    _refused(model, SparsityConfig(sparsity=0.5), r"model\.layers\.0\.mlp\.up_proj: sparsity must lie in \[0, 1\), got 1.0",
             calibration=cal)


def test_a_rank_over_the_layer_budget_is_refused():
    model = tiny_model("llama")
    cfg = SparsityConfig(method="rsparse", sparsity=0.5, overrides={"*.layers.0.mlp.up_proj": {"rank": 60}})
    _refused(model, cfg, r"up_proj: rank=60 alone reads more than the budget at sparsity 0.5")


@torch.no_grad()
def test_calibrated_factors_of_another_rank_are_recomputed():
    """An override of the rank drops the calibration's factors (made at its own rank) for the SVD at the new one."""
    cfg = SparsityConfig(method="rsparse", sparsity=0.5, overrides={"*.up_proj": {"rank": 2}})
    g = torch.Generator().manual_seed(5)
    cal = Calibration(layers={n: {"rank": 3, "A": torch.randn(64, 3, generator=g), "B": torch.randn(3, 160, generator=g)}
                              for n in _mlp_names(tiny_model("llama")) if n.endswith("up_proj")})
    ids = _ids()
    want = _logits(si.sparsify(tiny_model("llama"), cfg, progress=False), ids)
    model = si.sparsify(tiny_model("llama"), cfg, calibration=cal, progress=False)
    up = model.model.layers[0].mlp.up_proj
    assert up.rank == 2 and tuple(up.A.shape) == (64, 2)
    torch.testing.assert_close(_logits(model, ids), want, rtol=0, atol=0)


def test_calibration_tensors_shaped_for_another_model_are_refused():
    """Thresholds for another intermediate size; R-Sparse factors for another number of KV heads."""
    model = tiny_model("llama")
    thresholds = {n: {"threshold": torch.zeros(96 if n.endswith("down_proj") else 64)} for n in _mlp_names(model)}
    _refused(model, SparsityConfig(method="threshold", sparsity=0.5), r"down_proj: the calibration's threshold has 96 "
             r"values for a layer of 160 gated channels: it was made for another model; calibrate this one",
             calibration=Calibration(layers=thresholds))
    factors = {"model.layers.0.self_attn.k_proj": {"rank": 4, "A": torch.zeros(64, 4), "B": torch.zeros(4, 64)}}
    _refused(model, SparsityConfig(method="rsparse", sparsity=0.5, targets="attn"),
             r"k_proj: the calibration's low-rank factors .* for a 32x64 layer: they were made for another model",
             calibration=Calibration(layers=factors))


# --------------------------------------------------------------------------- config fields reaching the modules
@torch.no_grad()
def test_dense_prefill_above_runs_long_calls_dense():
    """More positions per sequence than dense_prefill_above (here 4): dense; fewer: sparse, at any batch size."""
    model = tiny_model("llama")
    long, short, wide = _ids(batch=1, length=6), _ids(batch=1, length=3), _ids(batch=6, length=2)
    dense_long, dense_short, dense_wide = _logits(model, long), _logits(model, short), _logits(model, wide)
    si.sparsify(model, SparsityConfig(sparsity=0.7, targets="all", dense_prefill_above=4), progress=False)
    torch.testing.assert_close(_logits(model, long), dense_long, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(model, short), dense_short, atol=1e-3)
    assert not torch.allclose(_logits(model, wide), dense_wide, atol=1e-3)  # 12 tokens, 2 positions each


def test_batched_decode_steps_stay_sparse_under_dense_prefill_above():
    """dense_prefill_above=1 ("sparse decode only"): the prefill runs dense, every decode step of a batch sparse."""
    model = tiny_model("llama")
    si.sparsify(model, SparsityConfig(method="topk", sparsity=0.5, dense_prefill_above=1), progress=False)
    ids = _ids(batch=4, length=8)
    mods = si.sparse_modules(model)
    with torch.no_grad():
        for m in mods.values():
            m.record_stats = True
            m.reset_stats()
        pre = model(ids, use_cache=True)
        assert si.model_sparsity(model, measured=True) == 0.0  # the prefill: dense
        for m in mods.values():
            m.reset_stats()
        model(ids[:, -1:], past_key_values=pre.past_key_values, use_cache=True)  # one step, batch 4
    assert si.model_sparsity(model, measured=True) == pytest.approx(0.5, abs=0.02)


@torch.no_grad()
def test_importance_ranks_channels_by_input_times_weight_column_norm():
    """importance=True: top-k of |x_i| * ||W[:, i]||, not of |x_i| alone."""
    model = tiny_model("llama")
    W = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    W[:, :80] *= 4.0  # column norms that differ a lot, so the two rankings disagree
    model.model.layers[0].mlp.down_proj.weight.data.copy_(W)
    si.sparsify(model, SparsityConfig(method="topk", sparsity=0.5, importance=True), progress=False)
    down = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(1))
    score = x.abs() * W.norm(dim=0)
    keep = torch.zeros_like(x, dtype=torch.bool).scatter_(1, score.topk(down.k, dim=1).indices, True)
    torch.testing.assert_close(down(x), (x * keep) @ W.T, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- progress switch, measured sparsity
@pytest.mark.parametrize("method", ["threshold", "rsparse"])
def test_progress_false_draws_no_bars(method, capsys):
    """progress=False is silent, calibration from token ids included."""
    model = tiny_model("llama")
    cfg = SparsityConfig(method=method, sparsity=0.5, allocation="uniform")
    si.sparsify(model, cfg, calibration=[_ids(seed=1, length=16)] if method == "threshold" else None, progress=False)
    assert si.sparse_modules(model)
    assert capsys.readouterr().err == ""


@torch.no_grad()
def test_measured_sparsity_counts_only_modules_that_recorded():
    model = tiny_model("llama")
    cfg = SparsityConfig(sparsity=0.5, overrides={"*.layers.0.*": {"sparsity": 0.2}, "*.layers.1.*": {"sparsity": 0.8}})
    si.sparsify(model, cfg, progress=False)
    recorded = {n: m for n, m in si.sparse_modules(model).items() if ".layers.0." in n}
    for m in recorded.values():
        m.record_stats = True
        m.reset_stats()
    model(_ids())
    read = sum(m.k * m.out_features for m in recorded.values())
    dense = sum(m.in_features * m.out_features for m in recorded.values())
    assert si.model_sparsity(model, measured=True) == pytest.approx(1 - read / dense, abs=1e-9)
    assert si.model_sparsity(model, measured=True) == pytest.approx(0.2, abs=0.02)


# --------------------------------------------------------------------------- padding, the KV cache, stats
def _left_padded(seed=0, batch=2, length=12, pad=6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, length), generator=g)
    am = torch.ones_like(ids)
    am[0, :pad] = 0
    return ids, am, g


@torch.no_grad()
@pytest.mark.parametrize("method", ["topk", "rsparse", "gate"])
def test_shared_masks_do_not_see_what_padding_holds(method):
    """mode='shared' ranks channels by the RMS over the batch: left padding (attention_mask 0) must not
    steer the masks the real tokens get, so the other sequence's logits cannot depend on the pad ids."""
    model = tiny_model("llama")
    si.sparsify(model, SparsityConfig(method=method, sparsity=0.5 if method != "gate" else 0.4, mode="shared",
                                      targets="all" if method != "gate" else "mlp"), progress=False)
    ids, am, g = _left_padded()
    other = ids.clone()
    other[0, :6] = torch.randint(1, 128, (6,), generator=g)
    a, b = model(ids, attention_mask=am).logits, model(other, attention_mask=am).logits
    assert torch.equal(a[1], b[1]) and torch.equal(a[0, 6:], b[0, 6:])
    out = [model.generate(input_ids=x, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0) for x in (ids, other)]
    assert torch.equal(out[0][:, 12:], out[1][:, 12:])
    si.unsparsify(model)
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks  # unsparsify takes the hooks away


@torch.no_grad()
def test_recorded_sparsity_counts_real_tokens_only():
    model = tiny_model("llama")
    si.sparsify(model, SparsityConfig(method="topk", sparsity=0.5, targets="all"), progress=False)
    ids, am, _ = _left_padded(length=16, pad=8)
    with pytest.raises(ValueError, match=r"no sparse module has recorded a token.*record_stats\(model\)"):
        si.model_sparsity(model, measured=True)
    si.record_stats(model)
    model(ids, attention_mask=am)
    assert all(m.stats_tokens == 24 for m in si.sparse_modules(model).values())  # 8 + 16 real tokens
    assert si.model_sparsity(model, measured=True) == pytest.approx(si.model_sparsity(model), abs=0.02)
    si.record_stats(model, False)
    model(ids)
    assert all(m.stats_tokens == 24 and not m.record_stats for m in si.sparse_modules(model).values())


def test_dense_prefill_above_warns_when_generate_runs_without_the_cache():
    """Without the KV cache every step is a call over the whole sequence: dense_prefill_above runs all of
    them dense, which the user is told once; with the cache the decode steps run sparse, silently."""
    model = tiny_model("llama")
    si.sparsify(model, SparsityConfig(sparsity=0.5, dense_prefill_above=1), progress=False)
    ids = _ids(length=8)
    with pytest.warns(UserWarning, match=r"dense_prefill_above=1 ran a call of 8 positions dense with use_cache=False"):
        model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_a_checkpoint_saved_after_sparsify_reloads_dense_and_says_so(tmp_path):
    """save_pretrained keeps the dense weights and the config entry: sparsify on the reloaded model warns
    that the entry described modules the checkpoint does not hold, and points at save_sparsity."""
    transformers = pytest.importorskip("transformers")
    model = si.sparsify(tiny_model("llama"), SparsityConfig(sparsity=0.5), progress=False)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not si.sparse_modules(reloaded) and hasattr(reloaded.config, "sparse_infer")
    with pytest.warns(UserWarning, match=r"no sparse modules: a checkpoint written by save_pretrained.*save_sparsity"):
        si.sparsify(reloaded, SparsityConfig(sparsity=0.3), progress=False)
    assert reloaded.config.sparse_infer["config"]["sparsity"] == 0.3
