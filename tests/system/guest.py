"""A tiny Linux guest for the system tests.

Debian's kernel (package linux-image-amd64) with an initramfs built here:
static busybox, e2fsprogs' mke2fs with its libraries, the kernel's modules
for a virtio-blk disk and ext4 (dependencies from modules.dep), and
guest-init.sh as /init.  The guest runs the steps named on its kernel
command line (qtest=mkfs,write,sums ...) on its first disk and reports on
the serial console; see guest-init.sh for the steps and the protocol.

QEMU runs it under TCG (no KVM on CI machines), its disk being an NBD
export over a Unix socket, as a user would attach the plugin's export to a
VM.  The host side reads the guest's files back with debugfs from the
image's raw bytes (qemu-img convert), so the guest, the host and QEMU all
agree on what was written.
"""

import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

import pytest

from conftest import qemu_img, run, serve

HERE = os.path.dirname(os.path.abspath(__file__))
INIT = os.path.join(HERE, "guest-init.sh")

# What /init loads, in this order with the dependencies of each before it:
# the PCI transport and the block driver for /dev/vda, the crc32c the ext4
# and jbd2 checksums ask the crypto API for, and ext4.
MODULES = ["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"]

# Programs copied with their shared libraries (busybox-static has none).
PROGRAMS = ["/bin/busybox", "/sbin/mke2fs"]
# mke2fs -t ext4 takes ext4's features from its configuration file.
FILES = ["/etc/mke2fs.conf"]

# A boot under TCG takes about 10 s on the 2-core CI machine; this bounds
# a hung guest, not a slow one.
BOOT_TIMEOUT = 300

# Names /init writes and deletes (guest-init.sh, write and trim steps);
# f1 is 8 MiB from /dev/urandom.
GUEST_FILES = ("f1", "f2", "f3")
F1_SIZE = 8 << 20

# Steps of the two boots of write_then_trim.
WRITE = ["mkfs", "write", "sums"]
TRIM = ["sums", "trim", "sums"]


class GuestUnavailable(Exception):
    """What the guest needs is not installed (the reason is the message)."""


@dataclass
class Guest:
    """A kernel and the initramfs built for it, in one directory."""
    kernel: str
    initramfs: str
    version: str


@dataclass
class Outcome:
    """What the guest reported on its console."""
    steps: list = field(default_factory=list)   # steps that succeeded
    sums: list = field(default_factory=list)    # {name: sha256} per sums step
    failed: str = None                          # "fail WHAT" if it failed
    done: bool = False


# --------------------------------------------------------------------------
# Building

def find_kernel():
    """(version, vmlinuz) of the newest kernel with its modules installed."""
    found = []
    for image in glob.glob("/boot/vmlinuz-*"):
        version = image[len("/boot/vmlinuz-"):]
        if os.path.exists("/lib/modules/%s/modules.dep" % version):
            found.append((version, image))
    if not found:
        raise GuestUnavailable(
            "no kernel with modules in /boot and /lib/modules "
            "(apt-get install linux-image-amd64)")
    # Debian's versions sort correctly by their numeric fields.
    return max(found, key=lambda f: [int(n) for n in re.findall(r"\d+", f[0])])


def module_load_order(modules_dir, names):
    """Paths (relative to modules_dir) of names and their dependencies, each
    after everything it depends on.

    modules.dep lists for each module all the modules it needs, the ones
    to load first last (modprobe loads them from the end of the list).
    """
    deps, by_name = {}, {}
    with open(os.path.join(modules_dir, "modules.dep")) as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[path] = rest.split()
            name = os.path.basename(path).split(".ko")[0].replace("-", "_")
            by_name[name] = path
    order = []
    for name in names:
        if name not in by_name:
            raise GuestUnavailable("kernel module %s not in %s/modules.dep"
                                   % (name, modules_dir))
        target = by_name[name]
        for path in list(reversed(deps[target])) + [target]:
            if path not in order:
                order.append(path)
    return order


def copy_module(src, dst_dir):
    """Copy a module into dst_dir as a plain .ko, decompressed if need be
    (Debian 12's are plain; later releases compress them), so that the
    guest's busybox insmod needs no decompressor; returns its file name."""
    base = os.path.basename(src)
    name, _, compression = base.partition(".ko")
    opener = {"": open, ".xz": lzma.open, ".gz": gzip.open}.get(compression)
    if opener is None:
        raise GuestUnavailable("cannot decompress kernel module %s" % src)
    with opener(src, "rb") as fin, open(os.path.join(dst_dir, name + ".ko"), "wb") as fout:
        shutil.copyfileobj(fin, fout)
    return name + ".ko"


