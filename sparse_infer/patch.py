"""One call patches a HuggingFace decoder: `sparsify(model, config)` and `unsparsify(model)`.

Model families are small registry entries (`Family`): which attribute of a
decoder layer holds the MLP and attention, and what their linears are called.
Any decoder whose layers have ``mlp.gate_proj/up_proj/down_proj`` (and
``self_attn.q_proj/k_proj/v_proj/o_proj`` when attention is patched) is served
by the generic entry.

Everything is validated and planned before the first module is replaced, so
bad input raises and leaves the model untouched.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import ops
from .config import TARGETS, SparsityConfig
from .modules import BatchContext, RSparseLinear, SparseGatedMLP, SparseLinear, k_for_density

__all__ = ["Family", "FAMILIES", "register_family", "find_family", "check_gated_mlp", "check_weights", "sparsify", "unsparsify", "plan_layers", "LayerPlan", "sparse_modules", "model_sparsity", "record_stats"]

CONFIG_KEY = "sparse_infer"  # namespaced, versioned entry in model.config


@dataclass(frozen=True)
class Family:
    """Where a family keeps its MLP and attention linears inside each decoder layer."""

    name: str
    model_types: Tuple[str, ...]
    mlp_attr: str = "mlp"
    mlp_linears: Tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    attn_attr: str = "self_attn"
    attn_linears: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


FAMILIES: List[Family] = [
    Family("Llama", ("llama",)),
    Family("Mistral", ("mistral",)),
    Family("Qwen2", ("qwen2",)),
    Family("Qwen3", ("qwen3",)),
    Family("Gemma", ("gemma",)),
    Family("Gemma 2", ("gemma2",)),
    Family("Gemma 3 (text)", ("gemma3", "gemma3_text")),
]
GENERIC = Family("generic gate/up/down decoder", ())


def register_family(family: Family) -> None:
    """Add a model family: one entry, no model code."""
    FAMILIES.append(family)


def supported_families() -> str:
    names = ", ".join(f.name for f in FAMILIES)
    return (f"{names}, and any decoder whose layers have mlp.gate_proj/up_proj/down_proj "
            "(and self_attn.q_proj/k_proj/v_proj/o_proj where attention is patched)")


def decoder_layers(model: nn.Module) -> Optional[nn.ModuleList]:
    """The decoder's layer list, found the way transformers exposes it (not `model.model.layers`)."""
    candidates = []
    if hasattr(model, "get_decoder"):
        try:
            candidates.append(model.get_decoder())
        except Exception:  # some wrappers raise instead of returning None
            pass
    prefix = getattr(model, "base_model_prefix", None)
    if prefix:
        candidates.append(getattr(model, prefix, None))
    # wrappers whose base_model_prefix names no attribute of theirs (Mllama: "language_model" on a
    # causal LM that holds `model`) still keep the decoder at the conventional `model`
    candidates += [getattr(model, "model", None), model]
    for c in candidates:
        layers = getattr(c, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
        lm = getattr(c, "language_model", None)  # multimodal wrappers (Gemma 3)
        if lm is not None and isinstance(getattr(lm, "layers", None), nn.ModuleList):
            return lm.layers
    return None


def _has_linears(layer: nn.Module, attr: str, names) -> bool:
    parent = getattr(layer, attr, None)
    return parent is not None and all(isinstance(getattr(parent, n, None), (nn.Linear, SparseLinear)) for n in names)


def find_family(model: nn.Module, targets: str = "all") -> Family:
    """The registry entry that serves ``model``; a ValueError naming the supported families otherwise.

    Every layer needs a gate/up/down MLP; its q/k/v/o attention linears are needed only when
    ``targets`` patches attention ("attn" or "all"), so decoders with other attention layers
    (linear attention, MLA) can still have their MLPs patched.
    """
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layers = decoder_layers(model)
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    why = " (no list of decoder layers found under the model)"
    if layers is not None:
        fam = family or GENERIC
        why = ""
        for i, layer in enumerate(layers):  # every layer: mixed dense/MoE decoders differ after the first
            mlp = getattr(layer, fam.mlp_attr, None)
            if not (_has_linears(layer, fam.mlp_attr, fam.mlp_linears) or isinstance(mlp, SparseGatedMLP)):
                why = f" (layer {i}: its {fam.mlp_attr} is a {type(mlp).__name__}, not {'/'.join(fam.mlp_linears)} linears)"
                break
            if targets != "mlp" and not _has_linears(layer, fam.attn_attr, fam.attn_linears):
                attn = type(getattr(layer, fam.attn_attr, None)).__name__
                why = (f" (layer {i}: its {fam.attn_attr} is a {attn}, not {'/'.join(fam.attn_linears)} linears; "
                       "targets='mlp' patches its MLPs only)")
                break
        else:
            return fam
    raise ValueError(
        f"{type(model).__name__} (model_type={model_type!r}) is not supported by sparse-infer{why}: "
        f"supported are {supported_families()}."
    )


def check_gated_mlp(name: str, mlp: nn.Module, family: Family) -> None:
    """Method 'gate' replaces a whole MLP by ``down(act(gate(x)) * up(x))``: an MLP that computes
    anything else (a norm inside it, its own activation sparsity, extra weights) would change
    silently, so it is refused here, before anything is replaced.  Probed on random input."""
    if isinstance(mlp, SparseGatedMLP):
        return
    fix = ("method 'gate' replaces the whole MLP by down(act(gate(x)) * up(x)); use method 'topk', "
           "'threshold' or 'rsparse', which replace single linears and keep the MLP's own forward")
    g, u, d = (getattr(mlp, n) for n in family.mlp_linears)
    act = getattr(mlp, "act_fn", None)
    if act is None:
        raise ValueError(f"{name} ({type(mlp).__name__}) has no act_fn: {fix}")
    kept = tuple(f"{n}." for n in (*family.mlp_linears, "act_fn"))
    extra = [k for k in mlp.state_dict() if not k.startswith(kept)]
    if extra:
        raise ValueError(f"{name} ({type(mlp).__name__}) also holds {extra[:3]}, which would be dropped: {fix}")
    w = g.weight
    x = torch.randn(1, 4, g.in_features, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    x = x.to(w.device, w.dtype)
    modes = [(m, m.training) for m in mlp.modules()]
    mlp.eval()  # dropout inside an MLP in training mode is not part of what it computes
    try:
        with torch.no_grad():
            want = mlp(x)
            got = d(act(g(x)) * u(x))
        err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30))
    except Exception as e:  # an MLP whose forward takes other arguments
        raise ValueError(f"{name} ({type(mlp).__name__}) cannot be probed with one input ({type(e).__name__}: {e}): {fix}") from None
    finally:
        for m, training in modes:
            m.training = training
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2
    if not err <= tol:
        raise ValueError(f"{name} ({type(mlp).__name__}) computes something other than down(act(gate(x)) * up(x)) "
                         f"(relative difference {err:.2g} on a probe): {fix}")


