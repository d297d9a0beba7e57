"""sparse-infer: activation-sparse LLM inference.

    import sparse_infer
    model = sparse_infer.sparsify(model, sparse_infer.SparsityConfig(method="topk", sparsity=0.5))
    ...
    sparse_infer.unsparsify(model)
"""

from .calibrate import Calibration, calibrate  # the function shadows its module's name on purpose
from .config import SparsityConfig
from .io import load_sparsity, save_sparsity
from .modules import RSparseLinear, SparseGatedMLP, SparseLinear
from .patch import FAMILIES, Family, model_sparsity, record_stats, register_family, sparse_modules, sparsify, unsparsify

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
    "record_stats",
    "Family",
    "FAMILIES",
    "register_family",
    "calibrate",
    "Calibration",
    "save_sparsity",
    "load_sparsity",
    "__version__",
]
