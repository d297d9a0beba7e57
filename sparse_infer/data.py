"""Evaluation and calibration text: where it comes from, and how it is split so the two never overlap.

Resolution order of the text file: an explicit path; the environment variable
``SPARSE_INFER_TEXT``; ``../shared/data/wikitext-2-raw-test.txt`` next to the
project (relative to the source tree, then to the working directory); else the
``datasets`` library (WikiText-2 raw test, where the hub can be reached).

The token stream is split by position: evaluation reads the first
``1 - calib_fraction`` of it, calibration the last ``calib_fraction``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

ENV_VAR = "SPARSE_INFER_TEXT"
SHARED_REL = Path("..") / "shared" / "data" / "wikitext-2-raw-test.txt"
CALIB_FRACTION = 0.2


@dataclass
class Text:
    text: str
    source: str  # path, or "datasets:wikitext/wikitext-2-raw-v1/test"
    sha256: str


def candidate_paths(path: Optional[str] = None) -> List[Path]:
    if path:
        return [Path(path)]
    out = []
    if os.environ.get(ENV_VAR):
        out.append(Path(os.environ[ENV_VAR]))
    project_root = Path(__file__).resolve().parents[1]
    out += [project_root / SHARED_REL, Path.cwd() / SHARED_REL]
    return out


def load_text(path: Optional[str] = None) -> Text:
    """The evaluation corpus (read with ``newline=""``: its CRLF endings are part of the tokens)."""
    if path is not None and not str(path).strip():  # an empty path must not fall back to the default text
        raise ValueError("the text file path is empty: give a text file with --text-file PATH (Python: text_file=...), "
                         "or leave the option out for the default text")
    tried = candidate_paths(path)
    env = os.environ.get(ENV_VAR)
    for p in tried:
        from_env = not path and bool(env) and p == Path(env)
        given = f"{ENV_VAR}={p}" if from_env else f"text file {p}"
        if p.is_file():
            try:
                with open(p, encoding="utf-8", newline="") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                raise ValueError(f"{given} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): "
                                 "the text must be UTF-8; convert it (iconv -t UTF-8) or give another file") from None
            return Text(text, str(p.resolve()), hashlib.sha256(text.encode("utf-8")).hexdigest())
        if (path or from_env) and p.is_dir():
            raise IsADirectoryError(f"{given} is a folder, not a file: give the path of a text file")
        if path:
            raise FileNotFoundError(f"text file {p} does not exist")
        if from_env:  # a typo must not fall back silently
            raise FileNotFoundError(f"{ENV_VAR}={p} does not exist: fix the variable or unset it")
    try:
        import datasets  # noqa: F401

        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
        text = "\r\n".join(r for r in ds["text"] if r.strip())
        return Text(text, "datasets:wikitext/wikitext-2-raw-v1/test", hashlib.sha256(text.encode("utf-8")).hexdigest())
    except Exception as e:  # no datasets package, or no hub
        why = ("the datasets library, the last fallback, is not installed" if isinstance(e, ImportError)
               else f"the datasets library, the last fallback, could not load it ({type(e).__name__}: {e})")
        raise FileNotFoundError(
            "no evaluation text found. Give one with --text-file PATH (Python: text_file=...), or set "
            f"{ENV_VAR}=PATH, or place WikiText-2 raw test at {(Path.cwd() / SHARED_REL).resolve()}; tried: "
            + ", ".join(str(p) for p in tried) + f"; {why}"
        ) from None


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """The whole text as one 1-D stream of token ids (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def outside_vocab(ids: torch.Tensor, vocab_size: Optional[int]) -> Optional[str]:
    """``"[min, max]"`` of ``ids`` when they do not all index a vocabulary of ``vocab_size``, else ``None``
    (an embedding would fail on them, or a CUDA kernel fault)."""
    if not ids.numel() or vocab_size is None:
        return None
    lo, hi = int(ids.min()), int(ids.max())
    return None if 0 <= lo <= hi < vocab_size else f"[{lo}, {hi}]"


def split_tokens(ids: torch.Tensor, calib_fraction: float = CALIB_FRACTION):
    """(evaluation ids, calibration ids, split point): calibration takes the tail, so they never overlap."""
    if not 0.0 < calib_fraction < 1.0:
        raise ValueError(f"calib_fraction must lie in (0, 1), got {calib_fraction}")
    cut = int(len(ids) * (1.0 - calib_fraction))
    return ids[:cut], ids[cut:], cut


class TooShort(ValueError):
    """Raised by `windows`: ``tokens`` are too few for one window of ``window``; `message` words it for a caller."""

    def __init__(self, tokens: int, window: int, part: str = "the text", flag: str = "--window"):
        self.tokens, self.window = tokens, window
        super().__init__(self.message(part, flag))

    def message(self, part: str = "the text", flag: str = "--window") -> str:
        return (f"{part} has {self.tokens} tokens, too short for one window of {self.window}; use a longer text "
                f"or a smaller {flag}")


def windows(ids: torch.Tensor, window: int, count: Optional[int] = None, *, part: str = "the text",
            flag: str = "--window") -> List[torch.Tensor]:
    """Non-overlapping windows of ``window`` tokens from the start of ``ids`` (at most ``count``).

    ``part`` (what ``ids`` are) and ``flag`` (the option that sets ``window``) word the error
    (`TooShort`) when ``ids`` hold less than one window."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    n = len(ids) // window
    if n == 0:
        raise TooShort(len(ids), window, part, flag)
    if count is not None:
        n = min(n, count)
    return [ids[i * window:(i + 1) * window] for i in range(n)]