@dataclass
class LayerPlan:
    """What one patched module becomes; every field checked before any module is replaced."""

    name: str  # fully qualified module name
    kind: str  # "linear" (SparseLinear / RSparseLinear) or "mlp" (SparseGatedMLP)
    method: str
    width: int  # gated channels: in_features, or the MLP's intermediate size
    k: Optional[int] = None
    threshold: Any = None
    rank: int = 0
    A: Optional[torch.Tensor] = None
    B: Optional[torch.Tensor] = None
    sparsity: float = 0.0


# what the sparse modules compute with: the kernels serve the first three, the reference path all four
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_weights(name: str, module: nn.Module) -> None:
    """A target's parameters must be resident dense floating-point tensors.

    The sparse modules compute with the weight tensors themselves: an offloaded weight (left on
    the meta device while accelerate's hooks swap the real one in for each forward) or a
    quantized one (int8/uint8 storage, a tensor subclass) would be read as something else, and
    PyTorch even returns numbers for ``F.linear(cpu_input, meta_weight)``.  So both are refused
    here, before anything is replaced."""
    for sub_name, sub in module.named_modules():
        for p_name, p in sub.named_parameters(recurse=False):
            where = ".".join(filter(None, (name, sub_name, p_name)))
            if p.is_meta:
                raise ValueError(
                    f"{where} is on the meta device, so the module holds no values (accelerate offloads weights "
                    "there when a device_map sends layers to 'cpu' or 'disk'; init_empty_weights leaves them there). "
                    "sparse-infer computes with the weight tensors themselves: load the model without offloading "
                    "(a device_map that fits it on your GPUs, or on the CPU) before sparsify or calibrate"
                )
            plain = type(p) in (nn.Parameter, torch.Tensor)
            if not plain or p.dtype not in WEIGHT_DTYPES:
                raise ValueError(
                    f"{where} is {'a tensor' if plain else 'a ' + type(p).__name__} of dtype {p.dtype} in a "
                    f"{type(sub).__name__}: sparse-infer patches dense "
                    f"{'/'.join(str(d).replace('torch.', '') for d in WEIGHT_DTYPES)} weights, not quantized or "
                    "sharded ones: load the model unquantized (transformers de-quantizes GGUF files) and without "
                    "tensor parallelism"
                )


