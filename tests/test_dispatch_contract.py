"""Contract of the dispatch layer (sparse_infer.ops), the custom ops, the launch-config table and the
launchers' argument handling: which path a call takes, the errors a user gets (naming the problem and
the fix), and output shapes/dtypes/values for the inputs the kernel tests do not cover (1-D and 3-D x,
strided vectors, empty inputs, gradients on parameters only).

Written from a mutation audit of that logic; each test names what it guards.  Tiny shapes, default
fallback cutoffs (no autouse override here): per-token calls of at most 4 tokens and shared calls of at
most 16 run the kernels.
"""

import dataclasses
import importlib
import json
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import DEVICE, rel_err

from sparse_infer import kernels as K
from sparse_infer import ops
from sparse_infer import reference as ref
from sparse_infer.kernels import _autotune as at
from sparse_infer.kernels import _ops
from sparse_infer.kernels import sparse_matmul as sm
from sparse_infer.ops import Gate

gm = importlib.import_module("sparse_infer.kernels.gated_mlp")  # the package's `gated_mlp` is the function
CUDA = DEVICE == "cuda"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def rnd(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def make(M, in_f, out_f, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return g, rnd(g, M, in_f, dtype=dtype), rnd(g, out_f, in_f, dtype=dtype, scale=in_f ** -0.5), rnd(g, out_f, dtype=dtype)


def ref_sparse(x, w, b, mask):
    return ref.sparse_linear(x.double(), w.double(), None if b is None else b.double(), mask)


def ref_rsparse(x, w, b, mask, A, B):
    return ref.rsparse_linear(x.double(), w.double(), None if b is None else b.double(), mask, A.double(), B.double())


# --------------------------------------------------------------------------- ops: Gate, backends, gradients
def test_gate_takes_exactly_one_of_k_or_threshold():
    with pytest.raises(ValueError, match="exactly one of k"):
        Gate(k=3, threshold=torch.tensor(0.5))
    with pytest.raises(ValueError, match="exactly one of k"):
        Gate()


class _FakeCuda(torch.Tensor):
    """A CPU tensor that reports ``is_cuda``: the auto policy read without a GPU."""

    @property
    def is_cuda(self):
        return True


def test_auto_backend_picks_kernels_only_for_their_dtypes_on_cuda():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert ops.resolve_backend("auto", torch.zeros(2, 3, dtype=dtype).as_subclass(_FakeCuda)) == "triton"
        assert ops.resolve_backend("auto", torch.zeros(2, 3, dtype=dtype, device="cpu")) == "reference"
    for dtype in (torch.float64, torch.int32):
        assert ops.resolve_backend("auto", torch.zeros(2, 3, dtype=dtype).as_subclass(_FakeCuda)) == "reference"


def test_backend_errors_name_the_problem_and_the_fix(monkeypatch):
    g, x, w, b = make(2, 37, 23)
    gate = Gate(k=9)
    with pytest.raises(ValueError, match=r"backend='trition' is not one of \('auto', 'triton', 'reference'\)"):
        ops.sparse_linear(x, w, b, gate, backend="trition")
    with pytest.raises(TypeError, match=r"torch.float64.*backend='reference'"):
        ops.sparse_linear(x.double(), w.double(), b.double(), gate, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs a CUDA tensor") as e:
        ops.sparse_linear(x.cpu(), w.cpu(), b.cpu(), gate, backend="triton")
    assert "backend='auto'" in str(e.value) and "TRITON_INTERPRET=1" in str(e.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_the_kernels(dtype, kernel_calls):
    if not (CUDA or ops._interpreting()):
        pytest.skip("no CUDA and no Triton interpreter")
    g, x, w, b = make(3, 37, 23, dtype, seed=1)
    gate = Gate(k=12)
    with torch.no_grad():
        y = ops.sparse_linear(x, w, b, gate, backend="triton")
    assert kernel_calls == ["sparse_linear"]
    assert y.dtype == dtype and rel_err(y, ref_sparse(x, w, b, gate.mask(x))) < TOL[dtype]


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_gradients_on_parameters_alone_take_the_reference(which, kernel_calls):
    """Fine-tuning with frozen inputs: x needs no gradient, a parameter does.  The kernels have no
    backward, so the call must warn and run the differentiable reference, not drop the gradient."""
    g, x, w, b = make(2, 37, 23, seed=2)
    p = (w if which == "weight" else b).clone().requires_grad_(True)
    w_, b_ = (p, b) if which == "weight" else (w, p)
    gate = Gate(k=12)
    with pytest.warns(UserWarning, match="inference-only"):
        y = ops.sparse_linear(x, w_, b_, gate, backend="triton")
    assert y.requires_grad and not kernel_calls
    want = ref.sparse_linear(x, w_, b_, gate.mask(x))
    got_grad, = torch.autograd.grad(y.square().sum(), [p])
    want_grad, = torch.autograd.grad(want.square().sum(), [p])
    assert torch.equal(got_grad, want_grad)
    # the same parameters under no_grad: the kernels serve the call, no warning
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.sparse_linear(x, w_, b_, gate, backend="triton")
    assert kernel_calls == ["sparse_linear"]


def test_gated_mlp_with_an_activation_the_kernel_lacks_runs_the_reference(kernel_calls):
    """``act_name=None`` (e.g. ReLU, which the fused kernel does not know) must take the reference even
    when the kernels are asked for."""
    torch.manual_seed(0)
    gp, up, dp = nn.Linear(16, 40), nn.Linear(16, 40), nn.Linear(40, 16)
    x = torch.randn(1, 16, device=DEVICE)
    for m in (gp, up, dp):
        m.to(DEVICE)
    gate = Gate(k=20)
    with torch.no_grad():
        y = ops.gated_mlp(x, gp, up, dp, F.relu, None, gate, backend="triton")
        want = ref.gated_mlp(x, gp.weight, up.weight, dp.weight, F.relu, gate.mask, gp.bias, up.bias, dp.bias)
    assert "gated_mlp" not in kernel_calls
    assert y.shape == (1, 16) and rel_err(y, want) < 1e-6


# --------------------------------------------------------------------------- custom ops
def test_fake_kernels_give_shape_and_dtype_of_nd_inputs():
    """torch.compile plans with the fake (meta) kernels: (..., out) in x's dtype for 1-D and 3-D x."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    dtype = torch.bfloat16
    g, x, w, b = make(6, 37, 23, dtype)
    A, B = ref.lowrank_factors(w.float(), 4, dtype)
    wu, wd = w * 0.5, w.t().contiguous()  # an MLP 37 -> 23 -> 37
    gate = Gate(k=9)
    for xs in (x.reshape(2, 3, 37), x[0]):
        lead = tuple(xs.shape[:-1])
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx, fw, fb, fA, fB, fwu, fwd = (mode.from_tensor(t) for t in (xs, w, b, A, B, wu, wd))
            for f in (_ops.sparse_linear_op(fx, fw, fb, gate), _ops.rsparse_linear_op(fx, fw, fb, fA, fB, gate)):
                assert (tuple(f.shape), f.dtype) == (lead + (23,), dtype)
            f = _ops.gated_mlp_op(fx, fw, fwu, fwd, "silu", gate, fb, None, None)
            assert (tuple(f.shape), f.dtype) == (lead + (37,), dtype)


def test_custom_op_keeps_the_density_hint(monkeypatch):
    """Under torch.compile the call goes through the custom op: a threshold gate's density hint must
    survive the flattening, so a sparse gate still takes the compacted-id loop as in eager mode."""
    modes = []
    launch = sm._launch
    monkeypatch.setattr(sm, "_launch", lambda *a, **kw: modes.append(kw["mode"]) or launch(*a, **kw))
    g, x, w, b = make(1, 77, 53, seed=3)
    gate = Gate(threshold=torch.tensor(1.2, device=DEVICE), density=0.2)
    y = _ops.sparse_linear_op(x, w, b, gate)
    assert modes == [sm.MODE_COMPACT]
    assert rel_err(y, ref_sparse(x, w, b, gate.mask(x))) < 1e-5


# --------------------------------------------------------------------------- launch configs
def test_token_buckets_and_overrides():
    """Buckets 1 | 2..8 | 9..16 | 17..32 | 33..: an override replaces the given fields of its bucket's
    config (the others as in the table), applies to calls already cached, and resets with no fields."""
    assert [at.token_bucket(M) for M in (1, 2, 8, 9, 16, 17, 32, 33, 64, 65, 4096)] == \
        [1, 8, 8, 16, 16, 32, 32, 64, 64, 64, 64]
    dev, dt = torch.device(DEVICE), torch.bfloat16
    table = {M: at.matmul_config(M, 64, 64, dt, dev) for M in (1, 2, 8, 9)}  # cached before the override
    try:
        at.set_override(8, BLOCK_N=table[8].BLOCK_N * 2, programs_per_sm=7)
        for M in (2, 8):
            assert at.matmul_config(M, 64, 64, dt, dev) == dataclasses.replace(
                table[M], BLOCK_N=table[8].BLOCK_N * 2, programs_per_sm=7), M
        for M in (1, 9):
            assert at.matmul_config(M, 64, 64, dt, dev) == table[M], M
    finally:
        at.set_override(8)
    assert {M: at.matmul_config(M, 64, 64, dt, dev) for M in table} == table


@pytest.fixture
def gpu_tables(monkeypatch):
    """Launch configs as a CUDA device gets them (no kernel runs: only the config lookup), restored after."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(at.TUNING_ENV, raising=False)
    at.load_tuning(None)
    yield torch.device("cuda")
    for b in at._GPU:
        at.set_override(b)
    at.load_tuning(None)
    monkeypatch.delenv(at.TUNING_ENV, raising=False)
    at._TUNING["env"] = None
    at._CFG_CACHE.clear()


def test_tuning_file_replaces_the_gpu_table_for_its_buckets(gpu_tables, tmp_path, monkeypatch):
    """A tuning file (bench_kernels.py --final writes one) replaces the built-in GPU config of the buckets it
    names, through load_tuning or $SPARSE_INFER_TUNING; overrides apply on top of it; the interpreter keeps
    its table; unsetting the variable, or load_tuning(None), brings the built-in table back."""
    cuda, dt = gpu_tables, torch.bfloat16
    builtin = {M: at.matmul_config(M, 4096, 4096, dt, cuda) for M in (1, 9)}
    assert builtin[1] == dataclasses.replace(at._GPU[1], BLOCK_M=1)
    swapped = at.MatmulConfig(1, 128, 64, 4, 4, 3, swap_ab=True, pregate=True)
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(at.tuning_dict({1: swapped}, {1: dict(variant="swap_ab=True")}, device="GPU X")))
    monkeypatch.setenv(at.TUNING_ENV, str(path))
    got = at.matmul_config(1, 4096, 4096, dt, cuda)  # cached before the variable was set: looked up again
    assert got.swap_ab and got.use_dot and got.BLOCK_M == 16 and got.num_stages == 3
    assert at.matmul_config(9, 4096, 4096, dt, cuda) == builtin[9]  # a bucket the file does not name
    at.set_override(1, num_stages=4)  # a benchmark variant starts from the tuned config
    assert at.matmul_config(1, 4096, 4096, dt, cuda) == dataclasses.replace(got, num_stages=4)
    at.set_override(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert at.matmul_config(1, 4096, 4096, dt, torch.device("cpu")) == dataclasses.replace(at._INTERP[1], BLOCK_M=1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(at.TUNING_ENV)
    assert at.matmul_config(1, 4096, 4096, dt, cuda) == builtin[1]
    assert at.load_tuning(str(path)) == {1: swapped}  # the same file, by call
    assert at.matmul_config(1, 4096, 4096, dt, cuda) == got
    at.load_tuning(None)
    assert at.matmul_config(1, 4096, 4096, dt, cuda) == builtin[1]


@pytest.mark.parametrize("content, names", [
    (None, "cannot read"),
    ("{not json", "cannot read"),
    ({"format": "something else", "buckets": {}}, "not a sparse-infer tuning file"),
    ({"buckets": {"3": {"config": {}}}}, "token bucket '3'"),
    ({"buckets": {"1": {}}}, "no 'config'"),
    ({"buckets": {"1": {"config": dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=64, programs_per_sm=4, num_warps=4,
                                       num_stages=2, swap=True)}}}, "unknown MatmulConfig fields ['swap']"),
    ({"buckets": {"1": {"config": dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=48, programs_per_sm=4, num_warps=4,
                                       num_stages=2)}}}, "BLOCK_K=48"),
    ({"buckets": {"1": {"config": dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=64, programs_per_sm=4, num_warps=4,
                                       num_stages=2, prefetch="yes")}}}, "prefetch='yes'"),
    ({"buckets": {"1": {"config": dict(BLOCK_M=1, BLOCK_N=64)}}}, "bucket 1"),
])
def test_bad_tuning_file_is_a_clear_error_and_changes_nothing(gpu_tables, tmp_path, monkeypatch, content, names):
    cuda, dt = gpu_tables, torch.bfloat16
    before = at.matmul_config(1, 4096, 4096, dt, cuda)
    path = tmp_path / "tuning.json"
    if isinstance(content, dict):
        content = json.dumps({"format": at.TUNING_FORMAT, **content})
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(names)) as e:
        at.load_tuning(str(path))
    assert "bench_kernels.py --final" in str(e.value) or "bucket" in str(e.value)
    assert at.matmul_config(1, 4096, 4096, dt, cuda) == before and not at._TUNED
    monkeypatch.setenv(at.TUNING_ENV, str(path))  # the same through the variable: named, and raised each call
    for _ in range(2):
        with pytest.raises(ValueError, match=re.escape(at.TUNING_ENV)):
            at.matmul_config(1, 4096, 4096, dt, cuda)


def test_launch_config_fields_are_checked():
    with pytest.raises(ValueError, match="BLOCK_N=96"):
        at.MatmulConfig(1, 96, 64, 4, 1, 1)
    with pytest.raises(ValueError, match="num_warps=3"):
        at.MatmulConfig(1, 64, 64, 4, 3, 1)
    with pytest.raises(ValueError, match="compact_below=1.5"):
        at.MatmulConfig(1, 64, 64, 4, 1, 1, compact_below=1.5)
    with pytest.raises(ValueError, match="BLOCK_K='not a size'"):
        at.set_override(1, BLOCK_K="not a size")
    assert 1 not in at._OVERRIDE


def test_launch_config_does_not_depend_on_earlier_calls():
    """The cached config of M tokens is the one computed for M alone (not for another M of its bucket)."""
    dev = torch.device(DEVICE)
    fresh = {}
    for M in range(1, 70):
        at._CFG_CACHE.clear()
        fresh[M] = at.matmul_config(M, 64, 64, torch.float32, dev)
    at._CFG_CACHE.clear()
    for M in list(range(1, 70)) + list(range(69, 0, -1)):
        assert at.matmul_config(M, 64, 64, torch.float32, dev) == fresh[M], M


def test_split_k_never_leaves_a_split_empty():
    """(splits, blocks per split) cover every K block and each split owns at least one."""
    cfg = at.matmul_config(1, 64, 64, torch.float32, torch.device(DEVICE))
    for k_blocks in range(1, 70):
        for n_tiles in (1, 3, 64):
            s, per = at.split_k(n_tiles, 1, k_blocks, cfg, torch.device(DEVICE))
            assert s >= 1 and per >= 1 and (s - 1) * per < k_blocks <= s * per, (k_blocks, n_tiles, s, per)


def test_per_token_cutoff_never_exceeds_the_shared_one(monkeypatch):
    """``PER_TOKEN_FALLBACK_TOKENS`` is the lower cutoff: raising it above ``DENSE_FALLBACK_TOKENS``
    must not send per-token calls the shared masks already send to the dense path to the kernels."""
    monkeypatch.setattr(sm, "DENSE_FALLBACK_TOKENS", 2)
    monkeypatch.setattr(sm, "PER_TOKEN_FALLBACK_TOKENS", 8)
    for shared in (False, True):
        assert not sm._fallback(2, Gate(k=1, shared=shared)) and sm._fallback(3, Gate(k=1, shared=shared))


# --------------------------------------------------------------------------- launcher arguments
def test_linear_argument_errors():
    g, x, w, b = make(2, 37, 23)
    gate = Gate(k=9)
    with pytest.raises(ValueError, match="weight is on meta"):
        K.sparse_linear(x, w.to("meta"), None, gate)
    with pytest.raises(ValueError, match=r"bias must have shape \(23,\)"):
        K.sparse_linear(x, w, torch.zeros(24, device=DEVICE), gate)
    with pytest.raises(TypeError, match="bias must be torch.float32"):
        K.sparse_linear(x, w, b.half(), gate)
    A, B = ref.lowrank_factors(w, 4)
    with pytest.raises(ValueError, match="same r"):
        K.rsparse_linear(x, w, b, A, B[:3], gate)


@pytest.mark.parametrize("M", [1, 3])
def test_strided_bias_scale_and_threshold(M):
    """Per-channel vectors given as strided views (every other element of a buffer) are read by value."""
    g, x, w, b = make(M, 37, 23, seed=10 + M)
    bs = torch.stack([b, -b], dim=-1)[..., 0]
    scale = torch.stack([torch.rand(37, generator=g) + 0.5] * 2, dim=-1)[..., 0].to(DEVICE)
    t = torch.rand(37, generator=g).to(DEVICE) * 0.8
    ts = torch.stack([t, -t], dim=-1)[..., 0]
    assert not any(v.is_contiguous() for v in (bs, scale, ts))
    A, B = ref.lowrank_factors(w, 4)
    for gate in (Gate(k=12, scale=scale), Gate(threshold=ts, scale=scale), Gate(threshold=ts, shared=True)):
        mask = gate.mask(x)
        assert rel_err(K.sparse_linear(x, w, bs, gate), ref_sparse(x, w, b, mask)) < 1e-5
        assert rel_err(K.rsparse_linear(x, w, bs, A, B, gate), ref_rsparse(x, w, b, mask, A, B)) < 1e-5


def test_threshold_of_shape_one_is_a_scalar():
    g, x, w, b = make(2, 37, 23, seed=4)
    gate = Gate(threshold=torch.tensor([0.6], device=DEVICE))
    assert rel_err(K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, gate.mask(x))) < 1e-5
    assert torch.equal(K.threshold_mask(x, gate.threshold), ref.threshold_mask(x, gate.threshold))


