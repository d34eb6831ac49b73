#!/usr/bin/env bash
# Create a TPU VM, or a queued resource that becomes one; nothing happens if it exists.
#
#   tpu_scripts/create.sh --zone us-west4-a --type v5e-8 [--spot] [--queued] [--dry-run]
#
# --spot: a Spot VM (cheap, can be preempted: flaxlm checkpoints on the SIGTERM and the
# same launch command resumes). --queued: ask through a queued resource (waits in line
# for capacity instead of failing); --wait then polls until it is ACTIVE.
# Common flags and env: see common.sh.
source "$(dirname "$0")/common.sh"
parse_common "$@"
SPOT=0
QUEUED=0
WAIT=0
for arg in "${REST[@]}"; do
  case "$arg" in
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --wait) WAIT=1 ;;
    *) die "unknown argument $arg" ;;
  esac
done
resolve_settings

SPOT_FLAG=()
if ((SPOT)); then SPOT_FLAG=(--spot); fi

if ((QUEUED)); then
  if probe gcloud compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}"; then
    echo "queued resource $TPU_NAME already exists; not creating it again"
  else
    run gcloud compute tpus queued-resources create "$TPU_NAME" "${WHERE[@]}" \
      --node-id="$TPU_NAME" --accelerator-type="$TPU_TYPE" \
      --runtime-version="$TPU_VERSION" "${SPOT_FLAG[@]}"
  fi
  if ((WAIT)); then
    run gcloud compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}" \
      --format='value(state.state)'
    if [[ "$DRY_RUN" != 1 ]]; then
      until [[ "$(gcloud compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}" \
        --format='value(state.state)')" == ACTIVE ]]; do
        echo "waiting for $TPU_NAME to become ACTIVE ..."
        sleep 60
      done
    fi
  fi
elif probe gcloud compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}"; then
  echo "TPU VM $TPU_NAME already exists; not creating it again"
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${WHERE[@]}" \
    --accelerator-type="$TPU_TYPE" --version="$TPU_VERSION" "${SPOT_FLAG[@]}"
fi
echo "$TPU_NAME: $TPU_TYPE ($(worker_count "$TPU_TYPE") worker(s)), runtime $TPU_VERSION"
