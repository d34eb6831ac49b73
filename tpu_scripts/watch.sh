#!/usr/bin/env bash
# Follow a run: tail worker 0's log (default), show which workers still run it
# (--status), copy every worker's log here (--gather DIR), or stop it gracefully
# (--stop: SIGTERM, so every host checkpoints at the same step and exits).
#
#   tpu_scripts/watch.sh --zone us-west4-a --run c4-125m [--status | --gather logs | --stop]
source "$(dirname "$0")/common.sh"
parse_common "$@"
ACTION="tail"
GATHER_DIR=""
set -- "${REST[@]}"
while (($#)); do
  case "$1" in
    --status) ACTION=status ;;
    --stop) ACTION=stop ;;
    --gather) ACTION=gather; GATHER_DIR="$2"; shift ;;
    --gather=*) ACTION=gather; GATHER_DIR="${1#*=}" ;;
    *) die "unknown argument $1" ;;
  esac
  shift
done
resolve_settings
RUN_Q="$(printf '%q' "$FLAXLM_RUN")"
LOG="\$HOME/flaxlm_logs/$RUN_Q.log"
PID="\$HOME/flaxlm_logs/$RUN_Q.pid"

case "$ACTION" in
  tail)
    worker="$TPU_WORKER"
    [[ "$worker" == all ]] && worker=0
    on_workers "$worker" "tail -n 50 -F $LOG"
    ;;
  status)
    on_workers all "if kill -0 \"\$(cat $PID 2>/dev/null)\" 2>/dev/null; then \
echo \"\$(hostname): running\"; else echo \"\$(hostname): not running\"; fi; tail -n 2 $LOG"
    ;;
  stop)
    on_workers all "kill -TERM \"\$(cat $PID)\" 2>/dev/null && echo \"\$(hostname): SIGTERM sent\" \
|| echo \"\$(hostname): not running\""
    ;;
  gather)
    run mkdir -p "$GATHER_DIR/$FLAXLM_RUN"
    for ((w = 0; w < $(worker_count "$TPU_TYPE"); w++)); do
      run gcloud compute tpus tpu-vm scp "$TPU_NAME:flaxlm_logs/$FLAXLM_RUN.log" \
        "$GATHER_DIR/$FLAXLM_RUN/worker-$w.log" "${WHERE[@]}" --worker="$w"
    done
    ;;
esac