def test_output_shapes_for_1d_3d_and_empty_inputs():
    """(..., in) -> (..., out) on the kernel path (per-token <= 4 tokens, shared decode steps), equal to
    the reference; no tokens give an empty result of the right shape."""
    g, x, w, b = make(3, 37, 23, seed=5)
    A, B = ref.lowrank_factors(w, 4)
    wu, wd = w * 0.5, w.t().contiguous()  # gated MLP 37 -> 23 -> 37
    silu = F.silu
    cases = [(x[0], Gate(k=12)), (x.reshape(1, 3, 37), Gate(k=12)), (x.reshape(3, 1, 37), Gate(k=12, shared=True)),
             (x.reshape(3, 1, 37), Gate(threshold=torch.tensor(0.7, device=DEVICE), shared=True))]
    for xs, gate in cases:
        lead = tuple(xs.shape[:-1])
        mask = gate.mask(xs)
        y = K.sparse_linear(xs, w, b, gate)
        assert tuple(y.shape) == lead + (23,) and rel_err(y, ref_sparse(xs, w, b, mask)) < 1e-5
        y = K.rsparse_linear(xs, w, b, A, B, gate)
        assert tuple(y.shape) == lead + (23,) and rel_err(y, ref_rsparse(xs, w, b, mask, A, B)) < 1e-5
        y = K.gated_mlp(xs, w, wu, wd, "silu", gate, b)
        want = ref.gated_mlp(xs, w, wu, wd, silu, gate.mask, b, None, None)
        assert tuple(y.shape) == lead + (37,) and rel_err(y, want) < 1e-5
    for xs in (x[:0], x.reshape(1, 3, 37)[:, :0]):
        lead = tuple(xs.shape[:-1])
        for gate in (Gate(k=12), Gate(threshold=torch.tensor(0.7, device=DEVICE))):
            assert tuple(K.sparse_linear(xs, w, b, gate).shape) == lead + (23,)
            assert tuple(K.rsparse_linear(xs, w, b, A, B, gate).shape) == lead + (23,)
            assert tuple(K.gated_mlp(xs, w, wu, wd, "silu", gate, b).shape) == lead + (37,)


