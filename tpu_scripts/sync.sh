#!/usr/bin/env bash
# Copy a run's workdir between the TPU workers and a bucket (rsync: only changed files).
#
#   tpu_scripts/sync.sh --zone us-west4-a --bucket gs://B --run c4-125m --to-bucket
#   tpu_scripts/sync.sh --zone us-west4-a --bucket gs://B --run c4-125m --from-bucket
#
# The workdir is ~/runs/RUN on the workers and gs://B/runs/RUN in the bucket. --to-bucket
# copies from worker 0 (a single-host run, or a workdir every worker shares: see
# mount.sh); --from-bucket copies to every worker, e.g. onto a new VM after a preemption.
source "$(dirname "$0")/common.sh"
parse_common "$@"
DIRECTION=""
for arg in "${REST[@]}"; do
  case "$arg" in
    --to-bucket) DIRECTION=to ;;
    --from-bucket) DIRECTION=from ;;
    *) die "unknown argument $arg" ;;
  esac
done
[[ -n "$DIRECTION" ]] || die "say --to-bucket or --from-bucket"
[[ "$FLAXLM_BUCKET" == gs://* ]] || die "set --bucket gs://BUCKET (or FLAXLM_BUCKET)"
resolve_settings
RUN_Q="$(printf '%q' "$FLAXLM_RUN")"
LOCAL="\$HOME/runs/$RUN_Q"
REMOTE="$(printf '%q' "${FLAXLM_BUCKET%/}/runs/$FLAXLM_RUN")"
if [[ "$DIRECTION" == to ]]; then
  on_workers 0 "gcloud storage rsync --recursive $LOCAL $REMOTE"
else
  on_workers all "mkdir -p $LOCAL && gcloud storage rsync --recursive $REMOTE $LOCAL"
fi
