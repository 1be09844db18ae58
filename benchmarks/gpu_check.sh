#!/usr/bin/env bash
# Issue 6's GPU check as one prepared call: every ATConv path checked against the oracle on the GPU,
# then bf16 ratios at batch 32 and the training step's MFU.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; results in $OUT, else benchmarks/measured/gpu
#
# Sized for a short GPU lease: under 10 minutes in the worst case (the parts' limits sum to 585 s; most
# of it is torch.compile). Each part has its own limit and writes its own JSON, most important first, so a
# part cut short loses only itself (the last one, compiled SiT-XL/2 training, is the likeliest).
# At most 8 files: device.txt, run.log and one JSON per part.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
out=${OUT:-benchmarks/measured/gpu}
mkdir -p "$out"
log="$out/run.log"

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } > "$out/device.txt" 2>&1
cat "$out/device.txt"

part() {  # part NAME SECONDS SCRIPT ARGS...: run one benchmark under a time limit, JSON to $out/NAME.json
    local name=$1 limit=$2 script=$3
    shift 3
    echo "== $name (limit ${limit}s): $script $*" | tee -a "$log"
    timeout "$limit" "$py" "benchmarks/$script" "$@" --out "$out/$name.json" >> "$log" 2>&1
    echo "   exit $? after ${SECONDS}s in total" | tee -a "$log"
}

gpu=(--device cuda --dtype bf16)
# correctness first: every ATConv path on the GPU (eager impls, inductor/Triton) vs the float64 oracle
part check 60 check_device.py --device cuda --dtypes fp32,bf16
part mixer 130 bench_atconv.py "${gpu[@]}" --sections mixer --widths B,XL --batch 32 --compile mixer --reps 20
part train_xl 115 bench_atconv.py "${gpu[@]}" --sections train --train-models SiT-XL/2 --train-batch 32 \
    --compile "" --reps 10
part block_xl 140 bench_atconv.py "${gpu[@]}" --sections block --block-widths XL --batch 32 --modes fwdbwd \
    --compile block --reps 20
part sampling_xl 50 bench_sampling.py "${gpu[@]}" --model SiT-XL/2 --batch 16 --solvers euler,sde-euler \
    --steps 50 --cfg-scales 1.0,4.0 --reps 3
part train_xl_compiled 90 bench_atconv.py "${gpu[@]}" --sections train --train-models SiT-XL/2 \
    --train-batch 32 --train-modes step --compile train --reps 10
grep -E "^(###|\||[0-9]+ of [0-9]+ cases)" "$log" | tail -n 150
