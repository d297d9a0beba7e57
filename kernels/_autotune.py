"""Launch configurations for the sparse-infer kernels.

Tested with triton 3.6 (H100, CUDA) and triton 3.9 (CPU interpreter).

One deterministic configuration per *shape class* instead of ``triton.autotune``:
the kernels are meant to be captured in CUDA graphs and called once per layer
per decode step, so a config must be known before the first launch and must not
depend on data.  The table below was measured on an H100 (see
``bench/KERNEL_NOTES.md``); the classes are bounded (a few buckets of tokens and
output size), so at most a handful of kernel variants get compiled per dtype.

Under ``TRITON_INTERPRET=1`` a single tiny configuration is used (the
interpreter ignores warps/stages, and small tiles keep the CPU tests fast while
still exercising the split-K reduction and the masked edges).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

__all__ = ["MatmulConfig", "interpreting", "matmul_config", "num_sms", "set_override"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class MatmulConfig:
    BLOCK_M: int  # token tile (1 => GEMV path); the launcher shrinks it to next_pow2(M) on the FMA path
    BLOCK_N: int  # output-feature tile
    BLOCK_K: int  # input-channel tile (rows of W^T per iteration)
    programs_per_sm: int  # split-K is chosen so that n_tiles * split_k ~ programs_per_sm * SMs
    num_warps: int
    num_stages: int
    use_dot: bool = False  # tensor-core tl.dot (BLOCK_M >= 16) instead of fp32 FMAs
    pregate: bool = False  # gate in a separate pass (masked x + union of active channels) instead of in-kernel
    compact: bool = False  # separate gate pass that also compacts active channel ids; the matmul loops over them
    # compact only when the gate's expected density (k/K for top-k, the hint a module gives its
    # thresholds) is at most this; 0 never, `compact=True` always
    compact_below: float = 0.0
    # one token: accumulate a (BLOCK_K, BLOCK_N) fp32 tile and reduce over K once after the loop
    # (no per-iteration cross-warp reduction, so several warps per program cost no barriers there)
    acc_2d: bool = False
    # bf16 column-major weights: read column pairs as int32 and widen with bit operations (no tl.dot)
    bf16_pairs: bool = False
    # issue the loads that pick the next block's weight rows (x and its gate, or the next active ids)
    # while this block's rows are in flight: one memory round trip per iteration instead of two
    prefetch: bool = False
    # tensor-core dot with the operands swapped: the W^T tile (BLOCK_N outputs) is the MMA's M side and the
    # tokens, padded to 16, its N side.  With BLOCK_N >= 64 and 4 warps Triton emits sm_90 wgmma reading W
    # from shared memory (cp.async, pipelined over num_stages) instead of mma.sync with the tokens as M.  Also
    # serves M = 1: gate in-kernel on the one row unless `pregate` (with `prefetch` and >= 3 stages the
    # copies stay pipelined: an in-kernel gate without it leaves none in flight); M > 1 always pregates
    swap_ab: bool = False


# token buckets: 1 | 2..8 | 9..16 | 17..32 | 33..64
_INTERP = {
    1: MatmulConfig(1, 64, 32, 0, 1, 1, compact_below=0.35),  # the GPU policy, so CI runs both M=1 paths
    8: MatmulConfig(8, 64, 32, 0, 1, 1, use_dot=False, pregate=False, compact_below=0.5),
    16: MatmulConfig(16, 64, 32, 0, 1, 1, use_dot=True, pregate=True),
    32: MatmulConfig(32, 64, 32, 0, 1, 1, use_dot=True, pregate=False),
    64: MatmulConfig(32, 64, 32, 0, 1, 1, use_dot=True, pregate=True),
}

# GPU table, measured on H100, bf16, Llama-3-8B MLP shapes, CUDA-graph timing
# (bench/KERNEL_NOTES.md, bench/final_h100_run3.log):
# * M=1: BLOCK_N=128, BLOCK_K=64, 1 warp, ~8 programs/SM was the best of 16 configs
#   (28.6 us at 50 % on 4096->14336; 256/64/2 warps: 33.3 us; 256/128/4 warps: 46.2 us).
# * M=2..64: tensor-core dot with the tokens padded to 16 and the gate in a separate pass
#   ("pregate": 35-49 us at M=4, 48-52 us shared M=16); the fp32-FMA path (155-169 us at M=4)
#   and the in-kernel gate with tl.dot (79-87 us shared M=16) were far slower.
# * M=1, compacted ids (bench/h100/h100_final_run4.log): 12.2 / 12.6 us at 90 % against 19.5 / 17.8
#   for the masked loop, 28.7 / 29.3 at 50 % against 28.6 / 27.5 (4096->14336 / 14336->4096).  A line
#   through each pair puts the crossover at density 0.49 / 0.41, so compaction is on at <= 0.35;
#   70 % sits between the measured points and is to be timed (gpu_check.sh --final rows).
# * M=4, shared mask at 50 % (same log): compacted ids 34.8 / 33.6 us against 38.9 / 35.7 with the
#   pregate pass, so shared masks of 2..8 tokens compact at density <= 0.5.  Per-token masks never do
#   (their union is read: 54.7 / 53.3 us compacted against 49.1 / 46.6); at M=16 it was a draw.
_GPU = {
    1: MatmulConfig(1, 128, 64, 8, 1, 1, compact_below=0.35),
    8: MatmulConfig(16, 128, 64, 4, 4, 2, use_dot=True, pregate=True, compact_below=0.5),
    16: MatmulConfig(16, 128, 64, 4, 4, 2, use_dot=True, pregate=True),
    32: MatmulConfig(32, 128, 64, 4, 4, 2, use_dot=True, pregate=True),
    64: MatmulConfig(64, 128, 64, 4, 4, 2, use_dot=True, pregate=True),
}

_OVERRIDE: dict = {}


def set_override(bucket: int, **fields) -> None:
    """Replace fields of one bucket's config (benchmark sweeps, tests); no fields: back to the table."""
    _CFG_CACHE.clear()
    if not fields:
        _OVERRIDE.pop(bucket, None)
        return
    base = _INTERP[bucket] if interpreting() else _GPU[bucket]
    _OVERRIDE[bucket] = replace(base, **fields)


