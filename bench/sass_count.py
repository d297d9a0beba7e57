"""Instruction counts of the sparse-matmul kernel for sm_90, compiled here without a GPU.

The M = 1 kernel is issue-bound (bench/KERNEL_NOTES.md, "Profile"), so the machine code of its
K loop says much about its speed before a device can time it.  This compiles
``_sparse_mm_kernel`` for an H100 (sm_90) with the ptxas that ships in the triton wheel,
specialised as a real launch on the Llama-3-8B up projection (4096 -> 14336, column-major bf16
weight: unit column stride, row stride a multiple of 16), and prints per variant: registers,
stack (spills), instructions in the kernel and in its longest loop (the K loop), the GPU-wide
fences (MEMBAR.GPU) in the whole kernel, the cp.async groups the loop keeps in flight while it
waits (tensor-core paths; "-" where the loop loads straight into registers), and the loop's most
frequent opcodes.  The split-K epilogue needs one fence (the release on the tile counter); each
extra one puts a serial L2 round trip on the kernel's tail.

    python bench/sass_count.py                    # every variant (the tables of KERNEL_NOTES)
    python bench/sass_count.py --variants default pairs --opcodes 12

Numbers in the notes were taken with triton 3.6 (the device's version); other versions
allocate registers differently.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

# name -> (compile options, kernel constexprs): M = 1 unless BLOCK_M says otherwise
VARIANTS = {
    "default": (dict(num_warps=1), {}),
    "pairs": (dict(num_warps=1), dict(BF16_PAIRS=True)),
    "compact": (dict(num_warps=1), dict(MODE=6)),
    "compact+pairs": (dict(num_warps=1), dict(MODE=6, BF16_PAIRS=True)),
    "prefetch": (dict(num_warps=1), dict(PREFETCH=True)),
    "prefetch+pairs": (dict(num_warps=1), dict(PREFETCH=True, BF16_PAIRS=True)),
    "compact+prefetch": (dict(num_warps=1), dict(MODE=6, PREFETCH=True)),
    "rank-aware": (dict(num_warps=1), dict(LOWRANK=True)),
    "acc2d-4warps": (dict(num_warps=4), dict(ACC_2D=True)),
    "acc2d-4warps+pairs": (dict(num_warps=4), dict(ACC_2D=True, BF16_PAIRS=True)),
    "m16-dot-pregated": (dict(num_warps=4, num_stages=2), dict(BLOCK_M=16, MODE=5, USE_DOT=True, DOT_NATIVE=True)),
    "m16-dot-3stages": (dict(num_warps=4, num_stages=3), dict(BLOCK_M=16, MODE=5, USE_DOT=True, DOT_NATIVE=True)),
    "m16-compact": (dict(num_warps=4, num_stages=2), dict(BLOCK_M=16, MODE=6, USE_DOT=True, DOT_NATIVE=True)),
    "m16-compact-3stages": (dict(num_warps=4, num_stages=3), dict(BLOCK_M=16, MODE=6, USE_DOT=True, DOT_NATIVE=True)),
    "m16-compact-4stages": (dict(num_warps=4, num_stages=4), dict(BLOCK_M=16, MODE=6, USE_DOT=True, DOT_NATIVE=True)),
    # swap_ab (stop 22): the W^T tile as wgmma's M side, 1..16 tokens padded to 16 as its N side
    "swap-pregated-3stages": (dict(num_warps=4, num_stages=3), dict(BLOCK_M=16, MODE=5, USE_DOT=True, DOT_NATIVE=True,
                                                                    SWAP_AB=True)),
    "swap-pregated-3stages-bk128": (dict(num_warps=4, num_stages=3), dict(BLOCK_M=16, MODE=5, USE_DOT=True,
                                                                          DOT_NATIVE=True, SWAP_AB=True, BLOCK_K=128)),
    "swap-compact-3stages": (dict(num_warps=4, num_stages=3), dict(BLOCK_M=16, MODE=6, USE_DOT=True, DOT_NATIVE=True,
                                                                   SWAP_AB=True)),
    # one token, threshold gate in-kernel on its row, the next block's gate prefetched (no gate launch)
    "swap-one-token-prefetch-4stages": (dict(num_warps=4, num_stages=4), dict(BLOCK_M=16, MODE=0, USE_DOT=True,
                                                                              DOT_NATIVE=True, SWAP_AB=True,
                                                                              ONE_TOKEN=True, PREFETCH=True)),
}


def _ptx_bin(tool: str) -> str:
    import triton.backends.nvidia as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", tool)


def compile_variant(options: dict, consts: dict, N: int = 14336, K: int = 4096):
    """Compile ``_sparse_mm_kernel`` for sm_90 as ``_launch`` would call it on (N, K)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import torch

    from sparse_infer.kernels import sparse_matmul as sm
    from sparse_infer.kernels.gating import compact_ids_dtype

    const = dict(MODE=0, INVERT=False, HAS_SCALE=False, HAS_BIAS=False, LOWRANK=False, BLOCK_M=1, BLOCK_N=128,
                 BLOCK_K=64, SPLIT_K=9, USE_DOT=False, DOT_NATIVE=False, ACC_2D=False, EVEN_N=N % 128 == 0,
                 BF16_PAIRS=False, PREFETCH=False, SWAP_AB=False, ONE_TOKEN=False)
    const.update(consts)
    R = 320 if const["LOWRANK"] else 0
    k_blocks = 7  # K blocks per split (ints below): the compaction block is one split's channels
    ids = compact_ids_dtype(k_blocks * const["BLOCK_K"], const["USE_DOT"] and options.get("num_stages", 1) >= 3)
    ptr = {"x_ptr": "bf16", "w_ptr": "bf16", "y_ptr": "bf16", "b_ptr": "bf16", "t_ptr": "fp32", "s_ptr": "fp32",
           # compacted ids in the dtype the launcher picks for this loop
           "gm_ptr": {torch.int16: "i16", torch.int32: "i32"}[ids] if const["MODE"] == 6 else "i8",
           "cc_ptr": "i32", "z_ptr": "fp32", "lb_ptr": "bf16",
           "ws_ptr": "fp32", "cnt_ptr": "i32"}
    # column-major W (stride_wn = 1, stride_wk = N); x, y, z (M, R) and B (R, N) contiguous
    ints = dict(M=const["BLOCK_M"], N=N, K=K, R=R, stride_xm=K, stride_xk=1, stride_wk=N, stride_wn=1,
                stride_ym=N, stride_yn=1, stride_t=0, stride_gm=0, stride_gk=1, stride_zm=R, stride_zr=1,
                stride_br=N, stride_bn=1, K_BLOCKS_PER_SPLIT=k_blocks, R_BLOCKS_PER_SPLIT=1)
    kern = sm._sparse_mm_kernel
    sig, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kern.arg_names):
        if name in const:
            sig[name], constexprs[(i,)] = "constexpr", const[name]
        elif name in ptr:
            sig[name], attrs[(i,)] = "*" + ptr[name], [["tt.divisibility", 16]]
        elif ints[name] == 1:  # Triton specialises integer arguments equal to 1
            sig[name], constexprs[(i,)] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kern, signature=sig, constexprs=constexprs, attrs=attrs)
    opts = dict(num_warps=1, num_stages=1)
    opts.update(options)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


