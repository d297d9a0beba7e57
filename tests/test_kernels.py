"""sparse_linear / rsparse_linear / gating kernels against sparse_infer.reference.

Runs under the Triton interpreter on the CPU (conftest sets TRITON_INTERPRET=1)
and natively on CUDA.  Shapes are tiny and odd (masked edges, split-K with a
partial last block); the parameter grid is spread over cases rather than a full
product to keep the whole file around a minute on a 2-core CPU.
"""

import itertools

import pytest
import torch
from conftest import DEVICE, rel_err

from sparse_infer import reference as ref
from sparse_infer import kernels as K
from sparse_infer.kernels import sparse_matmul as sm
from sparse_infer.ops import Gate

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
CUDA = DEVICE == "cuda"


@pytest.fixture(autouse=True)
def kernel_path(monkeypatch):
    """Exercise the kernels themselves up to 64 tokens (the dense fallback has its own test)."""
    monkeypatch.setattr(sm, "DENSE_FALLBACK_TOKENS", 64)
    monkeypatch.setattr(sm, "PER_TOKEN_FALLBACK_TOKENS", 64)


def rnd(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def make(M, in_f, out_f, dtype, seed=0, bias=True, layout="col"):
    g = torch.Generator().manual_seed(seed)
    x = rnd(g, M, in_f, dtype=dtype)
    w = rnd(g, out_f, in_f, dtype=dtype, scale=in_f ** -0.5)
    if layout == "col":
        w = K.to_kernel_layout(w)
    elif layout == "strided":  # neither row- nor column-major: every other column of a wider matrix
        wide = rnd(g, out_f, 2 * in_f, dtype=dtype, scale=in_f ** -0.5)
        w = wide[:, ::2]
    b = rnd(g, out_f, dtype=dtype) if bias else None
    return g, x, w, b


def make_gate(kind, x, sparsity, g, shared=False):
    """A gate that leaves about ``sparsity`` of the channels inactive."""
    in_f = x.shape[-1]
    scale = (torch.rand(in_f, generator=g) + 0.5).to(DEVICE) if "scale" in kind else None
    if kind.startswith("topk"):
        return Gate(k=int(round((1 - sparsity) * in_f)), scale=scale, shared=shared)
    score = x.float().abs() * (scale if scale is not None else 1.0)
    if shared:
        score = score.reshape(-1, in_f).mean(0)
    if sparsity <= 0:
        t = torch.tensor(-1.0)
    elif sparsity >= 1:
        t = torch.tensor(float("inf"))
    else:
        t = torch.quantile(score.flatten().cpu(), sparsity)
    t = t.to(DEVICE)
    if "vec" in kind:  # per-channel thresholds around the quantile
        t = t * (torch.rand(in_f, generator=g).to(DEVICE) * 0.4 + 0.8)
    return Gate(threshold=t, scale=scale, shared=shared)


def ref_sparse(x, w, b, mask):
    return ref.sparse_linear(x.double(), w.double(), None if b is None else b.double(), mask)


def ref_rsparse(x, w, b, mask, A, B):
    return ref.rsparse_linear(x.double(), w.double(), None if b is None else b.double(), mask, A.double(), B.double())


# --------------------------------------------------------------------------- input-sparse linear
GATES = ["thresh", "thresh_vec_scale", "topk", "topk_scale"]
SHAPES = [(37, 53), (129, 77)] + ([(577, 1539), (4096, 1024)] if CUDA else [])


GATE_CASES = list(itertools.product(GATES, [False, True]))  # 8 (gate kind, shared) pairs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_linear(shape, M, dtype):
    in_f, out_f = shape
    # each test takes 3 of the 8 gate cases, rotating, so the grid covers all of them per shape
    start = 3 * (DTYPES.index(dtype) + 3 * [1, 3, 16].index(M))
    for i in range(start, start + (8 if CUDA else 3)):
        kind, shared = GATE_CASES[i % 8]
        sparsity = [0.5, 0.9][i % 2]
        g, x, w, b = make(M, in_f, out_f, dtype, seed=i + 10 * M, bias=i % 3 != 2)
        gate = make_gate(kind, x, sparsity, g, shared)
        y = K.sparse_linear(x, w, b, gate)
        yr = ref_sparse(x, w, b, gate.mask(x))
        assert y.dtype == dtype and y.shape == (M, out_f)
        assert rel_err(y, yr) < TOL[dtype], (kind, shared, sparsity)


@pytest.mark.parametrize("kind", ["thresh", "topk"])
@pytest.mark.parametrize("steps", [1, 3])
def test_shared_per_decode_step(kind, steps):
    """Shared gating of a (batch, seq, in) input: one mask per position seq (RMS over the batch)."""
    g = torch.Generator().manual_seed(3)
    x = rnd(g, 4, steps, 37, dtype=torch.float16)
    w = rnd(g, 53, 37, dtype=torch.float16, scale=37 ** -0.5)
    gate = make_gate(kind, x, 0.5, g, shared=True)
    y = K.sparse_linear(x, w, None, gate)
    assert y.shape == (4, steps, 53)
    assert rel_err(y, ref_sparse(x, w, None, gate.mask(x))) < TOL[torch.float16]


@pytest.mark.parametrize("sparsity", [0.0, 1.0])
@pytest.mark.parametrize("kind", ["thresh", "topk"])
@pytest.mark.parametrize("shared", [False, True])
def test_sparsity_extremes(sparsity, kind, shared):
    dtype = torch.bfloat16
    g, x, w, b = make(3, 37, 53, dtype)
    gate = make_gate(kind, x, sparsity, g, shared)
    y = K.sparse_linear(x, w, b, gate)
    yr = ref_sparse(x, w, b, gate.mask(x))
    if sparsity == 1.0:  # nothing active: exactly the bias
        assert torch.equal(y, b.expand_as(y))
    else:
        assert rel_err(y, yr) < TOL[dtype]


@pytest.mark.parametrize("layout", ["row", "col", "strided"])
@pytest.mark.parametrize("M", [1, 4])
def test_weight_layouts_and_noncontiguous_x(layout, M):
    dtype = torch.float16
    g, x, w, b = make(M, 53, 37, dtype, layout=layout)
    x3 = rnd(g, 2, 53, M, dtype=dtype).transpose(1, 2)  # (2, M, 53), non-contiguous
    gate = make_gate("thresh", x3, 0.5, g)
    y = K.sparse_linear(x3, w, None, gate)
    yr = ref_sparse(x3, w, None, gate.mask(x3))
    assert y.shape == (2, M, 37)
    assert rel_err(y, yr) < TOL[dtype]
    # 2-D inputs whose channels are strided (a transpose, every other column): read in place, not copied
    for x2 in (rnd(g, 53, M, dtype=dtype).t(), rnd(g, M, 106, dtype=dtype)[:, ::2]):
        gate = make_gate("thresh", x2, 0.5, g)
        assert rel_err(K.sparse_linear(x2, w, b, gate), ref_sparse(x2, w, b, gate.mask(x2))) < TOL[dtype]
        A, B = ref.lowrank_factors(w.float(), 4, dtype)
        y = K.rsparse_linear(x2, w, b, A, B, gate)
        assert rel_err(y, ref_rsparse(x2, w, b, gate.mask(x2), A, B)) < TOL[dtype]


def test_even_n_only_when_n_fills_the_tiles(monkeypatch):
    """EVEN_N drops the column bound on W loads: it must be off when N is not a multiple of BLOCK_N (the
    interpreter cannot see the out-of-bounds reads, a GPU can)."""
    seen = []
    kern = sm._sparse_mm_kernel

    class LaunchSpy:  # kernel[grid](...) records the launch's meta-parameters, then launches
        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen.append(kw)
                return kern[grid](*a, **kw)
            return launch

    monkeypatch.setattr(sm, "_sparse_mm_kernel", LaunchSpy())
    for out_f in (53, 64, 133, 256):
        seen.clear()
        g, x, w, b = make(1, 37, out_f, torch.float32)
        K.sparse_linear(x, w, b, make_gate("thresh", x, 0.5, g))
        kw, = seen
        assert kw["EVEN_N"] == (out_f % kw["BLOCK_N"] == 0), (out_f, kw["BLOCK_N"])


@pytest.mark.parametrize("kind", ["thresh", "topk"])
def test_zero_input(kind):
    g, x, w, b = make(3, 37, 53, torch.float32)
    x = torch.zeros_like(x)
    gate = Gate(k=10) if kind == "topk" else Gate(threshold=torch.tensor(0.0, device=DEVICE))
    y = K.sparse_linear(x, w, b, gate)
    assert torch.allclose(y.double(), ref_sparse(x, w, b, gate.mask(x)), atol=1e-6)


@pytest.mark.parametrize("kind", ["thresh", "thresh_sparse", "topk", "topk0"])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("rank", [0, 4])
def test_nan_propagation(kind, M, rank):
    """NaN where the reference has it; at M=1 top-k (k/K <= 0.25) and the low-density threshold hint
    take the compacted-id loop, the others the masked loop."""
    g, x, w, b = make(M, 37, 53, torch.float32)
    x[0, 5] = float("nan")
    t = torch.tensor(0.5, device=DEVICE)
    gate = {"thresh": Gate(threshold=t), "thresh_sparse": Gate(threshold=t, density=0.2), "topk": Gate(k=9),
            "topk0": Gate(k=0)}[kind]
    mask = gate.mask(x)
    if rank:
        A, B = ref.lowrank_factors(w.float(), rank, torch.float32)
        y, yr = K.rsparse_linear(x, w, b, A, B, gate), ref_rsparse(x, w, b, mask, A, B)
    else:
        y, yr = K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, mask)
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    fin = ~torch.isnan(yr)
    assert rel_err(y[fin], yr[fin]) < 1e-5


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("density", [None, 0.2])
def test_nan_threshold_keeps_its_channel(M, shared, density):
    """A NaN in a per-channel threshold keeps that channel (score <= NaN is false), on every gating path:
    in the matmul (one token), in the gate pass (several tokens) and in the compacting gate pass."""
    g, x, w, b = make(M, 37, 53, torch.float32, seed=4)
    t = torch.full((37,), 5.0, device=DEVICE)  # above every |x|: only the NaN channels stay active
    t[[3, 30]] = float("nan")
    gate = Gate(threshold=t, shared=shared, density=density)
    mask = gate.mask(x)
    assert mask.reshape(-1, 37)[:, [3, 30]].all() and mask.sum() == 2 * mask.reshape(-1, 37).shape[0]
    assert rel_err(K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, mask)) < 1e-5


