#!/usr/bin/env bash
# The multi-node story on Docker, asserted step by step (exits non-zero at the
# first failure): 3 managers + 2 workers from docker-compose.yml; a secret
# delivered to a service's container; leader killed; a manager cut off by a
# network partition; an in-place secret update; the worker running the task
# removed. Tears down everything it made (containers, network, volumes, the
# images it built) even on failure. SWARMD_IMAGE_BUILD / SWARMD_PROFILE are
# passed to docker/build.sh; KEEP=1 leaves the cluster up.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${COMPOSE_PROJECT_NAME:-swarmd-demo}
dc() { docker-compose -p "$P" "$@"; }
started=$(date +%s)
cleanup() {
  local rc=$?
  if [[ ${KEEP:-0} == 1 ]]; then echo "demo: left running (docker-compose -p $P down -v to remove)"; return; fi
  if ((rc != 0)); then dc logs --tail 30 >&2 || true; fi
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  docker rmi -f swarmd-manager:local swarmd-worker:local swarmd-base:local >/dev/null 2>&1 || true
  docker image prune -f --filter label=org.swarmd.built-here=1 >/dev/null 2>&1 || true
  echo "demo: torn down ($(($(date +%s) - started)) s in all)"
}
trap cleanup EXIT
trap 'exit 143' TERM INT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { echo "demo: FAILED: $*" >&2; exit 1; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local n=$1 what=$2; shift 2
  for _ in $(seq 1 $((n * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  fail "timed out after ${n}s waiting for $what"
}
ctl() { local m=$1; shift; dc exec -T "$m" secretctl "$@"; }
leader_of() { # the manager container that leads, as seen by manager $1
  local lid; lid=$(ctl "$1" --format json info | python3 -c 'import json,sys; print(json.load(sys.stdin)["leader_raft_id"])')
  for m in manager1 manager2 manager3; do
    [[ $(ctl "$m" --format json info 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["raft_id"])' 2>/dev/null) == "$lid" ]] && { echo "$m"; return; }
  done
  return 1
}

step "build the images (SWARMD_IMAGE_BUILD=${SWARMD_IMAGE_BUILD:-offline})"
docker/build.sh

step "docker-compose up: 3 managers, 2 workers"
dc up -d
ready5() { [[ $(ctl manager1 node ls | grep -c ' ready ') == 5 ]]; }
wait_for 90 "five ready nodes" ready5
ctl manager1 node ls

step "no process in any container carries a join token in its command line or environment"
for c in manager1 manager2 manager3 worker1 worker2; do
  # What anyone in the container can read (a node's environ is root's and needs
  # CAP_SYS_PTRACE, which Docker does not grant: unreadable is fine).
  procs=$(dc exec -T -u 0 "$c" sh -c 'cat /proc/[0-9]*/cmdline /proc/[0-9]*/environ 2>/dev/null' | tr '\0' '\n' || true)
  [[ $procs == *SWDTKN-* ]] && fail "a process in $c carries a join token"
  [[ -n $procs ]] || fail "could not read the processes of $c"
done
echo "no join token in any container's /proc/*/cmdline or environ"

step "load the workload's image (an OCI layout built into the manager's container image)"
ctl manager1 image load /opt/images/busybox-oci
ctl manager1 image ls
step "create a secret and a one-replica service that uses it"
printf 'v1-compose-secret' | ctl manager1 create db_pass - >/dev/null
ctl manager1 service create web --image busybox:1 --secret db_pass -- sh -c \
  'last=; while true; do v=$(cat /run/secrets/db_pass); [ "$v" != "$last" ] && echo "uid $(id -u) read: $v" && last=$v; sleep 0.2; done' >/dev/null
running() { ctl manager1 service ps web | grep -q ' running .* running'; }
wait_for 60 "the task to run" running
ctl manager1 service ps web
step "the value, read inside the container (service logs)"
wait_for 30 "the workload's output" bash -c "docker-compose -p $P exec -T manager1 secretctl service logs web | grep -q 'read: v1-compose-secret'"
ctl manager1 service logs web
node=$(ctl manager1 --format json service ps web | python3 -c 'import json,sys; print([t for t in json.load(sys.stdin) if t["state"]=="running"][0]["node"])')
other=$([[ $node == worker1 ]] && echo worker2 || echo worker1)
step "the task has a user namespace of its own: on $node, host uid 65534 cannot read its secret"
dc exec -T -u 0 "$node" sh -c '
  pat="last=; whil""e"  # (split, so that this shell does not match itself)
  pid=
  for p in /proc/[0-9]*; do
    if tr "\0" " " <"$p/cmdline" 2>/dev/null | grep -q "$pat"; then pid=${p#/proc/}; break; fi
  done
  [ -n "$pid" ] || { echo "no task process"; exit 1; }
  echo "task pid $pid: uid_map $(cat /proc/$pid/uid_map | tr -s " ")"
  awk "NR==1 && \$1==0 && \$2>=2147483648 && \$3==65536 {ok=1} END {exit !ok}" /proc/$pid/uid_map || { echo "no user namespace"; exit 1; }
  for f in /proc/$pid/root/run/secrets/db_pass /proc/$pid/environ; do
    if setpriv --reuid 65534 --regid 65534 --clear-groups cat "$f" >/dev/null 2>&1; then echo "uid 65534 read $f"; exit 1; fi
    echo "uid 65534: $f refused"
  done' || fail "the task on $node has no user namespace of its own, or host uid 65534 read it"

step "$node runs it; $other holds nothing"
dc exec -T "$node" swarmd worker status --data-dir /var/lib/swarmd
st=$(dc exec -T "$other" swarmd worker status --data-dir /var/lib/swarmd); echo "$other: $st"
[[ $st == *'"secrets":[]'* && $st == *'"tasks":[]'* ]] || fail "$other holds something"

step "docker kill the leader; the other two keep taking writes"
leader=$(leader_of manager1); echo "leader: $leader"
docker kill "$(dc ps -q "$leader")" >/dev/null
survivor=$(for m in manager1 manager2 manager3; do [[ $m != "$leader" ]] && echo "$m" && break; done)
t0=$(date +%s%N)
wait_for 30 "a write through $survivor" bash -c "printf x | docker-compose -p $P exec -T $survivor secretctl create after-kill -"
echo "first write after the kill: $(( ($(date +%s%N) - t0) / 1000000 )) ms after it"
dc start "$leader" >/dev/null
wait_for 60 "$leader back" bash -c "docker-compose -p $P exec -T $leader secretctl ls -q | grep -q ."

step "cut a manager off the network: it refuses writes, the majority keeps working"
net=$(docker network ls --format '{{.Name}}' | grep "^${P//-/}_swarmd$\|^${P}_swarmd$" | head -1)
cut=$(for m in manager1 manager2 manager3; do [[ $m != "$(leader_of "$survivor")" ]] && echo "$m" && break; done)
echo "network $net; cutting off $cut"
docker network disconnect "$net" "$(dc ps -q "$cut")"
refused() { out=$(printf y | docker-compose -p "$P" exec -T "$cut" secretctl create cut-off - 2>&1) && return 1; [[ $out == *"no quorum"* ]]; }
wait_for 30 "$cut to refuse writes with no quorum" refused
printf y | docker-compose -p "$P" exec -T "$cut" secretctl create cut-off - 2>&1 | tail -1 || true
majority=$(for m in manager1 manager2 manager3; do [[ $m != "$cut" ]] && echo "$m" && break; done)
wait_for 30 "a write through $majority" bash -c "printf z | docker-compose -p $P exec -T $majority secretctl create during-partition -"
step "reconnect: it converges"
docker network connect "$net" "$(dc ps -q "$cut")"
converged() {
  local a b; a=$(ctl "$majority" --format json info | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["last_applied"], d["state_digest"])')
  b=$(ctl "$cut" --format json info | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["last_applied"], d["state_digest"])')
  [[ $a == "$b" ]]
}
wait_for 60 "$cut to converge" converged
[[ $(ctl "$cut" ls) == *during-partition* ]] || fail "$cut lacks the write made during the partition"
echo "$cut has caught up (equal state digests)"

step "secretctl update: the running task sees the new value, same task"
task_before=$(ctl manager1 --format json service ps web | python3 -c 'import json,sys; print([t for t in json.load(sys.stdin) if t["state"]=="running"][0]["id"])')
printf 'v2-compose-secret' | ctl manager1 update db_pass - >/dev/null
wait_for 30 "the new value inside the container" bash -c "docker-compose -p $P exec -T manager1 secretctl service logs web | grep -q 'read: v2-compose-secret'"
task_after=$(ctl manager1 --format json service ps web | python3 -c 'import json,sys; print([t for t in json.load(sys.stdin) if t["state"]=="running"][0]["id"])')
[[ $task_before == "$task_after" ]] || fail "the task was replaced ($task_before → $task_after)"
ctl manager1 service logs web | tail -2

step "node rm the worker running it: the task moves, the removed worker wipes and exits"
wid=$(ctl manager1 --format json node ls | python3 -c "import json,sys; print([n['id'] for n in json.load(sys.stdin) if n['hostname']=='$node'][0])")
ctl manager1 node rm --force "$wid"
moved() { ctl manager1 --format json service ps web | python3 -c "import json,sys; ts=json.load(sys.stdin); sys.exit(0 if any(t['state']=='running' and t['node']=='$other' for t in ts) else 1)"; }
wait_for 60 "the task on $other" moved
exited() { [[ $(docker inspect -f '{{.State.Running}}' "$(dc ps -q "$node")") == false ]]; }
wait_for 30 "$node to exit" exited
# (Read the logs whole: `grep -q` on a pipe would end it early and, with
# pipefail, fail the check.)
nodelog=$(dc logs --no-color "$node" 2>&1)
grep -q "removed from the cluster" <<<"$nodelog" || fail "$node did not say it was removed"
grep -q "task ended" <<<"$nodelog" || fail "$node did not stop its task"
echo "$node exited: $(grep -o 'this node was removed[^;]*' <<<"$nodelog" | tail -1)"
wait_for 30 "the value on $other" bash -c "docker-compose -p $P exec -T manager1 secretctl service logs web | grep -c 'read: v2-compose-secret' | grep -q 2"
ctl manager1 service ps web

printf '\n\033[1mdemo: all steps passed\033[0m\n'
