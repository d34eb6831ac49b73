#!/usr/bin/env bash
# Delete the TPU VM (or the queued resource and its VM); nothing happens if it is gone.
#
#   tpu_scripts/teardown.sh --zone us-west4-a [--name flaxlm] [--queued] [--dry-run]
#
# Copy what you need first (sync.sh --to-bucket): the VM's disks go with it.
source "$(dirname "$0")/common.sh"
parse_common "$@"
QUEUED=0
for arg in "${REST[@]}"; do
  case "$arg" in
    --queued) QUEUED=1 ;;
    *) die "unknown argument $arg" ;;
  esac
done
resolve_settings
if ((QUEUED)); then
  if probe gcloud compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}" ||
    [[ "$DRY_RUN" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$TPU_NAME" "${WHERE[@]}" --force --quiet
  else
    echo "queued resource $TPU_NAME does not exist; nothing to delete"
  fi
elif probe gcloud compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}" ||
  [[ "$DRY_RUN" == 1 ]]; then
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${WHERE[@]}" --quiet
else
  echo "TPU VM $TPU_NAME does not exist; nothing to delete"
fi
