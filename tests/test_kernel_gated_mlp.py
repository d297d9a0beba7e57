"""Fused CATS gated MLP kernel (kernels/gated_mlp.py) against reference.gated_mlp.

Runs under the Triton interpreter on the CPU (conftest sets TRITON_INTERPRET=1);
shapes are tiny and odd so masked edges are exercised.  The parameter grid is
spread over cases rather than a full product to keep the file under ~90 s.
"""

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, rel_err

from sparse_infer import reference as ref
from sparse_infer.kernels.gated_mlp import gated_mlp
from sparse_infer.ops import Gate

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# the kernel rounds where the reference rounds (0 error measured in bf16, <1e-5 in fp16 under the
# interpreter); a rounding that truncates instead of rounding to nearest even gives 1-2.5e-2
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 5e-3}
SHAPES = [(37, 101), (64, 160)]  # (hidden, intermediate)
TOKENS = [1, 3, 16]
ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


def make_case(M, hidden, inter, dtype, bias, seed=0, out_features=None):
    g = torch.Generator().manual_seed(seed)
    out_features = out_features or hidden

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    x = rnd(M, hidden)
    wg = rnd(inter, hidden, scale=hidden ** -0.5)
    wu = rnd(inter, hidden, scale=hidden ** -0.5)
    wd = rnd(out_features, inter, scale=inter ** -0.5)
    if bias:
        b = (rnd(inter, scale=0.1), rnd(inter, scale=0.1), rnd(out_features, scale=0.1))
    else:
        b = (None, None, None)
    return x, wg, wu, wd, b


def gate_scores(x, wg, bg, act, scale=None, shared=False):
    """The float32 scores the reference ranks/thresholds: |act(x Wg^T + bg) * s| (mean if shared)."""
    h = ACTS[act](F.linear(x, wg, bg)).float()
    if scale is not None:
        h = h * scale.float()
    s = h.abs()
    return s.reshape(-1, s.shape[-1]).mean(0) if shared else s


def threshold_for(scores, sparsity, per_channel, inter, seed=0):
    """A threshold that leaves about ``sparsity`` of the scores inactive."""
    if sparsity == 0.0:
        base = -1.0
    elif sparsity == 1.0:
        base = math.inf
    else:  # midway between two neighbouring scores: no score sits near the threshold
        v = scores.flatten().double().cpu().sort().values
        j = min(max(int(sparsity * v.numel()), 1), v.numel() - 1)
        base = ((v[j - 1] + v[j]) / 2).item()
    if not per_channel:
        return base
    g = torch.Generator().manual_seed(seed + 1)
    jitter = 0.5 + torch.rand(inter, generator=g)
    t = torch.full((inter,), base) if math.isinf(base) or base < 0 else base * jitter
    return t.to(DEVICE)


def check(x, wg, wu, wd, act, gate, b, dtype):
    out = gated_mlp(x, wg, wu, wd, act, gate, *b)
    exp = ref.gated_mlp(x, wg, wu, wd, ACTS[act], gate.mask, *b)
    assert out.shape == exp.shape and out.dtype == exp.dtype and out.device == exp.device
    nan_o, nan_e = torch.isnan(out), torch.isnan(exp)
    assert torch.equal(nan_o, nan_e), f"NaN pattern differs: {nan_o.sum()} vs {nan_e.sum()} NaNs"
    fin = ~nan_e
    err = rel_err(out[fin], exp[fin])
    assert err <= TOL[dtype], f"rel_err {err:.3e} > {TOL[dtype]:.0e}"
    return out, exp