def test_rank_zero_factors_and_factor_dtype():
    """Rank 0 is the plain sparse linear; factors stored in another dtype are cast to x's (the result is
    the one with factors already in x's dtype)."""
    g, x, w, b = make(2, 37, 23, torch.float16, seed=6)
    gate = Gate(k=12)
    A0, B0 = ref.lowrank_factors(w.float(), 0, torch.float16)
    assert torch.equal(K.rsparse_linear(x, w, b, A0, B0, gate), K.sparse_linear(x, w, b, gate))
    A, B = ref.lowrank_factors(w.float(), 4, torch.float32)
    y32 = K.rsparse_linear(x, w, b, A, B, gate)
    y16 = K.rsparse_linear(x, w, b, A.half(), B.half(), gate)
    assert y32.dtype == torch.float16
    assert rel_err(y32, y16) < (1e-3 if CUDA else 1e-7)


def test_gating_argument_errors():
    with pytest.raises(ValueError, match="at least one dimension"):
        K.topk_mask(torch.tensor(1.0, device=DEVICE), 1)
    with pytest.raises(TypeError, match="k must be an int"):
        K.topk_mask(torch.randn(2, 5, device=DEVICE), True)
    empty = torch.randn(0, 37, device=DEVICE)
    assert K.topk_mask(empty, 5).shape == (0, 37) and K.topk_gate(empty, 5).shape == (0, 37)


