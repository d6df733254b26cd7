#!/usr/bin/env bash
# kiln's CPU backend next to PyTorch's CPU build, in one run on the same machine.
#   bash bench/cpu_compare.sh [python-with-torch] [threads] [iters]
# Needs torch in the given Python (a venv outside the repository: python3 -m venv ~/venv-torch &&
# ~/venv-torch/bin/pip install torch).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}; threads=${2:-2}; iters=${3:-20}
cargo build --release --example cpu_bench -q
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; torch $($py -c 'import torch; print(torch.__version__)')"
kiln=$(target/release/examples/cpu_bench --threads "$threads" --iters "$iters")
torch=$($py bench/torch_cpu_bench.py "$threads" "$iters")
python3 - "$kiln" "$torch" <<'PY'
import sys
def parse(s):
    rows = [l.split(",") for l in s.strip().splitlines()[1:]]
    return {(r[0], r[1]): float(r[3]) for r in rows}
k, t = parse(sys.argv[1]), parse(sys.argv[2])
print("| model | batch | kiln ms | PyTorch ms | kiln speed / PyTorch |")
print("| --- | ---: | ---: | ---: | ---: |")
for key in k:
    print(f"| {key[0]} | {key[1]} | {k[key]:.2f} | {t[key]:.2f} | {t[key] / k[key]:.2f}x |")
PY
