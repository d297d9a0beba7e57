"""sparse-infer: activation-sparse LLM inference.

    import sparse_infer
    model = sparse_infer.sparsify(model, sparse_infer.SparsityConfig(method="topk", sparsity=0.5))
    ...
    sparse_infer.unsparsify(model)
"""

from .config import SparsityConfig
from .modules import RSparseLinear, SparseGatedMLP, SparseLinear
from .patch import FAMILIES, Family, model_sparsity, register_family, sparse_modules, sparsify, unsparsify

__version__ = "0.1.0"

__all__ = [
    "SparsityConfig",
    "SparseLinear",
    "RSparseLinear",
    "SparseGatedMLP",
    "sparsify",
    "unsparsify",
    "sparse_modules",
    "model_sparsity",
    "Family",
    "FAMILIES",
    "register_family",
    "calibrate",
    "save_sparsity",
    "load_sparsity",
    "__version__",
]


def __getattr__(name):  # heavy or optional parts load on first use
    if name == "calibrate":
        from .calibrate import calibrate

        return calibrate
    if name in ("save_sparsity", "load_sparsity"):
        from . import io

        return getattr(io, name)
    raise AttributeError(f"module 'sparse_infer' has no attribute {name!r}")
