"""CPU tests of what bench/bench_decode.py reports: the weight bytes a sparse step reads (measured and union
densities, dense fallbacks), the check of --compile rows against the eager step, the static cache's length
under --measure-steps / --profile, and --threads.  Tiny config, reference path, a few seconds each."""

from __future__ import annotations

import pytest
import torch

from conftest import load_bench_script


@pytest.fixture(scope="module")
def bd():
    return load_bench_script("bench_decode")


@pytest.fixture(scope="module")
def tiny(bd):
    return bd.build_model("tiny", torch.float32, "cpu", seed=1)


def _argv(tmp_path, *extra):
    return ["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--prompt", "8", "--new-tokens", "2",
            "--warmup", "1", "--out", str(tmp_path), "--quiet", *extra]


def _linear_bytes(model) -> int:
    """Weight bytes of the linears `targets=all` patches (q/k/v/o and gate/up/down of every layer)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.get_decoder().layers.modules()
               if isinstance(m, torch.nn.Linear))


def _by(rows, batch, mode):
    (row,) = [r for r in rows if r["batch"] == batch and r["mode"] == mode]
    assert row["tokens_per_s"] is not None, row["note"]
    return row


# ----------------------------------------------------------------------------- defect 1: bytes per step
def test_per_token_bytes_are_the_batch_union_or_dense(bd, tiny, tmp_path):
    """Per-token masks at batch 4 read the union of the 4 tokens' channels (more bytes than at batch 1);
    above PER_TOKEN_FALLBACK_TOKENS the layers fall back to a dense matmul (all bytes, x ideal 1.00); a
    shared mask reads its own channels at any batch up to DENSE_FALLBACK_TOKENS."""
    argv = _argv(tmp_path, "--batch", "1,4,8", "--sparsity", "0.5", "--modes", "per_token,shared",
                 "--method", "topk", "--measure-steps", "2")
    rows = bd.run(bd.parse_args(argv), model=tiny)
    dense = _by(rows, 1, "dense")["weight_gb_per_step"]
    lin = _linear_bytes(tiny) / 1e9
    p1, p4, p8 = (_by(rows, b, "per_token") for b in (1, 4, 8))
    # batch 4: the union of 4 random top-half masks keeps most channels
    assert p1["weight_gb_per_step"] * 1.2 < p4["weight_gb_per_step"] < dense
    assert abs(p4["measured_sparsity"] - 0.5) < 1e-6  # the per-token figure is unchanged
    # batch 8 > PER_TOKEN_FALLBACK_TOKENS: gate + dense matmul reads everything
    assert p8["weight_gb_per_step"] == pytest.approx(dense)
    # batch 1: the measured per-token density (top-k: the target) - the bytes the model-level sparsity says
    assert (dense - p1["weight_gb_per_step"]) / lin == pytest.approx(p1["measured_sparsity"], abs=1e-6)
    assert [r.get("weight_basis") for r in (p1, p4, p8)] == ["measured", "measured union", "dense fallback"]
    for b in (1, 4, 8):  # shared: one mask per step, k channels whatever the batch
        s = _by(rows, b, "shared")
        assert s["weight_gb_per_step"] == pytest.approx(p1["weight_gb_per_step"])
        assert s["weight_basis"] == "measured"
    # the table: GB/s from the same bytes, x ideal from them, and which basis was used
    assert p4["gb_per_s"] == pytest.approx(p4["weight_gb_per_step"] / (p4["step_ms"] / 1e3))
    lines = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line
             for line in (tmp_path / "decode.md").read_text().splitlines() if line.startswith("| ")}
    assert "| 1.00 |" in lines[("8", "per_token")] and "| dense fallback |" in lines[("8", "per_token")]
    ideal4 = dense / p4["weight_gb_per_step"]
    assert f"| {ideal4:.2f} |" in lines[("4", "per_token")] and "| measured union |" in lines[("4", "per_token")]
    assert ideal4 < 1.5 < dense / p1["weight_gb_per_step"]


def test_threshold_bytes_follow_the_measured_density(bd, tiny, tmp_path):
    """Calibrated thresholds land off their target: the bytes (and x ideal) follow the measured density."""
    argv = _argv(tmp_path, "--batch", "1", "--sparsity", "0.5", "--method", "threshold", "--calib-tokens", "64",
                 "--measure-steps", "4")
    rows = bd.run(bd.parse_args(argv), model=tiny)
    dense = _by(rows, 1, "dense")["weight_gb_per_step"]
    row = _by(rows, 1, "per_token")
    measured = row["measured_sparsity"]
    assert abs(measured - 0.5) > 5e-3  # else this test could not tell measured from target
    assert (dense - row["weight_gb_per_step"]) / (_linear_bytes(tiny) / 1e9) == pytest.approx(measured, abs=1e-6)
    assert row["weight_basis"] == "measured"


def test_step_weight_bytes_without_measurement(bd, tiny, monkeypatch):
    """No measurement: nominal bytes, except where the kernels' fallback token counts say dense."""
    from sparse_infer import SparsityConfig, sparse_modules, sparsify, unsparsify
    from sparse_infer.kernels import sparse_matmul as sm

    dense = float(bd.decode_weight_bytes(tiny))
    lin = _linear_bytes(tiny)
    sparsify(tiny, SparsityConfig(method="topk", sparsity=0.5, targets="all"), progress=False)
    try:
        nominal, how = bd.step_weight_bytes(tiny, dense, 1)
        assert how == "nominal" and (dense - nominal) / lin == pytest.approx(0.5, abs=0.02)
        assert bd.step_weight_bytes(tiny, dense, 4)[0] == nominal  # the union cannot be known: nominal
        assert bd.step_weight_bytes(tiny, dense, 5) == (dense, "dense fallback")
        monkeypatch.setattr(sm, "PER_TOKEN_FALLBACK_TOKENS", 1)  # read at run time, as the kernels do
        assert bd.step_weight_bytes(tiny, dense, 2) == (dense, "dense fallback")
        full = {name: 1.0 for name in sparse_modules(tiny)}
        assert bd.step_weight_bytes(tiny, dense, 1, full) == (pytest.approx(dense), "measured")
    finally:
        unsparsify(tiny)


