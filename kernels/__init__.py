"""Triton kernels of sparse-infer, installed as ``sparse_infer.kernels``.

Contract with ``sparse_infer.ops`` (each op equals the function of the same
name in ``sparse_infer.reference``):

* ``sparse_linear(x, weight, bias, gate)`` - input-sparse linear (decode GEMV / small-M GEMM)
* ``rsparse_linear(x, weight, bias, A, B, gate)`` - rank-aware (R-Sparse) linear
* ``topk_gate(x, k, scale=None)``, ``threshold_gate(x, threshold, scale=None)`` - gating
* ``topk_mask`` / ``threshold_mask`` (bool masks, ``shared=`` for batch-shared gating)
* ``to_kernel_layout(weight)`` - column-major weight, the layout the matmul reads fastest
* ``DENSE_FALLBACK_TOKENS`` - above this many tokens per call the ops run gate + dense matmul
  (``PER_TOKEN_FALLBACK_TOKENS``: the lower cutoff for per-token masks, whose union grows with M);
  to change them at run time set ``sparse_infer.kernels.sparse_matmul.<NAME>``
* ``load_tuning(path)`` - launch configs measured on another GPU (``bench/bench_kernels.py --final`` writes
  ``tuning.json``; the environment variable ``SPARSE_INFER_TUNING=path`` does the same); ``None``: built-in table
* ``gated_mlp`` - fused CATS gated MLP (kernels/gated_mlp.py); ``GATED_MLP_FALLBACK_TOKENS``: above
  this many tokens the dispatch layer runs the dense path instead (measured slower at M >= 4)

``torch.ops.sparse_infer.sparse_linear`` / ``rsparse_linear`` / ``gated_mlp`` are registered as
custom ops (kernels/_ops.py); under ``torch.compile`` the functions above route
through them (one opaque node each, no graph break).
"""

# Only as ``sparse_infer.kernels``.  In a source checkout whose root is on sys.path (``python -m pytest``,
# ``PYTHONPATH=.``), this folder is also importable as a top-level ``kernels``, and transformers imports any
# ``kernels`` it finds to read its version (the hub-kernels probe).  A second copy would re-register the
# custom ops below with its own config table, overrides, fallback cutoffs and workspace, so compiled calls
# would stop seeing settings made on ``sparse_infer.kernels``: under that name this package stays empty.
if __name__ == "sparse_infer.kernels":
    from .gating import threshold_gate, threshold_mask, topk_gate, topk_mask
    from .rsparse_matmul import rsparse_linear
    from .sparse_matmul import DENSE_FALLBACK_TOKENS, PER_TOKEN_FALLBACK_TOKENS, sparse_linear, to_kernel_layout
    from .gated_mlp import GATED_MLP_FALLBACK_TOKENS, gated_mlp
    from ._autotune import load_tuning
    from . import _ops  # noqa: F401  registers torch.ops.sparse_infer.sparse_linear / rsparse_linear / gated_mlp

    __all__ = [
        "sparse_linear", "rsparse_linear", "topk_gate", "threshold_gate", "topk_mask", "threshold_mask",
        "to_kernel_layout", "DENSE_FALLBACK_TOKENS", "PER_TOKEN_FALLBACK_TOKENS", "gated_mlp",
        "GATED_MLP_FALLBACK_TOKENS", "load_tuning",
    ]
else:
    __all__ = []
