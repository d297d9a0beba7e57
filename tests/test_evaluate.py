"""`sparse_infer.evaluate` and `sparse_infer.report` on a tiny random model and a short text (seconds, CPU)."""

import csv
import json
import math

import pytest
import torch

from sparse_infer import report
from sparse_infer.evaluate import EvalError, EvalSettings, evaluate, weight_read_fraction
from sparse_infer.models import tiny_model
from conftest import ByteTokenizer, byte_tokenizer

METHODS = ("dense", "topk", "threshold", "gate", "rsparse")


def run(text_file, **kw):
    kw.setdefault("window", 32)
    kw.setdefault("windows", 4)
    kw.setdefault("calib_windows", 2)
    kw.setdefault("search_iterations", 3)
    kw.setdefault("calib_quick", True)
    model = tiny_model("llama", vocab_size=256)
    return evaluate(model, tokenizer=ByteTokenizer(), text_file=text_file, progress=False, **kw)


@pytest.fixture(scope="module")
def grid(text_file):
    return run(text_file, methods=METHODS, sparsities=(0.3, 0.5, 0.7), protocols=("all", "decode"))


def test_grid_shape(grid):
    # dense: one row per protocol; 4 methods x 3 levels x 2 protocols
    assert len(grid) == 2 + 4 * 3 * 2
    assert [r["method"] for r in grid[:2]] == ["dense", "dense"]
    keys = {(r["method"], r["target"], r["protocol"]) for r in grid}
    assert len(keys) == len(grid)
    table = report.markdown_table(grid)
    lines = table.splitlines()
    assert len(lines) == 2 + len(grid)
    assert len({line.count("|") for line in lines}) == 1  # every line has the same number of columns


def test_dense_rows_are_the_reference(grid):
    for r in grid:
        if r["method"] == "dense":
            assert r["kl"] == 0.0 and r["top1"] == 1.0
            assert r["sparsity"] == 0.0 and r["bytes_rel"] == 1.0
            assert math.isfinite(r["ppl"]) and r["n_tokens"] > 0


def test_gate_above_two_thirds_is_na(grid):
    na = [r for r in grid if r["status"] != "ok"]
    assert {(r["method"], r["target"]) for r in na} == {("gate", 0.7)}
    assert all(math.isnan(r["ppl"]) for r in na)
    assert "| n/a |" in report.markdown_table(grid)


def test_measured_sparsity_near_target(grid):
    for r in grid:
        if r["method"] == "dense" or r["status"] != "ok":
            continue
        assert abs(r["sparsity"] - r["target"]) <= 0.02 + 1e-9 or (r["method"] == "threshold" and r["target"] == 0.7), r
        if r["target"] <= 0.5:
            assert abs(r["sparsity"] - r["target"]) <= 0.02, r
        # MLP-only sparsity skips only the MLP's share of the model's weight bytes
        assert r["sparsity"] > 0 and 1.0 - r["sparsity"] < r["bytes_rel"] < 1.0
        assert r["kl"] > 0 and 0.0 < r["top1"] <= 1.0


def test_scored_tokens(grid):
    n_all = 4 * 31  # 4 windows of 32: 31 next-token predictions each
    n_decode = 4 * (31 - 16)  # second half only
    for r in grid:
        if r["status"] == "ok":
            assert r["n_tokens"] == (n_all if r["protocol"] == "all" else n_decode)


def test_gate_rows_are_na_on_an_mlp_gate_cannot_serve(text_file):
    """An MLP that is more than down(act(gate(x)) * up(x)): gate's rows are n/a, the other methods still run."""
    model = tiny_model("llama", vocab_size=256)
    mlp = model.model.layers[0].mlp
    mlp.sub_norm = torch.nn.LayerNorm(mlp.gate_proj.out_features)  # now part of its state, which gate would drop
    rows = evaluate(model, tokenizer=ByteTokenizer(), text_file=text_file, progress=False, methods=("dense", "topk", "gate"),
                    sparsities=(0.3,), window=32, windows=2, calib_windows=1, search_iterations=3, calib_quick=True)
    status = {r["method"]: r["status"] for r in rows}
    assert status["dense"] == status["topk"] == "ok"
    assert status["gate"] == "n/a: LlamaMLP is not down(act(gate(x)) * up(x))"
    assert not any(isinstance(m, torch.nn.Module) and type(m).__name__.startswith("Sparse") for m in model.modules())