_SM_CACHE: dict = {}


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_CACHE:
        _SM_CACHE[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_CACHE[idx]


def token_bucket(M: int) -> int:
    for b in (1, 8, 16, 32):
        if M <= b:
            return b
    return 64


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def matmul_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> MatmulConfig:
    """The launch configuration for an (M tokens) x (K -> N) sparse matmul (cached: launch overhead)."""
    key = (M if M <= 64 else 65, dtype, device.type, interpreting())
    cfg = _CFG_CACHE.get(key)
    if cfg is None:
        cfg = _CFG_CACHE[key] = _matmul_config(M if M <= 64 else 65, dtype, device)
    return cfg


_CFG_CACHE: dict = {}


def _matmul_config(M: int, dtype: torch.dtype, device: torch.device) -> MatmulConfig:
    b = token_bucket(M)
    if b in _OVERRIDE:
        cfg = _OVERRIDE[b]
    elif interpreting() or device.type != "cuda":
        cfg = _INTERP[b]
    else:
        cfg = _GPU[b]
        # fp32 weight tiles take twice the registers: above 128 values of W per thread the one-warp GEMV
        # spills (sm_90 SASS, 128x64 tile: 256 B of stack; 64x64: 202 registers, none)
        if dtype == torch.float32 and (cfg.BLOCK_N * cfg.BLOCK_K * max(cfg.BLOCK_M, 1) > 256 * 64
                                       or cfg.BLOCK_N * cfg.BLOCK_K > 128 * 32 * cfg.num_warps):
            cfg = replace(cfg, BLOCK_N=max(32, cfg.BLOCK_N // 2))
    if cfg.swap_ab:  # the tensor-core path below, for one token too
        cfg = replace(cfg, use_dot=True, pregate=cfg.pregate or M > 1)
    elif M == 1:
        return replace(cfg, BLOCK_M=1, use_dot=False, pregate=False)
    if cfg.use_dot:
        return replace(cfg, BLOCK_M=max(16, min(cfg.BLOCK_M, _pow2(M))))
    return replace(cfg, BLOCK_M=min(max(2, _pow2(M)), max(2, cfg.BLOCK_M)))


def split_k(n_tiles: int, m_tiles: int, k_blocks: int, cfg: MatmulConfig, device: torch.device):
    """(split_k, k_blocks_per_split): enough programs to fill the GPU, never an empty split."""
    if interpreting() or device.type != "cuda":
        target = max(1, min(k_blocks, 3))
    else:
        target = max(1, (cfg.programs_per_sm * num_sms(device)) // max(1, n_tiles * m_tiles))
    s = max(1, min(target, k_blocks))
    per = -(-k_blocks // s)
    s = -(-k_blocks // per)
    return s, per