def shared_libraries(program):
    """Absolute paths of the shared libraries (and loader) program needs."""
    p = subprocess.run(["ldd", program], text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    if p.returncode != 0:     # "not a dynamic executable": static
        return []
    return re.findall(r"(/\S+) \(0x", p.stdout)


def copy_into(tree, path):
    """Copy path (following symlinks) to the same path inside tree."""
    dst = os.path.join(tree, path.lstrip("/"))
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copy(path, dst)


def build(dest):
    """Build the guest in directory dest: a copy of the kernel and an
    uncompressed initramfs (newc cpio).  Returns a Guest."""
    version, vmlinuz = find_kernel()
    modules_dir = "/lib/modules/" + version
    for prog in PROGRAMS:
        if not os.path.exists(prog):
            raise GuestUnavailable("%s missing (busybox-static, e2fsprogs)" % prog)

    tree = os.path.join(dest, "tree")
    for d in ("bin", "sbin", "dev", "proc", "sys", "mnt", "modules", "etc"):
        os.makedirs(os.path.join(tree, d), exist_ok=True)
    for prog in PROGRAMS:
        copy_into(tree, prog)
        for lib in shared_libraries(prog):
            copy_into(tree, lib)
    for path in FILES:
        copy_into(tree, path)
    shutil.copy(INIT, os.path.join(tree, "init"))
    os.chmod(os.path.join(tree, "init"), 0o755)
    order = [copy_module(os.path.join(modules_dir, m), os.path.join(tree, "modules"))
             for m in module_load_order(modules_dir, MODULES)]
    with open(os.path.join(tree, "modules", "order"), "w") as f:
        f.write("".join(m + "\n" for m in order))

    initramfs = os.path.join(dest, "initramfs.cpio")
    files = subprocess.run(["find", "."], cwd=tree, check=True,
                           stdout=subprocess.PIPE).stdout
    with open(initramfs, "wb") as out:
        subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
                       cwd=tree, input=files, stdout=out, check=True)
    shutil.rmtree(tree)
    kernel = os.path.join(dest, "vmlinuz")
    shutil.copy(vmlinuz, kernel)
    return Guest(kernel, initramfs, version)


# --------------------------------------------------------------------------
# Booting

def kernel_cmdline(steps):
    """The guest's kernel command line: serial console, the steps to run,
    and an immediate reboot on a kernel panic, which QEMU's -no-reboot
    (libvirt's on_reboot=destroy) turns into the end of the run."""
    return "console=ttyS0 quiet panic=-1 qtest=" + ",".join(steps)


def parse_console(text):
    """The guest's QTEST lines as an Outcome."""
    out = Outcome()
    current = {}
    # The firmware's terminal escapes may precede the first line on its line.
    for m in re.finditer(r"QTEST (.*)$", text, re.M):
        words = m.group(1).split()
        if words[0] == "sum" and len(words) == 3:
            current[words[2]] = words[1]
        elif words[0] == "step" and len(words) >= 3 and words[2] == "ok":
            out.steps.append(words[1])
            if words[1] == "sums":
                out.sums.append(current)
                current = {}
        elif words[0] == "fail":
            out.failed = " ".join(words[1:])
        elif words[0] == "done":
            out.done = True
    return out


def file_tail(path, lines=40):
    """The last lines of a log (the guest's console), for failure messages."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return str(e)


def check_outcome(console_path, steps):
    """Parse the guest's console and fail unless every step ran."""
    with open(console_path, errors="replace") as f:
        text = f.read()
    out = parse_console(text)
    tail = file_tail(console_path)
    assert out.failed is None, "guest step failed: %s\n%s" % (out.failed, tail)
    assert out.done and out.steps == list(steps), (
        "guest ran %s of %s\n%s" % (out.steps, list(steps), tail))
    return out


def qemu_command(guest, sock, steps, console):
    """qemu-system-x86_64 booting guest with the NBD export at Unix socket
    sock as its virtio-blk disk; the serial console goes to file console.
    The disk options are those of README.md ("Boot a VM ...")."""
    # The format node says raw: the export is the guest's disk, never probed.
    # discard=unmap on both nodes passes the guest's trims down to NBD.
    # (A comma in an option value is written twice.)
    path = sock.replace(",", ",,")
    return ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-smp", "1",
            "-nodefaults", "-nographic", "-no-reboot", "-monitor", "none",
            "-serial", "file:" + console,
            "-kernel", guest.kernel, "-initrd", guest.initramfs,
            "-append", kernel_cmdline(steps),
            "-blockdev", "driver=nbd,node-name=nbd0,server.type=unix,"
                         "server.path=%s,discard=unmap" % path,
            "-blockdev", "driver=raw,node-name=disk0,file=nbd0,discard=unmap",
            "-device", "virtio-blk-pci,drive=disk0"]


