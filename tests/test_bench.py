"""CPU tests of the benchmark scripts: argument parsing, shape tables, engines, result writers, a tiny run.

The scripts live in bench/ (not a package): they are loaded by path.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_bench_script

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    return load_bench_script(name)


@pytest.fixture(scope="module")
def bd():
    return _load("bench_decode")


# ----------------------------------------------------------------------------- bench_decode: arguments
def test_decode_defaults(bd):
    args = bd.parse_args([] if torch.cuda.is_available() else ["--device", "cpu"])
    assert args.config == "llama3-8b"
    assert args.batch == [1, 4]
    assert args.sparsity == [0.3, 0.5, 0.7]
    assert args.modes == ["per_token"]
    assert args.method == "threshold" and args.targets == "all"
    assert (args.prompt, args.new_tokens) == (128, 256)
    assert args.dtype == "bf16" and args.engine == "native"
    assert args.graphs == torch.cuda.is_available()  # CUDA graphs only where there is CUDA
    assert args.compile is None  # eager step unless asked


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_decode_refuses_a_gpu_sized_config_without_cuda(bd, capsys):
    """Without CUDA the default llama3-8b would run the reference path for hours: refused unless asked for."""
    with pytest.raises(SystemExit):
        bd.parse_args([])
    assert "--config llama3-8b is a GPU benchmark and torch sees no CUDA device: use --config tiny" in capsys.readouterr().err
    assert bd.parse_args(["--config", "tiny"]).device == "cpu"


def test_decode_lists_and_flags(bd):
    args = bd.parse_args(["--config", "small", "--batch", "1,4,16,32", "--sparsity", "0.5", "--modes",
                          "per_token,shared", "--method", "topk", "--new-tokens", "16", "--prompt", "8",
                          "--out", "x", "--no-graphs", "--device", "cpu"])
    assert args.batch == [1, 4, 16, 32]
    assert args.sparsity == [0.5]
    assert args.modes == ["per_token", "shared"]
    assert args.method == "topk" and args.graphs is False
    assert args.argv[:2] == ["--config", "small"]
    assert bd.parse_args(["--compile", "--device", "cpu"]).compile == "inductor"
    assert bd.parse_args(["--compile", "aot_eager", "--device", "cpu"]).compile == "aot_eager"


@pytest.mark.parametrize("argv", [
    ["--batch", "0"], ["--batch", "a,b"], ["--sparsity", "1.0"], ["--sparsity", "0"], ["--modes", "both"],
    ["--config", "gpt2"], ["--method", "rsparse"], ["--new-tokens", "0"], ["--warmup", "0"],
    ["--method", "gate", "--sparsity", "0.7"], ["--method", "gate", "--targets", "attn"],
    ["--compile", "--engine", "hf"],
])
def test_decode_rejects(bd, argv, capsys):
    with pytest.raises(SystemExit):
        bd.parse_args(argv + ["--device", "cpu"])
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["llama3-8b", "llama2-7b", "small", "tiny"])
def test_config_table(bd, name):
    cfg = bd.llama_config(name)
    spec = bd.CONFIGS[name]
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (
        spec["hidden_size"], spec["intermediate_size"], spec["num_hidden_layers"])
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size


def test_llama3_8b_size(bd):
    """The 8B config really is Llama-3-8B: 8.03 B parameters, counted without building it."""
    c = bd.CONFIGS["llama3-8b"]
    h, i, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    total = L * per_layer + 2 * v * h + h
    assert abs(total / 1e9 - 8.03) < 0.01


# ----------------------------------------------------------------------------- bench_decode: engines
@pytest.fixture(scope="module")
def tiny(bd):
    return bd.build_model("tiny", torch.float32, "cpu", seed=1)


@pytest.mark.parametrize("engine", ["native", "hf"])
def test_engine_matches_hf_forward(bd, tiny, engine):
    """Prefill and two cached decode steps give the logits of the HF forward over the whole sequence."""
    torch.manual_seed(0)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 9))
    e = bd.ENGINES[engine](tiny, 2, 64)
    with torch.no_grad():
        e.reset()
        got = e.prefill(ids[:, :8])
        assert bd.rel_err(got, tiny(ids[:, :8]).logits[:, -1]) < 1e-5
        e.set_state(ids[:, 8], 8)
        e.step()
        assert bd.rel_err(e.logits, tiny(ids).logits[:, -1]) < 1e-5
        seq = torch.cat([ids, e.tok.clone()], dim=1)
        e.step()
        assert bd.rel_err(e.logits, tiny(seq).logits[:, -1]) < 1e-5
        assert int(e.pos) == 10


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_step_matches_eager(bd, tiny, backend):
    """--compile: inductor traces the whole patched step in one graph (the Triton path as custom ops,
    the reference path inline) and its logits equal the eager step's from the same state."""
    from torch._dynamo.utils import counters

    from sparse_infer import SparsityConfig, sparsify, unsparsify

    torch.manual_seed(0)
    ids = torch.randint(0, tiny.config.vocab_size, (2, 8))
    sparsify(tiny, SparsityConfig(method="topk", sparsity=0.5, backend=backend), progress=False)
    try:
        e = bd.NativeEngine(tiny, 2, 64, compile="inductor")
        e.fresh_compile()
        counters.clear()
        with torch.no_grad():
            first = e.prefill(ids).argmax(-1)
            e.set_state(first, 8)
            e.eager_step()
            want = e.logits.clone()
            e.set_state(first, 8)
            e.step()
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 1
        assert bd.rel_err(e.logits, want) < 1e-5
        assert int(e.pos) == 9
    finally:
        unsparsify(tiny)
        torch._dynamo.reset()