def _targets(model: nn.Module, family: Family, config: SparsityConfig):
    """(name, parent, attribute, module, kind) for each module to replace, in model order; each
    one's weights checked by `check_weights`."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in decoder_layers(model):
        if config.targets in ("attn", "all"):
            attn = getattr(layer, family.attn_attr)
            for n in family.attn_linears:
                m = getattr(attn, n)
                out.append((names[id(m)], attn, n, m, "linear"))
        if config.targets in ("mlp", "all"):
            mlp = getattr(layer, family.mlp_attr)
            if config.method == "gate":
                out.append((names[id(mlp)], layer, family.mlp_attr, mlp, "mlp"))
            else:
                for n in family.mlp_linears:
                    m = getattr(mlp, n)
                    out.append((names[id(m)], mlp, n, m, "linear"))
    for name, _parent, _attr, module, _kind in out:
        check_weights(name, module)
    return out


def _layer_setting(name: str, key: str, default, calibration, config: SparsityConfig):
    value = default
    layers = getattr(calibration, "layers", None) or {}
    if name in layers and layers[name].get(key) is not None:
        value = layers[name][key]
    for pattern, spec in config.overrides.items():
        if fnmatch.fnmatchcase(name, pattern) and key in spec:
            value = spec[key]
    return value


def _check_calibrated(name: str, calib: dict, width: int, out_f: Optional[int]) -> None:
    """A calibration's tensors must fit the layer they are for (one made on another model may not)."""
    t = calib.get("threshold")
    if t is not None and torch.as_tensor(t).numel() not in (1, width):
        raise ValueError(
            f"{name}: the calibration's threshold has {torch.as_tensor(t).numel()} values for a layer of "
            f"{width} gated channels: it was made for another model; calibrate this one"
        )
    A, B = calib.get("A"), calib.get("B")
    if A is not None and (A.dim() != 2 or A.shape[0] != width or B is None or tuple(B.shape) != (A.shape[1], out_f)):
        raise ValueError(
            f"{name}: the calibration's low-rank factors are A {tuple(A.shape)}, B {None if B is None else tuple(B.shape)} "
            f"for a {out_f}x{width} layer: they were made for another model; calibrate this one"
        )


