"""User mistakes on the command line and in the Python API: each gets one clear line (exit status 2 on the
command line) that names the problem and the fix, before any work where it can be told up front; failed
runs leave no empty results folder; a --no-plot rerun leaves no stale plot; the eval bar ends full."""

import pytest
import torch

from conftest import ByteTokenizer, byte_tokenizer
from sparse_infer import data
from sparse_infer.cli import main
from sparse_infer.evaluate import EvalError, EvalSettings, _resolve_device, evaluate
from sparse_infer.models import tiny_model


def one_line_error(capsys, rc, *needles):
    """The run failed the user-error way: exit 2, one line on stderr holding every needle, no traceback."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("sparse-infer")]
    assert lines and all(n in lines[-1] for n in needles), err
    return err


def eval_args(model, text_file, out, *extra):
    return ["eval", "--model", str(model), "--text-file", str(text_file), "--out", str(out), "--no-progress",
            "--threads", "1", "--methods", "dense", "--window", "32", "--windows", "1", *extra]


# --------------------------------------------------------------------------- 5: search iterations
@pytest.mark.parametrize("n", ["0", "-3"])
def test_calibrate_rejects_non_positive_search_iterations_before_loading(n, tmp_path, capsys):
    rc = main(["calibrate", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "c.safetensors"),
               "--search-iterations", n, "--no-progress", "--threads", "1"])
    err = one_line_error(capsys, rc, f"search iterations must be a positive integer, got {n}")
    assert "could not load" not in err


@pytest.mark.parametrize("n", [0, -3, True, 2.5])
def test_allocation_search_rejects_bad_iterations(n):
    """Up front, not a quiet search of one (uniform) candidate."""
    from sparse_infer import allocate
    from sparse_infer.config import SparsityConfig

    cfg = SparsityConfig(method="rsparse", sparsity=0.5, allocation="search")
    with pytest.raises(ValueError, match="search iterations must be a positive integer"):
        allocate.search(tiny_model("llama"), None, [], cfg, iterations=n, progress=False)


# --------------------------------------------------------------------------- 6: stale plot
def test_no_plot_rerun_removes_the_earlier_plot(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "res"
    out.mkdir()
    (out / "eval_ppl.png").write_bytes(b"\x89PNG an earlier run's plot")
    rc = main(eval_args(model_dir, text_file, out, "-q", "--no-plot"))
    assert rc == 0, capsys.readouterr().err
    assert (out / "eval.csv").is_file() and (out / "eval.md").is_file()
    assert not (out / "eval_ppl.png").exists()


# --------------------------------------------------------------------------- 8: vocabulary
def test_eval_tokenizer_beyond_the_model_vocabulary(text_file, tmp_path, capsys):
    d = tmp_path / "small-vocab"
    tiny_model("llama", vocab_size=64).save_pretrained(d)  # byte tokenizer ids reach 255
    byte_tokenizer().save_pretrained(d)
    rc = main(eval_args(d, text_file, tmp_path / "res"))
    one_line_error(capsys, rc, "[0, 64)", "model's vocabulary", "use the model's own tokenizer")


# --------------------------------------------------------------------------- 9: devices
@pytest.mark.parametrize("device, needle", [
    ("meta", "holds no data"),
    ("mps", "no mps device available"),
])
def test_unusable_devices_are_rejected_before_loading(device, needle, tmp_path, capsys):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an mps device")
    rc = main(eval_args(tmp_path / "no-such-model", tmp_path / "no-text.txt", tmp_path / "res", "--device", device))
    err = one_line_error(capsys, rc, f"device {device!r}", needle, "--device cpu")
    assert "could not load" not in err and "does not exist" not in err


def test_devices_torch_reports_available_are_accepted(monkeypatch):
    assert _resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 1)
    assert _resolve_device("xpu") == "xpu" and _resolve_device("xpu:0") == "xpu:0"
    with pytest.raises(EvalError, match="this machine has 1 xpu device"):
        _resolve_device("xpu:1")


# --------------------------------------------------------------------------- 10: triton without CUDA
@pytest.mark.skipif(torch.cuda.is_available(), reason="triton runs on this machine's GPU")
def test_triton_backend_without_cuda_fails_before_loading(tmp_path, capsys):
    rc = main(eval_args(tmp_path / "no-such-model", tmp_path / "no-text.txt", tmp_path / "res",
                        "--backend", "triton", "--methods", "dense,topk", "--sparsities", "0.5"))
    err = one_line_error(capsys, rc, "backend 'triton' needs a CUDA device", "--backend reference")
    assert "could not load" not in err and "does not exist" not in err


# --------------------------------------------------------------------------- 12: --seq-len
def test_calibrate_seq_len_too_long_names_its_flag_and_the_tail(model_dir, text_file, tmp_path, capsys):
    rc = main(["calibrate", "--model", model_dir, "--text-file", text_file, "--out", str(tmp_path / "c.safetensors"),
               "--method", "topk", "--samples", "1", "--seq-len", "100000", "--no-progress", "--threads", "1"])
    err = one_line_error(capsys, rc, "the calibration part (the last 20 % of the text) has", "window of 100000",
                         "a smaller --seq-len")
    assert "--window" not in err


def test_windows_words_its_error_for_the_caller():
    with pytest.raises(data.TooShort, match=r"^the tail has 10 tokens, too short for one window of 16; .* --len$"):
        data.windows(torch.arange(10), 16, part="the tail", flag="--len")
    with pytest.raises(ValueError, match="the text has 10 tokens, .* smaller --window"):  # the defaults
        data.windows(torch.arange(10), 16)


# --------------------------------------------------------------------------- 13: text, tokenizer, settings
def test_non_utf8_text_names_the_file(model_dir, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    rc = main(eval_args(model_dir, bad, tmp_path / "res"))
    one_line_error(capsys, rc, f"text file {bad} is not UTF-8 text", "must be UTF-8")


def test_text_path_that_is_a_folder(tmp_path, monkeypatch):
    with pytest.raises(IsADirectoryError, match=f"text file {tmp_path} is a folder, not a file"):
        data.load_text(str(tmp_path))
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    with pytest.raises(IsADirectoryError, match=f"{data.ENV_VAR}={tmp_path} is a folder"):
        data.load_text()


def test_empty_text_path_is_an_error_not_the_default_text(tmp_path, capsys):
    with pytest.raises(ValueError, match="the text file path is empty"):
        data.load_text("")
    rc = main(eval_args(tmp_path / "no-such-model", "", tmp_path / "res"))
    err = one_line_error(capsys, rc, "the text file path is empty", "--text-file PATH")
    assert "could not load" not in err


def test_model_folder_without_tokenizer(text_file, tmp_path, capsys):
    d = tmp_path / "no-tokenizer"
    tiny_model("llama", vocab_size=256).save_pretrained(d)
    rc = main(eval_args(d, text_file, tmp_path / "res"))
    one_line_error(capsys, rc, f"could not load model {str(d)!r}: no tokenizer was found in the folder",
                   "tokenizer.save_pretrained")


def test_a_bare_value_for_a_sequence_field_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"sparsities takes a sequence .* got 0\.5: write sparsities=\(0\.5,\)"):
        EvalSettings(sparsities=0.5)
    with pytest.raises(TypeError, match="batch_sizes takes a sequence"):
        EvalSettings(batch_sizes=2)


@pytest.mark.parametrize("kw, match", [
    (dict(batch_sizes=[1.7]), "batch sizes must be positive integers, got \\[1.7\\]"),
    (dict(batch_sizes=[True]), "batch sizes must be positive integers"),
    (dict(seed="abc"), "seed must be an integer, got 'abc'"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(windows=True), "number of evaluation windows must be a positive integer, got True"),
    (dict(calib_windows=True), "number of calibration windows must be a positive integer, got True"),
])
def test_settings_reject_non_integer_counts(kw, match):
    with pytest.raises(EvalError, match=match):
        EvalSettings(**kw)


def test_settings_still_take_integers_and_their_text():
    s = EvalSettings(modes=("per_token", "shared"), batch_sizes=["2", 4], windows=4, seed=3)
    assert (s.batch_sizes, s.seed) == ((2, 4), 3)


# --------------------------------------------------------------------------- 14: --out folder, progress bar
def test_failed_eval_leaves_no_results_folder(tmp_path, capsys):
    out = tmp_path / "new" / "res"
    rc = main(eval_args(tmp_path / "no-such-model", tmp_path / "no-text.txt", out))
    one_line_error(capsys, rc, "does not exist")
    assert not (tmp_path / "new").exists()


def test_failed_eval_keeps_a_folder_that_was_there(tmp_path, capsys):
    out = tmp_path / "res"
    out.mkdir()
    rc = main(eval_args(tmp_path / "no-such-model", tmp_path / "no-text.txt", out))
    one_line_error(capsys, rc, "does not exist")
    assert out.is_dir()


def test_failed_calibrate_leaves_no_results_folder(text_file, tmp_path, capsys):
    rc = main(["calibrate", "--model", str(tmp_path / "no-such-model"), "--text-file", text_file, "--out",
               str(tmp_path / "cal" / "x.safetensors"), "--no-progress", "--threads", "1"])
    one_line_error(capsys, rc, "could not load model")
    assert not (tmp_path / "cal").exists()


def test_eval_bar_total_leaves_out_na_rows(text_file, monkeypatch):
    """gate at 70 % is n/a (it reaches at most 2/3): its windows are not in the total, so the bar ends full."""
    import tqdm.auto

    bars = []

    class Spy(tqdm.auto.tqdm):
        def close(self):
            if self.unit == "window" and not self.disable:  # once, however often close is called
                bars.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Spy)
    rows = evaluate(tiny_model("llama", vocab_size=256), tokenizer=ByteTokenizer(), text_file=text_file,
                    methods=("dense", "gate"), sparsities=(0.7,), window=32, windows=4, calib_windows=2,
                    progress=True)
    assert [r["status"].startswith("n/a") for r in rows] == [False, True]
    assert bars == [(4, 4)]


def test_evaluate_refuses_a_sparsified_model_object_and_bad_batch_sizes(text_file):
    import sparse_infer as si

    model = si.sparsify(tiny_model("llama", vocab_size=256), si.SparsityConfig(method="topk", sparsity=0.5))
    before = {n: m.k for n, m in si.sparse_modules(model).items()}
    with pytest.raises(EvalError, match=r"already sparsified: evaluate the dense model \(sparse_infer.unsparsify\(model\)\)"):
        evaluate(model=model, tokenizer=ByteTokenizer(), text_file=text_file, quick=True, progress=False)
    assert {n: m.k for n, m in si.sparse_modules(model).items()} == before  # left as it was
    for sizes in ((0,), (4, -1)):
        with pytest.raises(EvalError, match="batch sizes must be positive integers"):
            EvalSettings(modes=("per_token", "shared"), batch_sizes=sizes)


def test_no_text_anywhere_says_how_to_give_one(tmp_path, monkeypatch):
    """Neither a file, nor the variable, nor the shared copy, nor the datasets library: one error that lists
    the ways to give the text and every path it tried."""
    import sys

    monkeypatch.delenv(data.ENV_VAR, raising=False)
    missing = [tmp_path / "a" / "wikitext.txt", tmp_path / "b" / "wikitext.txt"]
    monkeypatch.setattr(data, "candidate_paths", lambda path=None: missing)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(FileNotFoundError, match=r"no evaluation text found\. Give one with --text-file PATH") as e:
        data.load_text()
    msg = str(e.value)
    assert f"set {data.ENV_VAR}=PATH" in msg and all(str(p) in msg for p in missing)
    assert msg.endswith("; the datasets library, the last fallback, is not installed")
    offline = type(sys)("datasets")

    def load_dataset(*args, **kwargs):
        raise ConnectionError("the hub cannot be reached")

    offline.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", offline)
    with pytest.raises(FileNotFoundError, match=r"could not load it \(ConnectionError: the hub cannot be reached\)$"):
        data.load_text()
