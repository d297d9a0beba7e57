"""Drop-in modules: same parameters, same state dict, equal to nn.Linear at sparsity 0."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import rel_err
from sparse_infer import RSparseLinear, SparseGatedMLP, SparseLinear
from sparse_infer import reference as ref
from sparse_infer.modules import activation_name


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(37, 23, bias=True)


def test_sparse_linear_keeps_parameters_and_keys(linear):
    keys = list(linear.state_dict())
    m = SparseLinear.from_linear(linear, k=10)
    assert m.weight is linear.weight and m.bias is linear.bias
    assert (m.in_features, m.out_features) == (37, 23)
    assert list(m.state_dict()) == keys
    assert m.to_linear() is linear


@pytest.mark.parametrize("cls,kw", [(SparseLinear, {}), (RSparseLinear, {"rank": 5})])
def test_dense_at_sparsity_zero(linear, cls, kw):
    x = torch.randn(2, 5, 37)
    m = cls.from_linear(linear, k=37, **kw)
    assert rel_err(m(x), linear(x)) < 1e-6


def test_threshold_minus_inf_is_dense(linear):
    x = torch.randn(4, 37)
    m = SparseLinear.from_linear(linear, threshold=float("-inf"))
    assert torch.equal(m(x), linear(x))


def test_sparse_linear_equals_reference(linear):
    x = torch.randn(3, 37)
    m = SparseLinear.from_linear(linear, k=9, importance=True)
    mask = ref.topk_mask(x, 9, ref.column_norms(linear.weight))
    assert torch.equal(m(x), ref.sparse_linear(x, linear.weight, linear.bias, mask))
    assert m.scale is not None and "scale" not in m.state_dict()


def test_rsparse_beats_sparse_at_same_k(linear):
    x = torch.randn(64, 37)
    dense = linear(x)
    sparse = SparseLinear.from_linear(linear, k=12)(x)
    rs = RSparseLinear.from_linear(linear, k=12, rank=8)(x)
    assert rel_err(rs, dense) < rel_err(sparse, dense)


def test_rank_too_large_is_a_clear_error(linear):
    with pytest.raises(ValueError, match=r"rank=24 is outside \[0, min\(in, out\)=23\]"):
        RSparseLinear.from_linear(linear, k=10, rank=24)


def test_k_too_large_is_a_clear_error(linear):
    with pytest.raises(ValueError, match="k=38"):
        SparseLinear.from_linear(linear, k=38)


def test_dense_prefill_policy(linear):
    m = SparseLinear.from_linear(linear, k=3, dense_prefill_above=4)
    long_x, short_x = torch.randn(1, 5, 37), torch.randn(1, 4, 37)
    assert torch.equal(m(long_x), linear(long_x))  # 5 tokens > 4: dense
    assert not torch.allclose(m(short_x), linear(short_x))  # decode-size call: sparse
    batch_step = torch.randn(8, 1, 37)  # one decode step of 8 sequences: 8 tokens, 1 position each
    assert not torch.allclose(m(batch_step), linear(batch_step))
    assert torch.equal(m(long_x[0]), linear(long_x[0]))  # 2-D input: its 5 rows are the positions


def test_measured_density(linear):
    m = SparseLinear.from_linear(linear, k=10)
    m.record_stats = True
    m(torch.randn(3, 4, 37))
    assert m.measured_density == pytest.approx(10 / 37)


def test_zero_input_features_count_tokens_and_give_no_density():
    m = SparseLinear.from_linear(nn.Linear(0, 5), k=0)
    m.record_stats = True
    x = torch.randn(3, 4, 0)
    assert torch.equal(m(x), m.bias.detach().expand(3, 4, 5))
    assert m.stats_tokens == 12 and m.measured_density is None and m.nominal_density == 1.0


def test_triton_backend_without_gpu_is_a_clear_error(linear, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = SparseLinear.from_linear(linear, k=10, backend="triton")
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        m(torch.randn(2, 37))


class _MLP(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(16, 40, bias=False), nn.Linear(16, 40, bias=False), nn.Linear(40, 16, bias=False)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("act,name", [(nn.SiLU(), "silu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.GELU(), "gelu"), (nn.ReLU(), None)])
def test_activation_is_probed_not_assumed(act, name):
    assert activation_name(act) == name


def test_gated_mlp_module():
    torch.manual_seed(0)
    mlp = _MLP(nn.GELU(approximate="tanh"))
    keys = list(mlp.state_dict())
    x = torch.randn(2, 3, 16)
    full = SparseGatedMLP.from_mlp(mlp, k=40)
    assert torch.allclose(full(x), mlp(x), atol=1e-6)
    assert list(full.state_dict()) == keys
    half = SparseGatedMLP.from_mlp(mlp, k=20)
    h = F.gelu(mlp.gate_proj(x), approximate="tanh")
    expect = mlp.down_proj(ref.topk_gate(h, 20) * mlp.up_proj(x))
    assert torch.allclose(half(x), expect, atol=1e-6)
    assert half.to_mlp() is mlp


@pytest.mark.parametrize("kind", ["linear", "rsparse", "mlp"])
def test_weights_left_on_the_meta_device_are_a_clear_error(kind):
    """F.linear(cpu input, meta weight) returns numbers in PyTorch: the modules refuse instead."""
    with torch.device("meta"):
        module = nn.Linear(16, 8) if kind != "mlp" else _MLP(nn.SiLU())
    sparse = {"linear": lambda: SparseLinear.from_linear(module, k=8),
              "rsparse": lambda: RSparseLinear.from_linear(module, k=8, rank=2),
              "mlp": lambda: SparseGatedMLP.from_mlp(module, k=20)}[kind]()
    with pytest.raises(RuntimeError, match=r"weights are on the meta device \(not loaded\).*assign=True"):
        sparse(torch.randn(2, 16))


def test_threshold_gate_carries_its_calibrated_density(linear):
    """Thresholds hand their target density to the kernels as a launch hint; top-k needs none (k/width)."""
    m = SparseLinear.from_linear(linear, threshold=0.3)
    assert m.gate().density is None
    m.target_density = 0.25
    assert m.gate().density == 0.25
    assert SparseLinear.from_linear(linear, k=9).gate().density is None
    m.target_density = -1e-17  # a budget spent exactly by the low-rank factor, after rounding
    assert m.gate().density == 0.0


@pytest.mark.parametrize("kind", ["linear", "rsparse", "mlp"])
def test_triton_backend_with_gradients_runs_the_reference(kind):
    """The kernels have no backward: a call that needs gradients warns and takes the differentiable reference."""
    torch.manual_seed(0)
    if kind == "mlp":
        mlp = nn.Module()
        mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(24, 40), nn.Linear(24, 40), nn.Linear(40, 24)
        mlp.act_fn = nn.SiLU()
        make = lambda backend: SparseGatedMLP.from_mlp(mlp, k=20, backend=backend)  # noqa: E731
        params = [mlp.gate_proj.weight, mlp.down_proj.bias]
    else:
        lin = nn.Linear(24, 17)
        cls, kw = (RSparseLinear, {"rank": 3}) if kind == "rsparse" else (SparseLinear, {})
        make = lambda backend: cls.from_linear(lin, k=11, backend=backend, **kw)  # noqa: E731
        params = [lin.weight, lin.bias]
    x = torch.randn(1, 24, requires_grad=True)
    grads = {}
    for backend in ("reference", "triton"):
        m = make(backend)
        if backend == "triton":
            with pytest.warns(UserWarning, match="inference-only"):
                out = m(x)
        else:
            out = m(x)
        assert out.requires_grad
        grads[backend] = torch.autograd.grad(out.square().sum(), [x, *params])
    for a, b in zip(grads["reference"], grads["triton"]):
        assert torch.equal(a, b)


def test_k_for_density_rounds_to_the_nearest_channel():
    from sparse_infer.modules import k_for_density

    assert [k_for_density(4, d) for d in (0.0, 0.1, 0.124, 0.125, 0.5, 0.874, 0.9, 1.0)] == [0, 0, 0, 1, 2, 3, 4, 4]
    assert k_for_density(10, -0.5) == 0 and k_for_density(10, 1.5) == 10


@pytest.mark.parametrize("cls,kw", [(SparseLinear, dict(k=20)), (RSparseLinear, dict(k=20, rank=3))])
def test_assign_loaded_parameters_go_back_with_to_linear(linear, cls, kw):
    """`load_state_dict(..., assign=True)` puts new Parameters on the module: to_linear hands those back."""
    m = cls.from_linear(linear, **kw)
    other = nn.Linear(37, 23, bias=True)
    m.load_state_dict(other.state_dict(), assign=True)
    back = m.to_linear()
    assert back.weight is m.weight and back.bias is m.bias
    x = torch.randn(4, 37)
    torch.testing.assert_close(back(x), other(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["topk", "rsparse", "gate"])
def test_a_patched_model_pickles(method):
    import io

    import sparse_infer as si
    from sparse_infer.models import tiny_model

    model = si.sparsify(tiny_model("llama"), si.SparsityConfig(method=method, sparsity=0.3), progress=False)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copy = torch.load(buf, weights_only=False)
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(copy(ids).logits, model(ids).logits)
    si.unsparsify(copy)
    assert not si.sparse_modules(copy)


def test_assign_loading_releases_the_replaced_parameters():
    import gc
    import weakref

    import sparse_infer as si
    from sparse_infer.models import tiny_model

    model = si.sparsify(tiny_model("llama"), si.SparsityConfig(sparsity=0.5, targets="all"), progress=False)
    old = [weakref.ref(p) for p in model.parameters()]
    model.load_state_dict({k: v.clone() for k, v in tiny_model("llama", seed=3).state_dict().items()}, assign=True)
    gc.collect()
    assert sum(r() is not None for r in old) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_thresholds_and_scales_stay_float32_through_dtype_casts(linear, dtype):
    m = SparseLinear.from_linear(linear, threshold=torch.rand(37) * 0.67 + 0.001, importance=True)
    t, s = m.threshold.clone(), m.scale.clone()
    m.to(dtype)
    assert m.weight.dtype == dtype
    assert m.threshold.dtype == m.scale.dtype == torch.float32 and torch.equal(m.threshold, t) and torch.equal(m.scale, s)
    m.to("meta")
    assert m.threshold.is_meta and m.scale.is_meta and m.threshold.dtype == torch.float32


@pytest.mark.parametrize("kw, expect", [
    (dict(k=3), "in_features=8, out_features=5, bias=True, k=3, backend=reference"),
    (dict(threshold=0.123456), "threshold=0.1235, backend=reference"),
    (dict(threshold=torch.full((8,), 0.5), shared=True), "threshold=per-channel, shared, backend=reference"),
    (dict(k=2, importance=True), "k=2, importance, backend=reference"),
])
def test_repr_names_the_gate(kw, expect):
    m = SparseLinear(nn.Linear(8, 5), backend="reference", **kw)
    assert expect in repr(m)


def test_repr_of_rank_aware_and_gated_mlp():
    r = RSparseLinear(nn.Linear(8, 5), k=3, rank=2, backend="reference")
    assert repr(r).endswith("k=3, importance, backend=reference, rank=2)")

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)
            self.act_fn = nn.SiLU()

    g = SparseGatedMLP(MLP(), k=6, backend="reference")
    assert "hidden=8, intermediate=12, act=silu, k=6, backend=reference" in repr(g)

def test_module_constructors_refuse_bad_gates():
    with pytest.raises(ValueError, match="exactly one of k"):
        SparseLinear(nn.Linear(8, 5), k=2, threshold=0.1)
    with pytest.raises(ValueError, match="backend=.cuda. is not one of"):
        SparseLinear(nn.Linear(8, 5), k=2, backend="cuda")
    with pytest.raises(ValueError, match="per-channel threshold needs 8 values, got 5"):
        SparseLinear(nn.Linear(8, 5), threshold=torch.ones(5))
    with pytest.raises(TypeError, match="SparseLinear replaces nn.Linear, got Conv1d"):
        SparseLinear(nn.Conv1d(8, 5, 1), k=2)
