"""bench/compile_check.py: every kernel the launchers start compiles for sm_90, here, without a GPU.

The script runs in a subprocess without TRITON_INTERPRET (this session's kernels were built for the
interpreter, which cannot compile), like tests/test_bench.py::test_sass_count_compiles_for_sm90, and is
skipped by the same rule: when this triton build cannot compile for sm_90 at all.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _launched_kernels() -> set[str]:
    """@triton.jit functions of kernels/ that some launcher starts with a grid (``name[grid](...)``)."""
    sources = [p.read_text() for p in (ROOT / "kernels").glob("*.py")]
    jit = {n for src in sources for n in re.findall(r"@triton\.jit\s*\ndef (\w+)", src)}
    return {n for n in jit if any(re.search(rf"\b{n}\[", src) for src in sources)}


def test_every_launched_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "compile_check.py")], env=env, capture_output=True,
                         text=True, timeout=300)
    if run.returncode and "| ok |" not in run.stdout and re.search(r"ptxas|nvdisasm|cuobjdump", run.stderr):
        pytest.skip(f"this triton build cannot compile for sm_90: {run.stderr[-300:]}")
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in run.stdout.splitlines()
            if line.startswith("| _")]
    failed = [r for r in rows if r[2] != "ok"]
    assert run.returncode == 0 and not failed, "\n".join(" | ".join(r[:3]) for r in failed) + run.stderr[-3000:]
    kernels = _launched_kernels()
    assert len(kernels) >= 8, kernels  # the eight of sparse_matmul.py, gating.py, gated_mlp.py at least
    per_kernel = {k: sum(1 for r in rows if r[0] == k) for k in kernels}
    assert all(n > 0 for n in per_kernel.values()), f"kernels missing from the table: {per_kernel}"
    assert all(r[0] in kernels for r in rows)
    # the paths of FINAL_VARIANTS and every dtype are in: a shrinking case list would pass silently otherwise
    combos = [r[1] for r in rows if r[0] == "_sparse_mm_kernel"]
    for flag in ("BF16_PAIRS", "PREFETCH", "ACC_2D", "LOWRANK", "INVERT", "MODE=6", "MODE=5", "SPLIT_K=1 ", "s4", "SWAP_AB", "ONE_TOKEN"):
        assert any(flag in c for c in combos), flag
    for dt in ("bf16", "fp16", "fp32"):
        assert all(any(r[0] == k and r[1].startswith(dt) for r in rows) for k in kernels), dt
