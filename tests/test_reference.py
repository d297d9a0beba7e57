"""The reference semantics against hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from sparse_infer import reference as ref


def test_topk_mask_hand_case():
    x = torch.tensor([[0.5, -3.0, 2.0, 0.1], [1.0, 1.0, -1.0, 4.0]])
    assert ref.topk_mask(x, 2).tolist() == [[False, True, True, False], [True, False, False, True]]


def test_topk_ties_break_to_lower_index():
    x = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.5]])
    # four equal magnitudes, keep 2: the lowest indices win, deterministically
    assert ref.topk_mask(x, 2).tolist() == [[True, True, False, False, False]]
    assert torch.equal(ref.topk_mask(x, 2), ref.topk_mask(x.clone(), 2))


def test_topk_edges_and_nan():
    x = torch.tensor([[1.0, float("nan"), 3.0]])
    assert ref.topk_mask(x, 1).tolist() == [[False, True, False]]  # NaN ranks first: it propagates
    assert ref.topk_mask(x, 0).sum() == 0 and ref.topk_mask(x, 3).all()
    with pytest.raises(ValueError, match="k=4"):
        ref.topk_mask(x, 4)


def test_topk_with_importance_scale():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    s = torch.tensor([10.0, 1.0, 1.0])  # |x*s| = 10, 2, 3
    assert ref.topk_mask(x, 1, s).tolist() == [[True, False, False]]


def test_threshold_mask_scalar_vector_and_nan():
    x = torch.tensor([[0.5, -2.0, 1.0, float("nan")]])
    assert ref.threshold_mask(x, 1.0).tolist() == [[False, True, False, True]]  # strict >, NaN kept
    t = torch.tensor([0.1, 3.0, 0.5, 0.0])
    assert ref.threshold_mask(x, t).tolist() == [[True, False, True, True]]
    s = torch.tensor([4.0, 1.0, 1.0, 1.0])
    assert ref.threshold_mask(x, 1.0, s).tolist() == [[True, True, False, True]]


def test_gates_zero_inactive_even_inf():
    x = torch.tensor([[float("inf"), 5.0, -6.0]])
    out = ref.threshold_gate(x, torch.tensor([float("inf"), 5.5, 5.5]))
    assert out.tolist() == [[0.0, 0.0, -6.0]]  # inf*0 would be NaN: inactive entries are skipped
    assert ref.topk_gate(torch.tensor([[1.0, -4.0, 2.0]]), 2).tolist() == [[0.0, -4.0, 2.0]]


def test_sparse_linear_hand_case():
    W = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = torch.tensor([0.5, -0.5])
    x = torch.tensor([[1.0, 10.0, -1.0]])
    mask = torch.tensor([[True, False, True]])
    # columns 0 and 2 only: [1 - 3, 4 - 6] + b
    assert ref.sparse_linear(x, W, b, mask).tolist() == [[-1.5, -2.5]]


def test_rsparse_full_rank_is_exact_and_rank0_is_sparse():
    torch.manual_seed(0)
    W = torch.randn(7, 5, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    mask = ref.topk_mask(x, 2)
    A, B = ref.lowrank_factors(W, 5)
    assert torch.allclose(ref.rsparse_linear(x, W, None, mask, A, B), F.linear(x, W), atol=1e-10)
    A0, B0 = ref.lowrank_factors(W, 0)
    b = torch.randn(7, dtype=torch.float64)
    for bias in (None, b):  # rank 0 keeps the bias (biased q/k/v of Qwen2 reach it at s = 0)
        assert torch.equal(ref.rsparse_linear(x, W, bias, mask, A0, B0), ref.sparse_linear(x, W, bias, mask))
    assert torch.allclose(ref.rsparse_linear(x, W, b, mask, A, B), F.linear(x, W, b), atol=1e-10)


def test_column_norms_are_euclidean_per_input_channel():
    W = torch.tensor([[3.0, 0.0, -1.0], [4.0, 1.0, 0.0]], dtype=torch.bfloat16)
    n = ref.column_norms(W)
    assert n.dtype == torch.float32 and n.tolist() == [5.0, 1.0, 1.0]


def test_lowrank_factors_shapes_and_error():
    W = torch.randn(6, 4)
    A, B = ref.lowrank_factors(W, 2)
    assert A.shape == (4, 2) and B.shape == (2, 6) and A.dtype == W.dtype
    # rank-2 truncation error is the tail of the spectrum
    S = torch.linalg.svdvals(W.double())
    err = torch.linalg.matrix_norm((A @ B).T.double() - W.double())
    assert math.isclose(err.item(), S[2:].norm().item(), rel_tol=1e-4)
    with pytest.raises(ValueError, match="rank=5"):
        ref.lowrank_factors(W, 5)


def test_gated_mlp_matches_dense_when_all_active_and_skips_masked():
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    Wg, Wu, Wd = torch.randn(12, 8), torch.randn(12, 8), torch.randn(8, 12)
    dense = F.linear(F.silu(F.linear(x, Wg)) * F.linear(x, Wu), Wd)
    out = ref.gated_mlp(x, Wg, Wu, Wd, F.silu, lambda h: torch.ones_like(h, dtype=torch.bool))
    assert torch.allclose(out, dense, atol=1e-5)
    keep = lambda h: ref.topk_mask(h, 3)  # noqa: E731
    h = F.silu(F.linear(x, Wg))
    m = ref.topk_mask(h, 3)
    expect = F.linear(torch.where(m, h, 0.0) * F.linear(x, Wu), Wd)
    assert torch.allclose(ref.gated_mlp(x, Wg, Wu, Wd, F.silu, keep), expect, atol=1e-5)


def test_shared_masks_one_row_per_decode_step():
    x = torch.tensor([[1.0, 0.0, 3.0], [0.0, 5.0, 0.5]])  # 2 tokens of one step
    # RMS of x = [0.71, 3.54, 2.15]: top-2 = channels 1, 2
    assert ref.shared_topk_mask(x, 2).tolist() == [False, True, True]
    assert ref.shared_threshold_mask(x, 1.0).tolist() == [False, True, True]
    assert ref.shared_threshold_mask(x, 2.2).tolist() == [False, True, False]
    # RMS, not the mean of |x|: one large value outranks two medium ones (mean |x| = [2, 2.67],
    # RMS = [3.46, 3.27]), since dropping it costs the batch more squared error
    spiky = torch.tensor([[6.0, 0.0], [0.0, 4.0], [0.0, 4.0]])
    assert ref.shared_topk_mask(spiky, 1).tolist() == [True, False]
    # one token: the RMS is |x·s| itself, so shared and per-token masks agree
    one = torch.randn(1, 64)
    assert torch.equal(ref.shared_topk_mask(one, 20), ref.topk_mask(one, 20)[0])
    # (batch, seq, in): tokens at the same position share a mask
    x3 = torch.stack([x, x.flip(0)])  # batch 2, seq 2
    m = ref.shared_topk_mask(x3, 1)
    assert m.shape == (2, 3)
    assert m.tolist() == [[False, True, False], [False, True, False]]


def test_shared_masks_leave_tokens_marked_invalid_out():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 40, generator=g)  # batch 3, 5 positions
    s = torch.rand(40, generator=g) + 0.5
    every = torch.ones(3, 5, dtype=torch.bool)
    assert torch.equal(ref._step_importance(x, s, every), ref._step_importance(x, s))  # bit for bit
    valid = every.clone()
    valid[0, :3] = False  # left padding of sequence 0
    valid[:, 4] = False  # a position no sequence reaches: scores 0, not NaN
    got = ref._step_importance(x, s, valid)
    for p in range(4):
        rows = x[valid[:, p], p]
        assert torch.allclose(got[p], ref._step_importance(rows, s), rtol=1e-6, atol=0), p
    assert torch.equal(got[4], torch.zeros(40))
    # what the padding holds no longer matters
    noisy = x.clone()
    noisy[~valid] = 1e4 * torch.randn(int((~valid).sum()), 40, generator=g)
    assert torch.equal(ref.shared_topk_mask(noisy, 7, s, valid), ref.shared_topk_mask(x, 7, s, valid))
    assert torch.equal(ref.shared_threshold_mask(noisy, 0.8, s, valid), ref.shared_threshold_mask(x, 0.8, s, valid))
    with pytest.raises(ValueError, match=r"valid has shape \(3, 4\), expected x's token dims \(3, 5\)"):
        ref._step_importance(x, s, valid[:, :4])


def test_accounting():
    assert ref.linear_read_elements(4096, 14336, 2048, 0) == 2048 * 14336
    assert ref.linear_read_elements(10, 20, 5, 2) == 5 * 20 + 2 * 30
    assert ref.model_sparsity([(10, 20, 5, 0), (20, 10, 20, 0)]) == pytest.approx(1 - (100 + 200) / 400)
    assert ref.model_sparsity([]) == 0.0