def plan_layers(model: nn.Module, config: SparsityConfig, calibration=None, family: Optional[Family] = None) -> List[LayerPlan]:
    """Decide k / threshold / rank for every target module, validating all of it; replaces nothing."""
    family = family or find_family(model, config.targets)
    targets = _targets(model, family, config)
    for name, _parent, _attr, module, kind in targets:
        if kind == "mlp":
            check_gated_mlp(name, module, family)
    names = [t[0] for t in targets]
    for pattern in config.overrides:  # a typo in a pattern would otherwise change nothing, silently
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(
                f"overrides pattern {pattern!r} matches none of the {len(names)} modules targets={config.targets!r} "
                f"patches (e.g. {names[0]!r}); fix the pattern or the targets"
            )
    cal_layers = getattr(calibration, "layers", None) or {}
    foreign = sorted(set(cal_layers) - set(names))
    if foreign:
        raise ValueError(
            f"the calibration holds layers this model does not patch with targets={config.targets!r}, "
            f"method={config.method!r} (e.g. {foreign[:3]}): it was made for another model or config; calibrate this one"
        )
    plans = []
    for name, _parent, _attr, module, kind in targets:
        s = float(_layer_setting(name, "sparsity", config.sparsity, calibration, config))
        if not 0.0 <= s < 1.0:
            raise ValueError(f"{name}: sparsity must lie in [0, 1), got {s}")
        calib = cal_layers.get(name, {})
        made = calib.get("sparsity")
        if (calib.get("threshold") is not None and config.mode != "shared" and made is not None
                and not math.isclose(float(made), s, abs_tol=1e-9)):
            # the threshold keeps the calibrated fraction of channels, whatever sparsity the plan says
            raise ValueError(
                f"{name}: overrides set sparsity {s}, but its calibrated threshold was fitted for sparsity "
                f"{float(made):.4g}: calibrate with these overrides in the config (calibrate applies them) "
                "or drop the override"
            )
        if kind == "mlp":
            g = getattr(module, family.mlp_linears[0])
            width = g.out_features
            _check_calibrated(name, calib, width, None)
            method = "gate"
            # over gate+up+down, reading all of gate and a density d of up/down: (1 + 2d)/3 = 1 - s
            density = 1.0 - 1.5 * s
            if density < 0:
                raise ValueError(f"{name}: method 'gate' cannot reach sparsity {s} (at most 2/3 over the MLP)")
            plan = LayerPlan(name, kind, method, width, sparsity=s)
            if calib.get("threshold") is not None and config.mode != "shared":
                plan.threshold = calib["threshold"]
            else:
                plan.k = k_for_density(width, density)
            plans.append(plan)
            continue

        in_f, out_f = module.in_features, module.out_features
        _check_calibrated(name, calib, in_f, out_f)
        method = "topk" if (config.method == "gate") else config.method  # gate: attention linears use top-k
        plan = LayerPlan(name, kind, method, in_f, sparsity=s)
        budget = (1.0 - s) * in_f * out_f  # weight elements read per token
        if method == "rsparse":
            # at sparsity 0 the whole weight is read: no remainder is left for a factor
            default_rank = int(config.rank_fraction * budget / (in_f + out_f)) if s > 0 else 0
            rank = _layer_setting(name, "rank", default_rank, calibration, config)
            limit = min(in_f, out_f)
            if not isinstance(rank, int) or not 0 <= rank <= limit:
                raise ValueError(f"{name}: rank={rank} is outside [0, min(in, out)={limit}] for this {out_f}x{in_f} layer")
            plan.rank = rank
            plan.A, plan.B = calib.get("A"), calib.get("B")
            if plan.A is not None and plan.A.shape[1] != rank:
                plan.A = plan.B = None  # factors from calibration at another rank: recompute
            active = (budget - rank * (in_f + out_f)) / out_f
            if active < 0:
                raise ValueError(f"{name}: rank={rank} alone reads more than the budget at sparsity {s}")
        else:
            active = (1.0 - s) * in_f
        k_override = _layer_setting(name, "k", None, calibration, config)
        # Shared masks always take the top-k of the step's RMS importance: thresholds are
        # calibrated on single tokens, and an RMS over a batch crosses them at another rate,
        # so only k keeps the bytes per step at the budget whatever the batch size.
        per_token_threshold = method == "threshold" or (calib.get("threshold") is not None and method != "topk")
        if per_token_threshold and config.mode != "shared":
            t = calib.get("threshold")
            if t is None:
                raise ValueError(
                    f"method {config.method!r} needs calibrated thresholds and {name} has none: pass "
                    "calibration=<iterable of token-id tensors> or a file saved by save_sparsity"
                )
            plan.threshold = t
        else:
            # floor: the layer never reads more than its budget (within one channel of it)
            k = k_override if k_override is not None else int(min(in_f, max(0, math.floor(active + 1e-9))))
            if not 0 <= k <= in_f:
                raise ValueError(f"{name}: k={k} is outside [0, {in_f}] (the layer's input channels)")
            plan.k = k
        plans.append(plan)
    return plans