# --------------------------------------------------------------------------- gated MLP launcher
def _mlp(M, hidden=37, inter=23, seed=7):
    g = torch.Generator().manual_seed(seed)
    return (rnd(g, M, hidden), rnd(g, inter, hidden, scale=hidden ** -0.5), rnd(g, inter, hidden, scale=hidden ** -0.5),
            rnd(g, hidden, inter, scale=inter ** -0.5), rnd(g, hidden, scale=0.1))


def test_gated_mlp_runs_its_kernels_up_to_max_tokens(monkeypatch):
    x, wg, wu, wd, bd = _mlp(gm.MAX_KERNEL_TOKENS + 1)
    gate = Gate(threshold=0.3)
    want = ref.gated_mlp(x, wg, wu, wd, F.silu, gate.mask, None, None, bd)
    used_ref = []
    real = ref.gated_mlp
    monkeypatch.setattr(ref, "gated_mlp", lambda *a, **kw: used_ref.append(1) or real(*a, **kw))
    n = gm.MAX_KERNEL_TOKENS
    assert rel_err(gm.gated_mlp(x[:n], wg, wu, wd, "silu", gate, None, None, bd), want[:n]) < 1e-5
    assert not used_ref  # the kernels served 16 tokens
    assert rel_err(gm.gated_mlp(x, wg, wu, wd, "silu", gate, None, None, bd), want) < 1e-5
    assert used_ref  # 17 tokens: the reference


