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

Another GPU can be tuned without editing this file: ``python bench/bench_kernels.py
--final --out DIR`` times the table's config and its alternatives per token bucket and
writes the fastest correct one of each to ``DIR/tuning.json``; ``load_tuning(path)`` (or
the environment variable ``SPARSE_INFER_TUNING=path``) makes CUDA launches use those
configs for the buckets the file names.  The interpreter always keeps its own table.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Union

import torch

__all__ = ["MatmulConfig", "TUNING_ENV", "interpreting", "load_tuning", "matmul_config", "num_sms", "set_override",
           "tuning_dict"]

TUNING_ENV = "SPARSE_INFER_TUNING"  # path of a tuning file (bench/bench_kernels.py --final writes one)
TUNING_FORMAT = "sparse-infer tuning 1"


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

    def __post_init__(self):
        # a config also arrives from a tuning file or a benchmark override: a bad value must fail here, with
        # its name, not as a Triton compile error on the GPU
        for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            v = getattr(self, name)
            if type(v) is not int or v < 1 or v & (v - 1):
                raise ValueError(f"MatmulConfig.{name}={v!r}: tile sizes must be powers of two (tl.arange needs them)")
        if type(self.num_warps) is not int or self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"MatmulConfig.num_warps={self.num_warps!r}: use 1, 2, 4, 8, 16 or 32")
        for name in ("programs_per_sm", "num_stages"):
            v = getattr(self, name)
            if type(v) is not int or v < (1 if name == "num_stages" else 0):
                raise ValueError(f"MatmulConfig.{name}={v!r}: must be an int >= {1 if name == 'num_stages' else 0}")
        if isinstance(self.compact_below, bool) or not isinstance(self.compact_below, (int, float)) \
                or not 0.0 <= self.compact_below <= 1.0:
            raise ValueError(f"MatmulConfig.compact_below={self.compact_below!r}: a density in [0, 1]")
        for f in fields(self):
            if f.default is False and type(getattr(self, f.name)) is not bool:
                raise ValueError(f"MatmulConfig.{f.name}={getattr(self, f.name)!r}: must be True or False")


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
_TUNED: dict = {}  # bucket -> MatmulConfig from a tuning file; CUDA only, in place of _GPU
# what is loaded: the GPU it was measured on, whether it came from $SPARSE_INFER_TUNING; the variable's
# value at the last look (loaded again when it changes); whether the device warning was given
_TUNING = {"device": None, "from_env": False, "env": None, "warned": False}


def _table(bucket: int) -> MatmulConfig:
    """The bucket's config before overrides: the interpreter's, a tuning file's, or the built-in GPU one."""
    if interpreting():
        return _INTERP[bucket]
    _tuning_from_env()
    return _TUNED.get(bucket, _GPU[bucket])


def set_override(bucket: int, **fields) -> None:
    """Replace fields of one bucket's config (benchmark sweeps, tests); no fields: back to the table."""
    _CFG_CACHE.clear()
    if not fields:
        _OVERRIDE.pop(bucket, None)
        return
    _OVERRIDE[bucket] = replace(_table(bucket), **fields)


def tuning_dict(configs: dict, measured: Optional[dict] = None, **info) -> dict:
    """A tuning file's contents, as `load_tuning` reads them: ``configs`` {token bucket: MatmulConfig},
    ``measured`` {bucket: what was timed for it}, ``info`` what they were measured on (device, triton, ...)."""
    measured = measured or {}
    return dict(format=TUNING_FORMAT, **info,
                buckets={str(b): dict(config=asdict(c), **measured.get(b, {})) for b, c in sorted(configs.items())})