def _build(plan: LayerPlan, module: nn.Module, config: SparsityConfig, family: Family) -> nn.Module:
    common = dict(shared=config.mode == "shared", backend=config.backend, dense_prefill_above=config.dense_prefill_above)
    gate = dict(k=plan.k, threshold=plan.threshold)
    if plan.kind == "mlp":
        new = SparseGatedMLP(module, names=family.mlp_linears, **gate, **common)
        new.target_density = 1.0 - 1.5 * plan.sparsity
    elif plan.method == "rsparse":
        # calibrated or saved factors are still the SVD of W unless they were fitted to activations
        new = RSparseLinear(module, rank=plan.rank, A=plan.A, B=plan.B, svd_factors=config.lowrank == "svd",
                            importance=config.use_importance, **gate, **common)
        new.target_density = (1.0 - plan.sparsity) - plan.rank * (new.in_features + new.out_features) / (new.in_features * new.out_features)
    else:
        new = SparseLinear(module, importance=config.use_importance, **gate, **common)
        new.target_density = 1.0 - plan.sparsity
    return new


# what a calibration's per-layer settings depend on: a config that differs in one of these would be
# served settings made for another config (and record the wrong one in model.config)
CALIBRATED_FIELDS = ("targets", "allocation", "per_channel", "importance", "lowrank", "overrides")


def _check_budget(calibration, config: SparsityConfig, where: str):
    """Per-layer settings calibrated for one method and budget would silently replace the config's."""
    meta = getattr(calibration, "meta", None) or {}
    method, budget = meta.get("method"), meta.get("budget_sparsity")
    if method is not None and method != config.method:
        raise ValueError(f"{where} was calibrated for method {method!r}, the config asks for {config.method!r}: "
                         f"use SparsityConfig(method={method!r}, ...) or calibrate again")
    if budget is not None and not math.isclose(float(budget), config.sparsity, abs_tol=1e-9):
        raise ValueError(f"{where} was calibrated for sparsity {budget}, the config asks for {config.sparsity}: "
                         f"use SparsityConfig(sparsity={budget}, ...) or calibrate again at {config.sparsity}")
    made = meta.get("config")  # the whole config the calibration was made with (absent in older files)
    if isinstance(made, dict):
        try:
            made = SparsityConfig.from_dict(made)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: the config it was calibrated with is invalid ({e}); calibrate again") from None
        # importance=None means "the method's default": compare what it resolves to
        have = {f: (config.use_importance if f == "importance" else getattr(config, f)) for f in CALIBRATED_FIELDS}
        want = {f: (made.use_importance if f == "importance" else getattr(made, f)) for f in CALIBRATED_FIELDS}
        diff = [f for f in CALIBRATED_FIELDS if have[f] != want[f]]
        if diff:
            raise ValueError(
                f"{where} was calibrated with {', '.join(f'{f}={want[f]!r}' for f in diff)}; the config asks for "
                f"{', '.join(f'{f}={have[f]!r}' for f in diff)}: use config.replace("
                f"{', '.join(f'{f}={want[f]!r}' for f in diff)}) or calibrate again with this config"
            )
    return calibration