def test_rsparse_fallback_keeps_one_shared_mask_per_decode_step(monkeypatch):
    """Above the cutoff the rank-aware op runs gate + dense matmuls: a shared gate over (batch, steps, in)
    still takes one mask per step."""
    monkeypatch.setattr(sm, "DENSE_FALLBACK_TOKENS", 2)
    g = torch.Generator().manual_seed(6)
    x = rnd(g, 6, 4, 37)
    w = rnd(g, 53, 37, scale=37 ** -0.5)
    b = rnd(g, 53)
    A, B = ref.lowrank_factors(w, 5, torch.float32)
    for gate in (Gate(k=12, shared=True), make_gate("thresh", x, 0.5, g, shared=True)):
        mask = gate.mask(x)
        assert mask.shape == (4, 37)
        assert rel_err(K.rsparse_linear(x, w, b, A, B, gate), ref_rsparse(x, w, b, mask, A, B)) < 1e-5
        assert rel_err(K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, mask)) < 1e-5


def test_launch_config_is_cached_per_token_count():
    """The config cache must key on the token count: M = 16 tiles reused for one token (or the reverse)
    is a slow launch that no result would reveal."""
    from sparse_infer.kernels import _autotune as at
    from sparse_infer import ops

    for order in ((1, 3, 16), (16, 3, 1)):
        at._CFG_CACHE.clear()
        got = {M: at.matmul_config(M, 64, 64, torch.float32, torch.device(DEVICE)).BLOCK_M for M in order}
        assert got[1] == 1 and got[3] >= 3 and got[16] >= 16, (order, got)
    # backend "auto" serves CPU tensors with the reference even where the interpreter could run kernels
    assert ops.resolve_backend("auto", torch.randn(2)) == "reference"


