#!/bin/busybox sh
# /init of the system tests' guest (built by guest.py): static busybox,
# e2fsprogs' mke2fs and the kernel modules listed in /modules/order.
#
# The kernel command line names what to do: qtest=STEP,STEP,... run in
# order on the first virtio disk, /dev/vda:
#   mkfs    mke2fs -t ext4 over the whole disk (mke2fs discards it first)
#   write   write f1 (8 MiB random), f2 (text, compresses well), f3 (small)
#   sums    print the sha256 of every regular file in the root directory
#   trim    delete f1 f2 f3, then fstrim the file system
# Each step mounts and unmounts the file system itself, so every step
# ends with the data flushed to the disk.
#
# Everything the test reads is on the console, one line each, prefixed by
# "QTEST ": "sum HASH NAME", "step NAME ok UPTIME", and at the end "done" or
# "fail WHAT".  The guest then powers off (QEMU runs with -no-reboot).

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /mnt

say() { echo "QTEST $*"; }
finish() { say "$@"; sync; poweroff -f; }

while read -r m; do
    insmod "/modules/$m" || finish fail "insmod $m"
done < /modules/order

# virtio devices are probed asynchronously: wait up to 10 s for the disk.
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -le 100 ] || finish fail "no /dev/vda"
    sleep 0.1
done

write_files() {
    dd if=/dev/urandom of=/mnt/f1 bs=1M count=8 2>/dev/null &&
    seq 1 400000 > /mnt/f2 &&
    head -c 3000 /dev/urandom | base64 > /mnt/f3
}

sums() {
    for f in /mnt/*; do
        [ -f "$f" ] || continue
        set -- $(sha256sum "$f")
        say sum "$1" "${f#/mnt/}"
    done
}

trim() {
    rm -f /mnt/f1 /mnt/f2 /mnt/f3 && sync && fstrim -v /mnt
}

# mounted STEP: run STEP on the mounted file system, unmount even if it fails.
mounted() {
    mount -t ext4 /dev/vda /mnt || return 1
    "$1"
    rc=$?
    umount /mnt || return 1
    return $rc
}

steps=$(sed -n 's/.*qtest=\([^ ]*\).*/\1/p' /proc/cmdline)
[ -n "$steps" ] || finish fail "no qtest= on the kernel command line"
for step in $(echo "$steps" | tr , ' '); do
    case $step in
        # e2fsprogs' mke2fs: busybox's makes only ext2 (and busybox's shell
        # runs its own applets whatever PATH says).
        mkfs) /sbin/mke2fs -q -F -t ext4 /dev/vda ;;
        write) mounted write_files ;;
        sums) mounted sums ;;
        trim) mounted trim ;;
        *) false ;;
    esac || finish fail "$step"
    # The guest's uptime after each step shows where a slow boot spends.
    say step "$step" ok "$(cut -d' ' -f1 /proc/uptime)"
done
finish done