def test_weight_bytes(bd, tiny):
    emb = tiny.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in tiny.parameters())
    assert bd.decode_weight_bytes(tiny) == total - emb.numel() * emb.element_size()


# ----------------------------------------------------------------------------- bench_decode: results
def _fake_row(bd, **kw):
    row = {c: None for c in bd.COLUMNS}
    row.update(config="tiny", device="cpu", dtype="fp32", engine="native", batch=1, prompt=8, new_tokens=4,
               method="threshold", targets="all", mode="dense", sparsity=None, tokens_per_s=10.0, ratio=1.0,
               step_ms=100.0, graphs=False, note="")
    row.update(kw)
    return row


META = {"timestamp": "2026-01-01T00:00:00Z", "device_name": "cpu", "torch": "t", "triton": "tr",
        "transformers": "tf", "sparse_infer": "0.1", "python": "3", "cuda": "n/a", "command": "python x"}


def test_write_results(bd, tmp_path):
    rows = [_fake_row(bd), _fake_row(bd, mode="shared", sparsity=0.5, tokens_per_s=15.0, ratio=1.5,
                                     measured_sparsity=0.49),
            _fake_row(bd, mode="per_token", sparsity=0.5, tokens_per_s=None, ratio=None, note="failed: a|b")]
    md, path = bd.write_results(rows, tmp_path, META)
    text = Path(md).read_text()
    assert "| 1 | shared | 0.50 | 0.490 | 15.0 | 1.50 |" in text
    assert "failed: a/b" in text  # a pipe in a note must not break the table
    assert "command: `python x`" in text and "device: cpu" in text
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 3 and got[1]["ratio"] == "1.5" and got[0]["timestamp"] == META["timestamp"]
    bd.write_results(rows[:1], tmp_path, META)  # appends under the same header
    with open(path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_csv_with_other_header_is_left_alone(bd, tmp_path):
    (tmp_path / "decode.csv").write_text("a,b\n1,2\n")
    _, path = bd.write_results([_fake_row(bd)], tmp_path, META)
    assert Path(path).name != "decode.csv"
    assert (tmp_path / "decode.csv").read_text() == "a,b\n1,2\n"


# ----------------------------------------------------------------------------- bench_decode: end to end
def test_tiny_end_to_end(bd, tiny, tmp_path):
    """The whole benchmark on the CPU (reference path) in seconds: every row timed and written."""
    argv = ["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "1,2", "--sparsity", "0.5",
            "--modes", "per_token,shared", "--method", "topk", "--prompt", "8", "--new-tokens", "3",
            "--warmup", "1", "--measure-steps", "1", "--out", str(tmp_path), "--quiet"]
    rows = bd.run(bd.parse_args(argv), model=tiny)
    # dense rows first, then each (sparsity, mode) over every batch size
    assert [(r["batch"], r["mode"]) for r in rows] == [
        (1, "dense"), (2, "dense"), (1, "per_token"), (2, "per_token"), (1, "shared"), (2, "shared")]
    for r in rows:
        assert r["tokens_per_s"] > 0, r["note"]
        assert r["graphs"] is False and r["ratio"] is not None
        if r["mode"] != "dense":
            assert r["weight_gb_per_step"] < rows[0]["weight_gb_per_step"]
            assert abs(r["measured_sparsity"] - 0.5) < 1e-6  # top-k: exactly the target
    from sparse_infer import sparse_modules

    assert not sparse_modules(tiny)  # left dense
    md = (tmp_path / "decode.md").read_text()
    assert md.count("\n| ") == 1 + len(rows)  # header + one line per row
    with open(tmp_path / "decode.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_tiny_end_to_end_compiled(bd, tiny, tmp_path):
    """--compile through the whole benchmark: every row compiled with the named backend, and said so."""
    argv = ["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "2", "--sparsity", "0.5",
            "--method", "topk", "--prompt", "8", "--new-tokens", "3", "--warmup", "1", "--measure-steps", "1",
            "--compile", "aot_eager", "--out", str(tmp_path), "--quiet"]
    rows = bd.run(bd.parse_args(argv), model=tiny)
    assert [r["mode"] for r in rows] == ["dense", "per_token"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["compiled"] == "aot_eager", r["note"]
    assert abs(rows[1]["measured_sparsity"] - 0.5) < 1e-6  # measured on the eager reference step
    assert "torch.compile aot_eager" in (tmp_path / "decode.md").read_text()
    with open(tmp_path / "decode.csv", newline="") as f:
        assert [r["compiled"] for r in csv.DictReader(f)] == ["aot_eager", "aot_eager"]
    torch._dynamo.reset()


def test_main_threshold(bd, tmp_path, capsys):
    """``main`` end to end with calibrated thresholds: builds the tiny model, prints the table."""
    code = bd.main(["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--batch", "1", "--sparsity", "0.5",
                    "--method", "threshold", "--calib-tokens", "64", "--prompt", "4", "--new-tokens", "2",
                    "--warmup", "1", "--measure-steps", "4", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| batch | mode |" in out and "| 1 | per_token | 0.50 |" in out
    with open(tmp_path / "decode.csv", newline="") as f:
        sparse = [r for r in csv.DictReader(f) if r["mode"] == "per_token"]
    assert abs(float(sparse[0]["measured_sparsity"]) - 0.5) < 0.2  # thresholds from random tokens land near


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_cuda_graphs(bd, tmp_path):
    """On a GPU the dense and sparse steps are both captured in CUDA graphs, and a replay equals the eager step."""
    args = bd.parse_args(["--config", "tiny", "--batch", "1,4", "--sparsity", "0.5", "--modes", "per_token,shared",
                          "--prompt", "16", "--new-tokens", "8", "--out", str(tmp_path), "--quiet"])
    rows = bd.run(args)
    for r in rows:
        assert r["graphs"] is True, r["note"]
        assert r["graph_check"] < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_cuda_graphs_compiled(bd, tmp_path):
    """--compile on a GPU: inductor's step (kernels as custom ops) is captured too, and replays equal it."""
    args = bd.parse_args(["--config", "tiny", "--batch", "1,4", "--sparsity", "0.5", "--modes", "per_token,shared",
                          "--prompt", "16", "--new-tokens", "8", "--compile", "--out", str(tmp_path), "--quiet"])
    rows = bd.run(args)
    for r in rows:
        assert r["graphs"] is True and r["compiled"] == "inductor", r["note"]
        assert r["graph_check"] < 2e-2 and (r["ref_check"] is None or r["ref_check"] < 2e-2)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- bench_kernels (the kernel helper's)
def test_bench_kernels_cases_and_writer(tmp_path):
    bk = _load("bench_kernels")
    for attr in ("parse_args", "build_cases", "write_results"):
        if not hasattr(bk, attr):
            pytest.skip(f"bench/bench_kernels.py has no {attr} yet")
    cases = bk.build_cases(bk.parse_args([]))
    assert cases and all({"in_features", "out_features", "M"} <= set(c) for c in cases)
    assert len({tuple(sorted(c.items())) for c in cases}) == len(cases)  # no duplicate case
    quick = bk.build_cases(bk.parse_args(["--quick"]))
    assert 0 < len(quick) <= len(cases)
    rows = [dict(c, dense_us=10.0, kernel_us=5.0, speedup=2.0, gpu="cpu", torch="t", triton="tr",
                 timestamp="now", command="python bench/bench_kernels.py --quick") for c in quick[:3]]
    paths = bk.write_results(rows, str(tmp_path))
    for p in paths:
        assert Path(p).is_file() and Path(p).stat().st_size > 0
        # every table says which command produced it
        assert "python bench/bench_kernels.py --quick" in Path(p).read_text()


def test_final_variants_are_config_fields():
    """`--final` runs on a GPU only: a misspelt override would fail there, so check each one here."""
    from dataclasses import replace
    from sparse_infer.kernels import _autotune as at
    bk = _load("bench_kernels")
    for bucket, variants in bk.FINAL_VARIANTS.items():
        assert variants[0] is None  # the table's default comes first: it is the row the table reports
        for v in variants[1:]:
            replace(at._GPU[bucket], **v)


def test_final_keeps_going_past_a_failing_variant_and_times_the_kernel_above_the_fallback(tmp_path, monkeypatch):
    """`--final` on the CPU (interpreter, timers stubbed): every row is checked against the reference and says
    so; a variant that fails (as an untried config may on the GPU) becomes a FAILED row and the run goes on;
    a per-token row above the fallback cutoff also times the kernel itself; the tables exist after each case."""
    import argparse
    import triton.testing as tt
    bk = _load("bench_kernels")
    monkeypatch.setattr(bk, "_DEV", "cpu")
    monkeypatch.setattr(bk, "_copies", lambda case, elt: 2)
    monkeypatch.setattr(tt, "do_bench", lambda fn, **kw: (fn(), 0.05)[1])
    monkeypatch.setattr(bk, "_graph_us", lambda fn, rep=30: (fn(), 40.0)[1])
    monkeypatch.setitem(bk.FINAL_VARIANTS, 1, [None, dict(compact=True), dict(BLOCK_K="not a size")])
    monkeypatch.setitem(bk.FINAL_VARIANTS, 16, [None, dict(compact=True)])
    written = []
    real_write = bk.write_results
    monkeypatch.setattr(bk, "write_results", lambda rows, out: written.append(len(rows)) or real_write(rows, out))
    plan = [(1, "input-sparse", 0.5), (1, "rank-aware", 0.5), (16, "input-sparse", 0.5)]
    args = argparse.Namespace(final_shapes=[(64, 96)], final_plan=plan, out=str(tmp_path))
    meta = dict(gpu="cpu", torch="t", triton="tr", timestamp="now", command="python bench/bench_kernels.py --final")
    rows = bk.final(args, 3000.0, meta)
    by = {(r["M"], r["kernel"], r["variant"]): r for r in rows}
    assert by[(1, "input-sparse", "default")]["status"] == "ok" and by[(1, "rank-aware", "default")]["status"] == "ok"
    assert by[(1, "input-sparse", "compact=True")]["status"] == "ok"
    assert by[(1, "input-sparse", "BLOCK_K=not a size")]["status"].startswith("FAILED: ")
    assert by[(1, "rank-aware", "compact=True")]["status"] == "ok"  # the run went on after the failure
    assert by[(16, "input-sparse", "default (no fallback: the kernel)")]["status"] == "ok"
    assert by[(16, "input-sparse", "compact=True (no fallback: the kernel)")]["status"] == "ok"
    assert all(r["rel_err"] < 1e-2 for r in rows if r["status"] == "ok")
    ok = by[(1, "input-sparse", "default")]  # bandwidth from the graph time (40 us), not the eager one
    assert ok["gbps"] == pytest.approx(ok["bytes"] / 40.0 / 1e3) and ok["graph_speedup"] == pytest.approx(1.0)
    assert written == [3, 6, 10]  # after every case
    md = (tmp_path / "kernels.md").read_text()
    assert "## Launch-config variants" in md and "FAILED: " in md
    with open(tmp_path / "kernels.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and {"variant", "rel_err", "status", "copy_gbps"} <= set(csv_rows[0])
    assert bk._status(0.5).startswith("WRONG") and bk._status(1e-3) == "ok"
    # the timers are stubbed to one value: every variant ties, so the tuning file keeps the table's defaults
    from sparse_infer.kernels import _autotune as at
    tuning = json.loads((tmp_path / "tuning.json").read_text())
    assert {b: e["variant"] for b, e in tuning["buckets"].items()} == {"1": "default"}  # M=16: fallback rows only
    assert tuning["command"] == meta["command"] and tuning["device"] == "cpu"
    assert at.MatmulConfig(**tuning["buckets"]["1"]["config"]) == at._table(1)


def test_pick_tuning_takes_the_fastest_correct_variant_per_bucket(tmp_path):
    """Geometric mean over the bucket's cases; WRONG / FAILED variants, variants missing a case, the rows where
    the ops fall back to cuBLAS and the forced-kernel rows do not compete; a gain under 2 % keeps the default."""
    from dataclasses import replace
    from sparse_infer.kernels import _autotune as at
    bk = _load("bench_kernels")

    def row(M, sp, variant, us, status="ok", overrides=None, kernel="input-sparse", **kw):
        return dict(in_features=4096, out_features=14336, M=M, kernel=kernel, sparsity=sp, rank=0, variant=variant,
                    graph_kernel_us=us, status=status, overrides=overrides or {}, **kw)

    swap, pairs, deep = dict(swap_ab=True, num_warps=4, num_stages=3), dict(bf16_pairs=True), dict(num_stages=3)
    rows = [
        row(1, 0.5, "default", 30.0), row(1, 0.9, "default", 12.0), row(1, 1.0, "default", 16.0),
        row(1, 0.5, "swap", 20.0, overrides=swap), row(1, 0.9, "swap", 10.0, overrides=swap),
        row(1, 0.5, "pairs", 10.0, overrides=pairs),  # faster, but missing the 90 % case
        row(1, 0.5, "bad", 5.0, "WRONG: rel err 0.5", dict(compact=True)), row(1, 0.9, "bad", 5.0, "ok", dict(compact=True)),
        row(1, 0.5, "default", 9.0, kernel="input-sparse-topk"),  # the default only: not a case
        row(4, 0.5, "default", 40.0, kernel="shared"), row(4, 0.5, "deep", 39.5, overrides=deep, kernel="shared"),
        row(16, 0.5, "default", 45.0, fallback=True),  # gate + cuBLAS: the config is not what ran
        row(16, 0.5, "default (no fallback: the kernel)", 60.0, fallback=True, forced=True),
        row(16, 0.5, "deep (no fallback: the kernel)", 30.0, overrides=deep, fallback=True, forced=True),
    ]
    picked = bk.pick_tuning(rows)
    assert set(picked) == {1, 8}
    assert picked[1]["variant"] == "swap" and picked[1]["config"] == replace(at._table(1), **swap)
    assert picked[1]["geomean_us"] == pytest.approx((20.0 * 10.0) ** 0.5, abs=0.01)
    assert picked[1]["default_geomean_us"] == pytest.approx((30.0 * 12.0) ** 0.5, abs=0.01)
    assert picked[1]["cases"] == 2 and picked[1]["candidates"] == 2  # default and swap
    assert picked[8]["variant"] == "default" and picked[8]["config"] == at._table(8)  # 1.25 % faster: noise
    path = bk.write_tuning(picked, dict(gpu="GPU X", command="cmd"), str(tmp_path))
    try:
        assert at.load_tuning(path) == {1: replace(at._table(1), **swap), 8: at._table(8)}
    finally:
        at.load_tuning(None)


def test_weight_copies_defeat_the_l2_at_any_sparsity():
    bk = _load("bench_kernels")
    for in_f, out_f in [(4096, 1024), (4096, 14336)]:
        for s in (0.5, 0.7, 0.9, 1.0):
            case = dict(in_features=in_f, out_features=out_f, kernel="input-sparse", sparsity=s, active=1 - s, rank=0)
            n = bk._copies(case, 2)
            read = in_f * out_f * 2 * max(1 - s, 0.05)
            assert n * read >= 4 * bk.L2_BYTES and n * 2 * in_f * out_f * 2 <= 12 * 2**30


@pytest.mark.parametrize("M", [1, 4, 16])
@pytest.mark.parametrize("shared", [False, True])
def test_bench_ops_threshold_gates_run_at_the_labelled_sparsity(M, shared):
    """pytest-benchmark groups say s=0.5: the threshold providers' masks must drop half the channels."""
    bo = _load("test_bench_ops")
    x = torch.randn(M, 1024, generator=torch.Generator().manual_seed(M))
    gate = bo._gate("threshold", x, shared)
    assert 1.0 - float(gate.mask(x).float().mean()) == pytest.approx(bo.SPARSITY, abs=0.01)


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_decode.sh", "gpu_decode_batch.sh"])
def test_device_scripts_fit_one_call(script):
    """Each device script is one `run` call, which is stopped after 600 s: its steps' timeouts must fit."""
    text = (Path(__file__).resolve().parents[1] / "bench" / script).read_text()
    steps = re.findall(r"^\s*timeout (.*?)(\d+) ", text, flags=re.M)
    limits = [int(t) for _, t in steps]
    assert limits and sum(limits) <= 590, limits
    # SIGINT, not SIGTERM: a stopped pytest still prints its summary; and each step writes its own log
    # under $OUT (a pipe into tee/grep would be killed with it when the call itself is stopped)
    assert all(opt == "-s INT " for opt, _ in steps), steps
    assert len(re.findall(r"> \$OUT/\S+ 2>&1$", text, flags=re.M)) == len(steps)


def test_sass_count_compiles_for_sm90():
    """bench/sass_count.py: the kernel compiles for sm_90 without a GPU, and the column-pair read of bf16
    weights issues fewer K-loop instructions than Triton's own widening, for the same 16-byte loads, the
    split-K tail has one GPU-wide fence (the counter's release), not one per element group, and the 3-stage
    tensor-core loop over compacted ids keeps weight copies in flight while it waits (with 4-byte ids it
    waited for all of them), and the swapped operands (swap_ab) turn the tensor-core loop from mma.sync into
    sm_90 wgmma with copies in flight.  (A subprocess: this session's kernels were built for the interpreter,
    which cannot compile.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parents[1] / "bench" / "sass_count.py"
    names = ("default", "pairs", "m16-compact-3stages", "m16-dot-pregated", "swap-pregated-3stages")
    run = subprocess.run([sys.executable, str(script), "--variants", *names],
                         env=env, capture_output=True, text=True, timeout=300)
    if run.returncode and re.search(r"ptxas|nvdisasm|cuobjdump", run.stderr):
        pytest.skip(f"this triton build cannot compile for sm_90: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {}
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in names:
            rows[cells[0]] = dict(regs=int(cells[1]), loop=int(cells[4]), ldg128=int(cells[6]), fences=int(cells[7]),
                                  in_flight=cells[8], mma=cells[9])
    assert rows["default"]["regs"] > 0 and rows["default"]["loop"] > 0
    assert rows["default"]["ldg128"] == rows["pairs"]["ldg128"] > 0
    assert rows["pairs"]["loop"] < rows["default"]["loop"]
    assert rows["default"]["fences"] == rows["pairs"]["fences"] == 1
    assert int(rows["m16-compact-3stages"]["in_flight"]) >= 1
    assert rows["m16-dot-pregated"]["mma"].startswith("HMMA") and rows["default"]["mma"] == "-"
    assert rows["swap-pregated-3stages"]["mma"].startswith("HGMMA")
    assert int(rows["swap-pregated-3stages"]["in_flight"]) >= 1


# --------------------------------------------------------------------------- bench/mlp_limits_study.py
@pytest.fixture(scope="module")
def ls():
    return _load("mlp_limits_study")


def _token_windows(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (length,), generator=g) for _ in range(n)]


def test_limits_study_tiny_run(ls, tiny):
    rows = ls.run(tiny, _token_windows(2, 33, 0), _token_windows(2, 33, 1), levels=(0.5,), ranks=(4,), log=lambda s: None,
                  densities=(0.3, 0.9), trained_ranks=(4,), train_steps=5)
    kinds = [(r["family"], r["rule"]) for r in rows]
    assert kinds[0] == ("dense", "-") and rows[0]["ratio"] == 1.0
    assert {("input top-k", i) for i in ls.IMPORTANCES} <= set(kinds)
    assert ("neuron oracle", "h") in kinds and ("neuron predictor", "rank 4") in kinds
    two_pass = [r for r in rows if r["rule"] == "input top-30%"]
    assert len(two_pass) == 1 and two_pass[0]["neuron_drop"] == pytest.approx(0.5 + 0.2)
    assert ("neuron predictor", "input top-90%") not in kinds  # its first pass alone is over the budget
    assert ("neuron predictor", "trained rank 4") in kinds
    assert all(math.isfinite(r["ppl"]) for r in rows)
    assert "| input top-k | fisher | 50% |" in ls.markdown(rows)
    # the swapped forwards are gone: the model is dense again
    assert all("forward" not in m.__dict__ for m in tiny.modules())


def test_limits_study_neuron_oracle_at_zero_drop_is_dense(ls, tiny):
    blocks, names = ls.mlps(tiny)
    x = torch.randn(3, 5, tiny.config.hidden_size)
    for rule in ("gate", "h"):
        out = ls._neuron_forward(blocks[0], names, 0.0, rule)(x)
        torch.testing.assert_close(out, blocks[0](x))


def test_limits_study_two_pass_predictor_reading_every_input_is_the_h_oracle(ls, tiny):
    blocks, names = ls.mlps(tiny)
    x = torch.randn(2, 7, tiny.config.hidden_size)
    for drop in (0.3, 0.6):
        out = ls._neuron_forward(blocks[1], names, drop, "input", density=1.0)(x)
        torch.testing.assert_close(out, ls._neuron_forward(blocks[1], names, drop, "h")(x))
    # reading fewer inputs changes the choice (the test would pass trivially if it did not)
    assert not torch.equal(ls._neuron_forward(blocks[1], names, 0.6, "input", density=0.1)(x), out)


def test_limits_study_trained_predictor_learns_a_learnable_ranking(ls):
    # |h| = relu of a rank-4 map of x: representable by a rank-8 ReLU network, so it must beat chance by far
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 16, generator=g) * torch.linspace(0.2, 5, 16)
    h = torch.relu(x @ torch.randn(16, 4, generator=g) @ torch.randn(4, 40, generator=g))
    keep = 10
    torch.manual_seed(123)
    state = torch.get_rng_state()
    net = ls.train_predictor(x[:2500], h[:2500], keep, rank=8, steps=300, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    ref_mask = ls.ref.topk_mask(h[2500:], keep)
    got = ls.ref.topk_mask(net(x[2500:]).sigmoid(), keep)
    recall = float((got & ref_mask).sum() / ref_mask.sum())
    assert recall > 0.7, recall  # chance is keep / 40 = 0.25


def test_limits_study_whitened_bases_full_rank_is_exact(ls):
    torch.manual_seed(0)
    W = torch.randn(24, 16, dtype=torch.float64)
    X = torch.randn(200, 16, dtype=torch.float64) * torch.linspace(0.1, 3, 16)
    A, B = ls.whitened_bases(W, X.T @ X / len(X))
    torch.testing.assert_close((X @ A[:, :16]) @ B[:16], X @ W.T)
    # sliced to a lower rank it beats the plain SVD on these inputs (what "activation-aware" means)
    A, B = A[:, :4], B[:4]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    plain = X @ (U[:, :4] * S[:4] @ Vh[:4]).T
    assert (X @ A @ B - X @ W.T).norm() < (plain - X @ W.T).norm()


def test_limits_study_fisher_is_per_output_and_restores_grad_flags(ls, tiny):
    flags = [p.requires_grad for p in tiny.parameters()]
    f = ls.fisher_diag(tiny, _token_windows(1, 17, 2))
    blocks, names = ls.mlps(tiny)
    for b in blocks:
        for n in names:
            v = f[getattr(b, n)]
            assert v.shape == (getattr(b, n).out_features,) and bool((v >= 0).all()) and float(v.sum()) > 0
    assert [p.requires_grad for p in tiny.parameters()] == flags


def test_limits_study_rejects_bad_level(ls):
    with pytest.raises(SystemExit):
        ls.main(["--levels", "1.0"])
    with pytest.raises(SystemExit):
        ls.main(["--densities", "0"])


# ----------------------------------------------------------------------------- calibration_study
def test_calibration_study_small_run(smollm2, tmp_path):
    cs = _load("calibration_study")
    out = tmp_path / "study.json"
    rows = cs.main(["--levels", "0.5", "--eval-windows", "1", "--window", "64", "--calib-samples", "2",
                    "--methods", "topk", "threshold", "--targets", "all", "--out", str(out)])
    assert [r["method"] for r in rows] == ["dense", "topk", "threshold"]
    assert rows[0]["ratio"] == 1.0 and all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in rows)
    topk = rows[1]
    assert topk["nominal_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert topk["measured_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert topk["ratio"] > 1.0  # half the weight bytes of every linear cannot be free
    saved = __import__("json").loads(out.read_text())
    assert saved["targets"] == "all" and len(saved["rows"]) == 3


def test_calibration_study_rejects_unknown_targets(capsys):
    cs = _load("calibration_study")
    with pytest.raises(SystemExit):
        cs.main(["--targets", "lm_head"])
    assert "invalid choice" in capsys.readouterr().err


# ----------------------------------------------------------------------------- union_study
def test_union_density_counts_channels_any_sequence_keeps():
    us = _load("union_study")
    m = torch.zeros(4, 1, 4, dtype=torch.bool)  # 4 sequences, 1 position, 4 channels
    m[0, 0, 0] = m[1, 0, 1] = m[2, 0, 0] = m[3, 0, 0] = True
    assert us.union_density(m, 1) == 0.25
    assert us.union_density(m, 2) == (2 / 4 + 1 / 4) / 2  # {0, 1} and {0}
    assert us.union_density(m, 4) == 0.5
    assert abs(us.random_union(0.5, 4) - 0.9375) < 1e-12
    with pytest.raises(ValueError, match="batches of 3"):
        us.union_density(m, 3)


def test_union_study_measure_on_tiny(tiny):
    """Top-k masks keep exactly k channels per token (B=1: the density), the union grows with B, the model
    is left dense."""
    us = _load("union_study")
    ids = torch.randint(0, tiny.config.vocab_size, (4, 6), generator=torch.Generator().manual_seed(0))
    rows = us.measure(tiny, ids, 0.5, "all", [1, 2, 4])
    from sparse_infer import sparse_modules

    assert not sparse_modules(tiny)
    assert [r["batch"] for r in rows] == [1, 2, 4]
    assert abs(rows[0]["union"] - 0.5) < 0.02  # floor(k) per linear: at most one channel under half
    assert rows[0]["union"] < rows[1]["union"] <= rows[2]["union"] <= 1.0
    assert set(rows[0]["per_kind"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "| all | 50% | 4 |" in us.markdown(rows)


def test_union_study_main_small(smollm2, tmp_path):
    us = _load("union_study")
    out = tmp_path / "u.json"
    rows = us.main(["--sparsities", "0.5", "--targets", "mlp", "--batches", "1", "2", "--sequences", "2",
                    "--window", "32", "--out", str(out)], model=smollm2[0], tokenizer=smollm2[1])
    assert [r["batch"] for r in rows] == [1, 2] and json.loads(out.read_text())[1]["batch"] == 2
    assert abs(rows[0]["union"] - 0.5) < 0.01 and rows[0]["union"] < rows[1]["union"]


def test_union_study_rejects_bad_batches(capsys):
    us = _load("union_study")
    with pytest.raises(SystemExit):
        us.main(["--batches", "3", "--sequences", "16"])
    assert "divide" in capsys.readouterr().err


# ----------------------------------------------------------------------------- shared_split_study
def test_shared_split_keeps_the_mlp_budget(tiny):
    """The down_proj sparsity each gate/up split gets keeps the MLP at the budget (what the row's patched
    model reports), an unreachable split is refused with the range that works, and the model is left dense."""
    ss = _load("shared_split_study")
    import sparse_infer as si

    assert abs(ss.split(tiny, 0.5, 0.5) - 0.5) < 1e-9  # a uniform split
    d = ss.split(tiny, 0.5, 0.4)
    assert d > 0.5
    ids = torch.randint(0, tiny.config.vocab_size, (4, 7), generator=torch.Generator().manual_seed(0))
    rows = ss.run(tiny, ids, 0.5, [0.5, 0.4], [2, 4], progress=False)
    assert not si.sparse_modules(tiny)
    assert [r["gate_up"] for r in rows] == [0.5, 0.4] and rows[1]["down"] == d
    assert all(abs(r["bytes"] - 0.5) < 0.02 for r in rows)  # whole channels per layer
    assert all(math.isfinite(r[k]) and r[k] > 1 for r in rows for k in ("per_token_b1", "shared_b2", "shared_b4"))
    assert "| 40% |" in ss.markdown(rows, 10.0, [2, 4])
    with pytest.raises(ValueError, match="between"):
        ss.split(tiny, 0.5, 0.9)


def test_shared_split_calibrated_rows_keep_the_budget(tiny):
    """A split picked by calibration: its per-kind sparsities average to the budget, the patched model
    reads the budget with per-token and shared masks, and the model is left dense."""
    ss = _load("shared_split_study")
    import sparse_infer as si

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tiny.config.vocab_size, (4, 9), generator=g)
    calib = [torch.randint(0, tiny.config.vocab_size, (48,), generator=g) for _ in range(4)]
    rows = ss.calibrated(tiny, ids, 0.5, calib, [2, 4], ["greedy"], iterations=2, progress=False)
    assert not si.sparse_modules(tiny)
    (r,) = rows
    hidden = sum(m.weight.numel() for n, m in tiny.named_modules() if n.endswith(ss.HIDDEN))
    down = sum(m.weight.numel() for n, m in tiny.named_modules() if n.endswith("down_proj"))
    assert abs((r["gate_up"] * hidden + r["down"] * down) / (hidden + down) - 0.5) < 1e-6
    assert abs(r["bytes"] - 0.5) < 0.02 and r["allocation"] == "greedy"
    assert all(math.isfinite(r[k]) for k in ("per_token_b1", "shared_b2", "shared_b4"))
    assert "| greedy: " in ss.markdown(rows, 10.0, [2, 4])


def test_shared_split_study_main_small(smollm2, tmp_path, capsys):
    ss = _load("shared_split_study")
    out = tmp_path / "s.json"
    rows = ss.main(["--gate-up", "0.5", "0.4", "--batches", "2", "--sequences", "2", "--window", "32", "--out",
                    str(out), "--no-progress"], model=smollm2[0], tokenizer=smollm2[1])
    saved = json.loads(out.read_text())
    assert [r["gate_up"] for r in saved["rows"]] == [0.5, 0.4] and saved["dense"] < rows[0]["per_token_b1"]
    printed = capsys.readouterr().out
    assert "shared, batch 2" in printed and "gate/up 50%, down" not in printed  # --no-progress: the table only
    with pytest.raises(SystemExit):
        ss.main(["--gate-up", "0.9"], model=smollm2[0], tokenizer=smollm2[1])
    assert "between" in capsys.readouterr().err
