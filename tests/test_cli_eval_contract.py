"""What `evaluate`, the `sparse-infer` command line, the text loader and the model loader promise: every
option reaches what it sets, bad input is an EvalError / exit status 2 before any work, the progress
switches are honoured, and the text is found and split the documented way."""

import importlib
import json
import math
import os
import re

import pytest
import torch

import sparse_infer as si
from conftest import ByteTokenizer, byte_tokenizer, short_text
from sparse_infer import data
from sparse_infer.cli import main
from sparse_infer.evaluate import EvalError, EvalSettings, evaluate, weight_read_fraction
from sparse_infer.models import tiny_model


def run(text_file, model=None, **kw):
    for k, v in dict(window=32, windows=4, calib_windows=2, search_iterations=3, calib_quick=True).items():
        kw.setdefault(k, v)
    kw.setdefault("progress", False)
    model = model if model is not None else tiny_model("llama", vocab_size=256)
    return evaluate(model, tokenizer=ByteTokenizer(), text_file=text_file, **kw)


class Stop(BaseException):
    """Ends a run once the call under test has been seen (main handles Exceptions and Ctrl-C, not this)."""


# --------------------------------------------------------------------------- EvalSettings
@pytest.mark.parametrize("kw, match", [
    (dict(window=3), "window must be an integer of at least 4 tokens"),
    (dict(windows=0), "number of evaluation windows must be a positive integer"),
    (dict(calib_windows=0), "number of calibration windows must be a positive integer"),
    (dict(search_iterations=True), "search iterations must be a positive integer"),
    (dict(methods=()), "no method to evaluate"),
    (dict(methods="topk", sparsities=()), "no sparsity level given"),
])
def test_more_bad_settings(kw, match):
    with pytest.raises(EvalError, match=match):
        EvalSettings(**kw)


