"""The kernels called directly (as a researcher would): gates they cannot serve are refused, the same
checks hold eager and under torch.compile and for empty outputs, and corner inputs equal the reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, rel_err

from sparse_infer import kernels as K
from sparse_infer import reference as ref
from sparse_infer.ops import Gate


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("op", ["sparse", "rsparse", "gated_mlp"])
@pytest.mark.parametrize("compiled", [False, True])
def test_gate_valid_rows_are_refused_by_the_kernels(op, compiled):
    """Gate.valid (padding left out of a shared mask) runs on the reference path only; a kernel that
    ignored it would return another mask's result (relative error 0.6-1.9 in the review)."""
    x, w = _randn(3, 1, 64), _randn(32, 64, seed=1)
    gate = Gate(k=8, shared=True, valid=torch.tensor([[True], [True], [False]], device=DEVICE))
    if op == "sparse":
        call = (lambda x: K.sparse_linear(x, w, None, gate))
    elif op == "rsparse":
        A, B = _randn(64, 4, seed=2), _randn(4, 32, seed=3)
        call = (lambda x: K.rsparse_linear(x, w, None, A, B, gate))
    else:
        wu, wd = _randn(32, 64, seed=2), _randn(16, 32, seed=3)
        call = (lambda x: K.gated_mlp(x, w, wu, wd, "silu", gate))
    if compiled:
        torch._dynamo.reset()
        call = torch.compile(call, backend="eager")
    with pytest.raises(ValueError, match=r"Gate.valid .* is not served by the Triton kernels"):
        call(x)


@pytest.mark.parametrize("k,error,match", [(2.7, TypeError, "k must be an int, got float"),
                                           (-1, ValueError, r"k=-1 must lie in \[0, 64\]"),
                                           (True, TypeError, "k must be an int, got bool")])
def test_k_is_checked_the_same_under_torch_compile(k, error, match):
    """The custom ops flatten k to an int (-1 = no k): a float or negative k must fail as it does eager."""
    x, w = _randn(2, 64), _randn(32, 64, seed=1)
    torch._dynamo.reset()
    fn = torch.compile(lambda x: K.sparse_linear(x, w, None, Gate(k=k)), backend="eager")
    with pytest.raises(error, match=match):
        fn(x)
    with pytest.raises(error, match=match):
        K.sparse_linear(x, w, None, Gate(k=k))


@pytest.mark.parametrize("shape", [(0, 8), (2, 0), (0, 0)])  # (out, in): empty outputs, empty inputs
def test_gates_are_checked_even_when_the_output_is_empty(shape):
    x, w = _randn(2, shape[1]), _randn(*shape, seed=1)
    for gate, match in [(Gate(k=-1), r"k=-1 must lie"), (Gate(k=300), r"k=300 must lie"),
                        (Gate(threshold=torch.ones(3, device=DEVICE)), "threshold must be a scalar or a"),
                        (Gate(k=0, scale=torch.ones(3, device=DEVICE)), "scale must be a tensor of shape")]:
        if shape[1] == 0 and "k=" not in match and "scale" not in match:
            continue  # a 3-value threshold fits no 0-channel layer either way: nothing to tell apart
        with pytest.raises(ValueError, match=match):
            K.sparse_linear(x, w, None, gate)


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_mlp_with_no_hidden_features_keeps_its_biases(act):
    """hidden = 0: h = act(gate bias), u = up bias, gated, then through down - not just the down bias."""
    inter, out = 6, 4
    x = torch.empty(2, 0, device=DEVICE)
    wg, wu, wd = torch.empty(inter, 0, device=DEVICE), torch.empty(inter, 0, device=DEVICE), _randn(out, inter)
    bg, bu, bd = _randn(inter, seed=1), _randn(inter, seed=2), _randn(out, seed=3)
    fn = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[act]
    for gate in (Gate(k=3), Gate(threshold=0.1)):
        got = K.gated_mlp(x, wg, wu, wd, act, gate, bg, bu, bd)
        want = ref.gated_mlp(x, wg, wu, wd, fn, gate.mask, bg, bu, bd)
        assert rel_err(got, want) < 1e-6
        assert not torch.allclose(want, bd.expand_as(want))  # the biases upstream of down do reach the output


