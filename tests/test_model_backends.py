"""A whole patched model gives the same logits on backend "triton" (the kernels; the Triton
interpreter without a GPU) as on backend "reference" (the specification)."""

import zlib

import pytest
import torch

import sparse_infer as si
from conftest import DEVICE, rel_err
from sparse_infer import SparsityConfig
from sparse_infer.models import tiny_model

CASES = [
    ("topk", "per_token", "all"),
    ("threshold", "per_token", "mlp"),
    ("rsparse", "per_token", "all"),
    ("rsparse", "shared", "mlp"),
    ("topk", "shared", "attn"),
    ("gate", "per_token", "all"),
    ("gate", "shared", "mlp"),
]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama").to(DEVICE)


SHAPES = {"decode-1": (1, 1), "decode-batch3": (3, 1), "prefill-6": (1, 6)}
# Calls the kernels do not serve run the reference by design, so these cases would compare the
# reference with itself: shared masks over several positions (prefill), and the fused gated MLP
# above GATED_MLP_FALLBACK_TOKENS (its attention linears alone would be compared).
REFERENCE_BY_DESIGN = {("gate", "shared", "decode-batch3"), ("gate", "shared", "prefill-6"),
                       ("topk", "shared", "prefill-6"), ("rsparse", "shared", "prefill-6")}


@torch.no_grad()
@pytest.mark.parametrize("method,mode,targets,shape_id", [
    (*case, shape_id) for shape_id in SHAPES for case in CASES if (case[0], case[1], shape_id) not in REFERENCE_BY_DESIGN
])
def test_triton_equals_reference(model, method, mode, targets, shape_id, kernel_calls):
    shape = SHAPES[shape_id]
    g = torch.Generator().manual_seed(zlib.crc32(repr((method, mode, shape)).encode()))
    ids = torch.randint(1, 128, shape, generator=g).to(DEVICE)
    calib = [torch.randint(1, 128, (2, 16), generator=g).to(DEVICE)]
    cfg = SparsityConfig(method=method, sparsity=0.5, mode=mode, targets=targets)
    cal = si.calibrate(model, calib, cfg, progress=False, quick=True) if method in ("threshold", "gate") else None
    out = {}
    for backend in ("reference", "triton"):
        si.sparsify(model, cfg.replace(backend=backend), calibration=cal, progress=False)
        try:
            out[backend] = model(ids).logits.float()
        finally:
            si.unsparsify(model)
    assert kernel_calls, "backend 'triton' ran no kernel"
    if method == "gate" and mode == "per_token" and shape_id != "decode-1":
        assert "gated_mlp" not in kernel_calls  # above GATED_MLP_FALLBACK_TOKENS: attention kernels only
    assert torch.isfinite(out["triton"]).all()
    assert rel_err(out["triton"], out["reference"]) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("method,mode,targets", [CASES[0], CASES[2], CASES[3], CASES[5]])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_patched_model_compiles_in_one_graph(model, method, mode, targets, backend):
    """torch.compile(fullgraph=True) of a patched HF model: no graph break in the sparse modules (the
    kernels enter as custom ops, the reference path has no data-dependent branch); same logits."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(("compile", method, mode)).encode()))
    ids = torch.randint(1, 128, (2, 1), generator=g).to(DEVICE)
    calib = [torch.randint(1, 128, (2, 16), generator=g).to(DEVICE)]
    cfg = SparsityConfig(method=method, sparsity=0.5, mode=mode, targets=targets, backend=backend)
    cal = si.calibrate(model, calib, cfg, progress=False, quick=True) if method in ("threshold", "gate") else None
    si.sparsify(model, cfg, calibration=cal, progress=False)
    try:
        want = model(ids).logits.float()
        torch._dynamo.reset()
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(ids).logits.float()
    finally:
        si.unsparsify(model)
        torch._dynamo.reset()
    assert rel_err(got, want) < 1e-5