def test_topk_at_zero_sparsity_equals_dense(text_file):
    rows = run(text_file, methods=("dense", "topk"), sparsities=(0.0,))
    dense, topk = rows
    assert topk["kl"] == 0.0 and topk["top1"] == 1.0
    assert topk["ppl"] == pytest.approx(dense["ppl"], rel=1e-6)


def test_deterministic(text_file):
    a = run(text_file, methods=("dense", "threshold", "rsparse"), sparsities=(0.5,))
    b = run(text_file, methods=("dense", "threshold", "rsparse"), sparsities=(0.5,))
    for x, y in zip(a, b):
        for k in ("ppl", "kl", "top1", "sparsity", "bytes_rel"):
            assert x[k] == y[k], k


def test_shared_mode_batches(text_file):
    rows = run(text_file, methods=("dense", "topk"), sparsities=(0.5,), modes=("per_token", "shared"),
               batch_sizes=(1, 2, 4))
    per_token = [r for r in rows if r["method"] == "topk" and r["mode"] == "per_token"]
    shared = {r["batch_size"]: r for r in rows if r["mode"] == "shared"}
    assert len(per_token) == 1 and sorted(shared) == [1, 2, 4]
    # batch 1: one token per decode step, so the shared mask is the per-token mask
    assert shared[1]["ppl"] == pytest.approx(per_token[0]["ppl"], rel=1e-5)
    assert shared[1]["kl"] == pytest.approx(per_token[0]["kl"], rel=1e-4, abs=1e-9)
    for b in (2, 4):  # a mask shared by different sequences fits each of them worse
        assert shared[b]["kl"] > per_token[0]["kl"]
        assert abs(shared[b]["sparsity"] - 0.5) <= 0.02
    assert "Batch" in report.markdown_table(rows)