def boot(guest, sock, steps, workdir):
    """Boot the guest on the export at sock, run steps, wait for it to power
    off; returns its Outcome (fails the test if a step failed)."""
    fd, console = tempfile.mkstemp(dir=str(workdir), prefix="console-", suffix=".log")
    os.close(fd)
    try:
        p = subprocess.run(qemu_command(guest, sock, steps, console),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=BOOT_TIMEOUT)
    except subprocess.TimeoutExpired:     # run() has killed QEMU
        pytest.fail("the guest still ran after %d s:\n%s"
                    % (BOOT_TIMEOUT, file_tail(console)))
    assert p.returncode == 0, "qemu exited %d: %s" % (p.returncode, p.stdout)
    return check_outcome(console, steps)


# --------------------------------------------------------------------------
# The host's view of the guest's file system

def files_in_raw(raw):
    """{name: sha256} of the regular files in the root directory of the
    ext4 file system in raw file raw, read with debugfs."""
    listing = run("debugfs", "-R", "ls -p /", raw).stdout
    out = {}
    # ls -p: /inode/mode/uid/gid/name/size/ ; regular files have mode 100xxx.
    for m in re.finditer(r"^/\d+/(\d+)/\d+/\d+/([^/]+)/\d*/$", listing, re.M):
        if m.group(1).startswith("100"):
            data = subprocess.run(["debugfs", "-R", "cat /" + m.group(2), raw],
                                  check=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL).stdout
            out[m.group(2)] = hashlib.sha256(data).hexdigest()
    return out


def host_files(source, workdir, fmt="qcow2"):
    """{name: sha256} of the files as the host reads them: source (an
    image, or an NBD URI with fmt="raw") converted to raw by qemu-img,
    then read by debugfs."""
    fd, raw = tempfile.mkstemp(dir=str(workdir), suffix=".raw")
    os.close(fd)
    try:
        qemu_img("convert", "-f", fmt, "-O", "raw", source, raw)
        return files_in_raw(raw)
    finally:
        os.unlink(raw)


def allocation(image):
    """(bytes of the file allocated on the host, bytes qemu-img map calls
    data) of an image."""
    mapped = json.loads(qemu_img("map", "--output=json", image).stdout)
    data = sum(e["length"] for e in mapped if e["data"])
    return os.stat(image).st_blocks * 512, data


def assert_clean(image):
    """qemu-img check finds no error, leak or corruption; returns its
    report (--output=json: "compressed-clusters", ...)."""
    p = qemu_img("check", "--output=json", image, check=False)
    assert p.returncode == 0, "qemu-img check %s:\n%s%s" % (image, p.stdout, p.stderr)
    return json.loads(p.stdout)


# --------------------------------------------------------------------------
# The scenario every stack runs

def write_then_trim(image, workdir, boot, before=None, filters=()):
    """Two boots on image served by the plugin (through filters): write,
    then read back and trim.  boot(sock, steps) boots the guest on the
    export at Unix socket sock and returns its Outcome.  before: {name:
    sha256} of the files already in the file system (None: the guest
    formats it first).

    After each boot the image passes qemu-img check and the host reads
    the files the guest reported; after the trim the image's allocation
    (on the host, and data per qemu-img map) has shrunk by at least f1,
    whose random bytes nothing can compress.  Returns the qemu-img check
    report after the first boot."""
    before = before or {}
    first = WRITE if not before else ["sums", "write", "sums"]
    with serve(image, filters=filters) as srv:
        out = boot(srv.sock, first)
    if before:
        assert out.sums[0] == before
    written = out.sums[-1]
    assert set(written) == set(before) | set(GUEST_FILES)
    report = assert_clean(image)
    assert host_files(image, workdir) == written
    allocated = allocation(image)

    with serve(image, filters=filters) as srv:
        out = boot(srv.sock, TRIM)
    assert out.sums[0] == written, "the second boot reads other data"
    assert out.sums[1] == before
    assert_clean(image)
    assert host_files(image, workdir) == before
    host, data = allocation(image)
    assert host <= allocated[0] - F1_SIZE, (
        "file allocation %d -> %d after fstrim" % (allocated[0], host))
    assert data <= allocated[1] - F1_SIZE, (
        "qemu-img map data %d -> %d after fstrim" % (allocated[1], data))
    return report
