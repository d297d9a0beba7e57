#!/bin/bash
# Second device-machine call (`run` tool), after gpu_check.sh: end-to-end decode on Llama-3-8B shapes
# (random bf16 weights), CUDA graphs, batch 1; then the same with the step compiled (--compile, inductor),
# dense and sparse alike (timeouts sum to 590 s: one call).  Results land in $OUT/decode_graph and
# $OUT/decode_compiled (decode.md/.csv, log).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
ln -sfn ../kernels sparse_infer/kernels
mkdir -p $OUT/decode_graph $OUT/decode_compiled
# tiny config first: graph capture of the eager and the compiled step, replay against eager
timeout 90 python -m pytest tests/test_bench.py -q -x -p no:cacheprovider -k cuda 2>&1 | grep -v -i warn | tail -3 | tee $OUT/decode_tests.log
# 0.7 is where the M=1 kernels now take the compacted-id loop (compact_below=0.35 in kernels/_autotune.py)
timeout 170 python bench/bench_decode.py --batch 1 --sparsity 0.5,0.7 --new-tokens 128 --measure-steps 2 \
    --out $OUT/decode_graph 2>&1 | grep -v -i warn | tee $OUT/decode_graph/log.txt
timeout 330 python bench/bench_decode.py --batch 1 --sparsity 0.5,0.7 --new-tokens 128 --measure-steps 2 --compile \
    --out $OUT/decode_compiled 2>&1 | grep -v -i warn | tee $OUT/decode_compiled/log.txt
