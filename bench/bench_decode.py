"""End-to-end decode benchmark: a dense Llama against the same model sparsified.

One command::

    python bench/bench_decode.py                       # Llama-3-8B config, bf16, batch 1 and 4
    python bench/bench_decode.py --config small        # Llama-3.2-1B-sized config
    python bench/bench_decode.py --config tiny --new-tokens 8 --prompt 16   # seconds, any machine

The model is built from a ``LlamaConfig`` with random weights, directly on the
device (no download; the 8B config is 16 GB in bf16).  Per batch size the
dense model is timed first, then, for every mode and sparsity, the *same*
model is sparsified (``sparse_infer.sparsify``), timed and unsparsified.

Decode loop (identical for dense and sparse):

* a static KV cache, allocated once per batch size, and static token /
  position buffers;
* the one-token step (embedding, the decoder layers' own modules - norms,
  ``q/k/v/o_proj`` and ``mlp``, patched or not - SDPA over the static cache,
  final norm, ``lm_head``, greedy argmax, next token and position written in
  place) captured once in a CUDA graph and replayed ``--new-tokens`` times;
* kernel compilation, autotuning and the kernels' workspace allocation happen
  in eager warm-up steps before the capture;
* if capture fails for a configuration (a host sync in some op), that
  configuration and its dense baseline both run eager, and the row says so;
* ``--compile`` compiles that step with ``torch.compile`` (inductor by default,
  dense and sparse alike; the kernels enter the graph as ``torch.library``
  custom ops) before the capture, which fuses the norms, RoPE, SiLU*mul and
  residual adds that otherwise run as many small kernels.  Each configuration
  is traced afresh; the sparsity and reference checks run the eager step, and
  the compiled step's logits are compared with the eager step's from the same
  state (a row above 2e-2 says CHECK in its note).

``--engine native`` (default) runs the decoder layers' modules with this
file's static cache and attention (same maths as HF's Llama attention, checked
against the HF forward in tests/test_bench.py); ``--engine hf`` calls the HF
model's own forward with ``transformers.StaticCache`` instead (its internals
change between transformers releases, so it is the second choice).

Sparsity: ``targets=all`` by default, so the configured sparsity is the
model-level fraction of linear-layer weight bytes skipped per token.  Threshold
mode (default, TEAL) calibrates its thresholds on ``--calib-tokens`` random
tokens; the sparsity measured on decode tokens (reference path, a few eager
steps) is reported next to the target.  The weight bytes a sparse step reads
(``× ideal``, ``GB/s``) come from those measured densities - for per-token
masks at batch > 1 the density of the union of the batch's masks, which the
kernels read - or all weights where the kernels fall back to a dense matmul at
that batch size.

``--threads N`` sets torch's thread count (default: torch's own); on a small
CPU machine with ``--compile``, fewer threads keep OpenMP from fighting
inductor's compile workers.

Writes ``decode.md`` and appends to ``decode.csv`` under ``--out`` after every
row (partial results survive a timeout), with the device, versions, command
and timestamp.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import inspect
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- configs
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

CONFIGS: Dict[str, dict] = {
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=dict(LLAMA3_ROPE)),
    # meta-llama/Llama-2-7b-hf
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=4096,
                      rms_norm_eps=1e-5, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # meta-llama/Llama-3.2-1B
    "small": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, rope_parameters=dict(LLAMA3_ROPE, factor=32.0)),
    # CPU tests: the shapes of sparse_infer.models.TINY
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                 rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}

METHODS = ("threshold", "topk", "gate")
MODES = ("per_token", "shared")
TARGETS = ("all", "mlp", "attn")
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


# ----------------------------------------------------------------------------- arguments
def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,4,16, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,4,16, got {text!r}")
    return values


def _sparsity_list(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sparsities like 0.3,0.5,0.7, got {text!r}")
    if not values or any(not 0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"sparsities must lie in (0, 1), got {text!r}")
    return values


def _mode_list(text: str) -> List[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in MODES]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"modes must be a comma-separated subset of {MODES}, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_decode.py",
        description="Decode tokens/s of a random-weight Llama, dense against sparsified (sparse-infer).",
    )
    p.add_argument("--config", default="llama3-8b", choices=sorted(CONFIGS), help="model shape (default llama3-8b)")
    p.add_argument("--batch", type=_int_list, default=[1, 4], help="batch sizes, comma-separated (default 1,4)")
    p.add_argument("--sparsity", type=_sparsity_list, default=[0.3, 0.5, 0.7],
                   help="model-level sparsities, comma-separated (default 0.3,0.5,0.7)")
    p.add_argument("--modes", type=_mode_list, default=["per_token"],
                   help="masks per token and/or shared per decode step: per_token,shared (default per_token)")
    p.add_argument("--method", default="threshold", choices=METHODS,
                   help="threshold (TEAL, calibrated on random tokens; default), topk, gate (CATS)")
    p.add_argument("--targets", default="all", choices=TARGETS, help="which linears are sparsified (default all)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                   help="sparse backend (auto: Triton on CUDA, reference elsewhere)")
    p.add_argument("--new-tokens", type=int, default=256, help="decoded tokens per sequence (default 256)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="weights and activations (default bf16)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--engine", default="native", choices=("native", "hf"),
                   help="decode step: native static cache over the model's modules (default) or the HF forward")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="eager decode (no CUDA graph capture)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the decode step (native engine; dense and sparse alike) with BACKEND "
                        "(default inductor: fuses the norms, RoPE, SiLU*mul and residual adds), then capture it "
                        "in the CUDA graph")
    p.add_argument("--warmup", type=int, default=3, help="eager warm-up steps before capture/timing (default 3)")
    p.add_argument("--repeats", type=int, default=1, help="timed passes over --new-tokens; the median is kept")
    p.add_argument("--calib-tokens", type=int, default=128, help="random tokens to calibrate thresholds on")
    p.add_argument("--measure-steps", type=int, default=8,
                   help="eager reference steps to measure the reached sparsity (0: skip)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="profile STEPS eager steps per row (torch.profiler): device time per step and the top "
                        "kernels go to profile.txt; compare with the graph step time to see launch gaps")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch.set_num_threads(N) for the run (default: leave torch's default). On a small CPU "
                        "machine with --compile, OpenMP threads fight inductor's compile workers: 1 or 2 there")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/decode", help="folder for decode.md / decode.csv")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.new_tokens < 1 or args.prompt < 1:
        parser.error("--new-tokens and --prompt must be positive")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (kernels compile and allocate in the warm-up, before capture)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.measure_steps < 0 or args.profile < 0:
        parser.error("--measure-steps and --profile must be 0 or more")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.compile and args.engine != "native":
        parser.error("--compile compiles the native engine's step: drop --engine hf (or --compile)")
    if args.method == "gate":
        from sparse_infer.config import GATE_MAX_SPARSITY

        if args.targets == "attn":
            parser.error("--method gate sparsifies the MLP: use --targets mlp or all")
        if any(s >= GATE_MAX_SPARSITY for s in args.sparsity):
            parser.error(f"--method gate reaches at most {GATE_MAX_SPARSITY:.3f} sparsity over the MLP")
    if args.device is None:
        if not torch.cuda.is_available() and args.config != "tiny":
            # a llama3-8b decode on the reference path would take ~16 GB and hours, with nothing said
            parser.error(f"--config {args.config} is a GPU benchmark and torch sees no CUDA device: use --config tiny "
                         "on the CPU, or --device cpu to run this config there anyway (slow)")
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    if not args.device.startswith("cuda"):
        args.graphs = False  # CUDA graphs need CUDA
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


# ----------------------------------------------------------------------------- model
def llama_config(name: str, **overrides):
    from transformers import LlamaConfig

    kw = dict(CONFIGS[name], **overrides)
    kw.setdefault("pad_token_id", 0)
    try:
        cfg = LlamaConfig(**kw)
    except TypeError:  # a transformers without rope_parameters: the 4.x spelling
        rope = kw.pop("rope_parameters")
        kw["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            kw["rope_scaling"] = rope
        cfg = LlamaConfig(**kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(name: str, dtype: torch.dtype, device, seed: int = 0):
    """A random-weight Llama of config ``name``, created directly on ``device`` in ``dtype``."""
    from transformers import AutoModelForCausalLM

    cfg = llama_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    # Explicit, seeded init (transformers versions differ in what from_config initializes):
    # N(0, initializer_range) for every matrix, ones for the RMSNorm weights.
    gen = torch.Generator(device=device).manual_seed(seed)
    std = getattr(cfg, "initializer_range", 0.02)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0) if "norm" in pname else p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)
    return model


def decode_weight_bytes(model) -> int:
    """Weight bytes one dense decode step reads: every parameter except an untied input embedding table."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if p.data_ptr() == emb.data_ptr() and not tied:
            continue
        total += p.numel() * p.element_size()
    return total


