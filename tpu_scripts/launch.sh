#!/usr/bin/env bash
# Start one command on every worker, detached, each worker logging to
# ~/flaxlm_logs/RUN.log (gather them with watch.sh --gather).
#
#   tpu_scripts/launch.sh --zone us-west4-a --run c4-125m -- \
#       flaxlm pretrain --config configs/pretrain.py:125m --workdir "$HOME/runs/c4-125m"
#
# Every worker runs the same command; JAX finds its peers on a TPU slice by itself
# (train/distributed.py). Idempotent: a worker where RUN is still running is left alone,
# and rerunning after a preemption resumes from the last checkpoint. The command runs in
# ~/flaxlm with ~/flaxlm-venv active; quote $HOME so it expands on the workers.
source "$(dirname "$0")/common.sh"
parse_common "$@"
((${#REST[@]})) || die "give the command after --, e.g. -- flaxlm pretrain ..."
resolve_settings

COMMAND="$(printf '%q ' "${REST[@]}")"
COMMAND="${COMMAND//\\\$HOME/\$HOME}"  # let a quoted $HOME expand on the worker
RUN_Q="$(printf '%q' "$FLAXLM_RUN")"
read -r -d '' START <<SCRIPT || true
set -euo pipefail
mkdir -p "\$HOME/flaxlm_logs"
pidfile="\$HOME/flaxlm_logs/$RUN_Q.pid"
if [ -f "\$pidfile" ] && kill -0 "\$(cat "\$pidfile")" 2>/dev/null; then
  echo "\$(hostname): $RUN_Q is already running (pid \$(cat "\$pidfile")); left alone"
  exit 0
fi
cd "\$HOME/flaxlm"
export PATH="\$HOME/flaxlm-venv/bin:\$PATH"
nohup setsid $COMMAND >"\$HOME/flaxlm_logs/$RUN_Q.log" 2>&1 </dev/null &
echo \$! >"\$pidfile"
echo "\$(hostname): started $RUN_Q (pid \$!)"
SCRIPT
on_workers "$TPU_WORKER" "$START"
