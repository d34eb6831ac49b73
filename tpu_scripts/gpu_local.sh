#!/usr/bin/env bash
# One multi-GPU host (e.g. 8xH100).
#
#   tpu_scripts/gpu_local.sh [--run NAME] [--processes N] [--dry-run] -- \
#       flaxlm pretrain --config configs/pretrain.py:1b --config.mesh.preset=8xH100 \
#       --workdir runs/1b
#
# Default: one process drives every GPU of the host; nothing distributed to set up.
# --processes N: N processes on 127.0.0.1, process i on GPU i (FLAXLM_LOCAL_DEVICE_IDS),
# the same multi-controller path a cluster takes, to try it on one box. Logs go to
# logs/RUN/process-I.log; SIGTERM/SIGINT to this script reach every process (each
# checkpoints at the same step and exits); the exit status is the first failure's.
source "$(dirname "$0")/common.sh"
parse_common "$@"
PROCESSES=1
set -- "${REST[@]}"
COMMAND=()
while (($#)); do
  case "$1" in
    --processes) PROCESSES="$2"; shift ;;
    --processes=*) PROCESSES="${1#*=}" ;;
    *) COMMAND+=("$1") ;;
  esac
  shift
done
((${#COMMAND[@]})) || die "give the command after --, e.g. -- flaxlm pretrain ..."
[[ "$PROCESSES" =~ ^[1-9][0-9]*$ ]] || die "--processes $PROCESSES: expected a count"

LOGS="logs/$FLAXLM_RUN"
run mkdir -p "$LOGS"
if ((PROCESSES == 1)); then
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${COMMAND[@]}"
    exit 0
  fi
  "${COMMAND[@]}" 2>&1 | tee "$LOGS/process-0.log"
  exit "${PIPESTATUS[0]}"
fi

PORT="${FLAXLM_COORDINATOR_PORT:-23456}"
PIDS=()
for ((i = 0; i < PROCESSES; i++)); do
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ FLAXLM_COORDINATOR=127.0.0.1:$PORT FLAXLM_NUM_PROCESSES=$PROCESSES" \
      "FLAXLM_PROCESS_ID=$i FLAXLM_LOCAL_DEVICE_IDS=$i $(printf '%q ' "${COMMAND[@]}")" \
      "> $LOGS/process-$i.log 2>&1 &"
    continue
  fi
  FLAXLM_COORDINATOR="127.0.0.1:$PORT" FLAXLM_NUM_PROCESSES="$PROCESSES" \
    FLAXLM_PROCESS_ID="$i" FLAXLM_LOCAL_DEVICE_IDS="$i" \
    "${COMMAND[@]}" >"$LOGS/process-$i.log" 2>&1 &
  PIDS+=("$!")
done
[[ "$DRY_RUN" == 1 ]] && exit 0
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null || true' TERM INT
STATUS=0
for pid in "${PIDS[@]}"; do
  code=0
  wait "$pid" || code=$?
  if ((code != 0 && STATUS == 0)); then STATUS=$code; fi
done
echo "logs: $LOGS/process-*.log"
exit "$STATUS"
