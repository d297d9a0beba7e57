"""`sparse-infer eval` end to end on a tiny random model saved to disk, and its error handling."""

import csv
import json
import subprocess
import sys

import pytest

from sparse_infer.cli import main
from conftest import byte_tokenizer, short_text


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "short.txt"
    p.write_text(short_text(seed=1), encoding="utf-8")
    return str(p)


def small(model_dir, text_file, out, *extra):
    return ["eval", "--model", model_dir, "--text-file", text_file, "--out", str(out), "--quick",
            "--window", "32", "--windows", "4", "--calib-windows", "2", "--search-iterations", "2", *extra]


def test_eval_quick_writes_table_and_results(model_dir, text_file, tmp_path, capsys):
    rc = main(small(model_dir, text_file, tmp_path / "res", "--no-progress"))
    out, err = capsys.readouterr()
    assert rc == 0, err
    table = [line for line in out.splitlines() if line.startswith("|")]
    # header, rule, dense + topk/threshold/gate/rsparse at 50 %
    assert len(table) == 2 + 5
    assert [line.split("|")[1].strip() for line in table[2:]] == ["dense", "topk", "threshold", "gate", "rsparse"]
    with open(tmp_path / "res" / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    dense = rows[0]
    assert float(dense["kl"]) == 0.0 and float(dense["top1"]) == 1.0
    for r in rows[1:]:
        assert abs(float(r["sparsity"]) - 0.5) <= 0.02, r
        assert r["model"] == model_dir and r["window"] == "32" and r["seed"] == "0" and r["device"] == "cpu"
    meta = json.loads((tmp_path / "res" / "eval.json").read_text())["meta"]
    assert meta["quick"] is True and meta["command"].startswith("sparse-infer eval")
    assert (tmp_path / "res" / "eval_ppl.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_protocols_and_shared_mode(model_dir, text_file, tmp_path, capsys):
    rc = main(small(model_dir, text_file, tmp_path / "res", "-q", "--no-plot", "--methods", "dense,topk",
                    "--protocols", "all,decode", "--modes", "per_token,shared", "--batch-sizes", "1,2,4"))
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""  # --quiet: nothing but the table
    with open(tmp_path / "res" / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # dense x 2 protocols; topk: per-token + shared at 3 batch sizes, x 2 protocols
    assert len(rows) == 2 + 4 * 2
    assert {(r["mode"], r["batch_size"]) for r in rows if r["method"] == "topk"} == {
        ("per_token", "1"), ("shared", "1"), ("shared", "2"), ("shared", "4")}
    assert not (tmp_path / "res" / "eval_ppl.png").exists()
    assert "| Protocol |" in out.splitlines()[0] or "Protocol" in out


@pytest.mark.parametrize("args, message", [
    (["--methods", "dense,magic"], "unknown method 'magic'"),
    (["--sparsities", "0.5,1.0"], "sparsity must lie in [0, 1)"),
    (["--sparsities", "abc"], "sparsity"),
    (["--protocols", "prefill"], "unknown protocol"),
    (["--device", "foo"], "unknown device 'foo'"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--batch-sizes", "4"], "apply to shared-mask rows only"),
    (["--search-iterations", "0"], "search iterations must be a positive integer"),
    (["--targets", "attn", "--methods", "dense,gate"], "method 'gate' sparsifies the gated MLP"),
    (["--out", "{file}"], "cannot hold the results"),
    (["--out", "{file}/sub"], "cannot hold the results"),
])
def test_bad_arguments_exit_cleanly(args, message, tmp_path, capsys):
    """Caught before the model loads: one line, exit code 2, no traceback."""
    (tmp_path / "file").write_text("")
    args = [a.replace("{file}", str(tmp_path / "file")) for a in args]
    rc = main(["eval", "--out", str(tmp_path), *args])
    _, err = capsys.readouterr()
    assert rc == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_text_too_short(model_dir, tmp_path, capsys):
    p = tmp_path / "short.txt"
    p.write_text("hello world", encoding="utf-8")
    rc = main(small(model_dir, str(p), tmp_path / "res", "--no-progress"))
    _, err = capsys.readouterr()
    assert rc == 2 and "too short for one window" in err and "Traceback" not in err


def test_missing_text_file(model_dir, tmp_path, capsys):
    rc = main(small(model_dir, str(tmp_path / "nope.txt"), tmp_path / "res"))
    _, err = capsys.readouterr()
    assert rc == 2 and "does not exist" in err


def test_unsupported_model_family(text_file, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=2, n_positions=64)).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    rc = main(small(str(d), text_file, tmp_path / "res", "--no-progress"))
    _, err = capsys.readouterr()
    assert rc == 2 and "not supported by sparse-infer" in err
    assert len(err.strip().splitlines()) <= 3  # the log line of the load, then the one error line


def test_missing_model_path(text_file, tmp_path, capsys):
    rc = main(small(str(tmp_path / "no-such-model"), text_file, tmp_path / "res", "--no-progress"))
    _, err = capsys.readouterr()
    assert rc == 2 and "could not load model" in err and "does not exist" in err and "Traceback" not in err


def test_text_variable_naming_a_missing_file_is_an_error(model_dir, tmp_path, monkeypatch, capsys):
    """$SPARSE_INFER_TEXT with a typo must not fall back to another text silently."""
    monkeypatch.setenv("SPARSE_INFER_TEXT", str(tmp_path / "typo.txt"))
    args = small(model_dir, "-", tmp_path / "res", "--no-progress")
    i = args.index("--text-file")
    rc = main(args[:i] + args[i + 2:])
    _, err = capsys.readouterr()
    assert rc == 2 and f"SPARSE_INFER_TEXT={tmp_path / 'typo.txt'} does not exist" in err


def test_shared_only_table_says_so(model_dir, text_file, tmp_path, capsys):
    """Rows of shared masks alone still carry the Mask and Batch columns (they would read as per-token)."""
    rc = main(small(model_dir, text_file, tmp_path / "res", "-q", "--no-plot", "--methods", "dense,topk",
                    "--modes", "shared", "--batch-sizes", "2"))
    out, err = capsys.readouterr()
    assert rc == 0, err
    header, _rule, dense, topk = [line for line in out.splitlines() if line.startswith("|")]
    assert "| Mask | Batch |" in header
    assert "| shared | 2 |" in topk


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "eval" in capsys.readouterr().err


def test_console_script_exit_status(tmp_path):
    """The installed entry point: a bad method exits non-zero with one line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "sparse_infer.cli", "eval", "--methods", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("sparse-infer eval: error: unknown method 'nope'")
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- calibrate
@pytest.mark.parametrize("method,allocation", [("rsparse", "search"), ("threshold", "greedy")])
def test_calibrate_saves_what_load_sparsity_reads(model_dir, text_file, tmp_path, capsys, method, allocation):
    """`sparse-infer calibrate` writes a file that patches a fresh dense copy of the model the same way."""
    import torch
    from transformers import AutoModelForCausalLM

    import sparse_infer as si

    out = tmp_path / "cal" / "tiny.safetensors"
    rc = main(["calibrate", "--model", model_dir, "--text-file", text_file, "--method", method, "--allocation",
               allocation, "--sparsity", "0.5", "--samples", "2", "--seq-len", "32", "--quick", "--search-iterations",
               "2", "--out", str(out), "--no-progress"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert out.is_file() and "load_sparsity" in stdout and f"method {method}" in stdout
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    si.load_sparsity(model, out)
    mods = si.sparse_modules(model)
    assert len(mods) == 3 * model.config.num_hidden_layers
    cls = si.RSparseLinear if method == "rsparse" else si.SparseLinear
    assert all(type(m) is cls for m in mods.values())
    if method == "threshold":
        assert all(torch.isfinite(m.threshold).all() for m in mods.values())
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["config"]["method"] == method and saved["config"]["allocation"] == allocation


@pytest.mark.parametrize("argv,needle", [
    (["--sparsity", "1.5"], "sparsity"),
    (["--samples", "0"], "--samples"),
    (["--method", "gate", "--targets", "attn"], "gate"),
])
def test_calibrate_rejects_bad_input_before_loading(tmp_path, capsys, argv, needle):
    rc = main(["calibrate", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "could not load" not in err, err


def test_every_eval_flag_reaches_the_settings(model_dir, text_file, tmp_path, monkeypatch):
    """Each eval option lands in EvalSettings (a dropped one would be ignored silently)."""
    import sparse_infer.evaluate as ev

    seen = {}

    class Stop(BaseException):  # stops before any work; main handles Exceptions and Ctrl-C, not this
        pass

    def fake_evaluate(model, settings=None, **kw):
        seen["s"] = settings
        raise Stop

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    with pytest.raises(Stop):
        main(["eval", "--model", model_dir, "--text-file", text_file, "--out", str(tmp_path / "r"), "--no-progress",
              "--methods", "dense,topk", "--sparsities", "0.3", "--protocols", "decode", "--modes", "shared",
              "--batch-sizes", "2", "--targets", "all", "--rsparse-allocation", "greedy", "--search-iterations", "3",
              "--backend", "reference", "--window", "40", "--windows", "6", "--calib-windows", "3", "--seed", "7"])
    s = seen["s"]
    assert (tuple(s.methods), tuple(s.sparsities), tuple(s.protocols), tuple(s.modes), tuple(s.batch_sizes)) == (
        ("dense", "topk"), (0.3,), ("decode",), ("shared",), (2,))
    assert (s.targets, s.rsparse_allocation, s.search_iterations, s.backend) == ("all", "greedy", 3, "reference")
    assert (s.window, s.windows, s.calib_windows, s.seed) == (40, 6, 3, 7)


def test_calibrate_defaults_and_seed(model_dir, text_file, tmp_path, capsys):
    """Without --allocation, top-k calibrates uniform (the search is R-Sparse's default only); --seed is kept."""
    out = tmp_path / "cal.safetensors"
    rc = main(["calibrate", "--model", model_dir, "--text-file", text_file, "--method", "topk", "--sparsity", "0.5",
               "--samples", "2", "--seq-len", "32", "--seed", "3", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["config"]["allocation"] == "uniform" and saved["config"]["seed"] == 3


def test_threads_option_values(monkeypatch):
    from sparse_infer import cli

    assert cli._threads(None) is None and cli._threads("3") == 3
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(cli.CliError, match=f"--threads must be a positive integer or auto, got '{bad}'"):
            cli._threads(bad)
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 8)
    for load, want in ((0.2, 8), (3.4, 5), (7.9, 1), (40.0, 1)):  # the cores the load average leaves idle, at least one
        monkeypatch.setattr(cli.os, "getloadavg", lambda load=load: (load, load, load))
        assert cli._threads("auto") == want
