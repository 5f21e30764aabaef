#!/bin/bash
# One full-parameter training step of the Llama-3-8B shape (bf16, gradient checkpointing, batch 1)
# per optimizer on a 24 GiB CPU machine, each case in a fresh process under an address-space limit
# (bench/bench_memory.py): seq 256 for every case, then seq 2048 for AdaLomo and Lomo, with the
# model's own loss and with the loss computed in 256-token chunks. Needs ~20 GiB free and a quiet
# machine; the free memory and the load are printed before each case. Results merge into
# bench/results/cpu/memory.json (+ memory.png, memory-llama3-8b.png).
#
#   bash bench/memory_llama3_8b.sh                        # the committed results
#   MODEL=tiny OUT=/tmp/dry bash bench/memory_llama3_8b.sh  # the same commands on a tiny model
set -u
cd "$(dirname "$0")/.."
MODEL=${MODEL:-llama3-8b}
if [ -n "${OUT:-}" ]; then dest=(--out "$OUT"); else dest=(--update-committed); fi
PY=${PYTHON:-python}
case_() {  # seq, case, extra flags...
  local seq=$1 name=$2; shift 2
  echo "=== $(date -u +%H:%M:%S) $MODEL seq $seq $name $*; load $(cut -d' ' -f1-3 /proc/loadavg)"
  free -g | head -2
  PYTHONPATH=. "$PY" bench/bench_memory.py --device cpu --model-config "$MODEL" --seq-len "$seq" \
    --gradient-checkpointing --optimizers "$name" --cpu-limit-gib 21 --wait-minutes 2 \
    --merge --plot-model "$MODEL" "${dest[@]}" "$@"
}
for name in floor-params lk-adalomo lk-lomo lomo_optim-adalomo lomo_optim-lomo adamw adafactor \
            lk-golore lk-golore-embfull lk-galore; do
  case_ 256 "$name" --steps 1
done
# seq 2048: one step each (the step is the measurement; ~8x the compute of seq 256)
case_ 2048 lk-adalomo --steps 0
case_ 2048 lk-adalomo --steps 0 --loss-chunk 256
case_ 2048 lk-lomo --steps 0
case_ 2048 lk-lomo --steps 0 --loss-chunk 256
echo "=== done $(date -u +%H:%M:%S)"
