"""Where the accuracy of MLP activation sparsity goes (issue 4): a study of what a byte budget
on the MLP can buy on SmolLM2-135M, beyond the calibrated methods of `calibration_study.py`.

Every row spends the same share of the MLP's weight bytes per token (``--levels``, e.g. 50 %
sparsity = half the bytes) and is scored by held-out perplexity against the dense model:

* ``input``: per linear, the top ``(1 - s)`` input channels of each token, uniform over
  layers, ranked by ``|x_i|`` (TEAL), ``|x_i|·||W[:, i]||`` (R-Sparse / WINA) or
  ``|x_i|·||√f ⊙ W[:, i]||`` with ``f`` the diagonal Fisher of the linear's output (the mean
  squared gradient of ``log p(y)``, ``y`` sampled from the model, over the calibration text):
  the expected loss increase of dropping channel ``i``, a static scale the kernels accept.
* ``neuron oracle``: drop the intermediate neurons ``j`` of each MLP with the smallest
  ``|silu(g_j)|`` (CATS rule) or ``|silu(g_j)·u_j|`` (the exact down_proj input), reading
  ``(1 - s)`` of gate, up and down.  Choosing by ``g`` or ``h`` needs all of gate (and up): an
  upper bound of what a free, perfect neuron predictor would give, not a method.
* ``neuron predictor``: the same, ranked by ``silu(ĝ)·û`` from activation-aware rank-``r``
  factors of gate and up (whitened by the calibration inputs' second moments), the factors'
  bytes counted in the budget.
* ``neuron predictor, input top-p``: two passes; the first reads the columns of gate and up
  for the top ``p`` share of input channels (``|x_i|``) and ranks the neurons by the
  approximate ``silu(g̃)·ũ``; the second reads the chosen neurons' rows of gate and up and
  columns of down in full.  Both passes count (``2p/3`` of the MLP, plus the neurons').
* ``neuron predictor, trained rank r`` (Deja Vu style): per MLP, a two-layer ReLU network
  ``x -> r -> neurons`` trained on the calibration tokens (binary cross-entropy against each
  token's top neurons by ``|h|``), its bytes counted; ranks neurons by its output.

    python bench/mlp_limits_study.py                 # ~9 min on 2 CPU cores
    python bench/mlp_limits_study.py --levels 0.5 --eval-windows 8 --out limits.json

Evaluation reads the first 80 % of the token stream, calibration (Fisher, second moments)
the last 20 % (`sparse_infer.data.split_tokens`): they never overlap.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_infer import reference as ref
from sparse_infer.evaluate import perplexity
from sparse_infer.patch import decoder_layers, find_family

IMPORTANCES = ("abs", "norm", "fisher")
RANKS = (32, 64, 128)
PREDICTOR_DENSITIES = (0.15, 0.3)
TRAINED_RANKS = (96,)


@contextlib.contextmanager
def replaced_forward(modules: Dict[nn.Module, object]):
    """Temporarily swap ``module.forward``; restored on exit whatever happens."""
    saved = {m: m.__dict__.get("forward") for m in modules}
    try:
        for m, fn in modules.items():
            m.forward = fn
        yield
    finally:
        for m, old in saved.items():
            if old is None:
                del m.forward  # back to the class's forward
            else:
                m.forward = old


def mlps(model):
    fam = find_family(model)
    return [getattr(layer, fam.mlp_attr) for layer in decoder_layers(model)], fam.mlp_linears


def fisher_diag(model, windows, seed: int = 0) -> Dict[nn.Linear, torch.Tensor]:
    """Per MLP linear, the mean over tokens of the squared gradient of ``log p(y)`` at its output,
    ``y`` sampled from the model's own next-token distribution (the diagonal of the Fisher)."""
    blocks, names = mlps(model)
    lins = [getattr(b, n) for b in blocks for n in names]
    acc = {m: 0.0 for m in lins}
    count = 0

    def hook(m, _inp, out):
        out.register_hook(lambda g, m=m: acc.__setitem__(m, acc[m] + g.reshape(-1, g.shape[-1]).double().pow(2).sum(0)))

    hooks = [m.register_forward_hook(hook) for m in lins]
    flags = [p.requires_grad for p in model.parameters()]
    gen = torch.Generator().manual_seed(seed)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.enable_grad():
            for w in windows:
                emb = model.get_input_embeddings()(w.unsqueeze(0)).detach().requires_grad_()
                logits = model(inputs_embeds=emb).logits[0].float()
                y = torch.multinomial(logits.detach().softmax(-1), 1, generator=gen)[:, 0]
                F.cross_entropy(logits, y, reduction="sum").backward()
                count += len(w)
    finally:
        for h in hooks:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return {m: (a / count).float() for m, a in acc.items()}


