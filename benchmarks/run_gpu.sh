#!/usr/bin/env bash
# The performance tables on a CUDA machine in one command: adapter-path timings in bfloat16 for
# every shape and setting, whole-layer timings, and the end-to-end training throughput.
# Usage: bash benchmarks/run_gpu.sh [SNI_DIR] [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
sni_dir=${1:-../shared/data/natural-instructions-subset}
output_dir=${2:-docs/benchmarks/gpu}
mkdir -p "$output_dir"

python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name(0))"
python benchmarks/layer_benchmark.py --device cuda --dtype bfloat16 --repeats 20 --warmup 5 \
    --output "$output_dir/layer-bf16.json"
python benchmarks/layer_benchmark.py --device cuda --dtype bfloat16 --shapes 7b --m 8 --r 8 --p 1 \
    --sharing shared --whole-layer --repeats 20 --warmup 5 --output "$output_dir/layer-bf16-whole.json"
python benchmarks/e2e_throughput.py --sni-dir "$sni_dir" --precisions bf16 --steps 40 --warmup 10 \
    --batch-size 32 --device-note "$(python -c 'import torch; print(torch.cuda.get_device_name(0))')" \
    --output "$output_dir/e2e.json"
python benchmarks/make_tables.py --layer "$output_dir/layer-bf16.json" --e2e "$output_dir/e2e.json" \
    --output "$output_dir/tables.md"
echo "Tables written to $output_dir/tables.md"
