#!/usr/bin/env bash
# Trains a bitgen config on one multi-GPU host.
#
#   bash launch/gpu_host.sh --config bsq_vit:b18 --workdir runs/b18 [--gpus 8] \
#     [--mode process-per-gpu|single-process] [--port 12355] [--dry-run] [-- extra bitgen train arguments]
#
# single-process (default): one process drives every GPU of the host (no jax.distributed needed).
# process-per-gpu: one process per GPU (CUDA_VISIBLE_DEVICES=i), joined by jax.distributed through a
# coordinator on localhost. --dry-run prints every command instead of running it.
set -euo pipefail

config="" workdir="" gpus="" mode="single-process" port=12355 dry_run=0 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --gpus) gpus=$2; shift 2 ;;
    --mode) mode=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "gpu_host.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
for required in config workdir; do
  if [ -z "${!required}" ]; then echo "gpu_host.sh: --$required is required" >&2; exit 2; fi
done
if [ -z "$gpus" ]; then
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
  if [ "${gpus:-0}" -lt 1 ]; then echo "gpu_host.sh: no GPU found; pass --gpus N" >&2; exit 2; fi
fi
python=${PYTHON:-python3}
train=("$python" -m bitgen train --config "$config" --workdir "$workdir")

run() {
  if [ "$dry_run" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

case "$mode" in
  single-process)
    run env CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((gpus - 1)))" "${train[@]}" "${extra[@]}" ;;
  process-per-gpu)
    pids=()
    for ((i = 0; i < gpus; i++)); do
      cmd=(env CUDA_VISIBLE_DEVICES="$i" "${train[@]}" --coordinator "localhost:$port"
           --num_processes "$gpus" --process_id "$i" "${extra[@]}")
      if [ "$dry_run" = 1 ]; then run "${cmd[@]}"; else "${cmd[@]}" & pids+=($!); fi
    done
    status=0
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit $status ;;
  *) echo "gpu_host.sh: --mode must be single-process or process-per-gpu, got $mode" >&2; exit 2 ;;
esac