_INS = re.compile(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def analyse(compiled) -> dict:
    """Registers, stack and instruction counts of a compiled kernel (whole kernel and its longest loop)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([_ptx_bin("cuobjdump"), "--dump-resource-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_ptx_bin("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    ins, labels, pending = [], {}, []
    for line in sass.splitlines():
        lab = re.match(r"\s*\.L_x_(\d+):", line)
        if lab:
            pending.append(lab.group(1))
            continue
        hit = _INS.match(line)
        if hit:
            addr = int(hit.group(1), 16)
            for p in pending:
                labels[p] = addr
            pending = []
            ins.append((addr, hit.group(2), line))
    loop, loop_lines = [], []  # the longest backward branch's body
    for addr, op, line in ins:
        back = re.search(r"BRA\s.*?\.L_x_(\d+)", line)
        if back and labels.get(back.group(1), addr + 1) < addr:
            body = [(o, text) for a, o, text in ins if labels[back.group(1)] <= a <= addr]
            if len(body) > len(loop):
                loop, loop_lines = [o for o, _ in body], [text for _, text in body]
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), instructions=len(ins), loop=len(loop),
                ldg128=sum(1 for _, o, line in ins if o == "LDG" and ".128" in line),
                fences=sum(1 for _, o, line in ins if o == "MEMBAR" and ".GPU" in line),
                # cp.async groups the K loop lets stay in flight while it waits (DEPBAR.LE SB0, n): 0 = the
                # loop waits for every copy it issued, i.e. no overlap of the weight stream with the math
                in_flight=max((int(m.group(1), 16) for o, line in zip(loop, loop_lines)
                               for m in [re.search(r"DEPBAR\.LE SB0, (0x[0-9a-f]+)", line)] if m), default=None),
                loop_ops=collections.Counter(loop),
                # tensor-core instructions per K iteration: HGMMA = sm_90 wgmma, HMMA = mma.sync
                mma=", ".join(f"{o} {n}" for o, n in collections.Counter(
                    o for o in loop if o in ("HGMMA", "HMMA")).items()) or "-",
                shared=getattr(compiled.metadata, "shared", 0))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--opcodes", type=int, default=8, help="most frequent loop opcodes to print")
    args = p.parse_args(argv)
    import triton
    print(f"triton {triton.__version__}, sm_90, 4096 -> 14336 bf16, column-major weight")
    print("| variant | registers | stack B | instructions | K-loop instructions (per warp) | warp-instructions "
          "per 1k weights | LDG.128 | GPU fences | copy groups in flight | MMA per K iteration | shared KB | "
          "loop opcodes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for name in args.variants:
        options, consts = VARIANTS[name]
        a = analyse(compile_variant(options, consts))
        # the loop body covers one BLOCK_K x BLOCK_N tile (64 x 128 unless the variant says) per iteration, split
        # over the warps
        per_k = a["loop"] * options.get("num_warps", 1) / (consts.get("BLOCK_K", 64) * consts.get("BLOCK_N", 128) / 1024)
        ops = ", ".join(f"{o} {n}" for o, n in a["loop_ops"].most_common(args.opcodes))
        print(f"| {name} | {a['regs']} | {a['stack']} | {a['instructions']} | {a['loop']} | {per_k:.0f} | "
              f"{a['ldg128']} | {a['fences']} | {'-' if a['in_flight'] is None else a['in_flight']} | {a['mma']} | "
              f"{a['shared'] / 1024:.0f} | {ops} |", flush=True)


if __name__ == "__main__":
    main()
