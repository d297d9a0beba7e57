"""Microbenchmarks of the sparse linear against dense, grouped per shape.

    pytest bench --benchmark-only                      # CPU: < 1 min
    pytest bench --benchmark-only --benchmark-columns=min,median,mean,rounds

One benchmark group per (shape, M): its rows are the providers, so one run
compares them side by side.

* CPU: ``dense`` (``nn.Linear``) against the reference sparse path
  (``ops.sparse_linear(..., backend="reference")``: gate + masked ``F.linear``;
  it exists for correctness, not speed, and is expected to be slower than dense).
  Shapes are scaled-down Llama projections so the whole run stays under a minute.
* GPU: ``dense`` (``F.linear``, cuBLAS) against the Triton kernels
  (``backend="triton"``, threshold and top-k gates, per token and shared) on
  Llama-3-8B projection shapes in bf16.  Wall-clock timings include a
  ``torch.cuda.synchronize()`` per call, so they include a launch (about 45 µs
  for a Triton launch from Python on the lent H100) and a sync; the event-timed
  median of ``triton.testing.do_bench`` (``extra_info["do_bench_us"]``) is the
  number to compare kernels by, and is printed per group after the tables.

Every provider's output is checked against the reference once before it is timed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparse_infer import ops
from sparse_infer import reference as ref

CUDA = torch.cuda.is_available()
SPARSITY = 0.5

if CUDA:
    DTYPE = torch.bfloat16
    # Llama-3-8B decoder projections (in -> out) at decode batch sizes
    SHAPES = [
        ("gate_up 4096->14336", 1, 4096, 14336),
        ("down 14336->4096", 1, 14336, 4096),
        ("q_o 4096->4096", 1, 4096, 4096),
        ("k_v 4096->1024", 1, 4096, 1024),
        ("gate_up 4096->14336", 4, 4096, 14336),
        ("gate_up 4096->14336", 16, 4096, 14336),
    ]
else:
    DTYPE = torch.float32
    # scaled-down projections: the CPU run must finish in well under a minute
    SHAPES = [
        ("up 1024->2816", 1, 1024, 2816),
        ("down 2816->1024", 1, 2816, 1024),
        ("up 1024->2816", 4, 1024, 2816),
    ]


def _kernels():
    try:
        from sparse_infer import kernels
    except Exception:  # noqa: BLE001
        return None
    return kernels if hasattr(kernels, "sparse_linear") else None


# provider -> (backend, gate kind, shared)
PROVIDERS = {
    "dense": (None, None, False),
    "reference-threshold": ("reference", "threshold", False),
    "reference-topk": ("reference", "topk", False),
}
if CUDA:
    PROVIDERS.update({
        "triton-threshold": ("triton", "threshold", False),
        "triton-topk": ("triton", "topk", False),
        "triton-threshold-shared": ("triton", "threshold", True),
    })


_INPUTS: dict = {}


def _inputs(M, K, N, device, seed=0):
    """Random x (M, K) and an nn.Linear(K, N), made once per shape (drawing 58 M weights takes a while)."""
    key = (M, K, N, device, seed)
    if key not in _INPUTS:
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(M, K, generator=g, device=device).to(DTYPE)
        with torch.device(device):
            lin = nn.Linear(K, N, bias=False)
        with torch.no_grad():
            lin.weight.normal_(0.0, K**-0.5, generator=g)
        _INPUTS.clear()  # one shape at a time: the tests of a shape run together
        _INPUTS[key] = (x, lin.to(DTYPE).eval())
    return _INPUTS[key]


def _gate(kind: str, x: torch.Tensor, shared: bool) -> ops.Gate:
    K = x.shape[-1]
    if kind == "topk":
        return ops.Gate(k=int(round((1.0 - SPARSITY) * K)), shared=shared)
    # a shared mask ranks channels by the step's RMS over its tokens (reference._step_importance): a
    # quantile of another score (the mean |x|) would miss the labelled sparsity (0.34 at M=4, 0.13 at M=16)
    score = ref._step_importance(x.float(), None) if shared else x.float().abs()
    return ops.Gate(threshold=torch.quantile(score.flatten().cpu(), SPARSITY).to(x.device), shared=shared)


def _rel_err(out, want):
    den = want.double().norm().item()
    return (out.double() - want.double()).norm().item() / (den or 1.0)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("name,M,K,N", SHAPES, ids=[f"{s[0].split()[0]}-M{s[1]}" for s in SHAPES])
def test_sparse_linear(benchmark, synchronized, record_event_time, device, provider, name, M, K, N):
    backend, kind, shared = PROVIDERS[provider]
    benchmark.group = f"sparse_linear {name} M={M} s={SPARSITY} {str(DTYPE).replace('torch.', '')}"
    x, lin = _inputs(M, K, N, device)
    if backend is None:
        fn = lambda: lin(x)  # noqa: E731
        needed = K * N * lin.weight.element_size()
    else:
        if backend == "triton" and _kernels() is None:
            pytest.skip("sparse_infer.kernels.sparse_linear is not available")
        gate = _gate(kind, x, shared)
        weight = lin.weight.detach()
        if backend == "triton":
            k = _kernels()
            weight = k.to_kernel_layout(weight) if hasattr(k, "to_kernel_layout") else weight.t().contiguous().t()
        want = ref.sparse_linear(x, lin.weight, None, gate.mask(x))
        out = ops.sparse_linear(x, weight, None, gate, backend=backend)
        tol = 2e-2 if DTYPE != torch.float32 else 1e-4
        err = _rel_err(out, want)
        assert err < tol, f"{provider} differs from the reference: rel. error {err:.2e}"
        mask = gate.mask(x)
        active = mask.reshape(-1, K).any(0).sum().item()  # union over the call's tokens: rows read
        needed = active * N * weight.element_size()
        fn = lambda: ops.sparse_linear(x, weight, None, gate, backend=backend)  # noqa: E731
        benchmark.extra_info["active_rows"] = active
    benchmark.extra_info.update(provider=provider, M=M, K=K, N=N, weight_bytes_needed=needed)
    if CUDA:
        import triton.testing

        with torch.no_grad():
            us = triton.testing.do_bench(fn, return_mode="median") * 1e3
        benchmark.extra_info["do_bench_us"] = us
        record_event_time(benchmark.group, provider, us)
    with torch.no_grad():
        benchmark(synchronized(fn))
