#!/bin/bash
# One device-machine call (`run` tool): final rows + path variants + fallback cutoff, then a CUDA test subset.
# Full logs land in $OUT (final.log, kernels.md, kernels.csv, tuning.json: the fastest correct config per token
# bucket, tests_kernels.log, tests_gated_mlp.log) and
# survive a step's timeout; the console gets the result lines and pytest's summaries only.
# Each step is stopped with SIGINT (pytest then still prints its summary); no step stops the next.
. bench/gpu_env.sh  # PYTHONPATH, OUT and CUDA checks, the kernels link
summary() { grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|error)|Interrupted|Timeout" "$1" | tail -40; }
timeout -s INT 400 python bench/bench_kernels.py --final --fallback --fallback-tokens 2 4 8 16 32 --out $OUT \
    > $OUT/final.log 2>&1
echo "bench_kernels.py exit $?"
grep -E "^(FINAL|FALLBACK|LAUNCH|NVIDIA|TUNING|wrote)|WRONG|FAILED|Error" $OUT/final.log
# -rA names every passing test in the log (KERNEL_NOTES asks for on_a_score, matrix and strided by name)
timeout -s INT 80 python -m pytest tests/test_kernels.py -rA -n 8 -p no:cacheprovider \
    -k "cuda_graph or paths or nan or density or custom_ops or gemv_variants or readback or prefetch or compacted or on_a_score or swap_ab" \
    > $OUT/tests_kernels.log 2>&1
echo "test_kernels exit $?"; summary $OUT/tests_kernels.log
# gated MLP top-k now runs gating's selection kernel: its selection, tie and shared (RMS) cases on CUDA;
# the matrix and strided cases check the tightened tolerances (bf16 5e-3, fp16 1e-3; stop 19) on the GPU
timeout -s INT 90 python -m pytest tests/test_kernel_gated_mlp.py -rA -n 8 -p no:cacheprovider \
    -k "selection or ties or shared or strided or matrix" > $OUT/tests_gated_mlp.log 2>&1
echo "test_kernel_gated_mlp exit $?"; summary $OUT/tests_gated_mlp.log
