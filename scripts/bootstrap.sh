#!/usr/bin/env bash
# Install every Debian 12 package that building, serving, testing and
# benchmarking need.  Idempotent: does nothing when all are present.
set -euo pipefail

packages=(
  # build
  gcc meson ninja-build pkg-config perl
  nbdkit nbdkit-plugin-dev zlib1g-dev libzstd-dev libdeflate-dev libssl-dev
  # the oracle and the clients used by tests, examples and bench/
  qemu-utils libnbd-bin python3-libnbd python3-pytest fio
  # examples/test-examples.sh: a QEMU guest's NBD drive, systemd units,
  # libvirt XML (xmllint; virt-xml-validate and its schemas)
  qemu-system-x86 systemd libxml2-utils libvirt-clients
  # tests/system: a Linux guest (kernel, and for its initramfs static
  # busybox, mke2fs, cpio; debugfs on the host), libvirtd with its QEMU
  # driver, FUSE 3 for nbdfuse (in libnbd-bin)
  linux-image-amd64 busybox-static e2fsprogs cpio
  libvirt-daemon-system libvirt-daemon-driver-qemu fuse3
  # tests/system: guestfish (libguestfs's appliance boots the host's
  # kernel from /boot), virt-v2v, and debootstrap for the guest it converts
  libguestfs-tools virt-v2v debootstrap debian-archive-keyring
  # the filter's transport tests: real ssh, HTTP and S3 (Ceph) servers
  openssh-server nginx-light nbdkit-plugin-python python3-boto3
  ceph-mon ceph-osd radosgw ceph-common
  # fuzzing and sanitizer runtimes
  clang libclang-rt-14-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
    missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=
[ "$(id -u)" -eq 0 ] || sudo=sudo
echo "bootstrap: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
