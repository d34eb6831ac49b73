# shellcheck shell=bash
# Sourced by the tpu_scripts: settings from flags or env, and `run`, which prints the
# command instead of running it under --dry-run.
#
# Flags (each also read from the env variable in brackets):
#   --name NAME        TPU VM / node name             [TPU_NAME, default flaxlm]
#   --zone ZONE        e.g. us-west4-a                [TPU_ZONE, required]
#   --project PROJECT  GCP project                    [TPU_PROJECT, default: gcloud's]
#   --type TYPE        v5e-8, v5litepod-16, v5p-8 ... [TPU_TYPE, default v5litepod-8]
#   --version VERSION  TPU runtime                    [TPU_VERSION, default from the type]
#   --bucket gs://B    for sync.sh and mount.sh       [FLAXLM_BUCKET]
#   --run RUN          log/run name                   [FLAXLM_RUN, default run]
#   --worker W         a worker index or all          [TPU_WORKER, default all]
#   --dry-run          print the gcloud commands      [DRY_RUN=1]
set -euo pipefail

TPU_NAME="${TPU_NAME:-flaxlm}"
TPU_ZONE="${TPU_ZONE:-}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_TYPE="${TPU_TYPE:-v5litepod-8}"
TPU_VERSION="${TPU_VERSION:-}"
TPU_WORKER="${TPU_WORKER:-all}"
FLAXLM_BUCKET="${FLAXLM_BUCKET:-}"
FLAXLM_RUN="${FLAXLM_RUN:-run}"
DRY_RUN="${DRY_RUN:-0}"
REST=()

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

COMMON_FLAGS="--name --zone --project --type --version --bucket --run --worker"

# Set the variable behind a flag; returns 1 for flags this file does not know.
set_common() {
  case "$1" in
    --name) TPU_NAME="$2" ;;
    --zone) TPU_ZONE="$2" ;;
    --project) TPU_PROJECT="$2" ;;
    --type) TPU_TYPE="$2" ;;
    --version) TPU_VERSION="$2" ;;
    --bucket) FLAXLM_BUCKET="$2" ;;
    --run) FLAXLM_RUN="$2" ;;
    --worker) TPU_WORKER="$2" ;;
    *) return 1 ;;
  esac
}

# parse_common "$@": known flags set variables; everything else lands in REST (in order,
# and all of it after a bare --).
parse_common() {
  REST=()
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --) shift; REST+=("$@"); return 0 ;;
      --*=*)
        set_common "${1%%=*}" "${1#*=}" || REST+=("$1") ;;
      --*)
        if [[ " $COMMON_FLAGS " == *" $1 "* ]]; then
          (($# >= 2)) || die "$1 needs a value"
          set_common "$1" "$2"
          shift
        else
          REST+=("$1")
        fi ;;
      *) REST+=("$1") ;;
    esac
    shift
  done
}

# The gcloud accelerator type: our preset names (v5e-16) map to gcloud's (v5litepod-16).
accelerator_type() {
  case "$1" in
    v5e-*) echo "v5litepod-${1#v5e-}" ;;
    *) echo "$1" ;;
  esac
}

# The default TPU runtime (software image) of an accelerator type.
runtime_version() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default runtime for --type $1; pass --version" ;;
  esac
}

# Number of TPU VMs (workers) of an accelerator type: v4/v5p count TensorCores (2 per
# chip, 4 chips per VM); v5e/v6e count chips (8 on a single-VM slice, else 4 per VM).
worker_count() {
  local size="${1##*-}"
  case "$1" in
    v4-* | v5p-*) echo $(((size + 7) / 8)) ;;
    v5litepod-* | v6e-*) if ((size <= 8)); then echo 1; else echo $((size / 4)); fi ;;
    *) echo 1 ;;
  esac
}

# Finish the settings once flags are parsed.
resolve_settings() {
  [[ -n "$TPU_ZONE" ]] || die "set the zone: --zone ZONE or TPU_ZONE"
  TPU_TYPE="$(accelerator_type "$TPU_TYPE")"
  TPU_VERSION="${TPU_VERSION:-$(runtime_version "$TPU_TYPE")}"
  WHERE=(--zone="$TPU_ZONE")
  if [[ -n "$TPU_PROJECT" ]]; then WHERE+=(--project="$TPU_PROJECT"); fi
}

# run CMD...: run it, or print it (shell-quoted) under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# probe CMD...: a read-only check (does the VM exist?). Printed and taken as false under
# --dry-run, so a dry run shows every command a first run would issue.
probe() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ (check)'
    printf ' %q' "$@"
    printf '\n'
    return 1
  fi
  "$@" >/dev/null 2>&1
}

# on_workers WORKER SCRIPT: run a bash script on one worker or on all of them. A dry run
# prints it as a pasteable command with the script in a quoted here-document.
on_workers() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ gcloud compute tpus tpu-vm ssh %q' "$TPU_NAME"
    printf ' %q' "${WHERE[@]}" --worker="$1"
    # shellcheck disable=SC2016  # the $(cat ...) is printed for the reader's shell
    printf ' --command="$(cat <<'"'"'REMOTE'"'"'\n%s\nREMOTE\n)"\n' "$2"
    return 0
  fi
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}