def test_dense_fallback(monkeypatch):
    monkeypatch.setattr(sm, "DENSE_FALLBACK_TOKENS", 2)
    monkeypatch.setattr(sm, "PER_TOKEN_FALLBACK_TOKENS", 1)
    assert not sm._fallback(1, Gate(k=1)) and sm._fallback(2, Gate(k=1)) and not sm._fallback(2, Gate(k=1, shared=True))
    for kind, shared in [("thresh", False), ("topk", True), ("topk_scale", False), ("thresh", True)]:
        g, x, w, b = make(5, 37, 53, torch.float32)
        gate = make_gate(kind, x, 0.5, g, shared)
        assert rel_err(K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, gate.mask(x))) < 1e-5
        A, B = ref.lowrank_factors(w.float(), 3, torch.float32)
        assert rel_err(K.rsparse_linear(x, w, b, A, B, gate), ref_rsparse(x, w, b, gate.mask(x), A, B)) < 1e-5


def test_shared_many_tokens():
    """Shared mode with more tokens than one tile holds (mask precomputed, several M tiles)."""
    g, x, w, b = make(40, 37, 53, torch.bfloat16)
    for kind in ["thresh", "topk"]:
        gate = make_gate(kind, x, 0.5, g, shared=True)
        assert rel_err(K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, gate.mask(x))) < TOL[torch.bfloat16]


@pytest.mark.parametrize("use_dot", [False, True])
@pytest.mark.parametrize("gating", ["fused", "pregate", "compact"])
def test_matmul_paths(use_dot, gating):
    """Every (tl.dot | fp32 FMA) x (in-kernel gate | separate gate pass | compacted channel ids) path,
    whatever the config table picks; M=1 (GEMV) included for the compacted path."""
    from sparse_infer.kernels import _autotune as at
    buckets = (1, 8, 16) if gating == "compact" else (8, 16)
    try:
        for bucket in buckets:
            at.set_override(bucket, use_dot=use_dot, pregate=gating != "fused", compact=gating == "compact",
                            BLOCK_M=16 if use_dot else 8)
        cases = [(5, "thresh_vec_scale", False), (16, "topk", True), (7, "thresh", True), (12, "topk_scale", False)]
        if gating == "compact":
            cases += [(1, "thresh", False), (1, "topk_scale", False)]
        for i, (M, kind, shared) in enumerate(cases):
            dtype = DTYPES[i % 3]
            g, x, w, b = make(M, 77, 64 if i == 1 else 53, dtype, seed=i)  # 64: N a multiple of BLOCK_N
            gate = make_gate(kind, x, [0.5, 0.9][i % 2], g, shared)
            assert rel_err(K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, gate.mask(x))) < TOL[dtype]
            A, B = ref.lowrank_factors(w.float(), 4, dtype)
            assert rel_err(K.rsparse_linear(x, w, b, A, B, gate),
                           ref_rsparse(x, w, b, gate.mask(x), A, B)) < TOL[dtype]
        if gating == "compact":  # all channels inactive / all active
            g, x, w, b = make(3, 77, 53, torch.float32, seed=9)
            for sp in (0.0, 1.0):
                gate = make_gate("thresh", x, sp, g)
                assert rel_err(K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, gate.mask(x))) < 1e-5
    finally:
        for bucket in buckets:
            at.set_override(bucket)


@pytest.mark.parametrize("variant", [dict(acc_2d=True), dict(bf16_pairs=True), dict(acc_2d=True, bf16_pairs=True)])
@pytest.mark.parametrize("gating", ["fused", "pregate", "compact"])
def test_gemv_variants(gating, variant):
    """One token through the opt-in GEMV variants: `acc_2d` (a (BLOCK_K, BLOCK_N) accumulator reduced once
    after the loop) and `bf16_pairs` (bf16 W^T rows read as int32 column pairs and widened with bit
    operations), via the in-kernel gate, the separate gate pass and the compacted ids; low-rank rows
    included.  bf16 weights an int32 read cannot serve (odd N, a 2-byte-aligned view) take the plain loads."""
    from sparse_infer.kernels import _autotune as at
    cases = [("thresh", 0.5, torch.bfloat16, 54), ("topk_scale", 0.9, torch.bfloat16, 54),
             ("thresh_vec_scale", 0.0, torch.float16, 54), ("topk", 1.0, torch.float32, 54),
             ("thresh", 0.3, torch.bfloat16, 53), ("topk", 0.5, torch.bfloat16, 128),
             ("thresh", 0.7, torch.float32, 64)]  # 128, 64: N a multiple of BLOCK_N
    try:
        at.set_override(1, pregate=gating != "fused", compact=gating == "compact", **variant)
        for i, (kind, sp, dtype, out_f) in enumerate(cases):
            g, x, w, b = make(1, 77, out_f, dtype, seed=20 + i)
            assert sm._pairs_ok(w) == (dtype == torch.bfloat16 and out_f % 2 == 0)
            gate = make_gate(kind, x, sp, g)
            assert rel_err(K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, gate.mask(x))) < TOL[dtype]
            A, B = ref.lowrank_factors(w.float(), 4, dtype)
            assert rel_err(K.rsparse_linear(x, w, b, A, B, gate),
                           ref_rsparse(x, w, b, gate.mask(x), A, B)) < TOL[dtype]
        # a column-major view starting one element in: 2-byte aligned, so not read as pairs
        g, x, w, b = make(1, 77, 54, torch.bfloat16, seed=30)
        wv = K.to_kernel_layout(torch.cat([w.new_zeros(1, 77), w])).t().reshape(-1)[1:].as_strided((54, 77), (1, 55))
        assert torch.equal(wv, w) and not sm._pairs_ok(wv)
        gate = make_gate("thresh", x, 0.5, g)
        assert rel_err(K.sparse_linear(x, wv, b, gate), ref_sparse(x, w, b, gate.mask(x))) < TOL[torch.bfloat16]
    finally:
        at.set_override(1)


