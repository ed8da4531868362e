#!/bin/sh
# Manager container entrypoint (runs as the unprivileged user swarmd).
# manager1 (SWARMD_INIT=1) creates the cluster on first start and publishes the
# join tokens on the bootstrap volume; the others join with the manager token.
# Every later start is `swarmd run` from the data dir.
set -eu
data=/var/lib/swarmd
self=$(hostname):4242
if [ -f "$data/manager.json" ]; then
  exec swarmd run --data-dir "$data"
fi
if [ "${SWARMD_INIT:-}" = 1 ]; then
  swarmd manager init --data-dir "$data" --listen-addr 0.0.0.0:4242 --advertise-addr "$self" --heartbeat 1s &
  pid=$!
  export SWARMD_HOST=unix://$data/control.sock
  # Token files are 0600 (swarmd refuses a --token-file others can read).
  umask 077
  until secretctl join-token worker -q >/bootstrap/worker.token.tmp 2>/dev/null; do sleep 0.3; done
  secretctl join-token manager -q >/bootstrap/manager.token.tmp
  mv /bootstrap/worker.token.tmp /bootstrap/worker.token
  mv /bootstrap/manager.token.tmp /bootstrap/manager.token
  wait "$pid"
  exit $?
fi
while [ ! -s /bootstrap/manager.token ]; do sleep 0.5; done
# The token comes from the file, never the command line (/proc/PID/cmdline is world-readable).
exec swarmd manager join --token-file /bootstrap/manager.token --remote "$SWARMD_MANAGERS" --data-dir "$data" \
  --listen-addr 0.0.0.0:4242 --advertise-addr "$self"
