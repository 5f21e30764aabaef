#!/bin/bash
# One full-parameter training step of the Llama-3-8B shape (bf16, gradient checkpointing, batch 1)
# per optimizer on a 24 GiB CPU machine, each case in a fresh process under an address-space limit
# (bench/bench_memory.py): seq 256 for every case, then seq 2048 for AdaLomo and Lomo, with the
# model's own loss and with the loss computed in 256-token chunks, and for lomo-optim's AdaLomo and
# Lomo, AdamW, GoLore (rank 64 and 128) and GaLore (rank 64) in the setting where AdaLomo fits.
# Needs ~20 GiB free and a quiet machine; the free memory and the load are printed before each
# case. Results merge into bench/results/cpu/memory.json (+ memory.png, memory-llama3-8b.png).
# One step per case (the step is the measurement). MATMUL=float32-tiles (the default) computes the
# bf16 linear layers in float32 tiles (bench/bf16_matmul.py), for CPUs without a fast bf16 matrix
# product; MATMUL=native on one that has it (AVX-512 BF16 / AMX).
#
#   bash bench/memory_llama3_8b.sh                        # the committed results
#   MODEL=tiny OUT=/tmp/dry bash bench/memory_llama3_8b.sh  # the same commands on a tiny model
set -u
cd "$(dirname "$0")/.."
MODEL=${MODEL:-llama3-8b}
if [ -n "${OUT:-}" ]; then dest=(--out "$OUT"); else dest=(--update-committed); fi
PY=${PYTHON:-python}
MATMUL=${MATMUL:-float32-tiles}
case_() {  # seq, case, extra flags...
  local seq=$1 name=$2; shift 2
  echo "=== $(date -u +%H:%M:%S) $MODEL seq $seq $name $*; load $(cut -d' ' -f1-3 /proc/loadavg)"
  free -g | head -2
  PYTHONPATH=. "$PY" bench/bench_memory.py --device cpu --model-config "$MODEL" --seq-len "$seq" \
    --gradient-checkpointing --optimizers "$name" --cpu-limit-gib 21 --wait-minutes 0 \
    --steps 0 --no-allocator-trace --bf16-matmul "$MATMUL" --merge --plot-model "$MODEL" \
    "${dest[@]}" "$@"
}
for name in floor-params lk-adalomo lk-lomo lomo_optim-adalomo lomo_optim-lomo adamw lk-golore \
            lk-golore-r64 lk-galore lk-galore-r64 adafactor lk-adalomo-acc4-bf16 floor-backward \
            lk-golore-embfull; do
  case_ 256 "$name"
done
# two of them again with glibc unmapping every freed block of 1 MiB or more (bench_memory.py
# --mmap-threshold-mib): what its default heap keeps resident
case_ 256 lk-adalomo --mmap-threshold-mib 1
case_ 256 lk-golore-r64 --mmap-threshold-mib 1
# seq 2048 (~8x the compute of seq 256); with the loss chunked, once more with glibc unmapping
# freed blocks (its default heap kept more than 3 GiB resident in this step)
case_ 2048 lk-adalomo --loss-chunk 256
case_ 2048 lk-adalomo --loss-chunk 256 --mmap-threshold-mib 1
case_ 2048 lk-adalomo
case_ 2048 lk-lomo --loss-chunk 256
case_ 2048 lk-lomo --loss-chunk 256 --mmap-threshold-mib 1
case_ 2048 lk-lomo
# lomo-optim's AdaLomo and Lomo, AdamW, GoLore at rank 64 and 128 and GaLore at rank 64 at seq
# 2048 in the setting where AdaLomo fits (Adafactor, which runs out of memory at seq 256, is left
# out there)
for name in lomo_optim-adalomo adamw lomo_optim-lomo lk-golore-r64 lk-galore-r64 lk-golore; do
  case_ 2048 "$name" --loss-chunk 256 --mmap-threshold-mib 1
done
echo "=== done $(date -u +%H:%M:%S)"
