#!/bin/bash
# Run the command lines of examples/README.md that can run on this machine.
#
#   examples/test-examples.sh
#
# QCOW2_PLUGIN selects the plugin (default build/plugin/nbdkit-qcow2-plugin.so
# in this tree).  Every check prints PASS, FAIL or SKIP (a tool is missing);
# the exit status is 1 if any check failed.
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
plugin="${QCOW2_PLUGIN:-$root/build/plugin/nbdkit-qcow2-plugin.so}"
plugin="$(realpath "$plugin")"
# nbdsh needs the nbd module, which only Debian's python3 has.
export PATH="/usr/bin:$PATH"

if [ ! -f "$plugin" ]; then
    echo "$0: plugin $plugin not found: ninja -C build, or set QCOW2_PLUGIN" >&2
    exit 1
fi
# The filters: next to the plugin in a build tree, else installed in
# nbdkit's filter directory (found by name).
filter() {   # filter NAME: what to pass to --filter=
    local so
    so="$(dirname "$plugin")/../filters/$1/nbdkit-qcow2-$1-filter.so"
    if [ -f "$so" ]; then realpath "$so"; else echo "qcow2-$1"; fi
}
compress_filter=$(filter compress)
snapshot_filter=$(filter snapshot)
for t in nbdkit qemu-img qemu-io nbdinfo nbdcopy nbdsh; do
    if ! command -v $t >/dev/null; then
        echo "$0: $t is needed" >&2
        exit 1
    fi
done

tmp="$(mktemp -d /tmp/qcow2-examples.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
cd "$tmp"

pass=0 fail=0 skip=0
result() {   # result NAME STATUS [DETAIL]
    printf '%-4s %s%s\n' "$2" "$1" "${3:+: $3}"
    case $2 in PASS) pass=$((pass+1));; FAIL) fail=$((fail+1));;
               SKIP) skip=$((skip+1));; esac
}
# check NAME CMD...: PASS if CMD succeeds; its output goes to NAME.log.
check() {
    local name=$1; shift
    local log="$tmp/log.${name//[^A-Za-z0-9]/_}"
    if "$@" >"$log" 2>&1; then
        result "$name" PASS
    else
        result "$name" FAIL "see below"
        sed 's/^/    | /' "$log" | tail -20
    fi
}
skip() { result "$1" SKIP "$2"; }

# wait_for FILE: wait up to 30 s for a file (pidfile, socket) to appear.
wait_for() {
    for _ in $(seq 300); do [ -e "$1" ] && return 0; sleep 0.1; done
    return 1
}

# stop_pid PID: SIGTERM, then wait up to 10 s for the process to be gone
# (nbdkit flushes and closes the image on the way out).
stop_pid() {
    kill "$1" &&
    for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done &&
    ! kill -0 "$1" 2>/dev/null
}

# serve NAME IMAGE [KEY=VALUE...]: a daemon on $tmp/NAME.sock, pid in
# $tmp/NAME.pid; stop it with stop_pid "$(cat "$tmp/NAME.pid")".
serve() {
    local name=$1 img=$2; shift 2
    rm -f "$tmp/$name.sock" "$tmp/$name.pid"
    nbdkit -U "$tmp/$name.sock" -P "$tmp/$name.pid" "$plugin" "$img" "$@" &&
    wait_for "$tmp/$name.pid" &&
    pids+=("$(cat "$tmp/$name.pid")")
}
unserve() { stop_pid "$(cat "$tmp/$1.pid")"; }

# clean IMAGE: qemu-img check finds no error and no leak (exit 2, 3).
clean() { qemu-img check "$1"; }

# The test image: 64 MiB with data, a zero area, a compressed cluster and
# holes; ref.raw is what QEMU reads from it.
qemu-img create -q -f qcow2 disk.qcow2 64M
qemu-io -f qcow2 -c 'write -P 0x41 0 1M' -c 'write -P 0x42 10M 64k' \
        -c 'write -z 20M 1M' -c 'write -c -P 0x43 30M 64k' disk.qcow2 >/dev/null