def _fallback_limits() -> tuple:
    """(DENSE_FALLBACK_TOKENS, PER_TOKEN_FALLBACK_TOKENS, GATED_MLP_FALLBACK_TOKENS) as the kernels' dispatch
    reads them now (module globals, settable at run time)."""
    try:
        from sparse_infer import kernels
        from sparse_infer.kernels import sparse_matmul as sm

        return sm.DENSE_FALLBACK_TOKENS, sm.PER_TOKEN_FALLBACK_TOKENS, kernels.GATED_MLP_FALLBACK_TOKENS
    except Exception:  # noqa: BLE001 - no triton: the values of kernels/sparse_matmul.py and gated_mlp.py
        return 16, 4, 1


def step_weight_bytes(model, dense_bytes: float, tokens: int,
                      densities: Optional[Dict[str, float]] = None) -> tuple:
    """(weight bytes one decode step of ``tokens`` tokens reads on the kernel path, what they are based on).

    Per sparse module: a module whose kernel falls back to gate + dense matmul at this token count
    (``PER_TOKEN_FALLBACK_TOKENS`` for per-token masks, ``DENSE_FALLBACK_TOKENS`` for shared ones,
    ``GATED_MLP_FALLBACK_TOKENS`` for the fused CATS MLP, or a ``dense_prefill_above`` of 0)
    reads all its weights; otherwise it reads the channels of ``densities[name]``, the measured density
    of the union of the step's masks (for per-token masks and several tokens: the union over the
    batch's tokens, which the kernels read), or the nominal density (target) where nothing was measured.
    Basis: "measured", "measured union", "nominal", "dense fallback", joined by " + " when mixed.
    """
    from sparse_infer import SparseGatedMLP, sparse_modules

    dense_fb, per_token_fb, mlp_fb = _fallback_limits()
    densities = densities or {}
    skipped, basis = 0.0, []
    for name, m in sparse_modules(model).items():
        if isinstance(m, SparseGatedMLP):
            dense, size = m.dense_elements(), m.gate_proj.weight.element_size()
            fallback = tokens > mlp_fb or m.act_name is None  # no fused kernel: the reference, dense
        else:
            dense, size = m.in_features * m.out_features, m.weight.element_size()
            fallback = tokens > (dense_fb if m.shared else min(per_token_fb, dense_fb))
        if m.dense_prefill_above is not None and m.dense_prefill_above < 1:  # a decode step is 1 position per sequence
            fallback = True
        if fallback:
            read, how = dense, "dense fallback"
        elif densities.get(name) is not None:
            read, how = m.read_elements(densities[name]), (
                "measured union" if tokens > 1 and not m.shared else "measured")
        else:
            read, how = m.read_elements(), "nominal"
        skipped += (dense - read) * size
        if how not in basis:
            basis.append(how)
    return dense_bytes - skipped, " + ".join(basis) or "dense"