@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("gating", ["fused", "pregate", "compact"])
def test_prefetch(gating, M):
    """`prefetch` (the next block's x and gate, or its active ids, loaded while this block's rows are in flight)
    over several K blocks per program, a partial last block, sparsity 0 and 1, NaN in x, low-rank rows,
    the GEMV (M=1) and tensor-core (M=5, padded to 16) paths."""
    from sparse_infer.kernels import _autotune as at
    bucket = at.token_bucket(M)
    cases = [("thresh_vec_scale", 0.5, torch.bfloat16), ("topk", 0.9, torch.float16), ("thresh", 0.0, torch.float32),
             ("topk_scale", 1.0, torch.bfloat16), ("thresh", 0.3, torch.float32)]
    try:
        at.set_override(bucket, pregate=gating != "fused", compact=gating == "compact", prefetch=True,
                        **(dict(use_dot=True, BLOCK_M=16) if M > 1 else {}))
        for i, (kind, sp, dtype) in enumerate(cases):
            g, x, w, b = make(M, 300, 54, dtype, seed=40 + i)  # 10 blocks of 32 channels: 4 per program, 12 left over
            if i == 4:
                x[0, 7] = float("nan")
            gate = make_gate(kind, x, sp, g)
            y, yr = K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, gate.mask(x))
            assert torch.equal(y.isnan(), yr.isnan())
            assert rel_err(y.nan_to_num(), yr.nan_to_num()) < TOL[dtype]
            if i < 2:
                A, B = ref.lowrank_factors(w.float(), 4, dtype)
                assert rel_err(K.rsparse_linear(x, w, b, A, B, gate), ref_rsparse(x, w, b, gate.mask(x), A, B)) < TOL[dtype]
    finally:
        at.set_override(bucket)


@pytest.mark.parametrize("M, gating", [(1, "fused"), (1, "fused-prefetch"), (1, "pregate"), (1, "compact"),
                                       (3, "pregate"), (3, "compact"), (16, "pregate"), (16, "compact"),
                                       (20, "fused")])
def test_swap_ab(gating, M):
    """`swap_ab` (the W^T tile as the MMA's M side, the tokens padded to 16 as its N side: sm_90 wgmma): one token
    (gate in-kernel on its row, with and without the next block's gate prefetched, or a gate pass) and several
    (always a gate pass), per-token and shared masks, every dtype, sparsity 0 / 0.5 / 0.9 / 1, NaN in x, a
    partial last K block and N tile, low-rank rows, a non-contiguous x and a row-major weight, against the
    reference."""
    from sparse_infer.kernels import _autotune as at
    bucket = at.token_bucket(M)
    cases = [("thresh_vec_scale", 0.5, torch.bfloat16, False), ("topk", 0.9, torch.float16, False),
             ("thresh", 0.0, torch.float32, True), ("topk_scale", 1.0, torch.bfloat16, True),
             ("topk", 0.5, torch.float32, False)]
    try:
        # 4 warps and 3 stages: the wgmma path on an H100 (the interpreter ignores both)
        at.set_override(bucket, swap_ab=True, pregate=not gating.startswith("fused"), compact=gating == "compact",
                        prefetch=gating == "fused-prefetch", num_warps=4, num_stages=4 if "prefetch" in gating else 3)
        cfg = at.matmul_config(M, 54, 300, torch.float32, torch.device(DEVICE))
        assert cfg.use_dot and cfg.BLOCK_M >= 16  # what swap_ab implies, also for one token
        assert cfg.pregate == (M > 1 or not gating.startswith("fused"))
        for i, ((kind, sp, dtype, shared), (in_f, out_f)) in enumerate(
                itertools.product(cases, [(300, 54)] + ([(1539, 577)] if CUDA else []))):
            i //= 2 if CUDA else 1
            g, x, w, b = make(M, in_f, out_f, dtype, seed=60 + i, layout="row" if i == 2 else "col")
            if i == 4:
                x[0, 7] = float("nan")
            if i == 1:  # every other column of a wider x
                x = torch.stack([x, -x], dim=-1)[..., 0]
                assert not x.is_contiguous()
            gate = make_gate(kind, x, sp, g, shared=shared)
            y, yr = K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, gate.mask(x))
            assert torch.equal(y.isnan(), yr.isnan())
            assert rel_err(y.nan_to_num(), yr.nan_to_num()) < TOL[dtype]
            if i in (0, 1, 4):
                A, B = ref.lowrank_factors(w.float(), 4, dtype)
                y, yr = K.rsparse_linear(x, w, b, A, B, gate), ref_rsparse(x, w, b, gate.mask(x), A, B)
                assert torch.equal(y.isnan(), yr.isnan())
                assert rel_err(y.nan_to_num(), yr.nan_to_num()) < TOL[dtype]
    finally:
        at.set_override(bucket)


