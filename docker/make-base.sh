#!/usr/bin/env bash
# Makes the base image `swarmd-base:local` with no registry: a root filesystem
# assembled from this machine's files (swarmd and secretctl as built here, the
# C libraries they and runc/crun link, a static busybox for a shell, runc and
# crun from Debian's packages), imported with `docker import`.
# Usage: docker/make-base.sh TARGET_DIR_WITH_BINARIES
set -euo pipefail
bins=${1:?directory with swarmd and secretctl}
root=$(mktemp -d /tmp/swarmd-base.XXXXXX)
trap 'rm -rf "$root"' EXIT

copy_with_libs() { # copy_with_libs FILE DEST_DIR
  install -D -m 0755 "$1" "$root$2/$(basename "$1")"
  ldd "$1" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    [[ -e $root$lib ]] || install -D -m 0755 "$lib" "$root$lib"
  done
}

mkdir -p "$root"/{bin,usr/local/bin,usr/bin,usr/sbin,etc,proc,sys,dev,run,var/lib/swarmd,root}
install -d -m 1777 "$root/tmp"
copy_with_libs "$bins/swarmd" /usr/local/bin
copy_with_libs "$bins/secretctl" /usr/local/bin
copy_with_libs "$(command -v runc)" /usr/sbin
copy_with_libs "$(command -v crun)" /usr/bin
copy_with_libs "$(command -v unshare)" /usr/bin
copy_with_libs "$(command -v nsenter)" /usr/bin
bb=$(command -v busybox)
install -m 0755 "$bb" "$root/bin/busybox"
for t in sh ash awk sort tr cat ls mkdir mount umount grep sed sleep id ps kill rm cp mv tar wget nc ip sha256sum hostname env; do
  ln -sf busybox "$root/bin/$t"
done
cat >"$root/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
swarmd:x:10001:10001:swarmd manager:/var/lib/swarmd:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/sh
P
cat >"$root/etc/group" <<'G'
root:x:0:
swarmd:x:10001:
nogroup:x:65534:
G
echo "hosts: files dns" >"$root/etc/nsswitch.conf"
# The demo's workload image, busybox:1, as an OCI layout (secretctl image
# load reads it; workers get it from the managers, never from this path).
img=$(mktemp -d /tmp/swarmd-busybox.XXXXXX)
mkdir -p "$img"/{bin,dev,proc,sys,run,etc}; install -d -m 1777 "$img/tmp"
install -m 0755 "$bb" "$img/bin/busybox"
for t in sh cat id sha256sum sleep echo; do ln -sf busybox "$img/bin/$t"; done
mkdir -p "$root/opt/images"
"$bins/secretctl" image build-rootfs "$img" --out "$root/opt/images/busybox-oci" --name busybox:1 >/dev/null
rm -rf "$img"
chmod -R a+rX "$root/opt/images"
cp docker/worker-entry.sh "$root/usr/local/bin/worker-entry" 2>/dev/null || cp "$(dirname "$0")/worker-entry.sh" "$root/usr/local/bin/worker-entry"
cp "$(dirname "$0")/manager-entry.sh" "$root/usr/local/bin/manager-entry"
chmod 0755 "$root/usr/local/bin/worker-entry" "$root/usr/local/bin/manager-entry"
mkdir -p "$root/bootstrap"
chown 10001:10001 "$root/var/lib/swarmd" "$root/bootstrap"
tar -C "$root" -c . | docker import \
  -c 'ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/bin' \
  -c 'ENTRYPOINT ["/usr/local/bin/swarmd"]' \
  -c 'LABEL org.swarmd.built-here=1' \
  - swarmd-base:local >/dev/null
echo "swarmd-base:local: $(docker image inspect swarmd-base:local --format '{{.Size}}' | awk '{printf "%.1f MB", $1/1e6}')"