def test_gated_mlp_without_intermediate_channels_is_the_down_bias():
    x, wg, wu, wd, bd = _mlp(2)
    out = gm.gated_mlp(x, wg[:0], wu[:0], wd[:, :0], "silu", Gate(k=0), None, None, bd)
    want = ref.gated_mlp(x, wg[:0], wu[:0], wd[:, :0], F.silu, Gate(k=0).mask, None, None, bd)
    assert out.shape == (2, 37) and torch.equal(out, want)


def test_gated_mlp_argument_errors(monkeypatch):
    x, wg, wu, wd, bd = _mlp(1)
    with pytest.raises(ValueError, match="down_bias is on meta"):
        gm.gated_mlp(x, wg, wu, wd, "silu", Gate(k=5), None, None, bd.to("meta"))
    if not CUDA:  # a CPU tensor without the interpreter: the kernels cannot run it
        monkeypatch.setattr(gm, "interpreting", lambda: False)
        with pytest.raises(RuntimeError, match="needs CUDA tensors") as e:
            gm.gated_mlp(x, wg, wu, wd, "silu", Gate(k=5))
        assert "TRITON_INTERPRET=1" in str(e.value) and "reference.gated_mlp" in str(e.value)


# --------------------------------------------------------------------------- zero input features
def test_zero_input_features_give_the_bias():
    """in_features == 0 (x.reshape(-1, 0) cannot infer the rows): the result is the bias, as the reference says."""
    x, w, b = torch.randn(3, 0, device=DEVICE), torch.randn(4, 0, device=DEVICE), torch.randn(4, device=DEVICE)
    assert torch.equal(K.sparse_linear(x, w, b, Gate(k=0)), b.expand(3, 4))
    assert torch.equal(K.sparse_linear(x.reshape(1, 3, 0), w, None, Gate(k=0)), torch.zeros(1, 3, 4, device=DEVICE))
    A, B = torch.randn(0, 2, device=DEVICE), torch.randn(2, 4, device=DEVICE)
    assert torch.equal(K.rsparse_linear(x, w, b, A, B, Gate(k=0)), b.expand(3, 4))
    g, u, d = torch.randn(5, 0, device=DEVICE), torch.randn(5, 0, device=DEVICE), torch.randn(6, 5, device=DEVICE)
    want = ref.gated_mlp(x, g, u, d, F.silu, lambda h: torch.ones_like(h, dtype=torch.bool))
    assert torch.equal(K.gated_mlp(x, g, u, d, "silu", Gate(k=5)), want)  # silu(0) * 0 = 0: zeros