@torch.no_grad()
def input_moments(model, windows) -> List[torch.Tensor]:
    """Per MLP, ``E[x xᵀ]`` of its input over the calibration windows (float64)."""
    blocks, _ = mlps(model)
    acc = [0.0] * len(blocks)
    count = [0]

    def pre(i):
        def hook(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            acc[i] = acc[i] + x.T @ x
        return hook

    hooks = [b.register_forward_pre_hook(pre(i)) for i, b in enumerate(blocks)]
    try:
        for w in windows:
            model(w.unsqueeze(0))
            count[0] += len(w)
    finally:
        for h in hooks:
            h.remove()
    return [a / count[0] for a in acc]


def whitened_bases(weight: torch.Tensor, moment: torch.Tensor):
    """``(A, B)`` of full rank; for any ``r``, ``x ↦ (x A[:, :r]) B[:r]`` is the rank-``r`` map of
    least ``E||(W - L) x||²`` on inputs of second moment ``moment`` (projection on the top left
    singular vectors of ``W·moment^½``).  One eigendecomposition and one SVD serve every rank."""
    W = weight.detach().double().cpu()
    evals, Q = torch.linalg.eigh(moment)
    root = (Q * evals.clamp_min(0).sqrt()) @ Q.T
    U = torch.linalg.svd(W @ root, full_matrices=False).U
    return (W.T @ U).to(weight.dtype), U.T.contiguous().to(weight.dtype)


def _input_forward(lin: nn.Linear, sparsity: float, scale: Optional[torch.Tensor]):
    k = int(round((1 - sparsity) * lin.in_features))

    def forward(x):
        return F.linear(ref.apply_mask(x, ref.topk_mask(x, k, scale)), lin.weight, lin.bias)
    return forward


def _neuron_forward(mlp, names, drop: float, rule: str, factors=None, density: float = 0.0):
    g_name, u_name, d_name = names

    def forward(x):
        gate, up, down = getattr(mlp, g_name), getattr(mlp, u_name), getattr(mlp, d_name)
        g = mlp.act_fn(gate(x))
        h = g * up(x)
        if rule == "gate":
            score = g
        elif rule == "h":
            score = h
        elif rule == "input":  # first pass: gate and up on the top `density` input channels
            xs = ref.apply_mask(x, ref.topk_mask(x, max(1, int(round(density * x.shape[-1])))))
            score = mlp.act_fn(gate(xs)) * up(xs)
        elif rule == "trained":
            score = factors(x).sigmoid()  # sigmoid: the ranking must not see |logit| of "off" neurons
        else:  # low-rank predictor of h
            (ag, bg), (au, bu) = factors
            score = mlp.act_fn((x @ ag) @ bg) * ((x @ au) @ bu)
        k = int(round((1 - drop) * h.shape[-1]))
        return down(ref.apply_mask(h, ref.topk_mask(score, k)))
    return forward


@torch.no_grad()
def mlp_samples(model, windows):
    """Per MLP, its inputs ``x`` (tokens, hidden) and ``|h|`` (tokens, intermediate) over the windows.

    Held in memory for training: tokens x layers x (hidden + intermediate) floats, about 1 GB
    for SmolLM2 at the default 8 x 512 calibration tokens."""
    blocks, names = mlps(model)
    xs, hs = [[] for _ in blocks], [[] for _ in blocks]

    def hook(i):
        def f(m, args, _out):
            x = args[0].reshape(-1, args[0].shape[-1])
            gate, up = getattr(m, names[0]), getattr(m, names[1])
            xs[i].append(x.clone())
            hs[i].append((m.act_fn(gate(x)) * up(x)).abs())
        return f

    hooks = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        for w in windows:
            model(w.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(a) for a in xs], [torch.cat(a) for a in hs]


def train_predictor(x: torch.Tensor, h_abs: torch.Tensor, keep: int, rank: int, steps: int = 200,
                    batch: int = 1024, seed: int = 0) -> nn.Module:
    """A ``x -> rank -> neurons`` ReLU network whose logits rank the ``keep`` largest ``|h|`` first
    (binary cross-entropy against each token's top-``keep`` set; inputs standardized)."""
    gen = torch.Generator().manual_seed(seed)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(x.shape[1], rank), nn.ReLU(), nn.Linear(rank, h_abs.shape[1]))
    labels = ref.topk_mask(h_abs, keep).float()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            loss = F.binary_cross_entropy_with_logits(net((x[idx] - mu) / sd), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.requires_grad_(False)
    return lambda z: net((z - mu) / sd)


def run(model, eval_windows, calib_windows, levels=(0.5, 0.7), importances=IMPORTANCES, ranks=RANKS,
        seed: int = 0, log=print, densities=PREDICTOR_DENSITIES, trained_ranks=TRAINED_RANKS,
        train_steps: int = 200) -> List[dict]:
    """The study's rows (dicts with ``family``, ``rule``, ``sparsity``, ``ppl``, ``ratio``)."""
    blocks, names = mlps(model)
    lins = [getattr(b, n) for b in blocks for n in names]
    rows = []

    def add(family, rule, sparsity, seconds, **kw):
        ppl = perplexity(model, eval_windows)
        r = {"family": family, "rule": rule, "sparsity": sparsity, "ppl": ppl,
             "ratio": ppl / rows[0]["ppl"] if rows else 1.0, "seconds": round(time.time() - seconds, 1), **kw}
        rows.append(r)
        log(json.dumps(r))

    add("dense", "-", 0.0, time.time())
    t = time.time()
    fisher = fisher_diag(model, calib_windows, seed) if "fisher" in importances else {}
    moments = input_moments(model, calib_windows) if ranks else []
    samples = mlp_samples(model, calib_windows) if trained_ranks else None
    log(f"calibration passes (Fisher, input moments): {time.time() - t:.0f} s")
    g0 = getattr(blocks[0], names[0])  # every MLP of the model has the same shape
    mlp_weights = 3 * g0.in_features * g0.out_features
    # per MLP, (gate, up) bases of the whitened low-rank predictor: sliced per rank, not recomputed
    bases = [(whitened_bases(getattr(b, names[0]).weight, mom), whitened_bases(getattr(b, names[1]).weight, mom))
             for b, mom in zip(blocks, moments)]

    def lowrank(r):
        return [((ag[:, :r], bg[:r]), (au[:, :r], bu[:r])) for (ag, bg), (au, bu) in bases]

    def predictor_row(rule, s, share, forwards):
        """One ``neuron predictor`` row; ``forwards(drop)`` gives the swapped MLP forwards."""
        drop = s + share  # the predictor's bytes come out of the neurons' share
        if drop >= 1:
            log(f"{rule}: the predictor alone costs {share:.0%} of the MLP, over the budget")
            return
        t = time.time()
        with replaced_forward(forwards(drop)):
            add("neuron predictor", rule, s, t, neuron_drop=drop, predictor_share=share)

    def trained(r, drop):
        keep = int(round((1 - drop) * g0.out_features))
        nets = [train_predictor(x, h, keep, r, train_steps, seed=seed + i) for i, (x, h) in enumerate(zip(*samples))]
        return {b: _neuron_forward(b, names, drop, "trained", net) for b, net in zip(blocks, nets)}

    scales = {
        "abs": {m: None for m in lins},
        "norm": {m: ref.column_norms(m.weight) for m in lins},
        "fisher": {m: (fisher[m][:, None] * m.weight.detach().float().pow(2)).sum(0).sqrt() for m in fisher},
    }
    for s in levels:
        for imp in importances:
            t = time.time()
            with replaced_forward({m: _input_forward(m, s, scales[imp][m]) for m in lins}):
                add("input top-k", imp, s, t)
        for rule in ("gate", "h"):
            t = time.time()
            with replaced_forward({b: _neuron_forward(b, names, s, rule) for b in blocks}):
                add("neuron oracle", rule, s, t)
        for r in ranks:  # low-rank factors of gate and up
            f = lowrank(r)
            predictor_row(f"rank {r}", s, 2 * r * (g0.in_features + g0.out_features) / mlp_weights,
                          lambda drop: {b: _neuron_forward(b, names, drop, "lowrank", fb) for b, fb in zip(blocks, f)})
        for p in densities:  # the first pass reads p of gate's and up's columns
            predictor_row(f"input top-{p:.0%}", s, 2 * p / 3,
                          lambda drop: {b: _neuron_forward(b, names, drop, "input", density=p) for b in blocks})
        for r in trained_ranks:  # x -> r -> neurons
            predictor_row(f"trained rank {r}", s, r * (g0.in_features + g0.out_features) / mlp_weights,
                          lambda drop: trained(r, drop))
    return rows


def markdown(rows: List[dict]) -> str:
    out = ["| rows | rule | MLP sparsity (bytes) | ppl | × dense |", "|---|---|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['family']} | {r['rule']} | {r['sparsity']:.0%} | {r['ppl']:.2f} | {r['ratio']:.3f} |")
    return "\n".join(out)


@torch.no_grad()  # not set_grad_enabled(False): tests call main in-process
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M)")
    p.add_argument("--text-file", default=None)
    p.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--ranks", type=int, nargs="*", default=list(RANKS))
    p.add_argument("--densities", type=float, nargs="*", default=list(PREDICTOR_DENSITIES),
                   help="input shares read by the two-pass neuron predictor's first pass")
    p.add_argument("--trained-ranks", type=int, nargs="*", default=list(TRAINED_RANKS),
                   help="hidden widths of the trained (Deja Vu style) neuron predictor")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    for s in args.levels:
        if not 0.0 <= s < 1.0:
            p.error(f"--levels must lie in [0, 1), got {s}")
    for d in args.densities:
        if not 0.0 < d <= 1.0:
            p.error(f"--densities must lie in (0, 1], got {d}")

    from sparse_infer import data as D
    from sparse_infer.models import load_model

    model, tok = load_model(args.model)
    text = D.load_text(args.text_file)
    eval_ids, calib_ids, _ = D.split_tokens(D.tokenize(text.text, tok))
    evals = D.windows(eval_ids, args.window, args.eval_windows)
    calib = D.windows(calib_ids, args.window, args.calib_windows)
    rows = run(model, evals, calib, args.levels, ranks=args.ranks, seed=args.seed, densities=args.densities,
               trained_ranks=args.trained_ranks, train_steps=args.train_steps)
    print(f"\n{args.model or 'SmolLM2-135M'}, {text.source}: {len(evals)} x {args.window} held-out tokens, "
          f"calibration {len(calib)} x {args.window} tokens of the last 20 %\n")
    print(markdown(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "eval_windows": len(evals), "calib_windows": len(calib), "window": args.window,
                       "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