# --------------------------------------------------------------------------- which tokens are scored
def _expected_dense_ppl(model, text, window, count):
    """Perplexity over ``count`` windows spread evenly over the first 80 % of the byte tokens."""
    ids = torch.tensor(list(text.encode("utf-8")))
    ev = ids[:int(len(ids) * 0.8)]
    n = len(ev) // window
    wins = [ev[p * window:(p + 1) * window] for p in ((i * n) // count for i in range(count))]
    nll = count_ = 0.0
    with torch.no_grad():
        for w in wins:
            logits = model(w[None, :-1]).logits[0].float()
            nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            count_ += len(w) - 1
    return math.exp(nll / count_)


def test_dense_row_scores_evenly_spread_windows_of_the_first_80_percent(text_file):
    text = open(text_file, encoding="utf-8", newline="").read()
    model = tiny_model("llama", vocab_size=256)
    rows = run(text_file, model, methods=("dense",), windows=3)
    assert rows[0]["n_windows"] == 3 and rows[0]["n_tokens"] == 3 * 31
    assert rows[0]["ppl"] == pytest.approx(_expected_dense_ppl(model, text, 32, 3), rel=1e-5)


def test_every_window_of_the_evaluation_part_can_be_asked_for(text_file):
    n = int(len(open(text_file, encoding="utf-8").read().encode()) * 0.8) // 32
    rows = run(text_file, methods=("dense",), windows=n)
    assert rows[0]["n_windows"] == n
    with pytest.raises(EvalError, match="fewer than"):
        run(text_file, methods=("dense",), windows=n + 1)


def test_calibration_tail_too_short_is_an_eval_error(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text(short_text(20)[:100].ljust(100, "x"), encoding="utf-8")  # 80 tokens to evaluate, 20 to calibrate
    assert run(str(p), methods=("dense", "topk"), sparsities=(0.5,), windows=2)  # top-k needs no calibration
    with pytest.raises(EvalError, match=r"calibration part of the text \(20 tokens, its last 20 %\) is too short"):
        run(str(p), methods=("dense", "threshold"), sparsities=(0.5,), windows=2)


# --------------------------------------------------------------------------- arguments of evaluate()
def test_keyword_overrides_change_a_given_settings_object(text_file):
    settings = EvalSettings(methods=("dense",), window=32, windows=4, calib_windows=1)
    model = tiny_model("llama", vocab_size=256)
    rows = evaluate(model, tokenizer=ByteTokenizer(), text_file=text_file, settings=settings, windows=2, progress=False)
    assert rows[0]["n_windows"] == 2 and rows[0]["window"] == 32


def test_quick_starts_from_the_quick_grid(text_file):
    rows = evaluate(tiny_model("llama", vocab_size=256), tokenizer=ByteTokenizer(), text_file=text_file, quick=True,
                    methods=("dense",), progress=False)
    assert (rows[0]["window"], rows[0]["n_windows"]) == (256, 4)


def test_dtype_applies_to_a_model_object(text_file):
    model = tiny_model("llama", vocab_size=256)
    rows = run(text_file, model, methods=("dense",), windows=1, dtype="bfloat16")
    assert rows[0]["dtype"] == "bfloat16" and next(model.parameters()).dtype == torch.bfloat16


def test_a_model_object_without_tokenizer_is_an_eval_error(text_file):
    with pytest.raises(EvalError, match="a model object needs its tokenizer"):
        evaluate(tiny_model("llama", vocab_size=256), text_file=text_file, methods=("dense",), window=32, windows=1,
                 progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_cuda_device_is_an_eval_error(text_file):
    with pytest.raises(EvalError, match="no CUDA device is available"):
        run(text_file, methods=("dense",), device="cuda")


# --------------------------------------------------------------------------- the grid
def test_targets_reach_the_sparsified_model(text_file):
    cfg = si.SparsityConfig(method="topk", sparsity=0.5, targets="all")
    want = weight_read_fraction(si.sparsify(tiny_model("llama", vocab_size=256), cfg, progress=False))
    rows = run(text_file, methods=("topk",), sparsities=(0.5,), targets="all", windows=1)
    assert rows[0]["targets"] == "all"
    assert rows[0]["bytes_rel"] == pytest.approx(want, rel=1e-9)
    assert rows[0]["sparsity"] == pytest.approx(0.5, abs=0.02)


def test_gate_is_na_when_any_layer_is_not_a_plain_gated_mlp(text_file):
    model = tiny_model("llama", vocab_size=256)
    mlp = model.model.layers[1].mlp  # the last layer, not the first
    mlp.sub_norm = torch.nn.LayerNorm(mlp.gate_proj.out_features)
    rows = run(text_file, model, methods=("dense", "gate"), sparsities=(0.3,), windows=1)
    assert [r["status"] for r in rows] == ["ok", "n/a: LlamaMLP is not down(act(gate(x)) * up(x))"]


def test_gate_at_exactly_two_thirds_is_na(text_file):
    rows = run(text_file, methods=("dense", "gate"), sparsities=(2 / 3,), windows=1)
    assert rows[1]["method"] == "gate" and rows[1]["status"].startswith("n/a: gate reaches at most 66.7%")


def test_calibration_honours_calib_windows_and_progress(text_file, capsys):
    """calib_windows bounds the calibration sample; progress=False draws nothing, calibration included."""
    rows = run(text_file, methods=("dense", "threshold"), sparsities=(0.5,), windows=2, calib_windows=1)
    assert [r["calib_windows"] for r in rows] == [1, 1] and rows[1]["status"] == "ok"
    assert capsys.readouterr().err == ""


def test_search_settings_reach_calibration(text_file, monkeypatch):
    seen = {}

    def spy(model, data, config, **kw):
        seen.update(kw, config=config, data=data)
        raise Stop

    monkeypatch.setattr(importlib.import_module("sparse_infer.calibrate"), "calibrate", spy)
    with pytest.raises(Stop):
        run(text_file, methods=("dense", "rsparse"), sparsities=(0.4,), search_iterations=2, calib_quick=True, seed=3)
    assert seen["iterations"] == 2 and seen["quick"] is True and seen["progress"] is False
    assert (seen["config"].method, seen["config"].sparsity, seen["config"].allocation, seen["config"].seed) == (
        "rsparse", 0.4, "search", 3)
    assert len(seen["data"]) == 2


def test_each_protocol_measures_its_own_tokens(text_file):
    """The decode row's measured sparsity is the same whether or not the 'all' row ran before it."""
    kw = dict(methods=("threshold",), sparsities=(0.5,), windows=2, calib_windows=1)
    both = run(text_file, protocols=("all", "decode"), **kw)
    alone = run(text_file, protocols=("decode",), **kw)
    assert [r["protocol"] for r in both] == ["all", "decode"]
    assert both[1]["sparsity"] == alone[0]["sparsity"]
    assert both[0]["sparsity"] != both[1]["sparsity"]


def test_weight_read_fraction_counts_a_gated_mlp_once():
    model = tiny_model("llama", vocab_size=256)
    total = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    si.sparsify(model, si.SparsityConfig(method="gate", sparsity=0.3), progress=False)
    mlps = list(si.sparse_modules(model).values())
    assert len(mlps) == 2 and all(isinstance(m, si.SparseGatedMLP) for m in mlps)
    saved = sum(m.dense_elements() - m.read_elements() for m in mlps)
    assert weight_read_fraction(model) == pytest.approx((total - saved) / total, rel=1e-12)


def test_measured_sparsity_is_nan_where_modules_recorded_nothing():
    """Kernel paths record no masks: the row's measured sparsity is NaN, not 0 (which would read as dense)."""
    from sparse_infer.evaluate import measured_sparsity

    model = si.sparsify(tiny_model("llama"), si.SparsityConfig(sparsity=0.5), progress=False)
    assert math.isnan(measured_sparsity(model))
    assert measured_sparsity(tiny_model("llama")) == 0.0


# --------------------------------------------------------------------------- the command line
def test_threads_option_sets_torch_threads(model_dir, text_file, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        rc = main(["eval", "--model", model_dir, "--text-file", text_file, "--out", str(tmp_path), "-q", "--no-plot",
                   "--methods", "dense", "--window", "32", "--windows", "1", "--threads", "2"])
        assert rc == 0, capsys.readouterr().err
        assert json.loads((tmp_path / "eval.json").read_text())["meta"]["threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_threads_default_is_torchs_own(model_dir, text_file, tmp_path, capsys, monkeypatch):
    # the default must not follow the machine's load: CPU numbers change with the thread count
    # (float32 summation order), so a rerun gives the same table only with the same count
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0), raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        rc = main(["eval", "--model", model_dir, "--text-file", text_file, "--out", str(tmp_path), "-q", "--no-plot",
                   "--methods", "dense", "--window", "32", "--windows", "1"])
        out = capsys.readouterr().out
        assert rc == 0
        data = json.loads((tmp_path / "eval.json").read_text())
        assert data["meta"]["threads"] == 2 and data["rows"][0]["threads"] == 2
        assert re.search(r"cpu( [A-Z0-9_]+)?, 2 threads\)", out)  # the caption says it
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--threads", "0"], "--threads must be a positive integer or auto, got '0'"),
    (["calibrate", "--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
    (["calibrate", "--search-seconds", "0"], "--search-seconds must be a positive number of seconds (or inf), got 0.0"),
    (["calibrate", "--search-seconds", "nan"], "--search-seconds must be a positive number of seconds (or inf), got nan"),
])
def test_bad_sizes_exit_cleanly_before_loading(argv, message, tmp_path, capsys):
    rc = main([*argv, "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "could not load" not in err and "Traceback" not in err, err


def test_debug_variable_shows_the_exception(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_INFER_DEBUG", "1")
    with pytest.raises(EvalError, match="unknown method 'nope'"):
        main(["eval", "--methods", "nope", "--out", str(tmp_path)])


def test_ctrl_c_exits_130(monkeypatch, tmp_path, capsys):
    import sparse_infer.evaluate as ev

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate", interrupted)
    try:
        rc = main(["eval", "--out", str(tmp_path), "--threads", "1"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert rc == 130
    assert capsys.readouterr().err.strip() == "sparse-infer eval: interrupted"


def test_every_calibrate_flag_reaches_calibration(model_dir, text_file, tmp_path, monkeypatch):
    seen = {}

    def spy(model, data, config, **kw):
        seen.update(kw, config=config, data=data, dtype=next(model.parameters()).dtype)
        raise Stop

    monkeypatch.setattr(si, "calibrate", spy)
    before = torch.get_num_threads()
    try:
        with pytest.raises(Stop):
            main(["calibrate", "--model", model_dir, "--text-file", text_file, "--method", "rsparse", "--mode", "shared",
                  "--targets", "all", "--allocation", "greedy", "--sparsity", "0.4", "--seed", "5", "--samples", "2",
                  "--seq-len", "16", "--search-iterations", "3", "--search-seconds", "inf", "--quick", "--dtype",
                  "bfloat16", "--no-progress", "--threads", "1", "--out", str(tmp_path / "c.safetensors")])
    finally:
        torch.set_num_threads(before)
    c = seen["config"]
    assert (c.method, c.mode, c.targets, c.allocation, c.sparsity, c.seed) == ("rsparse", "shared", "all", "greedy", 0.4, 5)
    assert (seen["iterations"], seen["quick"], seen["progress"], seen["dtype"]) == (3, True, False, torch.bfloat16)
    assert seen["time_budget_s"] == float("inf")  # bounded by candidates only: the same file on any machine
    assert [len(w) for w in seen["data"]] == [16, 16]


# --------------------------------------------------------------------------- the text
def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_an_explicit_text_file_beats_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(_write(tmp_path / "env.txt", "env")))
    assert data.load_text(str(_write(tmp_path / "given.txt", "given"))).text == "given"
    assert data.load_text().text == "env"


def test_shared_text_next_to_the_project_then_next_to_the_working_directory(tmp_path, monkeypatch):
    """Without a path or variable: ../shared/data/... relative to the source tree first, then to the cwd."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    (tmp_path / "proj" / "sparse_infer").mkdir(parents=True)
    monkeypatch.setattr(data, "__file__", str(tmp_path / "proj" / "sparse_infer" / "data.py"))
    work = tmp_path / "work" / "run"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    rel = ("shared", "data", "wikitext-2-raw-test.txt")
    near_project = _write(tmp_path.joinpath(*rel), "project")
    _write(tmp_path.joinpath("work", *rel), "cwd")
    t = data.load_text()
    assert (t.text, t.source) == ("project", str(near_project.resolve()))
    near_project.unlink()
    assert data.load_text().text == "cwd"


def test_split_and_window_arguments_are_checked():
    ids = torch.arange(100)
    for frac in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"calib_fraction must lie in \(0, 1\)"):
            data.split_tokens(ids, frac)
    with pytest.raises(ValueError, match="window must be at least 2 tokens"):
        data.windows(ids, 1)
    assert data.windows(ids, 10, 0) == []
    assert [int(w[0]) for w in data.windows(ids, 30)] == [0, 30, 60]


def test_tokenize_adds_no_special_tokens():
    class BosTokenizer:  # like a HuggingFace tokenizer, it adds a BOS unless told not to
        def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
            return {"input_ids": ([1] if add_special_tokens else []) + list(text.encode("utf-8"))}

    assert data.tokenize("ab", BosTokenizer()).tolist() == [97, 98]


# --------------------------------------------------------------------------- the model loader
def test_dtype_names():
    from sparse_infer.models import parse_dtype

    assert [parse_dtype(n) for n in ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")] == [
        torch.float32, torch.float32, torch.float16, torch.float16, torch.bfloat16, torch.bfloat16]
    assert parse_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        parse_dtype("int8")


def test_cache_dir_follows_its_variable(tmp_path, monkeypatch):
    from sparse_infer.models import cache_dir

    monkeypatch.setenv("SPARSE_INFER_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_tiny_model_seed():
    a, b, c = tiny_model("llama", seed=0), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_load_model_dtype_pad_token_and_quiet_loading(tmp_path):
    """A local folder loads in the asked dtype; a tokenizer without pad token pads with EOS; loading without
    progress leaves the transformers progress bars and verbosity as it found them."""
    from transformers.utils import logging as hf_logging

    from sparse_infer.models import load_model

    tok = byte_tokenizer()
    tok.pad_token = None
    tiny_model("llama", vocab_size=256).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()
    try:
        lm, tok2 = load_model(str(tmp_path), dtype="bfloat16", progress=False)
        assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.WARNING
    finally:
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
        hf_logging.set_verbosity(verbosity)
    assert next(lm.parameters()).dtype == torch.bfloat16 and not lm.training
    assert tok2.pad_token == tok2.eos_token == "!"


def test_window_past_the_context_warns(text_file, tmp_path):
    # the tiny model's context is 256 positions: a 300-token window scores positions it was never trained on
    model = tiny_model("llama", vocab_size=256)
    assert model.config.max_position_embeddings == 256
    lines = []
    with pytest.warns(UserWarning, match=r"--window 300 is longer than the model's context \(256 positions"):
        evaluate(model, tokenizer=byte_tokenizer(), text_file=text_file, methods=["dense"], window=300, windows=1,
                 progress=False, log=lines.append)
    assert any("use --window 256 or less" in line for line in lines)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the context: silent
        evaluate(model, tokenizer=byte_tokenizer(), text_file=text_file, methods=["dense"], window=256, windows=1,
                 progress=False)