@pytest.mark.skipif(CUDA, reason="on CUDA the 16-bit dot is native already (test_swap_ab)")
@pytest.mark.parametrize("M", [1, 5])
def test_swap_ab_native_fp16_dot(M, monkeypatch):
    """The swapped path's native 16-bit dot (the GPU's; the interpreter otherwise takes the fp32 one), where x
    goes to the MMA without a select (it was loaded zero-filled): fp16 under the interpreter, in-kernel gate,
    pregated and compacted loops, low-rank rows.  (The interpreter multiplies bf16's raw bits after a transpose, so bf16 is
    left to the CUDA run of test_swap_ab.)"""
    from sparse_infer.kernels import _autotune as at
    kern = sm._sparse_mm_kernel
    seen = []

    class Native:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen.append(kw["SWAP_AB"] and kw["USE_DOT"])
                return kern[grid](*a, **dict(kw, DOT_NATIVE=kw["USE_DOT"]))
            return launch

    monkeypatch.setattr(sm, "_sparse_mm_kernel", Native())
    bucket = at.token_bucket(M)
    try:
        for pregate, compact in ((False, False), (True, False), (True, True)):  # one token: gate in-kernel too
            at.set_override(bucket, swap_ab=True, pregate=pregate, compact=compact, prefetch=not pregate)
            g, x, w, b = make(M, 300, 54, torch.float16, seed=80 + M)
            gate = make_gate("topk", x, 0.5, g)
            assert rel_err(K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, gate.mask(x))) < TOL[torch.float16]
            A, B = ref.lowrank_factors(w.float(), 4, torch.float16)
            y, yr = K.rsparse_linear(x, w, b, A, B, gate), ref_rsparse(x, w, b, gate.mask(x), A, B)
            assert rel_err(y, yr) < TOL[torch.float16]
    finally:
        at.set_override(bucket)
    assert seen and all(seen)


def test_density_picks_the_compacted_loop():
    """A gate expected to keep at most `compact_below` of the channels (k/K for top-k, the module's hint for
    thresholds) takes the compacted-id loop, a denser one the masked loop; M=1, and shared masks of a few
    tokens; both loops equal the reference."""
    from sparse_infer.kernels import _autotune as at
    g, x, w, b = make(1, 77, 53, torch.bfloat16, seed=3)
    x2 = x.reshape(1, -1)
    below = at.matmul_config(1, 53, 77, x.dtype, x.device).compact_below
    assert below > 0
    assert sm._gate_plan(1, 53, 77, x2, density=below)[1] > 0
    assert sm._gate_plan(1, 53, 77, x2, density=0.5) == (False, 0)
    assert sm._gate_plan(1, 53, 77, x2, density=None) == (False, 0)
    assert sm.density_hint(Gate(k=7), 77) == 7 / 77
    assert sm.density_hint(Gate(threshold=torch.tensor(0.1), density=0.2), 77) == 0.2
    with pytest.raises(ValueError, match="density"):
        Gate(threshold=torch.tensor(0.1), density=1.5)
    # several tokens: only a shared mask (one per call) has a known density; per-token masks are read as a union
    assert sm.density_hint(Gate(k=7), 77, M=4) is None
    assert sm.density_hint(Gate(k=7, shared=True), 77, M=4) == 7 / 77
    assert sm.density_hint(Gate(k=7, shared=True), 77, M=4, steps=2) is None
    x4 = torch.randn(4, 77, generator=g).to(x.dtype).to(DEVICE)
    below4 = at.matmul_config(4, 53, 77, x.dtype, x.device).compact_below
    assert sm._gate_plan(4, 53, 77, x4, density=below4)[1] > 0
    assert sm._gate_plan(4, 53, 77, x4, density=min(1.0, below4 + 0.1))[1] == 0
    for kind in ("topk", "topk_scale", "thresh"):
        gate = make_gate(kind, x4, 0.6, g, shared=True)
        assert rel_err(K.sparse_linear(x4, w, b, gate), ref_sparse(x4, w, b, gate.mask(x4))) < TOL[torch.bfloat16]
    for kind, sp in [("topk", 0.9), ("topk_scale", 0.5), ("thresh", 0.8), ("thresh_vec", 0.3)]:
        gate = make_gate(kind, x, sp, g)
        if gate.threshold is not None:
            gate.density = 1 - sp
        assert rel_err(K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, gate.mask(x))) < TOL[torch.bfloat16]


