#!/bin/bash
# Second device-machine call (`run` tool), after gpu_check.sh: end-to-end decode on Llama-3-8B shapes
# (random bf16 weights), CUDA graphs, batch 1; then the same with the step compiled (--compile, inductor),
# dense and sparse alike (timeouts sum to 590 s: one call).  Results land in $OUT/decode_graph and
# $OUT/decode_compiled (decode.md/.csv, log.txt), the tests' full log in $OUT/decode_tests.log; each
# survives a step's timeout, and no step stops the next.
. bench/gpu_env.sh  # PYTHONPATH, OUT and CUDA checks, the kernels link
mkdir -p $OUT/decode_graph $OUT/decode_compiled
# launch configs: the built-in table, or gpu_check.sh's tuning.json committed to the tree and named by the caller
# (SPARSE_INFER_TUNING=bench/h100/tuning.json bash bench/gpu_decode.sh); the result tables' command says which
echo "launch configs: ${SPARSE_INFER_TUNING:-built-in table (kernels/_autotune.py)}"
# tiny config first: graph capture of the eager and the compiled step, replay against eager
timeout -s INT 90 python -m pytest tests/test_bench.py -rA -p no:cacheprovider -k cuda > $OUT/decode_tests.log 2>&1
echo "test_bench -k cuda exit $?"
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed|error)|Interrupted" $OUT/decode_tests.log | tail -20
# 0.7 is where the M=1 kernels now take the compacted-id loop (compact_below=0.35 in kernels/_autotune.py)
timeout -s INT 170 python bench/bench_decode.py --batch 1 --sparsity 0.5,0.7 --new-tokens 128 --measure-steps 2 \
    --out $OUT/decode_graph > $OUT/decode_graph/log.txt 2>&1
echo "bench_decode exit $?"; grep -v -i warn $OUT/decode_graph/log.txt | tail -25
timeout -s INT 330 python bench/bench_decode.py --batch 1 --sparsity 0.5,0.7 --new-tokens 128 --measure-steps 2 --compile \
    --out $OUT/decode_compiled > $OUT/decode_compiled/log.txt 2>&1
echo "bench_decode --compile exit $?"; grep -v -i warn $OUT/decode_compiled/log.txt | tail -25
