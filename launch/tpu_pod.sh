#!/usr/bin/env bash
# Trains a bitgen config on a multi-host Cloud TPU pod slice.
#
#   bash launch/tpu_pod.sh --name my-v5e-16 --zone us-west4-a --accelerator v5litepod-16 \
#     --config bsq_vit:b18 --workdir gs://my-bucket/bsq_b18 [--project P] [--spot] [--dry-run] \
#     [-- extra bitgen train arguments]
#
# Creates the TPU VM unless it exists, installs this checkout of bitgen on every worker, then starts
# the same `bitgen train` command on all workers (`--worker=all`); jax.distributed finds its peers
# from the TPU metadata. --dry-run prints every command instead of running it.
set -euo pipefail

name="" zone="" accelerator="" version="v2-alpha-tpuv5-lite" project="" config="" workdir=""
spot=0 dry_run=0 extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --accelerator) accelerator=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
for required in name zone accelerator config workdir; do
  if [ -z "${!required}" ]; then echo "tpu_pod.sh: --$required is required" >&2; exit 2; fi
done

run() {
  if [ "$dry_run" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[ -n "$project" ] && where+=(--project "$project")

if [ "$dry_run" = 1 ] || ! "${gcloud_tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator" --version "$version")
  [ "$spot" = 1 ] && create+=(--spot)
  [ "$dry_run" = 1 ] && echo "# only if 'gcloud compute tpus tpu-vm describe $name' fails:"
  run "${create[@]}"
fi

repo=$(cd "$(dirname "$0")/.." && pwd)
tarball=/tmp/bitgen-src.tar.gz
run git -C "$repo" archive --format=tar.gz --prefix=bitgen/ -o "$tarball" HEAD
run "${gcloud_tpu[@]}" scp "$tarball" "$name:~/bitgen-src.tar.gz" "${where[@]}" --worker=all
# TPU VM images ship an older Python: uv provides 3.12 in a venv on every worker.
install='set -e; rm -rf ~/bitgen && tar xzf ~/bitgen-src.tar.gz -C ~
python3 -m pip install -q --user uv && ~/.local/bin/uv venv -q -p 3.12 --allow-existing ~/bitgen-venv
~/.local/bin/uv pip install -q -p ~/bitgen-venv/bin/python -e "$HOME/bitgen[tpu]" "jax[tpu]"'
run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$install"

train="cd ~/bitgen && ~/bitgen-venv/bin/python -m bitgen train --config $(printf '%q' "$config") --workdir $(printf '%q' "$workdir")"
for arg in "${extra[@]}"; do train+=" $(printf '%q' "$arg")"; done
run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$train"
