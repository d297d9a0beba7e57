"""Saving and loading a sparsified model's settings: tensors in safetensors, everything else in JSON.

    sparse_infer.save_sparsity(model, "smollm2-rsparse50")   # a folder
    model = sparse_infer.load_sparsity(dense_model, "smollm2-rsparse50")
    sparse_infer.sparsify(model, config, calibration="smollm2-rsparse50")

A saved folder holds ``sparsity.json`` (format version, config, model class,
layer names and shapes, per-layer k / rank / sparsity, method, budget,
achieved sparsity, calibration split and the SHA-256 of the tensor file) and
``sparsity.safetensors`` (thresholds and low-rank factors).  A path ending in
``.safetensors`` names the tensor file, its JSON sits beside it (``.json``).
Loading reads JSON and safetensors only: nothing is unpickled or executed.
Every check runs before the model is touched, and each failure is a
ValueError that names the problem and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import torch
import torch.nn as nn

from .config import SparsityConfig, _is_real

__all__ = ["save_sparsity", "load_sparsity", "load_calibration", "FORMAT", "FORMAT_VERSION"]

FORMAT = "sparse-infer/sparsity"
FORMAT_VERSION = 1
JSON_NAME = "sparsity.json"
TENSORS_NAME = "sparsity.safetensors"


def _paths(path) -> Tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".safetensors":
        return p.with_suffix(".json"), p
    if p.suffix == ".json":
        return p, p.with_suffix(".safetensors")
    return p / JSON_NAME, p / TENSORS_NAME


def _fingerprint(weight: torch.Tensor) -> float:
    """Mean |w| of a weight, float64: tells checkpoints of the same shapes apart."""
    return float(weight.detach().double().abs().mean())


PROBE_VALUES = 64
MIN_PROBE_CORRELATION = 0.9


def _probe(weight: torch.Tensor) -> list:
    """64 evenly spaced values of a weight (row-major order whatever its layout), as floats."""
    from .calibrate import sampled_values

    return [float(v) for v in sampled_values(weight, PROBE_VALUES)]


def _probe_correlation(a: list, b: list) -> float | None:
    """Pearson correlation of two probes; None where it says nothing (other lengths, constant values).

    Why a correlation: a cast (bf16) or a quantize / de-quantize round trip (GGUF) of the same
    checkpoint keeps it near 1, while two checkpoints of one architecture (another seed, another
    model of the same shapes) land near 0 - mean |w| alone cannot tell those apart at real sizes."""
    if len(a) != len(b) or len(a) < 2:
        return None
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_safe(obj):
    try:
        json.dumps(obj, allow_nan=True)
        return obj
    except (TypeError, ValueError):
        if isinstance(obj, dict):
            return {str(k): _json_safe(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_json_safe(v) for v in obj]
        return repr(obj)


def _model_info(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "name_or_path": getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None),
    }


def _module_weight(module: nn.Module, kind: str, family) -> torch.Tensor:
    if kind == "mlp":
        return getattr(module, family.mlp_linears[0]).weight
    return module.weight


def _target_shapes(model: nn.Module, config: SparsityConfig) -> Dict[str, dict]:
    """name → {kind, in, out, fingerprint} of the modules ``config`` patches, on a dense or a patched model."""
    from .modules import SparseGatedMLP
    from .patch import _targets, find_family

    family = find_family(model, config.targets)
    out = {}
    for name, _p, _a, module, kind in _targets(model, family, config):
        if isinstance(module, SparseGatedMLP) or kind == "mlp":
            g = getattr(module, family.mlp_linears[0])
            out[name] = {"kind": "mlp", "in": g.in_features, "out": g.out_features, "fingerprint": _fingerprint(g.weight),
                         "probe": _probe(g.weight)}
        else:
            out[name] = {"kind": "linear", "in": module.in_features, "out": module.out_features,
                         "fingerprint": _fingerprint(module.weight), "probe": _probe(module.weight)}
    return out


# --------------------------------------------------------------------------- save
def save_sparsity(model: nn.Module, path, *, calibration=None) -> Path:
    """Write the sparse settings of a model patched by `sparsify` to ``path`` (a folder, or ``*.safetensors``).

    ``calibration``: optionally the `Calibration` used (its meta, e.g. the data
    split, is recorded); by default the meta `sparsify` recorded in the model config.
    Returns the JSON path.
    """
    from safetensors.torch import save_file

    from .modules import RSparseLinear, SparseGatedMLP
    from .patch import CONFIG_KEY, model_sparsity, sparse_modules

    mods = sparse_modules(model)
    entry = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not mods or not entry:
        raise ValueError("save_sparsity needs a model patched by sparse_infer.sparsify (this one has no sparse modules)")
    config = SparsityConfig.from_dict(entry["config"])
    expected = _target_shapes(model, config)
    if set(expected) != set(mods):
        raise ValueError("the sparse modules of this model do not match its recorded config; sparsify it again before saving")
    tensors: Dict[str, torch.Tensor] = {}
    layers = {}
    for name, m in mods.items():
        info = dict(expected[name])
        info["class"] = type(m).__name__
        info["k"] = m.k
        info["rank"] = int(getattr(m, "rank", 0)) if not isinstance(m, SparseGatedMLP) else 0
        info["target_density"] = m.target_density
        if isinstance(m, SparseGatedMLP):
            info["sparsity"] = (1.0 - m.target_density) / 1.5 if m.target_density is not None else None
        else:
            dens = m.target_density if m.target_density is not None else 1.0
            info["sparsity"] = 1.0 - (dens * m.in_features * m.out_features + info["rank"] * (m.in_features + m.out_features)) / (m.in_features * m.out_features)
        if m.threshold is not None:
            tensors[f"{name}:threshold"] = m.threshold.detach().float().cpu().contiguous()
        if isinstance(m, RSparseLinear) and m.rank > 0:
            tensors[f"{name}:A"] = m.A.detach().cpu().contiguous()
            tensors[f"{name}:B"] = m.B.detach().cpu().contiguous()
        layers[name] = info
    cal_meta = getattr(calibration, "meta", None) or entry.get("calibration") or {}
    json_path, tensor_path = _paths(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tensor_path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT, "version": str(FORMAT_VERSION)})
        os.replace(tmp, tensor_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": _model_info(model),
        "config": config.to_dict(),
        "method": config.method,
        "allocation": config.allocation,
        "budget_sparsity": config.sparsity,
        "achieved_sparsity": model_sparsity(model),
        "layers": layers,
        "tensors": {"file": tensor_path.name, "sha256": _sha256(tensor_path), "keys": sorted(tensors)},
        "calibration": _json_safe(cal_meta),
    }
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    return json_path


# --------------------------------------------------------------------------- load
def _read(path) -> Tuple[dict, Dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    json_path, tensor_path = _paths(path)
    if not json_path.is_file() or not tensor_path.is_file():
        raise ValueError(
            f"{path} is not a sparsity file: expected {json_path} and {tensor_path} "
            "(write them with sparse_infer.save_sparsity(model, path))"
        )
    try:
        with open(json_path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path} is corrupted (not valid JSON: {e}); save the sparsity file again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{json_path} is not a sparse-infer sparsity file (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{json_path} has format version {doc.get('version')!r}; this sparse-infer reads version {FORMAT_VERSION}: "
            "use the matching sparse-infer release or calibrate and save again"
        )
    for key in ("model", "config", "layers", "tensors"):
        if not isinstance(doc.get(key), dict):
            raise ValueError(f"{json_path} is corrupted: its {key!r} entry is missing; save the sparsity file again")
    for name, info in doc["layers"].items():
        if not isinstance(info, dict):
            raise ValueError(f"{json_path} is corrupted: the entry of layer {name!r} is {info!r}, not a dict; save again")
        sp = info.get("sparsity")
        if sp is not None and not _is_real(sp):
            raise ValueError(f"{json_path} is corrupted: the sparsity of layer {name!r} is {sp!r}, not a number; save again")
    if _sha256(tensor_path) != doc["tensors"].get("sha256"):
        raise ValueError(f"{tensor_path} does not match {json_path.name} (SHA-256 differs): the file is corrupted or from another save; save again")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{tensor_path} is corrupted ({e}); save the sparsity file again") from None
    return doc, tensors


def _check_model(model: nn.Module, doc: dict, config: SparsityConfig, where) -> None:
    info = _model_info(model)
    saved = doc["model"]
    if saved.get("class") != info["class"] or saved.get("model_type") != info["model_type"]:
        raise ValueError(
            f"{where} was made for a {saved.get('class')} (model_type={saved.get('model_type')!r}), "
            f"not this {info['class']} (model_type={info['model_type']!r}): calibrate this model and save its own file"
        )
    have = _target_shapes(model, config)
    want = doc["layers"]
    if list(have) != list(want) and set(have) != set(want):
        missing = sorted(set(want) - set(have))[:3]
        extra = sorted(set(have) - set(want))[:3]
        raise ValueError(
            f"{where} was made for other layers: {len(want)} in the file, {len(have)} in this model "
            f"(file only: {missing}, model only: {extra}); calibrate this model and save its own file"
        )
    for name, h in have.items():
        w = want[name]
        if (w.get("kind"), w.get("in"), w.get("out")) != (h["kind"], h["in"], h["out"]):
            raise ValueError(
                f"{where}: layer {name} is {w.get('kind')} {w.get('out')}x{w.get('in')} in the file but "
                f"{h['kind']} {h['out']}x{h['in']} in this model: the file was made for another model"
            )
    for name, h in have.items():
        w = want[name]
        fp = w.get("fingerprint")
        if fp is not None and not _is_real(fp):
            raise ValueError(f"{where} is corrupted: the fingerprint of {name} is {fp!r}, not a number; save again")
        if fp is not None and not math.isclose(fp, h["fingerprint"], rel_tol=1e-2, abs_tol=1e-8):
            raise ValueError(
                f"{where}: the weights of {name} differ from those the file was made for (mean |w| "
                f"{h['fingerprint']:.6g} vs {fp:.6g}): it belongs to another checkpoint; calibrate this model"
            )
        probe = w.get("probe")  # files written before the probe existed have none
        if isinstance(probe, list) and all(isinstance(v, (int, float)) for v in probe):
            corr = _probe_correlation(probe, h["probe"])
            if corr is not None and corr < MIN_PROBE_CORRELATION:
                raise ValueError(
                    f"{where}: the weights of {name} differ from those the file was made for (64 sampled values "
                    f"correlate at {corr:.2f}, same checkpoint >= {MIN_PROBE_CORRELATION}): it belongs to another "
                    "checkpoint; calibrate this model"
                )


def _layers_from(doc: dict, tensors: Dict[str, torch.Tensor], where) -> Dict[str, dict]:
    layers = {}
    for name, info in doc["layers"].items():
        entry = {"sparsity": info.get("sparsity"), "rank": info.get("rank") or 0, "k": info.get("k")}
        if entry["sparsity"] is None:
            entry.pop("sparsity")
        entry["threshold"] = tensors.get(f"{name}:threshold")
        A, B = tensors.get(f"{name}:A"), tensors.get(f"{name}:B")
        r = entry["rank"]
        if r:
            if A is None or B is None or tuple(A.shape) != (info["in"], r) or tuple(B.shape) != (r, info["out"]):
                raise ValueError(f"{where} is corrupted: the low-rank factors of {name} are missing or misshapen; save again")
            entry["A"], entry["B"] = A, B
        if info.get("kind") == "mlp":
            entry.pop("k", None)
        layers[name] = entry
    return layers


def load_calibration(model: nn.Module, path, config: SparsityConfig):
    """The `Calibration` stored at ``path``, checked against ``model`` and ``config`` (used by `sparsify`)."""
    from .calibrate import Calibration

    doc, tensors = _read(path)
    try:
        saved = SparsityConfig.from_dict(doc["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its config is invalid ({e}); save the sparsity file again") from None
    if (saved.method, saved.targets) != (config.method, config.targets):
        raise ValueError(
            f"{path} holds method={saved.method!r}, targets={saved.targets!r}; the config asks for "
            f"method={config.method!r}, targets={config.targets!r}: use the file's settings or sparse_infer.load_sparsity(model, path)"
        )
    _check_model(model, doc, saved, path)
    meta = dict(doc.get("calibration") or {})
    meta.update({"loaded_from": str(path), "achieved_sparsity": doc.get("achieved_sparsity"),
                 "budget_sparsity": doc.get("budget_sparsity"), "allocation": doc.get("allocation"),
                 "config": saved.to_dict()})
    return Calibration(layers=_layers_from(doc, tensors, path), meta=meta)


def load_sparsity(model: nn.Module, path, *, backend: str | None = None) -> nn.Module:
    """Patch a dense ``model`` with the settings saved at ``path`` (or check that a patched one matches them).

    ``backend``: run with this backend instead of the file's (a file saved from a GPU run with
    ``backend="triton"`` loads on the CPU with ``backend="auto"``).
    Returns the model.  Raises ValueError, leaving the model untouched, when the
    file is for another model (class, layer names, shapes, weights), corrupted,
    or of an unknown version.
    """
    from . import ops
    from .calibrate import Calibration
    from .modules import RSparseLinear
    from .patch import CONFIG_KEY, sparse_modules, sparsify

    doc, tensors = _read(path)
    try:
        config = SparsityConfig.from_dict(doc["config"])
        if backend is not None:
            config = config.replace(backend=backend)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its config is invalid ({e}); save the sparsity file again") from None
    weight = next(model.parameters(), None)
    if backend is None and config.backend == "triton" and weight is not None and not ops.triton_available(weight):
        raise ValueError(
            f"{path} was saved with backend='triton', which needs the model on a CUDA device (its weights are on "
            f"{weight.device}): move the model with model.to('cuda') first, or load with "
            "sparse_infer.load_sparsity(model, path, backend='auto')"
        )
    _check_model(model, doc, config, path)
    layers = _layers_from(doc, tensors, path)
    mods = sparse_modules(model)
    if not mods:
        meta = dict(doc.get("calibration") or {})
        sparsify(model, config, calibration=Calibration(layers=layers, meta=meta), progress=False)
        entry = getattr(model.config, CONFIG_KEY, None) if getattr(model, "config", None) is not None else None
        if isinstance(entry, dict):
            entry.setdefault("calibration", _json_safe(meta))
        return model
    # already patched: check that it is patched this way
    if set(mods) != set(layers):
        raise ValueError(f"this model is sparsified on other layers than {path} describes; unsparsify it first")
    entry = getattr(model.config, CONFIG_KEY, None) if getattr(model, "config", None) is not None else None
    if isinstance(entry, dict) and isinstance(entry.get("config"), dict):
        have = {k: v for k, v in entry["config"].items() if k != "backend"}  # the backend is where it runs, not how
        want = {k: v for k, v in config.to_dict().items() if k != "backend"}
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if diff:
            raise ValueError(
                f"this model is patched with other settings than {path} ({', '.join(f'{k}: {have.get(k)!r} here, {want.get(k)!r} in the file' for k in diff)}); "
                "unsparsify the model and load again"
            )
    for name, m in mods.items():
        info, entry = doc["layers"][name], layers[name]
        if (type(m).__name__ != info.get("class") or m.k != info.get("k") or int(getattr(m, "rank", 0) or 0) != int(info.get("rank") or 0)
                or m.shared != (config.mode == "shared") or m.dense_prefill_above != config.dense_prefill_above):
            raise ValueError(f"{name} is patched differently from {path} (module, k, rank, mode or dense_prefill_above); "
                             "unsparsify the model and load again")
        t = entry.get("threshold")
        if (t is None) != (m.threshold is None) or (t is not None and not torch.equal(t.float(), m.threshold.float().cpu())):
            raise ValueError(f"{name} has other thresholds than {path}; unsparsify the model and load again")
        if isinstance(m, RSparseLinear) and m.rank and not torch.equal(entry["A"].to(m.A.dtype), m.A.cpu()):
            raise ValueError(f"{name} has other low-rank factors than {path}; unsparsify the model and load again")
    return model
