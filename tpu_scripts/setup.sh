#!/usr/bin/env bash
# Install this checkout of flaxlm on every worker (rerunnable: it refreshes the code and
# reuses the virtual environment).
#
#   tpu_scripts/setup.sh --zone us-west4-a [--name flaxlm] [--extra tpu] [--dry-run]
#
# Ships the tracked and untracked-but-not-ignored files of this checkout (what `git
# status` shows, so local edits go too) to ~/flaxlm on every worker and installs them
# with `pip install -e ".[tpu]"` into ~/flaxlm-venv. The TPU images ship Python 3.10 and
# flaxlm needs >= 3.11, so the venv is made by uv with its own Python 3.12 when needed.
source "$(dirname "$0")/common.sh"
parse_common "$@"
EXTRA=tpu
set -- "${REST[@]}"
while (($#)); do
  case "$1" in
    --extra) EXTRA="$2"; shift ;;
    --extra=*) EXTRA="${1#*=}" ;;
    *) die "unknown argument $1" ;;
  esac
  shift
done
resolve_settings

REPO="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="${TMPDIR:-/tmp}/flaxlm-$TPU_NAME.tar.gz"
if [[ "$DRY_RUN" == 1 ]]; then
  echo "+ (cd $REPO && git ls-files -z -co --exclude-standard | tar --null -T - -czf $TARBALL)"
else
  (cd "$REPO" && git ls-files -z -co --exclude-standard | tar --null -T - -czf "$TARBALL")
fi
run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:flaxlm.tar.gz" "${WHERE[@]}" \
  --worker=all

# Runs on each worker. $HOME expands there; EXTRA is filled in here.
read -r -d '' INSTALL <<SCRIPT || true
set -euo pipefail
rm -rf "\$HOME/flaxlm" && mkdir -p "\$HOME/flaxlm"
tar -xzf "\$HOME/flaxlm.tar.gz" -C "\$HOME/flaxlm"
if [ ! -x "\$HOME/flaxlm-venv/bin/python" ]; then
  if python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    python3 -m venv "\$HOME/flaxlm-venv"
  else
    command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh
    "\$HOME/.local/bin/uv" venv --seed --python 3.12 "\$HOME/flaxlm-venv"
  fi
fi
"\$HOME/flaxlm-venv/bin/python" -m pip install --quiet --upgrade pip
"\$HOME/flaxlm-venv/bin/python" -m pip install --quiet -e "\$HOME/flaxlm[$EXTRA]"
echo "\$(hostname): flaxlm installed, \$("\$HOME/flaxlm-venv/bin/python" -c 'import jax; print(jax.device_count(), "devices")')"
SCRIPT
on_workers all "$INSTALL"
