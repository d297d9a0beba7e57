"""Setup of the pytest-benchmark microbenchmarks (``pytest bench --benchmark-only``).

This folder is not collected by the main test run (``testpaths = ["tests"]``).
On the CPU the providers are dense ``nn.Linear`` against the reference sparse
path (PyTorch, ``backend="reference"``); on a GPU dense against the Triton
kernels (and the reference, for scale).  The Triton interpreter is never used
here: it is a correctness tool, far too slow to time.
"""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def kernels_available() -> bool:
    """Whether ``sparse_infer.kernels`` exports ``sparse_linear`` (it is being written alongside)."""
    try:
        from sparse_infer import kernels
    except Exception:  # noqa: BLE001 - triton missing or a broken import: no kernel provider
        return False
    return hasattr(kernels, "sparse_linear")


def pytest_report_header(config):
    if CUDA:
        where = f"GPU {torch.cuda.get_device_name()}: providers dense (F.linear) / triton / reference"
    else:
        where = "CPU: providers dense (nn.Linear) / reference sparse; Triton kernels are timed on a GPU only"
    return [f"sparse-infer bench: {where}; torch {torch.__version__}"]


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def synchronized():
    """Wraps a callable so that a device sync follows it: wall-clock timings then cover the GPU work."""

    def wrap(fn):
        if not CUDA:
            return fn

        def run():
            out = fn()
            torch.cuda.synchronize()
            return out

        return run

    return wrap


_EVENT_TIMES: list = []  # (group, provider, median µs) from triton.testing.do_bench, GPU only


@pytest.fixture
def record_event_time():
    """Record an event-timed median for the summary printed after the pytest-benchmark tables."""

    def record(group: str, provider: str, us: float):
        _EVENT_TIMES.append((group, provider, us))

    return record


def pytest_terminal_summary(terminalreporter):
    if not _EVENT_TIMES:
        return
    tr = terminalreporter
    tr.section("event-timed medians (triton.testing.do_bench, µs; x dense = dense / provider)")
    groups: dict = {}
    for group, provider, us in _EVENT_TIMES:
        groups.setdefault(group, {})[provider] = us
    for group, times in groups.items():
        dense = times.get("dense")
        cells = [f"{p} {us:.1f}" + (f" (x{dense / us:.2f})" if dense and p != "dense" else "")
                 for p, us in sorted(times.items(), key=lambda kv: kv[1])]
        tr.write_line(f"{group}: " + ", ".join(cells))