# ----------------------------------------------------------------------------- defect 2: --compile rows
def _scaled_backend(gm, example_inputs):
    """A torch.compile backend whose step returns logits 1.5 times too large (a miscompiled step)."""
    def run(*args):
        out = gm(*args)
        return type(out)(o * 1.5 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)
    return run


def test_compiled_rows_are_checked_against_the_eager_step(bd, tiny, tmp_path):
    from torch._dynamo.backends.registry import register_backend

    if "bench_test_scaled" not in torch._dynamo.list_backends(exclude_tags=()):
        register_backend(compiler_fn=_scaled_backend, name="bench_test_scaled")
    common = ["--batch", "2", "--sparsity", "0.5", "--method", "topk", "--measure-steps", "1"]
    try:
        good = bd.run(bd.parse_args(_argv(tmp_path / "good", *common, "--compile", "aot_eager")), model=tiny)
        bad = bd.run(bd.parse_args(_argv(tmp_path / "bad", *common, "--compile", "bench_test_scaled")), model=tiny)
    finally:
        torch._dynamo.reset()
    assert [r["mode"] for r in good] == [r["mode"] for r in bad] == ["dense", "per_token"]
    for r in bad:
        assert r["note"].startswith("CHECK: compiled vs eager rel err 5.0e-01"), r["note"]
        assert r["compile_check"] == pytest.approx(0.5, abs=1e-4)
    for r in good:
        assert r["compile_check"] is not None and r["compile_check"] < 1e-5 and "CHECK" not in r["note"]
    md = (tmp_path / "bad" / "decode.md").read_text()
    assert "rel. err graph / compiled / ref" in md and "| - / 5.0e-01 / 0.0e+00 | CHECK" in md
    import csv

    with open(tmp_path / "bad" / "decode.csv", newline="") as f:
        assert [float(r["compile_check"]) for r in csv.DictReader(f)] == pytest.approx([0.5, 0.5], abs=1e-4)


# ----------------------------------------------------------------------------- defect 3: cache length
@pytest.mark.parametrize("extra", [["--measure-steps", "8"], ["--measure-steps", "1", "--profile", "8"]])
def test_cache_holds_measure_and_profile_steps(bd, tiny, tmp_path, extra):
    """--new-tokens 1 with 8 measurement (or profiled) steps: each pass restarts at the prompt's end, so the
    cache needs prompt + 8 positions.  Prompt 58 puts the old length (prompt + new + warm-up + 2, rounded
    up to 64) at exactly 64, two positions short."""
    argv = ["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "1", "--sparsity", "0.5",
            "--method", "topk", "--prompt", "58", "--new-tokens", "1", "--warmup", "1", "--out", str(tmp_path),
            "--quiet", *extra]
    args = bd.parse_args(argv)
    rows = bd.run(args, model=tiny)
    assert [r["mode"] for r in rows] == ["dense", "per_token"]
    for r in rows:
        assert r["tokens_per_s"] is not None and "failed" not in r["note"], r["note"]
    assert abs(rows[1]["measured_sparsity"] - 0.5) < 1e-6
    if "--profile" in extra:
        assert all(r["kernel_ms"] is not None for r in rows)
    assert bd.cache_len(args) >= 58 + 8 + 1


def test_cache_len_defaults_unchanged(bd):
    """The default commands keep the cache (and so the attention's cost) they had."""
    for argv in ([], ["--prompt", "16", "--new-tokens", "8"], ["--new-tokens", "128", "--measure-steps", "2"]):
        args = bd.parse_args(argv + ["--device", "cpu"])
        assert bd.cache_len(args) == -(-(args.prompt + args.new_tokens + args.warmup + 2) // 64) * 64


# ----------------------------------------------------------------------------- defect 4: --threads
def test_threads_option(bd, tiny, tmp_path, monkeypatch, capsys):
    assert bd.parse_args(["--device", "cpu"]).threads is None  # torch's default unless asked
    assert bd.parse_args(["--threads", "1", "--device", "cpu"]).threads == 1
    with pytest.raises(SystemExit):
        bd.parse_args(["--threads", "0", "--device", "cpu"])
    assert "--threads" in capsys.readouterr().err

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    seen = []
    run_decode = bd.run_decode

    def spy(*a, **kw):
        seen.append(torch.get_num_threads())
        return run_decode(*a, **kw)

    monkeypatch.setattr(bd, "run_decode", spy)
    argv = _argv(tmp_path, "--batch", "1", "--sparsity", "0.5", "--method", "topk", "--measure-steps", "1",
                 "--threads", str(want))
    rows = bd.run(bd.parse_args(argv), model=tiny)
    assert seen and set(seen) == {want}
    assert torch.get_num_threads() == before  # restored for the caller
    assert all(r["tokens_per_s"] is not None for r in rows)
    assert f"torch threads {want}" in (tmp_path / "decode.md").read_text()
    seen.clear()
    bd.run(bd.parse_args(_argv(tmp_path, "--batch", "1", "--sparsity", "0.5", "--method", "topk",
                               "--measure-steps", "0")), model=tiny)
    assert set(seen) == {before}