def _layers_owner(model: nn.Module) -> Optional[nn.Module]:
    """The module whose forward runs the decoder layers (and takes the ``attention_mask``)."""
    layers = decoder_layers(model)
    return next((m for m in model.modules() if any(c is layers for c in m.children())), None)


BATCH_ATTR = "_sparse_infer_batch"  # the BatchContext `sparsify` hooks onto the layers' owner


def _attach_batch(model: nn.Module, modules: Iterable[nn.Module]) -> None:
    """Hook a BatchContext onto the layers' owner so the sparse modules see the call's attention mask."""
    owner = _layers_owner(model)
    if owner is None:
        return
    try:
        names = list(inspect.signature(owner.forward).parameters)
        index = names.index("attention_mask") if "attention_mask" in names else None
    except (TypeError, ValueError):
        index = None
    ctx = BatchContext(index)
    ctx.handles = [owner.register_forward_pre_hook(ctx.enter, with_kwargs=True),
                   owner.register_forward_hook(ctx.exit, with_kwargs=True, always_call=True)]
    object.__setattr__(owner, BATCH_ATTR, ctx)
    for m in modules:
        object.__setattr__(m, "_batch", ctx)


def _detach_batch(model: nn.Module) -> None:
    owner = _layers_owner(model)
    ctx = owner.__dict__.pop(BATCH_ATTR, None) if owner is not None else None
    for h in getattr(ctx, "handles", ()):
        h.remove()


def _check_backend(model: nn.Module, config: SparsityConfig) -> None:
    """backend='triton' on weights the kernels cannot serve fails now, not at the first forward."""
    if config.backend != "triton":
        return
    weight = next(model.parameters(), None)
    if weight is None:
        return
    if not ops.triton_available(weight):
        raise ValueError(
            f"backend='triton' needs the model on a CUDA device (its weights are on {weight.device}): "
            "move it with model.to('cuda') before sparsify, or use backend='auto' / 'reference'"
        )
    if weight.dtype not in ops.TRITON_DTYPES:
        raise ValueError(
            f"backend='triton' serves {', '.join(str(d) for d in ops.TRITON_DTYPES)} weights, not {weight.dtype}: "
            "cast the model (model.to(torch.bfloat16)) before sparsify, or use backend='reference'"
        )


def _resolve_calibration(model, config: SparsityConfig, calibration, progress: bool):
    if calibration is None:
        if config.needs_calibration:
            raise ValueError(
                f"method {config.method!r} needs calibration: pass calibration=<iterable of token-id tensors> "
                "(a few sequences of the model's domain) or the path of a file saved by save_sparsity"
            )
        return None
    if isinstance(calibration, (str, Path)):
        from .io import load_calibration

        return _check_budget(load_calibration(model, calibration, config), config, str(calibration))
    if hasattr(calibration, "layers"):
        return _check_budget(calibration, config, "the calibration")
    if not hasattr(calibration, "__iter__"):
        raise TypeError(
            f"calibration must be None, the path of a file saved by save_sparsity, a Calibration, or an iterable "
            f"of token-id tensors; got {type(calibration).__name__}"
        )
    from .calibrate import calibrate

    return calibrate(model, calibration, config, progress=progress)


