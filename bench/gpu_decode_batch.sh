#!/bin/bash
# Third device-machine call (`run` tool), after gpu_check.sh and gpu_decode.sh: issue 7's batched decode on
# Llama-3-8B shapes (random bf16 weights, CUDA graphs), per-token and batch-shared masks at 50 %: batches 4 and 16
# (last timed in stop 8: shared 0.77x / 0.57x dense), then 1 and 32 (32 tokens take the dense fallback today).
# Results in $OUT/decode_batch and $OUT/decode_batch_1_32 (decode.md/.csv, log.txt); each survives a step's timeout.
# Launch configs: the built-in table, or SPARSE_INFER_TUNING=bench/h100/tuning.json as gpu_decode.sh explains.
. bench/gpu_env.sh  # PYTHONPATH, OUT and CUDA checks, the kernels link
mkdir -p $OUT/decode_batch $OUT/decode_batch_1_32
echo "launch configs: ${SPARSE_INFER_TUNING:-built-in table (kernels/_autotune.py)}"
timeout -s INT 320 python bench/bench_decode.py --batch 4,16 --sparsity 0.5 --modes per_token,shared --new-tokens 128 \
    --measure-steps 2 --out $OUT/decode_batch > $OUT/decode_batch/log.txt 2>&1
echo "bench_decode batch 4,16 exit $?"; grep -v -i warn $OUT/decode_batch/log.txt | tail -20
timeout -s INT 260 python bench/bench_decode.py --batch 1,32 --sparsity 0.5 --modes per_token,shared --new-tokens 128 \
    --measure-steps 2 --out $OUT/decode_batch_1_32 > $OUT/decode_batch_1_32/log.txt 2>&1
echo "bench_decode batch 1,32 exit $?"; grep -v -i warn $OUT/decode_batch_1_32/log.txt | tail -20