# ----------------------------------------------------------------------------- engines
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class NativeEngine:
    """Static-KV decode over the HF model's own modules (norms, projections, MLP, lm_head).

    Attention is Llama's (RoPE, GQA, scale head_dim^-1/2, causal) over a static
    cache: SDPA with a boolean mask computed from the position tensor, so the
    step has static shapes and no host sync.  GQA without copying the cache:
    the query heads of each KV head are stacked along the query axis.
    """

    name = "native"

    def __init__(self, model, batch: int, max_len: int, compile: Optional[str] = None):
        """``compile``: a torch.compile backend ("inductor") for the one-token step, or None (eager)."""
        cfg = model.config
        self.model = model
        self.compiled = compile
        # One compiled function for the whole one-token step; `fresh_compile` drops its cache
        # before each configuration, so a patched model is traced anew rather than hitting
        # dynamo's recompile limit and silently running eager.
        self._step_fn = torch.compile(self._step_body, backend=compile, dynamic=False) if compile else self._step_body
        dec = model.get_decoder()
        self.layers = dec.layers
        self.norm = dec.norm
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        p = next(model.parameters())
        dev, dt = p.device, p.dtype
        self.nh = cfg.num_attention_heads
        self.nkv = cfg.num_key_value_heads or self.nh
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.group = self.nh // self.nkv
        self.batch, self.max_len = batch, max_len
        shape = (batch, self.nkv, max_len, self.hd)
        self.k_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in self.layers]
        positions = torch.arange(max_len, device=dev)
        with torch.no_grad():
            cos, sin = dec.rotary_emb(torch.empty(1, device=dev, dtype=dt), positions[None])
        self.cos, self.sin = cos[0], sin[0]  # (max_len, head_dim)
        self.kv_idx = positions
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.logits = None

    def reset(self):
        for c in self.k_cache + self.v_cache:
            c.zero_()

    def set_state(self, tok: torch.Tensor, pos: int):
        self.tok.copy_(tok.view(self.batch, 1))
        self.pos.fill_(pos)

    def _attention(self, i: int, attn, x, positions, cos, sin, mask):
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        kc, vc = self.k_cache[i], self.v_cache[i]
        # an index_put_ into the static cache: inductor writes it in place (its CPU output code
        # stores the new rows only; no copy of the cache)
        kc[:, :, positions] = k.to(kc.dtype)
        vc[:, :, positions] = v.to(vc.dtype)
        # (B, nh, T, hd) -> (B, nkv, group*T, hd): query heads kv*group+g of one KV head, rows g*T + t
        qg = q.reshape(B, self.nkv, self.group * T, self.hd)
        o = F.scaled_dot_product_attention(qg, kc, vc, attn_mask=mask, scale=getattr(attn, "scaling", None))
        o = o.view(B, self.nh, T, self.hd).transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return attn.o_proj(o)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states after the final norm, (B, T, hidden); writes the KV cache at ``positions``."""
        h = self.embed(ids)
        cos = self.cos.index_select(0, positions)[None, None]
        sin = self.sin.index_select(0, positions)[None, None]
        mask = (self.kv_idx[None, :] <= positions[:, None]).repeat(self.group, 1)[None, None]
        for i, layer in enumerate(self.layers):
            h = h + self._attention(i, layer.self_attn, layer.input_layernorm(h), positions, cos, sin, mask)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.forward(ids, positions)
        return self.lm_head(h[:, -1:])[:, -1]

    def _step_body(self):
        h = self.forward(self.tok, self.pos)
        logits = self.lm_head(h)[:, -1]
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        return logits

    def fresh_compile(self):
        """Forget compiled code: the next step traces the model as it is now (patched or dense)."""
        if self.compiled:
            torch._dynamo.reset()

    @torch.no_grad()
    def step(self):
        """One decode step, compiled when the engine was built with a ``compile`` backend."""
        self.logits = self._step_fn()

    @torch.no_grad()
    def eager_step(self):
        """The same step without torch.compile (module hooks and backend switches see every call)."""
        self.logits = self._step_body()


class HFEngine:
    """The HF model's own forward over a ``transformers.StaticCache``."""

    name = "hf"

    def __init__(self, model, batch: int, max_len: int):
        from transformers import StaticCache

        self.model = model
        self.batch, self.max_len = batch, max_len
        dev = next(model.parameters()).device
        try:
            self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        except TypeError:  # older signatures want the batch size and device up front
            self.cache = StaticCache(config=model.config, max_batch_size=batch, max_cache_len=max_len,
                                     device=dev, dtype=next(model.parameters()).dtype)
        params = set(inspect.signature(model.forward).parameters)
        params |= set(inspect.signature(model.get_decoder().forward).parameters)
        self.pass_cache_position = "cache_position" in params
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.logits = None

    def _layers(self):
        return getattr(self.cache, "layers", [])

    def reset(self):
        self.cache.reset()

    def set_state(self, tok: torch.Tensor, pos: int):
        self.tok.copy_(tok.view(self.batch, 1))
        self.pos.fill_(pos)
        for layer in self._layers():  # caches that count positions themselves (transformers >= 5.2x)
            n = getattr(layer, "cumulative_length", None)
            if isinstance(n, torch.Tensor):
                n.fill_(pos)

    def _forward(self, ids, positions):
        kw = dict(input_ids=ids, position_ids=positions[None].expand(ids.shape[0], -1),
                  past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        if self.pass_cache_position:
            kw["cache_position"] = positions
        return self.model(**kw).logits[:, -1]

    @torch.no_grad()
    def prefill(self, ids):
        self.reset()
        return self._forward(ids, torch.arange(ids.shape[1], device=ids.device))

    @torch.no_grad()
    def step(self):
        logits = self._forward(self.tok, self.pos)
        self.tok.copy_(logits.argmax(-1, keepdim=True))
        self.pos.add_(1)
        self.logits = logits

    eager_step = step

    def fresh_compile(self):
        pass


ENGINES = {"native": NativeEngine, "hf": HFEngine}


def make_engine(args, model, batch: int, max_len: int):
    if getattr(args, "compile", None):
        return ENGINES[args.engine](model, batch, max_len, compile=args.compile)
    return ENGINES[args.engine](model, batch, max_len)


# ----------------------------------------------------------------------------- timing
def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    den = b64.norm().item()
    return (a64 - b64).norm().item() / den if den else (a64 - b64).norm().item()


def _find_host_sync(engine) -> str:
    """Run one eager step with CUDA sync debugging on: the op that syncs, if any."""
    try:
        torch.cuda.set_sync_debug_mode("error")
        engine.step()
        return ""
    except Exception as e:  # noqa: BLE001 - a diagnostic, whatever it raised
        return str(e).splitlines()[0][:160]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def capture_step(engine):
    """Capture ``engine.step`` in a CUDA graph (after one side-stream warm-up, as torch asks)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        engine.step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        engine.step()
    torch.cuda.synchronize()
    return graph


@dataclass
class DecodeResult:
    tokens_per_s: float
    step_ms: float
    prefill_ms: float
    peak_mem_gib: Optional[float]
    graphs: bool
    graph_check: Optional[float] = None  # rel. error of a replayed step against the eager step
    note: str = ""
    measured_sparsity: Optional[float] = None
    ref_check: Optional[float] = None  # worst rel. error of a sparse module's output against the reference
    kernel_ms: Optional[float] = None  # device (kernel) time per eager step, from the profiler
    profile: str = ""
    compile_check: Optional[float] = None  # rel. error of the compiled step's logits against the eager step's
    union_density: Dict[str, float] = field(default_factory=dict)  # per module: measured density of the step's union


# Checks above this relative error are flagged in the row's note ("CHECK: ...").
CHECK_TOLERANCE = 2e-2


def run_decode(model, engine, prompt: torch.Tensor, args, graphs: bool, measure_sparsity: bool = False) -> DecodeResult:
    """Prefill, warm up, (capture,) and time ``args.new_tokens`` decode steps on ``engine``."""
    device = prompt.device
    cuda = device.type == "cuda"
    batch, plen = prompt.shape
    note = ""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    engine.reset()
    engine.fresh_compile()
    t0 = time.perf_counter()
    first_logits = engine.prefill(prompt)
    _sync(device)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    first = first_logits.argmax(-1)

    def start():
        engine.set_state(first, plen)

    start()
    for _ in range(args.warmup):  # compiles, autotunes and allocates everything the step needs
        engine.step()
    _sync(device)

    compile_check, eager_repeat = None, None
    if getattr(engine, "compiled", None):
        # the compiled step (its kernel path included) against the eager, uncompiled step from the same
        # state; a second eager step from that state says how reproducible the eager step itself is
        start()
        engine.eager_step()
        eager_logits = engine.logits.clone()
        start()
        engine.eager_step()
        eager_repeat = rel_err(engine.logits, eager_logits)
        start()
        engine.step()
        _sync(device)
        compile_check = rel_err(engine.logits, eager_logits)
        if not compile_check <= CHECK_TOLERANCE:  # NaN included
            note = (f"CHECK: compiled vs eager rel err {compile_check:.1e} "
                    f"(eager vs eager {eager_repeat:.1e})")

    graph, check = None, None
    if graphs:
        try:
            start()
            engine.step()
            eager_logits = engine.logits.clone()
            start()
            graph = capture_step(engine)
            start()
            graph.replay()
            torch.cuda.synchronize()
            check = rel_err(engine.logits, eager_logits)
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager, reported
            graph = None
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - an invalidated capture may report here once more
                pass
            start()
            culprit = _find_host_sync(engine)
            failed = f"CUDA graph capture failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
            if culprit:
                failed += f"; host sync: {culprit}"
            note = "; ".join(n for n in (note, failed + "; eager") if n)

    times = []
    for _ in range(args.repeats):
        start()
        _sync(device)
        t0 = time.perf_counter()
        if graph is not None:
            for _ in range(args.new_tokens):
                graph.replay()
        else:
            for _ in range(args.new_tokens):
                engine.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    secs = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del graph

    kernel_ms, prof_table = None, ""
    if getattr(args, "profile", 0) > 0:
        kernel_ms, prof_table = profile_steps(engine, first, plen, args.profile, device)

    measured, ref_check, union = None, None, {}
    if measure_sparsity and args.measure_steps > 0:
        ref_check = module_check(model, engine, first, plen)
        measured = measure_model_sparsity(model, engine, first, plen, args.measure_steps, union=union)
        if ref_check is not None and not ref_check <= CHECK_TOLERANCE:
            note = "; ".join(n for n in (note, f"CHECK: module vs reference rel err {ref_check:.1e}") if n)
    return DecodeResult(
        tokens_per_s=batch * args.new_tokens / secs,
        step_ms=secs / args.new_tokens * 1e3,
        prefill_ms=prefill_ms,
        peak_mem_gib=peak,
        graphs=graphs and check is not None,
        graph_check=check,
        note=note,
        measured_sparsity=measured,
        ref_check=ref_check,
        kernel_ms=kernel_ms,
        profile=prof_table,
        compile_check=compile_check,
        union_density=union,
    )


def profile_steps(engine, first, plen: int, steps: int, device) -> tuple:
    """(device time per step in ms, top-kernel table) over ``steps`` eager steps under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    engine.set_state(first, plen)
    engine.step()  # outside the trace: nothing first-call in it
    _sync(device)
    engine.set_state(first, plen)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            engine.step()
        _sync(device)
    events = prof.key_averages()

    def dev_self(e):
        for name in ("self_device_time_total", "self_cuda_time_total"):
            v = getattr(e, name, None)
            if v is not None:
                return float(v)
        return 0.0

    if device.type == "cuda":
        from torch.autograd import DeviceType

        # as torch's own table total: kernel-level (CUDA) events only, so ops and their kernels count once
        total_us = sum(dev_self(e) for e in events
                       if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
        table = events.table(sort_by="self_cuda_time_total" if not hasattr(events[0], "self_device_time_total")
                             else "self_device_time_total", row_limit=15, max_name_column_width=60)
    else:
        total_us = sum(float(getattr(e, "self_cpu_time_total", 0.0)) for e in events)
        table = events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
    return total_us / steps / 1e3, table


def _union_tap(m, densities: list):
    """A stand-in for ``m._record`` that also appends the density of the union of the call's mask rows
    (per-token masks: over the step's tokens; a shared mask: its one row; a dense call: 1.0)."""
    record = m._record

    def tap(mask, tokens, dense=False, valid=None):
        if dense or mask is None:
            densities.append(1.0)
        else:  # decode steps: one position per sequence, so no padding to leave out (valid is None)
            densities.append(float(mask.reshape(-1, m.width).any(0).float().mean()))
        return record(mask, tokens, dense, valid)

    return tap


def measure_model_sparsity(model, engine, first, plen: int, steps: int,
                           union: Optional[Dict[str, float]] = None) -> Optional[float]:
    """Model-level sparsity reached on decode tokens: a few eager steps on the reference path with stats on.

    ``union``: a dict to fill with, per sparse module name, the mean over the steps of the density of the
    union of the step's masks (what the kernels read per step: with per-token masks, every channel some
    token of the batch keeps).  The returned sparsity is the mean per-token one."""
    from sparse_infer import model_sparsity, sparse_modules

    named = sparse_modules(model)
    saved = [(m, m.backend, m.record_stats) for m in named.values()]
    taps = {name: [] for name in named}
    try:
        for name, m in named.items():
            m.backend, m.record_stats = "reference", True
            m.reset_stats()
            if union is not None:
                m._record = _union_tap(m, taps[name])  # an instance attribute over the method
        engine.set_state(first, plen)
        for _ in range(steps):
            engine.eager_step()
        if union is not None:
            union.update({name: sum(v) / len(v) for name, v in taps.items() if v})
        return model_sparsity(model, measured=True)
    finally:
        for m, backend, rec in saved:
            m.backend, m.record_stats = backend, rec
            m.__dict__.pop("_record", None)


@torch.no_grad()
def module_check(model, engine, first, plen: int) -> Optional[float]:
    """Largest rel. error, over every sparse module, of its timed-path output against the reference path
    on the very same input, recorded during one eager decode step.

    Module by module on purpose: logits are no test for a hard-threshold / top-k model.  A perturbation of
    relative size e (split-K fp32 atomics sum in a varying order) flips the channels that sit at the
    threshold, which perturbs the next layer by about sqrt(e); over 32 layers any rounding difference
    grows to O(1) in the logits (dense models pass it through unchanged).
    """
    from sparse_infer import sparse_modules

    records = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: records.append((mod, inp[0].clone(), out.clone())))
             for m in sparse_modules(model).values()]
    try:
        engine.set_state(first, plen)
        engine.eager_step()
    finally:
        for h in hooks:
            h.remove()
    worst = None
    for mod, x, y in records:
        saved = mod.backend
        mod.backend = "reference"
        try:
            want = mod(x)
        finally:
            mod.backend = saved
        err = rel_err(y.float(), want.float())
        worst = err if worst is None else max(worst, err)
    return worst