def test_gated_mlp_rounds_a_python_threshold_to_float32_as_the_reference():
    """1e39 is inf in float32: an infinite score is then not above it (the reference's comparison)."""
    x = torch.tensor([[100.0, 1.0]], dtype=torch.float16, device=DEVICE)
    wg = torch.tensor([[1000.0, 0.0], [0.0, 1.0]], dtype=torch.float16, device=DEVICE)
    wu, wd = torch.ones(2, 2, dtype=torch.float16, device=DEVICE), torch.ones(1, 2, dtype=torch.float16, device=DEVICE)
    gate = Gate(threshold=1e39)
    got = K.gated_mlp(x, wg, wu, wd, "silu", gate)
    want = ref.gated_mlp(x, wg, wu, wd, F.silu, gate.mask)
    assert torch.equal(got, want)


def test_gated_mlp_checks_bias_dtypes_and_takes_numpy_scalars():
    np = pytest.importorskip("numpy")
    x, wg, wu, wd = _randn(2, 16), _randn(24, 16, seed=1), _randn(24, 16, seed=2), _randn(8, 24, seed=3)
    with pytest.raises(TypeError, match=r"gate_bias.dtype=torch.float64 differs from x.dtype=torch.float32"):
        K.gated_mlp(x, wg, wu, wd, "silu", Gate(k=5), _randn(24).double())
    for gate in (Gate(k=np.int64(5)), Gate(threshold=np.float32(0.2))):
        got = K.gated_mlp(x, wg, wu, wd, "silu", gate)
        assert rel_err(got, ref.gated_mlp(x, wg, wu, wd, F.silu, gate.mask)) < 1e-6
    w = _randn(8, 16, seed=4)
    assert rel_err(K.sparse_linear(x, w, None, Gate(k=np.int64(5))), ref.sparse_linear(x, w, None, ref.topk_mask(x, 5))) < 1e-6


@pytest.mark.parametrize("shape", [(0, 12), (0, 3, 12)])
def test_shared_masks_of_no_tokens_agree(shape):
    """No token to score: the reference and the kernels keep no channel (all of them when k keeps all)."""
    x = torch.empty(*shape, device=DEVICE)
    for k in (0, 5, 12):
        assert torch.equal(K.topk_mask(x, k, shared=True), ref.shared_topk_mask(x, k)), k
    for t in (-1.0, 0.5):
        assert torch.equal(K.threshold_mask(x, t, shared=True), ref.shared_threshold_mask(x, t)), t


def test_public_kernels_refuse_inputs_they_cannot_serve():
    """Each public kernel names the argument it refuses (a researcher calls these directly)."""
    x, w = _randn(2, 64), _randn(32, 64, seed=1)
    A, B = _randn(64, 4, seed=2), _randn(4, 32, seed=3)
    gate = Gate(k=8)
    cases = [
        (lambda: K.sparse_linear(x.tolist(), w, None, gate), TypeError, "x and weight must be torch.Tensors"),
        (lambda: K.sparse_linear(x.double(), w.double(), None, gate), TypeError, "serve float16/bfloat16/float32, got x.dtype=torch.float64"),
        (lambda: K.sparse_linear(x, w[0], None, gate), ValueError, r"weight must be 2-D \(out_features, in_features\), got shape \(64,\)"),
        (lambda: K.rsparse_linear(x, w, None, A.numpy(), B, gate), TypeError, "A and B must be torch.Tensors"),
        (lambda: K.rsparse_linear(x, w, None, A.to("meta"), B, gate), ValueError, r"A \(meta\) and B \(.*\) must be on x's device"),
        (lambda: K.topk_gate(x.tolist(), 8), TypeError, "x must be a torch.Tensor, got list"),
        (lambda: K.threshold_gate(x.to(torch.int32), 0.5), TypeError, "gating kernels serve float16/bfloat16/float32 activations, got torch.int32"),
        (lambda: K.topk_gate(x, 8, scale=torch.ones(64, device="meta")), ValueError, "scale is on meta"),
        (lambda: K.to_kernel_layout(w[0]), ValueError, r"weight must be 2-D \(out, in\), got shape \(64,\)"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