def _matrix():
    """dtype x sparsity x gate kind; shape, tokens, activation, bias rotate across the cases."""
    cases = []
    rot = itertools.count()
    for dtype in DTYPES:
        for sparsity in (0.0, 0.5, 0.9, 1.0):
            for kind in ("topk", "thr_scalar", "thr_channel"):
                i = next(rot)
                hidden, inter = SHAPES[i % 2]
                cases.append(
                    pytest.param(dtype, sparsity, kind, hidden, inter, TOKENS[i % 3], list(ACTS)[(i // 2) % 3],
                                 (i // 3) % 2 == 0, id=f"{str(dtype)[6:]}-s{sparsity}-{kind}-{i}")
                )
    return cases


@pytest.mark.parametrize("dtype,sparsity,kind,hidden,inter,M,act,bias", _matrix())
def test_sparsity_matrix(dtype, sparsity, kind, hidden, inter, M, act, bias):
    x, wg, wu, wd, b = make_case(M, hidden, inter, dtype, bias, seed=hidden + inter + M)
    if kind == "topk":
        gate = Gate(k=round((1 - sparsity) * inter))
    else:
        t = threshold_for(gate_scores(x, wg, b[0], act), sparsity, kind == "thr_channel", inter)
        gate = Gate(threshold=t)
    out, exp = check(x, wg, wu, wd, act, gate, b, dtype)
    if sparsity == 1.0 and not bias:
        assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("hidden,inter", SHAPES)
@pytest.mark.parametrize("M", TOKENS)
def test_shapes_tokens(hidden, inter, M):
    dtype = torch.bfloat16
    x, wg, wu, wd, b = make_case(M, hidden, inter, dtype, bias=M != 3, seed=M)
    check(x, wg, wu, wd, "silu", Gate(k=inter // 2), b, dtype)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("bias", [False, True])
def test_activations_bias(act, bias):
    dtype = torch.float16
    x, wg, wu, wd, b = make_case(3, 37, 101, dtype, bias, seed=7)
    t = threshold_for(gate_scores(x, wg, b[0], act), 0.5, False, 101)
    check(x, wg, wu, wd, act, Gate(threshold=torch.tensor(t, device=DEVICE)), b, dtype)


@pytest.mark.parametrize("kind", ["topk", "threshold"])
@pytest.mark.parametrize("M", TOKENS)
def test_shared(kind, M):
    dtype = DTYPES[M % 3]
    hidden, inter = SHAPES[M % 2]
    x, wg, wu, wd, b = make_case(M, hidden, inter, dtype, bias=True, seed=11 + M)
    if kind == "topk":
        gate = Gate(k=inter // 3, shared=True)
    else:
        t = threshold_for(gate_scores(x, wg, b[0], "gelu", shared=True), 0.6, M == 3, inter)
        gate = Gate(threshold=t, shared=True)
    out, _ = check(x, wg, wu, wd, "gelu", gate, b, dtype)
    # (batch, steps, hidden): one mask per decode step, over the batch
    x3 = torch.cat([x, x.flip(0) * 0.5]).reshape(2, M, hidden)
    if kind == "threshold":
        gate = Gate(threshold=threshold_for(gate_scores(x3, wg, b[0], "gelu", shared=True), 0.6, False, inter),
                    shared=True)
    out3, exp3 = check(x3, wg, wu, wd, "gelu", gate, b, dtype)
    assert out3.shape == (2, M, hidden)


@pytest.mark.parametrize("kind", ["topk", "threshold"])
@pytest.mark.parametrize("shared", [False, True])
def test_importance_scale(kind, shared):
    dtype = torch.float32
    M, hidden, inter = 3, 37, 101
    x, wg, wu, wd, b = make_case(M, hidden, inter, dtype, bias=False, seed=5)
    scale = (torch.rand(inter, generator=torch.Generator().manual_seed(3)) + 0.1).to(DEVICE)
    if kind == "topk":
        gate = Gate(k=30, scale=scale, shared=shared)
    else:
        t = threshold_for(gate_scores(x, wg, None, "silu", scale, shared), 0.7, False, inter)
        gate = Gate(threshold=t, scale=scale, shared=shared)
    check(x, wg, wu, wd, "silu", gate, b, dtype)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["topk", "threshold"])
def test_zero_input(bias, kind):
    dtype = torch.bfloat16
    x, wg, wu, wd, b = make_case(3, 64, 160, dtype, bias, seed=2)
    x = torch.zeros_like(x)
    gate = Gate(k=40) if kind == "topk" else Gate(threshold=0.01)
    out, _ = check(x, wg, wu, wd, "silu", gate, b, dtype)
    if not bias:
        assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize(
    "gate",
    [Gate(k=50), Gate(k=50, shared=True), Gate(threshold=0.2), Gate(k=0), Gate(threshold=0.2, shared=True)],
    ids=["topk", "topk_shared", "threshold", "k0", "threshold_shared"],
)
def test_nan_input(gate):
    """A NaN in one token's input makes that token's output NaN (as the reference); others stay finite."""
    dtype = torch.float16
    x, wg, wu, wd, b = make_case(3, 37, 101, dtype, bias=True, seed=9)
    x[1, 5] = float("nan")
    if gate.threshold is not None and gate.shared:
        x[2, 7] = float("inf")
    out, exp = check(x, wg, wu, wd, "silu", gate, b, dtype)
    assert torch.isnan(out[1]).all()
    assert not torch.isnan(out[0]).any()


def test_nan_gate_ranks_first():
    """NaN gate activations (here from a NaN gate bias) rank above every number in top-k."""
    dtype = torch.float32
    x, wg, wu, wd, b = make_case(3, 37, 101, dtype, bias=True, seed=4)
    b[0][[3, 60]] = float("nan")
    out, _ = check(x, wg, wu, wd, "silu", Gate(k=5), b, dtype)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(dtype):
    """Non-contiguous x (3-D, transposed view), column-major down weight, transposed gate/up storage."""
    hidden, inter = 37, 101
    x, wg, wu, wd, b = make_case(6, hidden, inter, dtype, bias=dtype != torch.float32, seed=13)
    xs = x.reshape(2, 3, hidden).transpose(0, 1)  # (3, 2, hidden), not contiguous
    assert not xs.is_contiguous()
    wd_cm = wd.t().contiguous().t()
    assert wd_cm.stride(0) == 1 and torch.equal(wd_cm, wd)
    wg_t = wg.t().contiguous().t()  # any strides must stay correct
    wu_sl = torch.stack([wu, wu], dim=-1)[..., 0]
    assert torch.equal(wu_sl, wu) and not wu_sl.is_contiguous()
    out, _ = check(xs, wg_t, wu_sl, wd_cm, "gelu_tanh", Gate(k=40), b, dtype)
    assert out.shape == (3, 2, hidden)


@pytest.mark.parametrize("kind", ["topk", "threshold"])
def test_strided_vectors(kind):
    """Biases, a per-channel threshold and the importance scale given as strided views."""
    dtype = torch.float32
    hidden, inter = 37, 101
    x, wg, wu, wd, b = make_case(3, hidden, inter, dtype, bias=True, seed=17)
    b = tuple(torch.stack([v, -v], dim=-1)[..., 0] for v in b)  # every other element of a buffer
    g = torch.Generator().manual_seed(18)
    scale = torch.stack([torch.rand(inter, generator=g) + 0.5] * 2, dim=-1)[..., 0].to(DEVICE)
    if kind == "topk":
        gate = Gate(k=40, scale=scale)
    else:
        t = threshold_for(gate_scores(x, wg, b[0], "silu", scale), 0.5, True, inter)
        gate = Gate(threshold=torch.stack([t, -t], dim=-1)[..., 0], scale=scale)
        assert not gate.threshold.is_contiguous()
    assert not any(v.is_contiguous() for v in (*b, scale))
    check(x, wg, wu, wd, "silu", gate, b, dtype)


@pytest.mark.parametrize("shared", [False, True])
def test_ties_lower_index_wins(shared):
    """Integer inputs give many exactly equal gate activations; the selection must match the reference's."""
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(21)
    M, hidden, inter = 3, 37, 101
    x = torch.randint(-1, 2, (M, hidden), generator=g).to(dtype).to(DEVICE)
    if shared:  # equal tokens keep the ties in the RMS over tokens
        x = x[:1].expand(M, hidden).contiguous()
    wg = torch.randint(-2, 3, (inter, hidden), generator=g).to(dtype).to(DEVICE) / 4
    wu = (torch.randn(inter, hidden, generator=g) / 6).to(dtype).to(DEVICE)
    wd = (torch.randn(hidden, inter, generator=g) / 10).to(dtype).to(DEVICE)
    h = F.silu(F.linear(x, wg)).float().abs()
    score = h.square().mean(0).sqrt() if shared else h[0]
    assert score.unique().numel() < inter // 2  # plenty of ties
    desc = score.sort(descending=True).values
    k = next(k for k in range(20, 80) if desc[k - 1] == desc[k])  # the cut falls inside a tie group
    check(x, wg, wu, wd, "silu", Gate(k=k, shared=shared), (None, None, None), dtype)


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_selection_pass_on_h(monkeypatch, streamed, shared):
    """The top-k pass of gated_mlp (gating's kernel over fp32 h) on NaN, +-inf, an all-zero row
    and ties, held in registers or streamed in chunks, against reference.topk_mask."""
    from sparse_infer.kernels import gating
    if streamed:
        monkeypatch.setattr(gating, "RESIDENT_MAX", 32)
    for k in (0, 1, 17, 100, 101):
        g = torch.Generator().manual_seed(k)
        M, N = 4, 101
        h = torch.randn(M, N, generator=g).mul(4).round().div(4)  # ties
        h[0, 3] = float("nan")
        h[0, 50] = float("inf")  # NaN ranks above +inf in the same row
        h[1, 90] = float("inf")
        h[2, 10] = float("-inf")
        h[3, :] = 0.0
        scale = (torch.rand(N, generator=g) + 0.5) if k % 2 else None
        h = h.to(DEVICE)
        scale = scale.to(DEVICE) if scale is not None else None
        mask = gating._topk_launch(h, k, scale, shared)
        exp = (ref.shared_topk_mask if shared else ref.topk_mask)(h, k, scale)
        assert torch.equal(mask.bool().reshape(exp.shape), exp), k
        assert int(mask.max()) <= 1


def test_many_tokens_falls_back():
    dtype = torch.float32
    x, wg, wu, wd, b = make_case(20, 37, 101, dtype, bias=True, seed=1)
    check(x, wg, wu, wd, "silu", Gate(k=50), b, dtype)


def test_empty_tokens():
    x, wg, wu, wd, b = make_case(1, 37, 101, torch.float32, bias=False)
    out = gated_mlp(x[:0], wg, wu, wd, "silu", Gate(k=5))
    assert out.shape == (0, 37)


def test_errors():
    x, wg, wu, wd, b = make_case(1, 37, 101, torch.float32, bias=False)
    with pytest.raises(ValueError, match="act_name"):
        gated_mlp(x, wg, wu, wd, "relu", Gate(k=5))
    with pytest.raises(TypeError, match="dtype"):
        gated_mlp(x, wg.half(), wu, wd, "silu", Gate(k=5))
    with pytest.raises(TypeError, match="serves"):
        gated_mlp(x.double(), wg.double(), wu.double(), wd.double(), "silu", Gate(k=5))
    with pytest.raises(ValueError, match="up_weight"):
        gated_mlp(x, wg, wu[:-1], wd, "silu", Gate(k=5))
    with pytest.raises(ValueError, match="down_weight"):
        gated_mlp(x, wg, wu, wd[:, :-1], "silu", Gate(k=5))
    with pytest.raises(ValueError, match="gate_weight"):
        gated_mlp(x[:, :-1], wg, wu, wd, "silu", Gate(k=5))
    with pytest.raises(ValueError, match="k=102"):
        gated_mlp(x, wg, wu, wd, "silu", Gate(k=102))
    with pytest.raises(ValueError, match="threshold has shape"):
        gated_mlp(x, wg, wu, wd, "silu", Gate(threshold=torch.zeros(5, device=DEVICE)))
    with pytest.raises(ValueError, match="scale"):
        gated_mlp(x, wg, wu, wd, "silu", Gate(k=5, scale=torch.ones(3, device=DEVICE)))
    with pytest.raises(ValueError, match="down_bias"):
        gated_mlp(x, wg, wu, wd, "silu", Gate(k=5), None, None, torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="at least one dimension"):
        gated_mlp(x[0, 0], wg, wu, wd, "silu", Gate(k=5))
    with pytest.raises(ValueError, match="up_weight must be a 2-D tensor"):
        gated_mlp(x, wg, wu[0], wd, "silu", Gate(k=5))
    with pytest.raises(ValueError, match="exactly one of k or threshold"):  # an object Gate itself would refuse
        gated_mlp(x, wg, wu, wd, "silu", SimpleNamespace(k=5, threshold=0.1, scale=None))
    with pytest.raises(ValueError, match="exactly one of k or threshold"):
        gated_mlp(x, wg, wu, wd, "silu", None)
    with pytest.raises(TypeError, match="gate.k must be an int, got Tensor"):
        gated_mlp(x, wg, wu, wd, "silu", Gate(k=torch.tensor(5)))
    with pytest.raises(TypeError, match="threshold must be a float or a tensor, got str"):
        gated_mlp(x, wg, wu, wd, "silu", Gate(threshold="0.1"))
    with pytest.raises(ValueError, match="gate_bias has shape"):
        gated_mlp(x, wg, wu, wd, "silu", Gate(k=5), torch.zeros(3, device=DEVICE))
    with pytest.raises(TypeError, match="up_bias.dtype=torch.float16 differs"):
        gated_mlp(x, wg, wu, wd, "silu", Gate(k=5), None, torch.zeros(101, device=DEVICE, dtype=torch.float16))
    meta = torch.empty_like(wu, device="meta")  # another device than x: refused before any launch
    with pytest.raises(ValueError, match="up_weight is on meta"):
        gated_mlp(x, wg, meta, wd, "silu", Gate(k=5))
    with pytest.raises(ValueError, match="gate.scale is on meta"):
        gated_mlp(x, wg, wu, wd, "silu", Gate(k=5, scale=torch.ones(101, device="meta")))
    with pytest.raises(ValueError, match="threshold is on meta"):
        gated_mlp(x, wg, wu, wd, "silu", Gate(threshold=torch.zeros(101, device="meta")))