def test_writers(grid, tmp_path):
    paths = report.write_results(grid, tmp_path / "out", meta={"command": "test"})
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(grid)
    for key in ("model", "text_sha256", "window", "n_tokens", "seed", "device", "version", "ppl", "kl", "top1", "sparsity"):
        assert key in rows[0]
    with open(paths["json"]) as f:
        js = json.load(f)
    assert js["meta"]["command"] == "test" and len(js["rows"]) == len(grid)
    assert js["rows"][0]["text_sha256"] == grid[0]["text_sha256"]
    with open(paths["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| Method |" in open(paths["markdown"]).read()


def test_weight_read_fraction_dense():
    assert weight_read_fraction(tiny_model("llama")) == 1.0


@pytest.mark.parametrize("kw, match", [
    (dict(methods="topk,magic"), "unknown method 'magic'"),
    (dict(sparsities=(1.0,)), r"\[0, 1\)"),
    (dict(sparsities=(-0.1,)), r"\[0, 1\)"),
    (dict(protocols="prefill"), "unknown protocol"),
    (dict(modes="shared", batch_sizes=(3,), windows=4), "multiple of every batch size"),
    (dict(window=2), "window"),
])
def test_bad_settings(kw, match):
    with pytest.raises(EvalError, match=match):
        EvalSettings(**kw)


def test_text_too_short(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text("too short", encoding="utf-8")
    with pytest.raises(EvalError, match="too short for one window"):
        run(str(p), methods=("dense",))


def test_too_few_windows(text_file):
    with pytest.raises(EvalError, match="fewer than"):
        run(text_file, methods=("dense",), windows=10_000)


def test_unsupported_model(text_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(EvalError, match="not supported"):
        evaluate(gpt2, tokenizer=ByteTokenizer(), text_file=text_file, methods=("dense",), window=32, windows=2, progress=False)


def test_lm_eval_harness_on_patched_model():
    """A patched model goes into lm-evaluation-harness's HF wrapper as a model object (skipped without lm_eval)."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    import sparse_infer

    model = tiny_model("llama", vocab_size=256)
    sparse_infer.sparsify(model, sparse_infer.SparsityConfig(method="topk", sparsity=0.5))
    lm = HFLM(pretrained=model, tokenizer=byte_tokenizer(), batch_size=1, max_length=64)
    from lm_eval.api.instance import Instance

    req = Instance(request_type="loglikelihood", doc={}, arguments=("the of and", " a"), idx=0)
    (ll, _greedy), = lm.loglikelihood([req])
    assert math.isfinite(ll)
    assert sparse_infer.sparse_modules(model)


def test_without_dense_row(text_file):
    """The dense reference runs anyway: the sparse rows are compared with it."""
    rows = run(text_file, methods=("topk",), sparsities=(0.5,))
    assert [r["method"] for r in rows] == ["topk"]
    assert rows[0]["kl"] > 0 and rows[0]["top1"] < 1


# --------------------------------------------------------------------------- metrics against hand computations
def test_ppl_is_exp_of_the_mean_nll(grid):
    for r in grid:
        if r["status"] == "ok":
            assert r["ppl"] == pytest.approx(math.exp(r["nll"]), rel=1e-12)


def test_accumulator_metrics_on_known_logits():
    """nll, KL(dense || sparse) and top-1 agreement of `_Acc` against direct formulas (the dense reference is
    kept in float16, so the expected KL uses the same rounding)."""
    from sparse_infer.evaluate import _Acc

    g = torch.Generator().manual_seed(0)
    T, V = 9, 11
    dense, sparse = torch.randn(T, V, generator=g), torch.randn(T, V, generator=g)
    targets = torch.randint(0, V, (T,), generator=g)
    ref_acc, acc = _Acc(), _Acc()
    ref = ref_acc.add(dense, targets, None)
    assert acc.add(sparse, targets, ref) is None
    m = acc.metrics()
    logq = torch.log_softmax(sparse.double(), -1)
    nll = -logq.gather(-1, targets[:, None]).mean().item()
    logp = torch.log_softmax(dense.float(), -1).half().double()
    kl = (logp.exp() * (logp - torch.log_softmax(sparse.float(), -1).half().double())).sum(-1).mean().item()
    agree = (dense.argmax(-1) == sparse.argmax(-1)).double().mean().item()
    assert m["nll"] == pytest.approx(nll, rel=1e-6) and m["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)
    assert m["kl"] == pytest.approx(kl, rel=1e-5) and m["top1"] == agree and m["n_tokens"] == T
    assert ref_acc.metrics()["kl"] == 0.0 and ref_acc.metrics()["top1"] == 1.0


class _Uniform(torch.nn.Module):
    """Equal logits over V tokens: perplexity V, whatever the windows."""

    def __init__(self, V):
        super().__init__()
        self.V = V

    def forward(self, ids):
        from types import SimpleNamespace
        return SimpleNamespace(logits=torch.zeros(*ids.shape, self.V))


def test_perplexity_counts_next_token_predictions():
    from sparse_infer.evaluate import perplexity

    wins = [torch.randint(0, 13, (8,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for batch in (1, 2, 4):
        assert perplexity(_Uniform(13), wins, batch=batch) == pytest.approx(13.0, rel=1e-6)
    model = tiny_model("llama", vocab_size=256)
    assert perplexity(model, wins, batch=1) == pytest.approx(perplexity(model, wins, batch=4), rel=1e-5)


def test_decode_protocol_prefills_with_the_dense_model():
    """The decode protocol's first half runs dense (its KV cache is the dense model's), the second sparse."""
    import copy

    import sparse_infer as si
    from sparse_infer.evaluate import _forward

    dense = tiny_model("llama", vocab_size=256)
    sparse = si.sparsify(copy.deepcopy(dense), si.SparsityConfig(method="topk", sparsity=0.7), progress=False)
    batch = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    logits, targets = _forward(sparse, batch, "decode")
    x, h = batch[:, :-1], batch.shape[1] // 2
    with torch.no_grad():
        pre = dense(input_ids=x[:, :h], use_cache=True)
        want = sparse(input_ids=x[:, h:], past_key_values=pre.past_key_values, use_cache=True).logits
    assert torch.allclose(logits, want, atol=1e-5) and torch.equal(targets, batch[:, 1 + h:])
    with torch.no_grad():  # a sparse prefill would give other logits: the check above can fail
        pre = sparse(input_ids=x[:, :h], use_cache=True)
        other = sparse(input_ids=x[:, h:], past_key_values=pre.past_key_values, use_cache=True).logits
    assert not torch.allclose(other, want, atol=1e-3)


def test_weight_read_fraction_counts_every_linear():
    """Top-k on the MLP: the bytes read over the bytes of every linear, LM head and attention included."""
    import sparse_infer as si
    from sparse_infer.modules import SparseGatedMLP

    model = tiny_model("llama", vocab_size=256)
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    si.sparsify(model, si.SparsityConfig(method="topk", sparsity=0.5), progress=False)
    mods = si.sparse_modules(model)
    assert mods and not any(isinstance(m, SparseGatedMLP) for m in mods.values())
    saved = sum((m.in_features - m.k) * m.out_features for m in mods.values())
    assert weight_read_fraction(model) == pytest.approx((total - saved) / total, rel=1e-12)


# --------------------------------------------------------------------------- report format and text handling
def test_table_header_cells_and_csv_order(grid, tmp_path):
    from sparse_infer.evaluate import ROW_FIELDS

    lines = report.markdown_table(grid).splitlines()
    assert lines[0] == ("| Method | Allocation | Target | Protocol | Measured sparsity | Weight bytes / token | PPL "
                        "| KL to dense | Top-1 agree |")
    na = next(line for line in lines if line.startswith("| gate |") and "n/a" in line)
    assert [c.strip() for c in na.split("|")[-6:-1]] == ["n/a"] * 5
    assert (report.format_value("sparsity", 0.5), report.format_value("target", 0.3),
            report.format_value("top1", 0.125), report.format_value("kl", 0.1)) == ("50.0 %", "30 %", "12.5 %", "0.1000")
    path = report.write_csv(grid, tmp_path / "t.csv")
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header[:len(ROW_FIELDS)] == list(ROW_FIELDS)


def test_text_split_and_crlf(tmp_path):
    from sparse_infer import data

    ev, cal, cut = data.split_tokens(torch.arange(100))
    assert (len(ev), len(cal), cut) == (80, 20, 80) and ev[-1] == 79 and cal[0] == 80
    p = tmp_path / "crlf.txt"
    p.write_bytes(b"a\r\nb\r\n")
    t = data.load_text(str(p))
    assert t.text == "a\r\nb\r\n"  # CRLF endings are part of the tokens: read with newline=""


def test_rows_say_how_many_rank_aware_layers_carry_a_factor():
    """Calibration may give every rsparse layer rank 0 (then the row measures importance-ranked channels,
    not a low-rank path): the row says how many layers carry a factor."""
    import sparse_infer as si
    from sparse_infer.evaluate import lowrank_layers
    from sparse_infer.models import tiny_model

    model = tiny_model("llama")
    assert lowrank_layers(model) is None
    si.sparsify(model, si.SparsityConfig(method="rsparse", sparsity=0.5, overrides={"*.layers.0.*": {"rank": 0}}),
                progress=False)
    assert lowrank_layers(model) == "3/6"
    si.unsparsify(model)
    si.sparsify(model, si.SparsityConfig(method="topk", sparsity=0.5), progress=False)
    assert lowrank_layers(model) is None


@pytest.mark.parametrize("method", ["threshold", "rsparse"])
def test_a_method_row_does_not_depend_on_the_other_methods(grid, text_file, method):
    """threshold and rsparse share one dense statistics pass in a grid (and the SVDs cached with it):
    a grid of one method must give that method's rows of the full grid, number for number."""
    alone = run(text_file, methods=("dense", method), sparsities=(0.3, 0.5, 0.7), protocols=("all", "decode"))
    key = lambda r: (r["method"], r["target"], r["protocol"])  # noqa: E731
    full = {key(r): r for r in grid if r["method"] == method}
    mine = {key(r): r for r in alone if r["method"] == method}
    assert mine.keys() == full.keys() and len(mine) == 6
    for k, r in mine.items():
        for field in ("sparsity", "bytes_rel", "ppl", "kl", "top1", "lowrank_layers"):
            assert r.get(field) == full[k].get(field), (k, field, r.get(field), full[k].get(field))