def sparsify(model: nn.Module, config: Optional[SparsityConfig] = None, calibration=None, *, progress: bool = True) -> nn.Module:
    """Patch ``model`` in place with sparse modules and return it.

    Args:
        model: a HuggingFace causal LM of a supported family (see `FAMILIES`).
        config: a `SparsityConfig` (default: top-k, 50 %, MLP linears).
        calibration: ``None``; an iterable of token-id tensors (calibrated here);
            a `Calibration` from `sparse_infer.calibrate`; or the path of a file
            saved by `save_sparsity`.
        progress: show progress bars during calibration.
    """
    config = config or SparsityConfig()
    if not isinstance(config, SparsityConfig):
        raise TypeError(f"config must be a SparsityConfig, got {type(config).__name__}")
    config.validate()  # fields set after construction (config.method = "TopK") are checked too
    if any(isinstance(m, (SparseLinear, SparseGatedMLP)) for m in model.modules()):
        raise ValueError("this model is already sparsified; call sparse_infer.unsparsify(model) first")
    if hasattr(getattr(model, "config", None), CONFIG_KEY):
        warnings.warn(
            f"model.config.{CONFIG_KEY} describes a sparsified model, but this one has no sparse modules: a checkpoint "
            "written by save_pretrained after sparsify holds the dense weights and this entry, not the sparse modules. "
            "The entry is replaced now; to keep sparse settings with a checkpoint, write them with "
            "sparse_infer.save_sparsity(model, path) and apply them with sparse_infer.load_sparsity(model, path)",
            stacklevel=2,
        )
    family = find_family(model, config.targets)
    _check_backend(model, config)
    calibration = _resolve_calibration(model, config, calibration, progress)
    plans = plan_layers(model, config, calibration, family)
    targets = {name: (parent, attr, module) for name, parent, attr, module, _ in _targets(model, family, config)}
    # building may raise (and computes SVD factors for rsparse): nothing is replaced until all are built
    built = [
        (targets[p.name], _build(p, targets[p.name][2], config, family))
        for p in tqdm(plans, desc=f"sparsify ({config.method})", disable=not progress or config.method != "rsparse", leave=False)
    ]
    for (parent, attr, _module), new in built:
        setattr(parent, attr, new)
    _attach_batch(model, [new for _, new in built])
    if getattr(model, "config", None) is not None:
        entry = {"version": 1, "family": family.name, "config": config.to_dict()}
        if getattr(calibration, "meta", None):  # how the calibration was made (split, budget), for save_sparsity
            entry["calibration"] = calibration.meta
        setattr(model.config, CONFIG_KEY, entry)
    return model


def sparse_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Name → sparse module, for every module `sparsify` put in."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseGatedMLP))}


def unsparsify(model: nn.Module) -> nn.Module:
    """Put every original module back (the same objects `sparsify` replaced) and return the model."""
    for name, module in list(sparse_modules(model).items()):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = module.to_mlp() if isinstance(module, SparseGatedMLP) else module.to_linear()
        setattr(parent, attr, original)
    _detach_batch(model)
    if getattr(model, "config", None) is not None and hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    return model


def record_stats(model: nn.Module, on: bool = True) -> nn.Module:
    """Start the sparse modules' counting of active channels from zero (``on=False``: stop it and
    keep the counts).

    The reference path counts (every call of a module on the CPU, or with ``backend="reference"``);
    the Triton kernels do not.  Read the result with ``model_sparsity(model, measured=True)``.
    Tokens that the call's ``attention_mask`` marks as padding are not counted."""
    for m in sparse_modules(model).values():
        m.record_stats = bool(on)
        if on:
            m.reset_stats()
    return model


def model_sparsity(model: nn.Module, measured: bool = False) -> float:
    """Model-level sparsity ``1 - read/dense`` over the patched modules (nominal, or measured since `reset_stats`).

    ``measured=True`` counts the modules that recorded tokens (`record_stats`) and raises a ValueError
    when none did, rather than report a model that ran sparse as 0 % sparse."""
    if measured and not any(m.stats_tokens for m in sparse_modules(model).values()):
        raise ValueError(
            "model_sparsity(measured=True): no sparse module has recorded a token. Call "
            "sparse_infer.record_stats(model) before the forward passes to count (the reference path counts, "
            "the Triton kernels do not), or use measured=False for the nominal sparsity"
        )
    read = dense = 0.0
    for m in sparse_modules(model).values():
        density = m.measured_density if measured else None
        if measured and density is None:
            continue
        read += m.read_elements(density)
        dense += m.dense_elements() if isinstance(m, SparseGatedMLP) else m.in_features * m.out_features
    return 1.0 - read / dense if dense else 0.0