def load_tuning(tuning: Union[str, os.PathLike, dict, None]) -> dict:
    """Use a tuning file's launch configs on CUDA for the token buckets it names; ``None``: the built-in table.

    ``tuning`` is the path of a file written by ``python bench/bench_kernels.py --final --out DIR``
    (``DIR/tuning.json``) or its contents as a dict.  Returns {bucket: MatmulConfig}.  A file that does not
    parse as one raises ValueError and leaves the current configs as they were."""
    if tuning is None:
        _TUNED.clear()
        _TUNING.update(device=None, from_env=False, warned=False)
        _CFG_CACHE.clear()
        return {}
    where = "tuning dict" if isinstance(tuning, dict) else f"tuning file {os.fspath(tuning)!r}"
    if isinstance(tuning, dict):
        data = tuning
    else:
        try:
            with open(tuning) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {where}: {e}; write one with `python bench/bench_kernels.py --final "
                             f"--out DIR` (DIR/tuning.json)") from None
    if not isinstance(data, dict) or data.get("format") != TUNING_FORMAT or not isinstance(data.get("buckets"), dict):
        raise ValueError(f"{where} is not a sparse-infer tuning file (expected format {TUNING_FORMAT!r} and a "
                         f"'buckets' table); write one with `python bench/bench_kernels.py --final --out DIR`")
    names = {f.name for f in fields(MatmulConfig)}
    configs = {}
    for key, entry in data["buckets"].items():
        if key not in {str(b) for b in _GPU}:
            raise ValueError(f"{where}: token bucket {key!r} is not one of {sorted(_GPU)}")
        cfg = entry.get("config") if isinstance(entry, dict) else None
        if not isinstance(cfg, dict):
            raise ValueError(f"{where}: bucket {key} has no 'config' table")
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"{where}: bucket {key} names unknown MatmulConfig fields {unknown} (known: {sorted(names)})")
        try:
            configs[int(key)] = MatmulConfig(**cfg)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: bucket {key}: {e}") from None
    _TUNED.clear()
    _TUNED.update(configs)
    _TUNING.update(device=data.get("device"), from_env=False, warned=False)
    _CFG_CACHE.clear()
    return dict(configs)


def _tuning_from_env() -> None:
    """Follow ``$SPARSE_INFER_TUNING``: load it when it is set or changed since the last look; when it is
    unset, drop what it had loaded (a `load_tuning` call's configs stay)."""
    path = os.environ.get(TUNING_ENV) or None
    if path == _TUNING["env"]:
        return
    _TUNING["env"] = path
    if path is None:
        if _TUNING["from_env"]:
            load_tuning(None)
        return
    try:
        load_tuning(path)
    except ValueError as e:
        _TUNING["env"] = None  # the next call raises again instead of silently running the table
        raise ValueError(f"${TUNING_ENV}: {e}") from None
    _TUNING["from_env"] = True


def _check_tuned_device(device: torch.device) -> None:
    if _TUNING["warned"] or not _TUNING["device"] or not torch.cuda.is_available():
        return
    _TUNING["warned"] = True
    name = torch.cuda.get_device_name(device)
    if name != _TUNING["device"]:
        warnings.warn(f"sparse-infer: the loaded tuning was measured on {_TUNING['device']!r}, this GPU is {name!r}; "
                      f"its configs run but may be slower than on that GPU (retune with bench/bench_kernels.py --final)",
                      stacklevel=3)


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


# Host-side integer helpers for the launchers: triton.cdiv / next_power_of_2 are ConstexprFunction
# objects since triton 3.6, ~1.5-2 µs per call (measured on the CPU), paid several times per launch.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def matmul_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> MatmulConfig:
    """The launch configuration for an (M tokens) x (K -> N) sparse matmul (cached: launch overhead)."""
    key = (M if M <= 64 else 65, dtype, device.type, interpreting())
    if device.type == "cuda" and not key[3]:
        _tuning_from_env()  # the variable set or changed since the last call: (re)loads, clearing the cache
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
        cfg = _table(b)
        if b in _TUNED:
            _check_tuned_device(device)
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
        return replace(cfg, BLOCK_M=max(16, min(cfg.BLOCK_M, next_pow2(M))))
    return replace(cfg, BLOCK_M=min(max(2, next_pow2(M)), max(2, cfg.BLOCK_M)))


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
