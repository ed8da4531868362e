#!/usr/bin/env bash
# Builds swarmd-manager:local and swarmd-worker:local.
#   SWARMD_IMAGE_BUILD=offline (default): no registry needed — binaries built
#     here, a base imported from this machine's files (docker/make-base.sh).
#   SWARMD_IMAGE_BUILD=registry: the multi-stage docker/Dockerfile (pulls
#     rust:1-bookworm and debian:bookworm-slim).
#   SWARMD_PROFILE=release (default) or debug: which cargo build the offline
#     images carry (CI reuses the debug build its tests made).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${SWARMD_IMAGE_BUILD:-offline}
case $mode in
  offline)
    profile=${SWARMD_PROFILE:-release}
    if [[ $profile == release ]]; then cargo build --release --bins --quiet; else cargo build --bins --quiet; fi
    docker/make-base.sh "target/$profile"
    for t in manager worker; do
      docker build -q -f docker/Dockerfile.offline --target "$t" -t "swarmd-$t:local" docker >/dev/null
    done ;;
  registry)
    for t in manager worker; do
      docker build -f docker/Dockerfile --target "$t" -t "swarmd-$t:local" .
    done ;;
  *) echo "SWARMD_IMAGE_BUILD must be offline or registry, not $mode" >&2; exit 2 ;;
esac
for t in manager worker; do
  printf 'swarmd-%s:local  %s MB\n' "$t" "$(docker image inspect "swarmd-$t:local" --format '{{.Size}}' | awk '{printf "%.1f", $1/1e6}')"
done
