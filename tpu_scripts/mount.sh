#!/usr/bin/env bash
# Mount a bucket at ~/bucket on every worker (gcsfuse), so a multi-host run has one
# workdir that all hosts see: --workdir "$HOME/bucket/runs/RUN". Rerunnable.
#
#   tpu_scripts/mount.sh --zone us-west4-a --bucket gs://B [--dry-run]
#
# Orbax writes each host's shards into the same checkpoint directory and commits it from
# process 0, so a multi-host workdir must be shared (this mount, or an NFS/Filestore
# path). A single-host run can keep its workdir on local disk and use sync.sh.
# Directory renames (Orbax's commit) need --rename-dir-limit on a flat bucket.
source "$(dirname "$0")/common.sh"
parse_common "$@"
((${#REST[@]} == 0)) || die "unknown argument ${REST[0]}"
[[ "$FLAXLM_BUCKET" == gs://* ]] || die "set --bucket gs://BUCKET (or FLAXLM_BUCKET)"
resolve_settings
BUCKET_NAME="$(printf '%q' "${FLAXLM_BUCKET#gs://}")"
BUCKET_NAME="${BUCKET_NAME%%/*}"

read -r -d '' MOUNT <<SCRIPT || true
set -euo pipefail
if ! command -v gcsfuse >/dev/null; then
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
fi
mkdir -p "\$HOME/bucket"
if mountpoint -q "\$HOME/bucket"; then
  echo "\$(hostname): \$HOME/bucket already mounted"
else
  gcsfuse --implicit-dirs --rename-dir-limit=1000000 $BUCKET_NAME "\$HOME/bucket"
  echo "\$(hostname): mounted gs://$BUCKET_NAME at \$HOME/bucket"
fi
SCRIPT
on_workers all "$MOUNT"
