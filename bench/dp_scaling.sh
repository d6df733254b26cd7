#!/usr/bin/env bash
# Data-parallel scaling, kiln next to PyTorch DDP, in one run on one machine with >= 2 GPUs:
# ResNet-18 (CIFAR stem) at a batch per GPU on 1 and on N GPUs, one process per GPU.
#   kiln:    examples/dp_bench.rs (it starts its own workers, as `kiln launch` would)
#   PyTorch: bench/ddp_baseline.py under torchrun (DistributedDataParallel, NCCL)
#
#   bash bench/dp_scaling.sh [dp_bench binary] [batch per GPU] ["1 2" GPU counts]
#
# Prints the machine, each run's CSV line, and a table with the scaling efficiency
# (images/s on N GPUs / (N x images/s on 1 GPU)); with $OUT set, also writes $OUT/dp_scaling.csv.
# NVLink multicast stays off (KINDS.md): the variables below are set for every process.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-target/release/examples/dp_bench}
batch=${2:-256}
counts=${3:-"1 2"}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
baseline="$here/ddp_baseline.py"
[ -f "$baseline" ] || baseline="$here/../bench/ddp_baseline.py"
echo "# $(date -u +%Y-%m-%dT%H:%MZ)"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader || true
nvidia-smi topo -m || true
python3 -c 'import torch; print("# torch", torch.__version__, "nccl", torch.cuda.nccl.version(), "gpus", torch.cuda.device_count())' || true
rows=()
for n in $counts; do
  line=$("$bin" --nproc "$n" --batch "$batch" --model resnet18 | tail -1)
  echo "$line"; rows+=("$line")
  line=$(torchrun --nproc-per-node "$n" --master-port $((29400 + n)) "$baseline" --batch "$batch" --model resnet18 | tail -1)
  echo "$line"; rows+=("$line")
done
printf '%s\n' "impl,model,gpus,batch_per_gpu,ms_per_step,images_per_s,per_rank_ms" "${rows[@]}" > /tmp/dp_scaling.csv
[ -n "${OUT:-}" ] && cp /tmp/dp_scaling.csv "$OUT/dp_scaling.csv"
python3 - /tmp/dp_scaling.csv <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
one = {r["impl"]: float(r["images_per_s"]) for r in rows if r["gpus"] == "1"}
print("| impl | GPUs | batch/GPU | ms/step | images/s | scaling efficiency |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    n, ips = int(r["gpus"]), float(r["images_per_s"])
    eff = f"{ips / (n * one[r['impl']]):.2f}" if r["impl"] in one else "-"
    print(f"| {r['impl']} | {n} | {r['batch_per_gpu']} | {float(r['ms_per_step']):.2f} | {ips:.0f} | {eff} |")
PY