qemu-img convert -f qcow2 -O raw disk.qcow2 ref.raw
sha256sum disk.qcow2 > disk.sha256
size=$(stat -c %s ref.raw)

# ---------------------------------------------------------------- nbdinfo
t_nbdinfo() {
    nbdkit -U - "$plugin" disk.qcow2 --run 'nbdinfo "$uri"' > info.txt &&
    grep -q "export-size: $size" info.txt &&
    grep -q 'can_multi_conn: true' info.txt &&
    grep -q 'block_size_preferred: 65536' info.txt
}
check "nbdinfo (captive)" t_nbdinfo

t_nbdinfo_map() {
    nbdinfo --map -- [ nbdkit "$plugin" disk.qcow2 ] > map.txt &&
    cat map.txt &&
    grep -Eq '^ +0 +1048576 +0 +data' map.txt &&
    grep -q 'hole,zero' map.txt
}
check "nbdinfo --map -- [ nbdkit ... ] (socket activation by libnbd)" t_nbdinfo_map

# ------------------------------------------------- daemon with -U and -P
sock="$tmp/disk.sock"
t_daemon() {
    serve disk disk.qcow2 &&
    [ "$(nbdinfo --size "nbd+unix:///?socket=$sock")" = "$size" ]
}
check "daemon: nbdkit -U SOCK -P PIDFILE, nbdinfo --size" t_daemon

# ---------------------------------------------------------- qemu-img
t_convert_uri() {
    qemu-img convert -f raw "nbd+unix:///?socket=$sock" -O raw c1.raw &&
    cmp c1.raw ref.raw
}
check "qemu-img convert -f raw nbd+unix:///?socket=... -O raw" t_convert_uri

t_convert_qcow2() {
    qemu-img convert -f raw "nbd+unix:///?socket=$sock" -O qcow2 -c c1.qcow2 &&
    qemu-img compare -f raw -F qcow2 ref.raw c1.qcow2
}
check "qemu-img convert ... -O qcow2 -c" t_convert_qcow2

t_convert_old() {
    qemu-img convert -f raw "nbd:unix:$sock" -O raw c2.raw && cmp c2.raw ref.raw
}
check "qemu-img convert -f raw nbd:unix:SOCK" t_convert_old

t_image_opts() {
    qemu-img convert --image-opts \
        "driver=nbd,server.type=unix,server.path=$sock,read-only=on" \
        -O raw c3.raw && cmp c3.raw ref.raw
}
check "-blockdev style options (qemu-img convert --image-opts)" t_image_opts

t_nbdcopy() {
    nbdcopy "nbd+unix:///?socket=$sock" d1.raw && cmp d1.raw ref.raw &&
    [ "$(nbdcopy "nbd+unix:///?socket=$sock" - | sha256sum)" = \
      "$(sha256sum < ref.raw)" ]
}
check "nbdcopy URI FILE, URI -" t_nbdcopy

# Stop the daemon: a server holds the image's locks, and the tests below
# start their own servers on the same image.
t_daemon_stop() { unserve disk && sha256sum -c --quiet disk.sha256; }
check "daemon stopped by pid (image unchanged by reads)" t_daemon_stop

# ------------------------------------------------------------- writing
# Each test writes a copy of disk.qcow2 (or a new image) and compares it
# with the same writes applied to a copy of ref.raw.
t_write_qemu_io() {
    cp disk.qcow2 w1.qcow2 && cp ref.raw w1.raw &&
    qemu-io -f raw -c 'write -P 0x44 40M 1M' w1.raw >/dev/null &&
    serve w1 w1.qcow2 &&
    qemu-io -f raw -c 'write -P 0x44 40M 1M' -c 'read -P 0x44 40M 1M' \
        "nbd+unix:///?socket=$tmp/w1.sock" &&
    unserve w1 && clean w1.qcow2 &&
    qemu-img compare -f raw -F qcow2 w1.raw w1.qcow2
}
check "qemu-io -f raw writes over nbd+unix://, image clean and as written" \
      t_write_qemu_io

t_nbdcopy_create() {
    nbdcopy -- ref.raw [ nbdkit "$plugin" new.qcow2 create=true size=64M ] &&
    clean new.qcow2 && qemu-img compare -f raw -F qcow2 ref.raw new.qcow2
}
check "nbdcopy -- FILE [ nbdkit qcow2 NEW create=true size=64M ]" \
      t_nbdcopy_create

t_nbdcopy_compress() {
    nbdcopy -- ref.raw [ nbdkit --filter="$compress_filter" "$plugin" \
                         small.qcow2 create=true size=64M ] &&
    clean small.qcow2 && qemu-img compare -f raw -F qcow2 ref.raw small.qcow2 &&
    qemu-img check small.qcow2 | tee small.check &&
    ! grep -q ' 0.00% compressed clusters' small.check
}
check "nbdcopy into [ nbdkit --filter=qcow2-compress ... create=true ]" \
      t_nbdcopy_compress

t_convert_into() {
    qemu-img create -q -f qcow2 into.qcow2 64M &&
    serve into into.qcow2 &&
    qemu-img convert -n -f raw ref.raw -O raw "nbd+unix:///?socket=$tmp/into.sock" &&
    unserve into && clean into.qcow2 &&
    qemu-img compare -f raw -F qcow2 ref.raw into.qcow2
}
check "qemu-img convert -n FILE nbd+unix://... into a served image" t_convert_into

# ----------------------------------------------------------- snapshots
t_snapshots() {
    cp disk.qcow2 snap.qcow2 &&
    serve snap snap.qcow2 snapshot-create=before-upgrade &&
    nbdinfo --list "nbd+unix:///?socket=$tmp/snap.sock" | tee list.txt &&
    grep -q 'export="before-upgrade"' list.txt &&
    nbdsh -u "nbd+unix:///?socket=$tmp/snap.sock" \
          -c 'h.pwrite(b"Z" * 65536, 0); h.flush()' &&
    nbdcopy "nbd+unix:///before-upgrade?socket=$tmp/snap.sock" s1.raw &&
    cmp s1.raw ref.raw &&
    unserve snap && clean snap.qcow2 &&
    qemu-img snapshot -l snap.qcow2 | grep -q before-upgrade &&
    ! qemu-img compare -q -f raw -F qcow2 ref.raw snap.qcow2 &&
    # The snapshot filter: that snapshot whatever export the client names.
    nbdkit -U - --filter="$snapshot_filter" "$plugin" snap.qcow2 \
           snapshot=before-upgrade --run 'nbdcopy "$uri" s2.raw' &&
    cmp s2.raw ref.raw &&
    # Revert, then drop it.
    nbdkit -U - "$plugin" snap.qcow2 snapshot-apply=before-upgrade \
           --run 'nbdcopy "$uri" s3.raw' &&
    cmp s3.raw ref.raw &&
    nbdkit -U - "$plugin" snap.qcow2 snapshot-delete=before-upgrade \
           --run 'nbdinfo --list "$uri"' > list2.txt &&
    ! grep -q before-upgrade list2.txt &&
    clean snap.qcow2 && qemu-img compare -f raw -F qcow2 ref.raw snap.qcow2
}
check "snapshots: snapshot-create=, export, filter, -apply=, -delete=" t_snapshots

# ------------------------------------------------------- the qcow2 filter
qcow2_filter="$(dirname "$plugin")/../filters/qcow2/nbdkit-qcow2-filter.so"
if [ -f "$qcow2_filter" ]; then qcow2_filter=$(realpath "$qcow2_filter")
else qcow2_filter=qcow2; fi
t_filter_file() {
    cp disk.qcow2 cont.qcow2 && truncate -s 1G cont.qcow2 &&
    rm -f "$tmp/cont.sock" "$tmp/cont.pid" &&
    nbdkit -U "$tmp/cont.sock" -P "$tmp/cont.pid" --filter="$qcow2_filter" \
           file cont.qcow2 && wait_for "$tmp/cont.pid" &&
    pids+=("$(cat "$tmp/cont.pid")") &&
    nbdcopy "nbd+unix:///?socket=$tmp/cont.sock" f1.raw && cmp f1.raw ref.raw &&
    nbdsh -u "nbd+unix:///?socket=$tmp/cont.sock" \
          -c 'h.pwrite(b"F" * 65536, 40 << 20); h.flush()' &&
    unserve cont && clean cont.qcow2 &&
    [ "$(stat -c %s cont.qcow2)" = 1073741824 ] &&
    qemu-io -f qcow2 -c 'read -P 0x46 40M 64k' cont.qcow2 | grep -q 'read 65536'
}
check "--filter=qcow2 file: a container file, read and write" t_filter_file

t_filter_nbd() {
    cp disk.qcow2 raw-cont.qcow2 && truncate -s 1G raw-cont.qcow2 || return
    qemu-nbd -t -f raw -k "$tmp/raw.sock" raw-cont.qcow2 &
    local q=$!
    pids+=("$q")
    wait_for "$tmp/raw.sock" &&
    nbdkit -U - --filter="$qcow2_filter" nbd socket="$tmp/raw.sock" \
           --run 'nbdcopy "$uri" n1.raw' &&
    cmp n1.raw ref.raw && stop_pid "$q" && clean raw-cont.qcow2
}
check "--filter=qcow2 nbd socket=... (qemu-nbd serving the container raw)" \
      t_filter_nbd

t_filter_memory_create() {
    nbdkit -U - --filter="$qcow2_filter" memory size=256M create=true \
           qcow2-size=20G --run 'nbdinfo --size "$uri"' | grep -qx 21474836480
}
check "--filter=qcow2 memory size=256M create=true qcow2-size=20G" \
      t_filter_memory_create

t_filter_backing_dir() {
    mkdir -p images && cp disk.qcow2 images/base.qcow2 &&
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 images/top.qcow2 &&
    truncate -s 256M images/top.qcow2 || return
    qemu-nbd -t -f raw -k "$tmp/top.sock" images/top.qcow2 &
    local q=$!
    pids+=("$q")
    wait_for "$tmp/top.sock" &&
    nbdkit -U - --filter="$qcow2_filter" nbd socket="$tmp/top.sock" \
           backing-dir="$tmp/images" --run 'nbdcopy "$uri" b1.raw' &&
    cmp b1.raw ref.raw && stop_pid "$q"
}
check "--filter=qcow2 ... backing-dir=DIR (an overlay over a local file)" \
      t_filter_backing_dir

# ------------------------------------------------------- qemu-system
# A writable NBD drive, no guest: QMP says it is writable, the monitor's
# qemu-io writes through it, and the image holds the write afterwards.
t_qemu_system() {
    cp disk.qcow2 vm.qcow2 && serve vm vm.qcow2 &&
    printf '%s\n' '{"execute":"qmp_capabilities"}' \
        '{"execute":"query-block"}' \
        '{"execute":"human-monitor-command","arguments":{"command-line":"qemu-io d0 \"write -P 0x55 0 64k\""}}' \
        '{"execute":"quit"}' |
    timeout 60 qemu-system-x86_64 -machine none -nodefaults -display none \
        -drive "file=nbd+unix:///?socket=$tmp/vm.sock,format=raw,if=none,id=d0" \
        -qmp stdio > qmp.txt &&
    cat qmp.txt && grep -q '"ro": false' qmp.txt && grep -q nbd qmp.txt &&
    grep -q 'wrote 65536/65536 bytes at offset 0' qmp.txt &&
    unserve vm && clean vm.qcow2 &&
    qemu-io -f qcow2 -c 'read -P 0x55 0 64k' -c 'read -P 0x41 64k 960k' vm.qcow2
}
if command -v qemu-system-x86_64 >/dev/null; then
    check "qemu-system-x86_64 -drive file=nbd+unix:...,format=raw: writable, written" t_qemu_system
else
    skip "qemu-system with an NBD drive" "qemu-system-x86_64 not installed"
fi

t_captive_convert() {
    nbdkit -U - "$plugin" disk.qcow2 \
        --run 'qemu-img convert -f raw "$uri" -O raw c4.raw' &&
    cmp c4.raw ref.raw
}
check "qemu-img convert captive (--run with \$uri)" t_captive_convert

# ------------------------------------------------- nbdcopy, own servers
t_nbdcopy_captive() {
    nbdkit -U - "$plugin" disk.qcow2 --run 'nbdcopy "$uri" d2.raw' &&
    cmp d2.raw ref.raw
}
check "nbdcopy captive" t_nbdcopy_captive

t_nbdcopy_sa() {
    nbdcopy -- [ nbdkit "$plugin" disk.qcow2 ] d3.raw && cmp d3.raw ref.raw
}
check "nbdcopy -- [ nbdkit ... ] FILE" t_nbdcopy_sa

t_nbdcopy_qemu_nbd() {
    qemu-img create -q -f qcow2 d4.qcow2 "$(nbdinfo --size -- [ nbdkit "$plugin" disk.qcow2 ])" &&
    nbdcopy -- [ nbdkit "$plugin" disk.qcow2 ] [ qemu-nbd -f qcow2 d4.qcow2 ] &&
    qemu-img compare -f raw -F qcow2 ref.raw d4.qcow2
}
if command -v qemu-nbd >/dev/null; then
    check "nbdcopy -- [ nbdkit ... ] [ qemu-nbd -f qcow2 ... ]" t_nbdcopy_qemu_nbd
else
    skip "nbdcopy to [ qemu-nbd ]" "qemu-nbd not installed"
fi

# ------------------------------------------------------------ filters
t_cow() {
    nbdkit -U - --filter=cow "$plugin" disk.qcow2 --run 'nbdsh -u "$uri" -c "
assert not h.is_read_only()
h.pwrite(b\"hello\" * 1000, 4096)
h.flush()
assert h.pread(5000, 4096) == b\"hello\" * 1000
assert h.pread(4096, 0) == b\"A\" * 4096
h.trim(1 << 20, 10 << 20)
assert h.pread(65536, 10 << 20) == bytes(65536)
"' && sha256sum -c --quiet disk.sha256
}
check "cow filter: write, trim, read back with nbdsh; image unchanged" t_cow

t_blocksize_policy() {
    nbdkit -U - --filter=blocksize-policy "$plugin" disk.qcow2 \
        blocksize-minimum=512 blocksize-maximum=32M \
        blocksize-error-policy=error --run '
nbdinfo "$uri" | grep -q "block_size_minimum: 512" &&
nbdinfo "$uri" | grep -q "block_size_maximum: 33554432" &&
nbdsh -u "$uri" -c "
import errno
h.set_strict_mode(0)    # let the unaligned request reach the server
try:
    h.pread(100, 1)
    raise SystemExit(\"unaligned read was allowed\")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
assert h.pread(512, 0) == b\"A\" * 512
"'
}
check "blocksize-policy filter: limits shown, unaligned read refused" t_blocksize_policy

t_log() {
    nbdkit -U - --filter=log "$plugin" disk.qcow2 logfile="$tmp/disk.log" \
        --run 'nbdcopy "$uri" null:' &&
    grep -q 'Read id=' disk.log && grep -q 'Extents id=' disk.log
}
check "log filter: logfile= records reads and extents" t_log

t_log_cow() {
    nbdkit -U - --filter=log --filter=cow "$plugin" disk.qcow2 \
        logfile="$tmp/disk2.log" --run 'nbdsh -u "$uri" -c "h.pwrite(b\"x\" * 512, 0)"' &&
    grep -q 'Write id=' disk2.log && sha256sum -c --quiet disk.sha256
}
check "log + cow filters combined" t_log_cow

# ------------------------------------------------- systemd socket units
t_units_verify() {
    mkdir -p units/nbdkit-qcow2@.socket.d &&
    cp "$here/nbdkit-qcow2@.socket" units/nbdkit-qcow2@test.socket &&
    cp "$here/nbdkit-qcow2@.service" units/nbdkit-qcow2@test.service &&
    # The libvirt drop-in, where systemd looks for it (verify reads it too).
    cp "$here/nbdkit-qcow2@.socket.d/libvirt.conf" units/nbdkit-qcow2@.socket.d/ &&
    systemd-analyze verify --man=no units/nbdkit-qcow2@test.socket \
        units/nbdkit-qcow2@test.service 2>&1 | tee verify.txt &&
    ! grep -q 'nbdkit-qcow2@' verify.txt
}
if command -v systemd-analyze >/dev/null; then
    check "systemd-analyze verify nbdkit-qcow2@.socket/.service (+ libvirt drop-in)" t_units_verify
else
    skip "systemd-analyze verify" "systemd-analyze not installed"
fi

# The service's ExecStart under systemd-socket-activate, which passes a
# listening socket with LISTEN_FDS/LISTEN_PID as systemd does.  The image
# directory (a copy of the test image) and the plugin name are replaced by
# the test's.
t_socket_activation() {
    local line cmd sasock="$tmp/sa.sock"
    mkdir -p "$tmp/sa" && cp disk.qcow2 "$tmp/sa/disk.qcow2" || return 1
    line=$(sed -n 's/^ExecStart=//p' "$here/nbdkit-qcow2@.service")
    line=${line//%i/disk}
    line=${line//\/var\/lib\/nbdkit-qcow2\//$tmp/sa/}
    read -r -a cmd <<< "$line"
    for i in "${!cmd[@]}"; do
        [ "${cmd[$i]}" = qcow2 ] && cmd[$i]=$plugin
    done
    echo "running: ${cmd[*]}"
    systemd-socket-activate -l "$sasock" "${cmd[@]}" &
    local sapid=$!
    pids+=("$sapid")
    wait_for "$sasock" &&
    # Two clients one after the other, and two at once: one nbdkit serves all.
    [ "$(nbdinfo --size "nbd+unix:///?socket=$sasock")" = "$size" ] &&
    nbdcopy "nbd+unix:///?socket=$sasock" sa.raw && cmp sa.raw ref.raw &&
    { nbdinfo --size "nbd+unix:///?socket=$sasock" > sa1 &
      nbdinfo --size "nbd+unix:///?socket=$sasock" > sa2; wait $!; } &&
    [ "$(cat sa2)" = "$size" ] &&
    kill -0 "$sapid" && grep -qx nbdkit "/proc/$sapid/comm" &&
    # A write through it reaches the image, which stays clean.
    nbdsh -u "nbd+unix:///?socket=$sasock" \
          -c 'h.pwrite(b"S" * 4096, 50 << 20); h.flush()' &&
    stop_pid "$sapid" && clean "$tmp/sa/disk.qcow2" &&
    qemu-io -f qcow2 -c 'read -P 0x53 50M 4k' "$tmp/sa/disk.qcow2"
}
if command -v systemd-socket-activate >/dev/null; then
    check "socket activation: service ExecStart under systemd-socket-activate" \
          t_socket_activation
else
    skip "socket activation" "systemd-socket-activate not installed"
fi

# ------------------------------------------------------------ guestfish
# On an empty image of its own: the read-write line formats and writes it
# through the plugin, the others read the file back.
gf_drive="nbd://?socket=$tmp/gf.sock"
t_guestfish_rw() {
    qemu-img create -q -f qcow2 gf.qcow2 64M && serve gf gf.qcow2 &&
    guestfish --format=raw -a "$gf_drive" \
      run : part-disk /dev/sda mbr : mkfs ext4 /dev/sda1 : \
      mount /dev/sda1 / : write /hello 'hello, world'
}
t_guestfish_cat() {
    [ "$(guestfish --ro --format=raw -a "$gf_drive" -m /dev/sda1 cat /hello)" = \
      "hello, world" ]
}
t_virt_ls() {
    virt-ls --format=raw -a "$gf_drive" -m /dev/sda1 / | tee ls.txt &&
    grep -qx hello ls.txt
}
t_virt_cat() {
    [ "$(virt-cat --format=raw -a "$gf_drive" -m /dev/sda1 /hello)" = "hello, world" ]
}
t_guestfish_qcow2() {
    unserve gf && clean gf.qcow2 &&
    [ "$(guestfish --ro --format=qcow2 -a gf.qcow2 -m /dev/sda1 cat /hello)" = \
      "hello, world" ]
}
t_guestfish_captive() {
    [ "$(nbdkit -U - "$plugin" gf.qcow2 \
         --run 'guestfish --ro --format=raw -a "nbd://?socket=$unixsocket" -m /dev/sda1 cat /hello')" = \
      "hello, world" ]
}
if ! command -v guestfish >/dev/null; then
    skip "guestfish" "guestfish not installed"
elif ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
    skip "guestfish" "no kernel in /boot for libguestfs's appliance"
else
    check "guestfish over nbd://?socket=...: part-disk, mkfs, write" t_guestfish_rw
    check "guestfish --ro ... -m /dev/sda1 cat" t_guestfish_cat
    check "virt-ls ... -m /dev/sda1 /" t_virt_ls
    check "virt-cat ... -m /dev/sda1 /hello" t_virt_cat
    check "guestfish --ro --format=qcow2 on the image; qemu-img check clean" \
          t_guestfish_qcow2
    check "guestfish captive (nbdkit --run, \$unixsocket)" t_guestfish_captive
fi

# ------------------------------------------------------------- virt-v2v
# The XML of the README with the disk on a free port: virt-v2v reads it and
# reaches the plugin (--print-source stops before converting: the test
# image holds no operating system; tests/system/test_v2v.py converts one).
t_v2v_source() {
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') &&
    [ "$port" != 10809 ] &&
    sed "s/port='10900'/port='$port'/" "$here/virt-v2v-nbd-source.xml" > v2v-source.xml &&
    grep -q "port='$port'" v2v-source.xml &&
    rm -f "$tmp/v2v.pid" &&
    nbdkit -r -i 127.0.0.1 -p "$port" -P "$tmp/v2v.pid" "$plugin" disk.qcow2 &&
    wait_for "$tmp/v2v.pid" && pids+=("$(cat "$tmp/v2v.pid")") &&
    mkdir -p v2v-out &&
    virt-v2v -i libvirtxml v2v-source.xml -o local -os v2v-out -of qcow2 \
             --print-source 2>&1 | tee v2v.txt &&
    stop_pid "$(cat "$tmp/v2v.pid")" &&
    grep -q 'source name: guest' v2v.txt && grep -qP '^\t0 \[scsi\]' v2v.txt &&
    ! grep -Eiq 'error|ignored' v2v.txt &&
    sha256sum -c --quiet disk.sha256
}
if command -v virt-v2v >/dev/null; then
    check "virt-v2v -i libvirtxml virt-v2v-nbd-source.xml (--print-source)" \
          t_v2v_source
else
    skip "virt-v2v" "virt-v2v not installed"
fi

# ------------------------------------------------------------- libvirt
t_libvirt_xml() {
    xmllint --noout "$here/libvirt-nbd-disk.xml" &&
    xmllint --xpath "string(/disk/driver/@type)" "$here/libvirt-nbd-disk.xml" |
        grep -qx raw &&
    xmllint --xpath "string(/disk/source/@protocol)" "$here/libvirt-nbd-disk.xml" |
        grep -qx nbd
}
if command -v xmllint >/dev/null; then
    check "libvirt-nbd-disk.xml well-formed, raw over nbd" t_libvirt_xml
else
    skip "libvirt XML" "xmllint not installed"
fi
# A <disk> alone has no schema of its own: validate it inside a minimal
# domain, as virsh attach-device / edit would place it.
t_libvirt_schema() {
    { echo "<domain type='kvm'><name>t</name><memory>131072</memory>"
      echo "<os><type>hvm</type></os><devices>"
      sed -n '/^<disk/,$p' "$here/libvirt-nbd-disk.xml"
      echo "</devices></domain>"; } > domain.xml &&
    virt-xml-validate domain.xml domain
}
# The whole domain: raw NBD disk over the Unix socket, valid as it is.
t_libvirt_domain() {
    local x="$here/libvirt-domain.xml"
    xmllint --noout "$x" &&
    xmllint --xpath "string(/domain/devices/disk/driver/@type)" "$x" | grep -qx raw &&
    xmllint --xpath "string(/domain/devices/disk/source/@protocol)" "$x" | grep -qx nbd &&
    xmllint --xpath "string(/domain/devices/disk/source/host/@transport)" "$x" |
        grep -qx unix &&
    virt-xml-validate "$x" domain
}
if command -v virt-xml-validate >/dev/null; then
    check "libvirt-nbd-disk.xml valid in a domain (virt-xml-validate)" \
          t_libvirt_schema
    check "libvirt-domain.xml: raw NBD disk, valid (virt-xml-validate)" \
          t_libvirt_domain
else
    skip "libvirt schema validation" "virt-xml-validate not installed"
fi

# ------------------------------------------------------------- nbdfuse
# fuse_wait FILE PID: wait until nbdfuse shows FILE (it is mounted).
fuse_wait() {
    for _ in $(seq 300); do
        [ -f "$1" ] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
# fuse_stop DIR PID: unmount, then nbdfuse exits by itself.
fuse_stop() {
    fusermount3 -u "$1" &&
    for _ in $(seq 100); do kill -0 "$2" 2>/dev/null || break; sleep 0.1; done &&
    ! kill -0 "$2" 2>/dev/null
}

# The export as a file: it reads as the image, and a write through it
# (dd into the file) lands in the image, which stays clean.
t_nbdfuse() {
    local fpid
    cp disk.qcow2 fuse.qcow2 && serve fuse fuse.qcow2 && mkdir -p nbd &&
    { nbdfuse nbd/disk.raw "nbd+unix:///?socket=$tmp/fuse.sock" & fpid=$!; } &&
    pids+=("$fpid") &&
    fuse_wait nbd/disk.raw "$fpid" &&
    [ "$(sha256sum < nbd/disk.raw)" = "$(sha256sum < ref.raw)" ] &&
    head -c 65536 /dev/zero | tr '\0' 'F' |
        dd of=nbd/disk.raw bs=64k seek=100 conv=notrunc,fsync status=none &&
    fuse_stop nbd "$fpid" &&
    unserve fuse && clean fuse.qcow2 &&
    qemu-io -f qcow2 -c 'read -P 0x46 6400k 64k' -c 'read -P 0x41 0 1M' fuse.qcow2
}
# Captive: nbdfuse starts nbdkit (-P added to know its pid) and stops it
# when unmounted.
t_nbdfuse_captive() {
    local fpid
    mkdir -p nbd2 &&
    { nbdfuse nbd2/disk.raw [ nbdkit -P "$tmp/fcap.pid" "$plugin" disk.qcow2 ] &
      fpid=$!; } &&
    pids+=("$fpid") &&
    fuse_wait nbd2/disk.raw "$fpid" &&
    cmp nbd2/disk.raw ref.raw &&
    kill -0 "$(cat "$tmp/fcap.pid")" &&
    fuse_stop nbd2 "$fpid" &&
    ! kill -0 "$(cat "$tmp/fcap.pid")" 2>/dev/null
}
if ! command -v nbdfuse >/dev/null || ! command -v fusermount3 >/dev/null; then
    skip "nbdfuse" "nbdfuse or fusermount3 not installed"
elif [ ! -e /dev/fuse ]; then
    skip "nbdfuse" "no /dev/fuse"
else
    check "nbdfuse DIR/FILE nbd+unix://...: read, write, fusermount3 -u" t_nbdfuse
    check "nbdfuse DIR/FILE [ nbdkit qcow2 ... ]" t_nbdfuse_captive
fi

echo
echo "$pass passed, $fail failed, $skip skipped (plugin: $plugin)"
[ "$fail" -eq 0 ]
