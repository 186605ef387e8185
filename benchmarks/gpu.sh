#!/usr/bin/env bash
# The GPU checks issues 3 and 5 ask for, in one run, for a session that is lent a GPU.
# Not yet run: no GPU has been lent to this project so far.
#
#   bash benchmarks/gpu.sh        # needs a CUDA build of torch; writes benchmarks/results/*-<gpu>-<date>.*
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
tag="$(python -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')-$(date +%F)"
log="$out/gpu-$tag.log"
exec > >(tee "$log") 2>&1

# Issue 3: the planner's sweep on a GPT-2-small-shaped gpt (12 layers, width 768, sequence 1024), bf16, with times.
memfit bench --model gpt --size gpt2 --dtype bf16 --device cuda --batch-size 8 \
    --json "$out/bench-gpt2-bf16-$tag.json" --plot "$out/bench-gpt2-bf16-$tag.png"
# Issue 3: offload, measured by the allocator.
memfit verify --model gpt --size gpt2 --dtype bf16 --device cuda --strategy offload --json "$out/verify-offload-$tag.json"
# Issue 5: DDP and FSDP2 over nccl (world size 1), bf16 autocast and fp16 with a gradient scaler.
for dist in ddp fsdp; do
  for precision in bf16 fp16; do
    torchrun --standalone --nproc-per-node 1 -m memfit train --config configs/gpt-char.yaml --device cuda \
        --distributed "$dist" --precision "$precision" --gradient-checkpointing blocks --max-iters 20 \
        --metrics "$out/train-$dist-$precision-$tag.jsonl"
  done
done
# Issue 5: the CUDA tests (bf16 and fp16 gradients with and without checkpointing, RNG replay on CUDA).
python -m pytest tests/test_compat.py tests/test_checkpointing.py -k cuda
# Issue 5: memfit against Hugging Face's own checkpointing, on CUDA.
python benchmarks/hf.py --device cuda
echo "log written to $log"