# ----------------------------------------------------------------------------- results
COLUMNS = ["config", "device", "dtype", "engine", "batch", "prompt", "new_tokens", "method", "targets", "mode",
           "sparsity", "measured_sparsity", "graphs", "compiled", "tokens_per_s", "ratio", "step_ms",
           "weight_gb_per_step", "weight_basis", "gb_per_s", "peak_mem_gib", "prefill_ms", "graph_check",
           "compile_check", "ref_check", "kernel_ms", "note"]
META_COLUMNS = ["timestamp", "torch", "triton", "transformers", "sparse_infer", "python", "threads", "command"]


def environment(device) -> dict:
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001
            return "n/a"

    if str(device).startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_name": name,
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "sparse_infer": version("sparse_infer"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "n/a",
        "threads": torch.get_num_threads(),
    }


def _fmt(v, nd=2):
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{nd}f}"
    return str(v)


def markdown_table(rows: List[dict]) -> str:
    prof = any(r.get("kernel_ms") is not None for r in rows)
    compiled = any(r.get("compiled") not in (None, "", "no") for r in rows)
    dense_gb = {r["batch"]: r["weight_gb_per_step"] for r in rows if r["mode"] == "dense"}
    head = ["batch", "mode", "sparsity (target)", "sparsity (measured)", "tokens/s", "× dense", "× ideal (bytes)",
            "ms/step", "GB/s (weights)", "weight bytes from", "peak GiB", "graphs"] + (
            ["device ms/step (profiled)"] if prof else []) + [
            "rel. err graph / compiled / ref" if compiled else "rel. err graph / ref", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = sorted(rows, key=lambda r: (r["batch"], r["mode"] != "dense", r["mode"], r["sparsity"] or 0.0))
    for r in order:
        ideal = None
        if r["mode"] != "dense" and dense_gb.get(r["batch"]) and r.get("weight_gb_per_step"):
            ideal = dense_gb[r["batch"]] / r["weight_gb_per_step"]
        shown = ["graph_check"] + (["compile_check"] if compiled else []) + ["ref_check"]
        checks = "-" if all(r.get(k) is None for k in shown) else " / ".join(_sci(r.get(k)) for k in shown)
        cells = [
            str(r["batch"]), r["mode"], _fmt(r["sparsity"]), _fmt(r["measured_sparsity"], 3),
            _fmt(r["tokens_per_s"], 1), _fmt(r["ratio"]), _fmt(ideal), _fmt(r["step_ms"], 3), _fmt_rate(r["gb_per_s"]),
            r.get("weight_basis") or "-", _fmt(r["peak_mem_gib"], 2), _fmt(r["graphs"]),
        ] + ([_fmt(r.get("kernel_ms"), 3)] if prof else []) + [checks, (r["note"] or "").replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt_rate(v) -> str:
    """GB/s: whole numbers at GPU scale, three significant digits below (the tiny config's MB-sized weights)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _sci(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def markdown_report(rows: List[dict], meta: dict) -> str:
    first = rows[0] if rows else {}
    method = next((r["method"] for r in rows if r["mode"] != "dense"), "-")
    return "\n".join([
        f"# Decode benchmark: {first.get('config', '?')} ({first.get('dtype', '?')}, engine {first.get('engine', '?')}"
        f"{', torch.compile ' + str(first['compiled']) if first.get('compiled') not in (None, 'no') else ''})",
        "",
        f"- device: {meta.get('device_name')}; torch {meta.get('torch')}, triton {meta.get('triton')}, "
        f"transformers {meta.get('transformers')}, CUDA {meta.get('cuda')}, Python {meta.get('python')}, "
        f"sparse-infer {meta.get('sparse_infer')}; torch threads {meta.get('threads', '?')}",
        f"- date: {meta.get('timestamp')}",
        f"- command: `{meta.get('command')}`",
        f"- prompt {first.get('prompt')} tokens, {first.get('new_tokens')} new tokens, random weights; "
        f"method {method}, targets {first.get('targets')}.",
        "- tokens/s counts all sequences of the batch; x dense compares with the dense row of the same batch size "
        "run the same way (CUDA graphs or eager); x ideal (bytes) = dense weight bytes per step / the weight bytes "
        "the sparse step reads, the memory-bound ceiling of x dense; GB/s (weights) = those bytes per step / "
        "step time. The bytes are the kernel path's at the row's batch size (on the CPU reference path, a model "
        "of it), from (column weight bytes from): measured = the density measured on decode tokens; measured "
        "union = per-token masks at batch > 1, the measured density of the union of the batch's masks, which "
        "the kernels read; dense fallback = the batch is above the kernels' fallback token count, so the layers "
        "run gate + dense matmul and read all weights; nominal = the target density (nothing measured: "
        "--measure-steps 0). device ms/step: kernel time of an eager step (profiler), whose difference to "
        "ms/step is launch gaps.",
        "- rel. err graph: logits of a CUDA-graph replay against the eager step from the same state (0 when the "
        "step is deterministic; sparse steps are not - split-K fp32 atomics - and the hard threshold amplifies "
        "rounding over the layers); rel. err compiled (--compile): logits of the compiled step against the "
        "uncompiled eager step from the same state; rel. err ref: the worst sparse module's output against the "
        f"reference path on the same input. A compiled or ref error above {CHECK_TOLERANCE:g} puts CHECK in the "
        "note (with, for compiled, the eager step's own run-to-run error from that state).",
        "",
        markdown_table(rows),
    ])


def append_csv(rows: List[dict], csv_path, meta: dict) -> str:
    """Append ``rows`` (with the meta columns) to ``csv_path``; a file with another header is left alone
    and the rows go to a new file beside it.  Returns the path written."""
    csv_path = Path(csv_path)
    header = COLUMNS + META_COLUMNS
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            existing = next(csv.reader(f), None)
        if existing != header:
            csv_path = csv_path.with_name(f"{csv_path.stem}-{meta.get('timestamp', 'new').replace(':', '')}.csv")
    new_file = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        if new_file:
            w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k) for k in COLUMNS}, **{k: meta.get(k) for k in META_COLUMNS}})
    return str(csv_path)


def write_results(rows: List[dict], out_dir, meta: dict, csv_rows: Optional[List[dict]] = None) -> tuple:
    """Write ``decode.md`` (all ``rows``) and append ``csv_rows`` (default: ``rows``) to ``decode.csv``.

    Returns (markdown path, csv path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / "decode.md"
    md_path.write_text(markdown_report(rows, meta))
    csv_path = append_csv(rows if csv_rows is None else csv_rows, out / "decode.csv", meta)
    return str(md_path), csv_path


# ----------------------------------------------------------------------------- main
def _row(args, meta, batch, mode, sparsity, res: Optional[DecodeResult], dense: Optional[DecodeResult],
         weight_bytes: float, note: str = "", basis: Optional[str] = None) -> dict:
    """One table row; ``weight_bytes``: what the step reads (``basis``: how that was worked out)."""
    row = {
        "config": args.config, "device": meta["device_name"], "dtype": args.dtype, "engine": args.engine,
        "batch": batch, "prompt": args.prompt, "new_tokens": args.new_tokens, "method": args.method if mode != "dense" else "-",
        "targets": args.targets, "mode": mode, "sparsity": sparsity, "measured_sparsity": None, "graphs": None,
        "compiled": getattr(args, "compile", None) or "no",
        "tokens_per_s": None, "ratio": None, "step_ms": None, "weight_gb_per_step": weight_bytes / 1e9,
        "weight_basis": None, "gb_per_s": None, "peak_mem_gib": None, "prefill_ms": None, "graph_check": None,
        "compile_check": None, "ref_check": None, "kernel_ms": None, "note": note,
    }
    if res is not None:
        row.update(
            measured_sparsity=res.measured_sparsity, graphs=res.graphs, tokens_per_s=res.tokens_per_s,
            step_ms=res.step_ms, gb_per_s=weight_bytes / 1e9 / (res.step_ms / 1e3), peak_mem_gib=res.peak_mem_gib,
            prefill_ms=res.prefill_ms, graph_check=res.graph_check, compile_check=res.compile_check,
            ref_check=res.ref_check, kernel_ms=res.kernel_ms, weight_basis=basis,
            note="; ".join(n for n in (note, res.note) if n),
        )
        if dense is not None:
            row["ratio"] = res.tokens_per_s / dense.tokens_per_s
    return row


def cache_len(args) -> int:
    """Static KV-cache length: the prompt and the most steps any pass takes from the prompt's end (each pass
    restarts there): the timed decode (with warm-up slack, as before), the sparsity measurement, the
    profile (one unprofiled step, then ``--profile``), the checks (one or two steps); a multiple of 64."""
    steps = max(args.new_tokens + args.warmup + 2, getattr(args, "measure_steps", 0) + 1,
                getattr(args, "profile", 0) + 2, args.warmup + 2)
    return -(-(args.prompt + steps) // 64) * 64


def run(args, model=None) -> List[dict]:
    """Run the whole benchmark described by ``args`` (from `parse_args`); return the rows written.

    ``model``: an already built model to use instead of building ``args.config`` (tests); it is left dense.
    ``args.threads``: torch's intra-op thread count for the run (restored afterwards).
    """
    threads = getattr(args, "threads", None)
    if not threads:
        return _run(args, model)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(args, model)
    finally:
        torch.set_num_threads(saved)


def _run(args, model=None) -> List[dict]:
    from sparse_infer import SparsityConfig, sparsify, unsparsify

    def log(msg):
        if not args.quiet:
            print(msg, flush=True)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    meta = environment(device)
    tuning = os.environ.get("SPARSE_INFER_TUNING")  # launch configs from a tuning file: part of what reruns it
    meta["command"] = ((f"SPARSE_INFER_TUNING={shlex.quote(tuning)} " if tuning else "")
                       + "python bench/bench_decode.py " + " ".join(shlex.quote(a) for a in args.argv))
    t0 = time.perf_counter()
    if model is None:
        model = build_model(args.config, dtype, device, args.seed)
    _sync(device)
    dense_bytes = decode_weight_bytes(model)
    log(f"[decode] {args.config} built on {meta['device_name']} in {time.perf_counter() - t0:.1f}s "
        f"({dense_bytes / 1e9:.2f} GB read per dense step)")
    gen = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    calib = [torch.randint(0, vocab, (1, args.calib_tokens), generator=gen)]
    max_len = cache_len(args)
    rows: List[dict] = []

    def emit(row, res: Optional[DecodeResult] = None):
        rows.append(row)
        write_results(rows, args.out, meta, csv_rows=[row])  # after every row: partial results survive
        if res is not None and res.profile:
            with open(Path(args.out) / "profile.txt", "a") as f:
                f.write(f"=== {args.config} batch {row['batch']} {row['mode']} sparsity {row['sparsity']}: "
                        f"{_fmt(row['kernel_ms'], 3)} ms device time per eager step, "
                        f"{_fmt(row['step_ms'], 3)} ms per timed step (graphs {_fmt(row['graphs'])})\n{res.profile}\n")
        log(f"[decode] batch {row['batch']:>3} {row['mode']:>9} s={_fmt(row['sparsity'])}: "
            f"{_fmt(row['tokens_per_s'], 1)} tok/s (x{_fmt(row['ratio'])}), peak {_fmt(row['peak_mem_gib'])} GiB, "
            f"graphs {_fmt(row['graphs'])} {row['note']}")

    # Dense rows first (one engine - static KV cache - per batch size, kept for the sparse runs),
    # then per (sparsity, mode) one sparsify/calibration serving every batch size.
    state: Dict[int, dict] = {}
    for batch in args.batch:
        prompt = torch.randint(0, vocab, (batch, args.prompt), generator=gen).to(device)
        st = state[batch] = {"prompt": prompt, "engine": make_engine(args, model, batch, max_len), "dense": {}}
        try:
            dense = run_decode(model, st["engine"], prompt, args, args.graphs)
            st["dense"][dense.graphs] = dense
            emit(_row(args, meta, batch, "dense", None, dense, dense, dense_bytes, basis="dense"), dense)
        except Exception as e:  # noqa: BLE001 - a failed row is reported, the run goes on
            st["failed"] = True
            emit(_row(args, meta, batch, "dense", None, None, None, dense_bytes, note=_failure(e)))
    live = [b for b in args.batch if not state[b].get("failed")]

    for sparsity in args.sparsity:
        for mode in args.modes:
            cfg = SparsityConfig(method=args.method, sparsity=sparsity, targets=args.targets, mode=mode,
                                 backend=args.backend)
            deferred = []  # sparse runs whose dense baseline (eager) must be measured once the model is dense
            try:
                sparsify(model, cfg, calibration=calib if cfg.needs_calibration else None, progress=False)
                for batch in live:
                    st = state[batch]
                    try:
                        res = run_decode(model, st["engine"], st["prompt"], args, args.graphs, measure_sparsity=True)
                    except Exception as e:  # noqa: BLE001
                        emit(_row(args, meta, batch, mode, sparsity, None, None, dense_bytes, note=_failure(e)))
                        continue
                    # what this batch size's step reads: measured (union) densities, dense fallbacks
                    sparse_bytes, basis = step_weight_bytes(model, dense_bytes, batch, res.union_density)
                    if res.graphs in st["dense"]:
                        emit(_row(args, meta, batch, mode, sparsity, res, st["dense"][res.graphs], sparse_bytes,
                                  basis=basis), res)
                    else:
                        deferred.append((batch, res, sparse_bytes, basis))
            except Exception as e:  # noqa: BLE001 - sparsify itself failed: one failed row per batch size
                for batch in live:
                    emit(_row(args, meta, batch, mode, sparsity, None, None, dense_bytes, note=_failure(e)))
            finally:
                unsparsify(model)
            for batch, res, sparse_bytes, basis in deferred:
                st = state[batch]
                if res.graphs not in st["dense"]:
                    try:
                        st["dense"][res.graphs] = run_decode(model, st["engine"], st["prompt"], args, res.graphs)
                    except Exception as e:  # noqa: BLE001
                        emit(_row(args, meta, batch, mode, sparsity, res, None, sparse_bytes,
                                  note="dense baseline failed: " + _failure(e), basis=basis))
                        continue
                emit(_row(args, meta, batch, mode, sparsity, res, st["dense"][res.graphs], sparse_bytes,
                          basis=basis), res)
    state.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _failure(e: Exception) -> str:
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    print()
    print(markdown_table(rows))
    failed = [r for r in rows if r["tokens_per_s"] is None]
    return 1 if failed and len(failed) == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
