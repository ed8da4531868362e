#!/bin/sh
# Worker container entrypoint. Gives the worker a cgroup namespace of its own
# (rooted at this container's cgroup) with writable cgroup hierarchies mounted
# fresh, so that runc can create the tasks' cgroups below this container and
# nowhere else; then runs the worker. Joins on first start (token from the
# bootstrap volume), restarts from its data dir afterwards.
set -eu
if [ "${SWARMD_IN_CGROUPNS:-}" != 1 ]; then
  SWARMD_IN_CGROUPNS=1 exec /usr/bin/unshare --cgroup --mount --propagation private "$0" "$@"
fi
# Docker covers parts of /proc (kcore, keys, sysrq-trigger…) and /sys
# (firmware); while they are covered the kernel refuses the fresh /proc each
# task's pid namespace needs, and the fresh sysfs of a task's network namespace
# when the task has a user namespace of its own (a mount from a user namespace
# must not reveal more than is already visible). Uncover them in this worker's
# own mount namespace only (its cgroup hierarchies are mounted fresh below).
for m in $(awk '$5 ~ "^/proc/." || ($5 ~ "^/sys/." && $5 !~ "^/sys/fs/cgroup") {print $5}' /proc/self/mountinfo | sort -r); do
  umount "$m" 2>/dev/null || true
done
mount -t tmpfs -o mode=755,nosuid,nodev,noexec cgroup /sys/fs/cgroup
if [ -f /proc/self/cgroup ] && grep -q '^0::' /proc/self/cgroup && ! grep -q ':cpu' /proc/self/cgroup; then
  mount -t cgroup2 cgroup2 /sys/fs/cgroup
else
  for h in $(awk 'NR>1 && $2!=0 {print $2}' /proc/cgroups | sort -u); do
    ctrls=$(awk -v h="$h" 'NR>1 && $2==h {printf "%s%s", sep, $1; sep=","}' /proc/cgroups)
    mkdir -p "/sys/fs/cgroup/$ctrls"
    mount -t cgroup -o "$ctrls" cgroup "/sys/fs/cgroup/$ctrls"
    case $ctrls in *,*) for c in $(echo "$ctrls" | tr , ' '); do ln -s "$ctrls" "/sys/fs/cgroup/$c"; done ;; esac
  done
  mkdir -p /sys/fs/cgroup/systemd && mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
fi
data=/var/lib/swarmd
if [ -f "$data/worker.json" ]; then
  exec swarmd run --data-dir "$data"
fi
while [ ! -s /bootstrap/worker.token ]; do sleep 0.5; done
# The token comes from the file, never the command line (/proc/PID/cmdline is world-readable).
exec swarmd worker join --token-file /bootstrap/worker.token --remote "$SWARMD_MANAGERS" --data-dir "$data"