@pytest.mark.parametrize("block, ids_dtype", [(32, torch.int32), (32, torch.int16), (2 ** 15, torch.int16)])
def test_compacted_ids(block, ids_dtype):
    """The gate pass's stream compaction: per block, the active channels' ids relative to the block, in
    order, and their count (the union over tokens; with ``invert`` the complement's too), in the id dtype
    the matmul path asks for; int16 holds the ids of the largest block it is used for (2**15 channels)."""
    from sparse_infer.kernels import gating as G
    assert G.compact_ids_dtype(2 ** 15, deep_pipeline=True) == torch.int16
    assert G.compact_ids_dtype(2 ** 16, deep_pipeline=True) == torch.int32
    assert G.compact_ids_dtype(64, deep_pipeline=False) == torch.int32
    g = torch.Generator().manual_seed(5)
    K_ = block + 37 if block < 100 else block  # a partial last block where blocks are small
    x = rnd(g, 3, K_)
    mask = (torch.rand(3, K_, generator=g) < 0.2).to(DEVICE)
    o = G.pregate(x, sm.MODE_MASK, gm=mask.to(torch.int8), invert=True, compact_block=block, ids_dtype=ids_dtype)
    assert o["idx"].dtype == o["idxi"].dtype == ids_dtype
    for key, cnt, union in [("idx", "cnt", mask.any(0)), ("idxi", "cnti", (~mask).any(0))]:
        for blk in range(-(-K_ // block)):
            want = torch.nonzero(union[blk * block:(blk + 1) * block]).flatten().cpu()
            n = int(o[cnt][blk])
            assert n == want.numel()
            assert torch.equal(o[key][blk * block:blk * block + n].long().cpu(), want)


def test_compacted_loop_with_int16_ids(monkeypatch):
    """The tensor-core loop over compacted ids with 3 cp.async stages reads int16 ids (``compact_ids_dtype``):
    sparse and rank-aware ops equal the reference with shared and per-token masks, and the ids were int16."""
    from sparse_infer.kernels import _autotune as at
    from sparse_infer.kernels import gating as G
    seen = []
    real = G.pregate

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append(out["idx"].dtype)
        return out
    monkeypatch.setattr(sm, "pregate", spy)
    try:
        at.set_override(16, use_dot=True, pregate=True, compact=True, num_stages=3, BLOCK_M=16)
        for i, (M, kind, shared) in enumerate([(12, "topk", True), (9, "thresh_scale", False), (16, "thresh", True)]):
            dtype = DTYPES[i]
            g, x, w, b = make(M, 77, 53, dtype, seed=20 + i)
            gate = make_gate(kind, x, 0.6, g, shared)
            assert rel_err(K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, gate.mask(x))) < TOL[dtype]
            A, B = ref.lowrank_factors(w.float(), 4, dtype)
            assert rel_err(K.rsparse_linear(x, w, b, A, B, gate), ref_rsparse(x, w, b, gate.mask(x), A, B)) < TOL[dtype]
    finally:
        at.set_override(16)
    assert seen and set(seen) == {torch.int16}


def test_errors():
    g, x, w, b = make(1, 37, 53, torch.float32)
    with pytest.raises(ValueError, match="in_features"):
        K.sparse_linear(x[:, :10], w, b, Gate(k=3))
    with pytest.raises(TypeError, match="dtype"):
        K.sparse_linear(x.half(), w, b, Gate(k=3))
    with pytest.raises(ValueError, match="k="):
        K.sparse_linear(x, w, b, Gate(k=99))
    with pytest.raises(ValueError, match="threshold"):
        K.sparse_linear(x, w, b, Gate(threshold=torch.ones(5, device=DEVICE)))
    with pytest.raises(ValueError, match="A \\(in"):
        K.rsparse_linear(x, w, b, torch.zeros(36, 2, device=DEVICE), torch.zeros(2, 53, device=DEVICE), Gate(k=3))


def test_default_fallback_cutoffs():
    assert K.DENSE_FALLBACK_TOKENS >= 1 and 1 <= K.PER_TOKEN_FALLBACK_TOKENS <= 64


def test_to_kernel_layout():
    w = torch.randn(5, 7, device=DEVICE)
    wk = K.to_kernel_layout(w)
    assert torch.equal(wk, w) and wk.stride() == (1, 5)
    assert K.to_kernel_layout(wk) is wk


# --------------------------------------------------------------------------- rank-aware
RS_CASES = [("thresh", False, 5), ("topk_scale", False, 17), ("thresh_vec_scale", True, 3), ("topk", True, 8)]


@pytest.mark.parametrize("shape", [(37, 53), (129, 77)] + ([(577, 1539)] if CUDA else []))
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rsparse_linear(shape, M, dtype):
    in_f, out_f = shape
    start = DTYPES.index(dtype) + [1, 3, 16].index(M)
    for i in range(start, start + (4 if CUDA else 2)):
        kind, shared, rank = RS_CASES[i % 4]
        g, x, w, b = make(M, in_f, out_f, dtype, seed=i, bias=i % 2 == 0)
        A, B = ref.lowrank_factors(w.float(), rank, dtype)
        gate = make_gate(kind, x, [0.5, 0.9][i % 2], g, shared)
        y = K.rsparse_linear(x, w, b, A, B, gate)
        yr = ref_rsparse(x, w, b, gate.mask(x), A, B)
        assert y.dtype == dtype and y.shape == (M, out_f)
        assert rel_err(y, yr) < TOL[dtype], (kind, shared, rank)


@pytest.mark.parametrize("sparsity", [0.0, 1.0])
def test_rsparse_extremes(sparsity):
    g, x, w, b = make(3, 37, 53, torch.float32)
    A, B = ref.lowrank_factors(w.float(), 6, torch.float32)
    for kind in ["thresh", "topk"]:
        gate = make_gate(kind, x, sparsity, g)
        assert rel_err(K.rsparse_linear(x, w, b, A, B, gate), ref_rsparse(x, w, b, gate.mask(x), A, B)) < 1e-5
    # rank 0 is the input-sparse op
    A0, B0 = ref.lowrank_factors(w.float(), 0, torch.float32)
    gate = make_gate("thresh", x, 0.5, g)
    assert rel_err(K.rsparse_linear(x, w, b, A0, B0, gate), ref_sparse(x, w, b, gate.mask(x))) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_k_split_keeps_bias(dtype, monkeypatch):
    """in_features within one K block: SPLIT_K == 1, so the direct-store epilogue runs, not the split-K
    read-back every other shape takes; it must add the bias too."""
    from sparse_infer.kernels import _autotune as at
    splits = []
    split_k = at.split_k

    def recording_split_k(*a, **kw):
        out = split_k(*a, **kw)
        splits.append(out[0])
        return out

    monkeypatch.setattr(at, "split_k", recording_split_k)
    for M in (1, 3):
        g, x, w, b = make(M, 20, 30, dtype, seed=M)
        A, B = ref.lowrank_factors(w.float(), 4, dtype)
        for kind in ("thresh", "topk"):
            gate = make_gate(kind, x, 0.5, g)
            assert rel_err(K.sparse_linear(x, w, b, gate), ref_sparse(x, w, b, gate.mask(x))) < TOL[dtype]
            y = K.rsparse_linear(x, w, b, A, B, gate)
            assert rel_err(y, ref_rsparse(x, w, b, gate.mask(x), A, B)) < TOL[dtype]
    assert splits and set(splits) == {1}


# --------------------------------------------------------------------------- gating
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 53), (4, 129), (2, 3, 200)])
def test_gates_equal_reference(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = rnd(g, *shape, dtype=dtype)
    n = shape[-1]
    x.view(-1, n)[:, :7] = x.view(-1, n)[:, 7:14]  # exact ties in |x|
    x.view(-1, n)[0, 3] = float("nan")
    scale = (torch.rand(n, generator=g) + 0.5).to(DEVICE)

    def same(a, b):
        return torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())

    for k, s in [(0, None), (1, scale), (n // 3, None), (n // 3, scale), (n - 1, None), (n, scale)]:
        assert same(K.topk_gate(x, k, s), ref.topk_gate(x, k, s)), k
        assert torch.equal(K.topk_mask(x, k, s, shared=True), ref.shared_topk_mask(x, k, s)), k
    t_nan = torch.rand(n, generator=g).to(DEVICE)
    t_nan[[2, 5]] = float("nan")  # a NaN threshold keeps its channel (score <= NaN is false)
    for t, s in [(0.0, None), (0.7, scale), (torch.rand(n, generator=g).to(DEVICE), None), (t_nan, scale)]:
        assert same(K.threshold_gate(x, t, s), ref.threshold_gate(x, t, s))
        assert torch.equal(K.threshold_mask(x, t, s, shared=True), ref.shared_threshold_mask(x, t, s))


@pytest.mark.parametrize("streamed", [False, True])
def test_topk_ranks_nan_above_inf_above_finite(monkeypatch, streamed):
    """NaN > +inf > the largest finite score in one row, per token and shared, as the reference ranks."""
    from sparse_infer.kernels import gating
    if streamed:
        monkeypatch.setattr(gating, "RESIDENT_MAX", 32)
    inf, nan, big = float("inf"), float("nan"), torch.finfo(torch.float32).max
    x = torch.zeros(3, 70, device=DEVICE)
    x[0, [2, 5, 9]] = torch.tensor([inf, nan, 2.0], device=DEVICE)
    x[1, [1, 4, 8]] = torch.tensor([big, -inf, 1.0], device=DEVICE)
    x[2, [0, 3]] = torch.tensor([-inf, inf], device=DEVICE)  # tie: the lower index wins
    want = {1: [[5], [4], [0]], 2: [[2, 5], [1, 4], [0, 3]], 3: [[2, 5, 9], [1, 4, 8], [0, 3, 1]]}
    for k, rows in want.items():
        mask = K.topk_mask(x, k)
        assert torch.equal(mask, ref.topk_mask(x, k)), k
        if k < 3:  # row 2's third pick is the first zero: ties of 0.0, lowest index
            assert [sorted(r.nonzero().flatten().tolist()) for r in mask] == [sorted(r) for r in rows], k
        assert torch.equal(K.topk_mask(x, k, shared=True), ref.shared_topk_mask(x, k)), k
    # the NaN channel is the one picked at k=1: its column's NaN reaches every output
    w = torch.ones(4, 70, device=DEVICE)
    y = K.sparse_linear(x[:1], w, None, Gate(k=1))
    assert torch.isnan(y).all() and torch.equal(y.isnan(), ref_sparse(x[:1], w, None, ref.topk_mask(x[:1], 1)).isnan())


@pytest.mark.parametrize("M", [1, 5, 16])
def test_shared_threshold_on_a_score(M):
    """Thresholds set exactly to RMS scores: the reference's float32 root must be the kernels'
    correctly rounded one, or channels at the threshold flip."""
    g = torch.Generator().manual_seed(M)
    x = rnd(g, M, 200)
    rms = ref._step_importance(x, None)
    for t in (rms, rms.roll(1), rms.sort().values[100]):
        assert torch.equal(K.threshold_mask(x, t, shared=True), ref.shared_threshold_mask(x, t))


def test_topk_streamed_rows(monkeypatch):
    """Rows longer than RESIDENT_MAX take the chunked selection path (forced here on a short row)."""
    from sparse_infer.kernels import gating
    monkeypatch.setattr(gating, "RESIDENT_MAX", 64)
    g = torch.Generator().manual_seed(2)
    x = rnd(g, 3, 300)
    x[:, :50] = x[:, 50:100].round(decimals=1)  # ties
    x[:, 50:100] = x[:, :50]
    for k in [1, 77, 299]:
        assert torch.equal(K.topk_mask(x, k), ref.topk_mask(x, k))
        assert torch.equal(K.topk_mask(x, k, shared=True), ref.shared_topk_mask(x, k))
    # several chunks per row (the interpreter streams 1024 channels at a time), ties across chunks
    x = rnd(g, 2, 2500).round(decimals=1)
    x[:, 1500:2500] = x[:, :1000]
    for k in [700, 1999]:
        assert torch.equal(K.topk_mask(x, k), ref.topk_mask(x, k)), k
    assert torch.equal(K.topk_mask(x, 700, shared=True), ref.shared_topk_mask(x, 700))


@pytest.mark.parametrize("M", [1, 16])
def test_split_k_readback_back_to_back(M):
    """Calls queued back to back (no sync between them on CUDA), each with other inputs: every result equals
    its reference, so the last program of each tile read all partial sums of its own call, and the shared
    fp32 workspace and tile counters are left zeroed for the next one."""
    in_f, out_f, calls = (4096, 2048, 12) if CUDA else (200, 70, 3)
    g, _, w, b = make(M, in_f, out_f, torch.bfloat16)
    xs = [rnd(g, M, in_f, dtype=torch.bfloat16) for _ in range(calls)]
    gates = [make_gate("thresh", x, 0.5, g, shared=M > 1) for x in xs]
    outs = [K.sparse_linear(x, w, b, gate) for x, gate in zip(xs, gates)]
    for x, gate, y in zip(xs, gates, outs):
        assert rel_err(y, ref_sparse(x, w, b, gate.mask(x))) < TOL[torch.bfloat16]
    ws, cnt = sm._WS[(w.device.type, w.device.index)]
    assert not ws.any() and not cnt.any()


# --------------------------------------------------------------------------- CUDA only
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    g, x, w, b = make(4, 4096, 1024, torch.bfloat16)
    A, B = ref.lowrank_factors(w.float(), 32, torch.bfloat16)
    gate = make_gate("thresh", x, 0.5, g)
    gate_k = Gate(k=1024)
    fns = [lambda: K.sparse_linear(x, w, b, gate), lambda: K.rsparse_linear(x, w, b, A, B, gate),
           lambda: K.sparse_linear(x, w, b, gate_k)]
    for fn in fns:
        eager = fn()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        x.copy_(rnd(g, *x.shape, dtype=x.dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, fn()) < 1e-2
        del eager


# --------------------------------------------------------------------------- torch.library / torch.compile
@pytest.mark.parametrize("kind", ["thresh", "topk"])
def test_custom_ops(kind):
    from sparse_infer.kernels import _ops  # noqa: F401  (registers torch.ops.sparse_infer.*)
    g, x, w, b = make(3, 37, 53, torch.float32)
    gate = make_gate(kind, x, 0.5, g)
    A, B = ref.lowrank_factors(w.float(), 4, torch.float32)
    y = _ops.sparse_linear_op(x, w, b, gate)
    assert rel_err(y, ref_sparse(x, w, b, gate.mask(x))) < 1e-5
    y = _ops.rsparse_linear_op(x, w, b, A, B, gate)
    assert rel_err(y, ref_rsparse(x, w, b, gate.mask(x), A, B)) < 1e-5
    wu, wd = w * 0.5, w.t().contiguous()  # an MLP 37 -> 53 -> 37, gated on silu(x Wg^T)
    y = _ops.gated_mlp_op(x, w, wu, wd, "silu", gate, b, None, None)
    assert rel_err(y, ref.gated_mlp(x, w, wu, wd, torch.nn.functional.silu, gate.mask, b, None, None)) < 1e-5
    # the fake (meta) kernels give the shapes and dtypes torch.compile plans with
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fx, fw, fb, fA, fB, fwu, fwd = (mode.from_tensor(t) for t in (x, w, b, A, B, wu, wd))
        for f in (_ops.sparse_linear_op(fx, fw, fb, gate), _ops.rsparse_linear_op(fx, fw, fb, fA, fB, gate)):
            assert f.shape == (3, 53) and f.dtype == x.dtype
        f = _ops.gated_mlp_op(fx, fw, fwu, fwd, "silu", gate, fb, None, None)
        assert f.shape == (3, 37) and f.dtype == x.dtype
    # k = 0 (every channel off) goes through the ops like any other k
    y = _ops.sparse_linear_op(x, w, b, Gate(k=0))
    assert rel_err(y, b.expand(3, 53)) < 1e-6


def test_torch_compile_no_graph_break():
    """Dynamo traces a call of the kernels as one custom-op node (fullgraph=True fails on a break)."""
    g, x, w, b = make(2, 37, 53, torch.float32)
    gate = make_gate("thresh", x, 0.5, g)
    A, B = ref.lowrank_factors(w.float(), 4, torch.float32)

    wu, wd = w * 0.5, w.t().contiguous()
    silu = torch.nn.functional.silu

    def f(x):
        mlp = K.gated_mlp(x, w, wu, wd, "silu", gate, b)
        return K.sparse_linear(x, w, b, gate) + K.rsparse_linear(x, w, b, A, B, gate), mlp

    torch._dynamo.reset()
    y, mlp = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    want = ref_sparse(x, w, b, gate.mask(x)) + ref_rsparse(x, w, b, gate.mask(x), A, B)
    assert rel_err(y, want) < 1e-5
    assert rel_err(mlp, ref.gated_mlp(x, w, wu, wd, silu, gate.mask, b, None, None)) < 1e-5


def test_gpu_configs_fit_registers(monkeypatch):
    """The CUDA config table (read here without a GPU): no GEMV tile holds more than 128 weight values per
    thread in fp32 (above that the one-warp loop spills: sm_90 SASS, bench/KERNEL_NOTES.md), and the
    16-bit tiles stay as tuned."""
    from sparse_infer.kernels import _autotune as at
    monkeypatch.setattr(at, "interpreting", lambda: False)
    at._CFG_CACHE.clear()
    try:
        cuda = torch.device("cuda")
        for M in (1, 3, 16, 40):
            for dtype in DTYPES:
                cfg = at.matmul_config(M, 4096, 4096, dtype, cuda)
                per_thread = cfg.BLOCK_N * cfg.BLOCK_K / (32 * cfg.num_warps)
                if dtype == torch.float32 and not cfg.use_dot:
                    assert per_thread <= 128, (M, cfg)
                if dtype == torch.bfloat16 and M == 1:
                    assert (cfg.BLOCK_N, cfg.BLOCK_K, cfg.num_warps) == (128, 64, 1)
    finally:
        at._CFG_CACHE.clear()


_GATING_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sparse_infer.kernels import gating as G
cases = ((G._threshold_kernel, dict(HAS_SCALE=True, SHARED=True, BLOCK=1024)),
         (G._topk_kernel, dict(HAS_SCALE=False, SHARED=True, RESIDENT=True, BLOCK=16384)))
for kern, const in cases:
    for one_token in (True, False):  # a launch with M == 1 specialises M to a constexpr
        sig, ce = {}, {}
        for i, n in enumerate(kern.arg_names):
            if n in const:
                sig[n], ce[(i,)] = "constexpr", const[n]
            elif n.endswith("_ptr"):
                sig[n] = "*i8" if n == "mask_ptr" else "*fp32"
            elif n == "M" and one_token:
                sig[n], ce[(i,)] = "constexpr", 1
            else:
                sig[n] = "i32"
        ptx = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=ce), target=GPUTarget("cuda", 90, 32),
                             options=dict(num_warps=4, **G.EXACT_RMS)).asm["ptx"]
        print(kern.fn.__name__, one_token, "div.rn.f32" in ptx, "sqrt.rn.f32" in ptx, "fma.rn.f32" in ptx)
"""


def test_shared_rms_compiles_ieee_for_sm90():
    """The gating passes' shared RMS on an H100: IEEE division and root, no fused square-add (so the mask
    is bit-equal to the reference's), for M as a runtime value and as the constexpr a one-token launch
    makes of it.  (A subprocess without the interpreter, as bench/sass_count.py.)"""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _GATING_SM90], env=env, capture_output=True, text=True, timeout=300)
    if run.returncode and "ptxas" in run.stderr:
        pytest.skip(f"this triton build cannot compile for sm_90: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split() for line in run.stdout.splitlines()]
    assert len(rows) == 4 and all(r[2:] == ["True", "True", "False"] for r in rows), run.stdout
