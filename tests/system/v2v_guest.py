"""A small bootable Debian guest for the virt-v2v test, built once and cached.

The guest is Debian's minbase with its kernel, GRUB (BIOS) and sysvinit (a
getty on ttyS0 prints the login prompt the test waits for; sysvinit boots
in well under a minute under TCG).  It is debootstrapped from the Debian
mirror that this machine's apt already uses, then written into a new qcow2
image *through the plugin*: the plugin creates the image, guestfish
partitions and formats the export, unpacks the tree into it and runs
grub-install and update-grub inside the guest (libguestfs's `command`).

The image is cached in $QCOW2_V2V_CACHE (default
/var/tmp/nbdkit-qcow2-v2v-cache) under a name that includes a hash of this
file, so that changing the recipe builds a new guest.  The test serves the
cached image read-only; it never changes after it is built.
"""

import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import time

from v2v_support import guestfish, nbd_drive, qemu_img_check_clean, serve

CACHE = os.environ.get("QCOW2_V2V_CACHE", "/var/tmp/nbdkit-qcow2-v2v-cache")
SIZE = "2G"
PACKAGES = ["linux-image-amd64", "grub-pc", "sysvinit-core"]
HOSTNAME = "v2vguest"     # the serial console shows "HOSTNAME login:"

# Only the modules listed are put in the initramfs (MODULES=list): a
# small initramfs that boots from virtio-blk, virtio-scsi, SATA or IDE.
# MODULES=dep cannot be used: it would look at the disk of the machine
# that builds it (the host, or libguestfs's appliance).
INITRAMFS_MODULES = ["virtio_pci", "virtio_blk", "virtio_scsi", "sd_mod",
                     "ata_piix", "ahci", "ext4"]

# What the guest needs besides the packages.  fstab names the root file
# system by label, so that it does not depend on the disk's bus.
GUEST_FILES = {
    "etc/hostname": HOSTNAME + "\n",
    "etc/fstab": "LABEL=root / ext4 errors=remount-ro 0 1\n",
    "etc/initramfs-tools/conf.d/v2v-test.conf": "MODULES=list\n",
    "etc/initramfs-tools/modules": "".join(m + "\n" for m in INITRAMFS_MODULES),
}
GUEST_APPEND = {
    # A login prompt on the serial console.
    "etc/inittab": "T0:2345:respawn:/sbin/getty -L ttyS0 115200 vt100\n",
    # Boot at once, kernel messages and the console on ttyS0.
    "etc/default/grub": ('GRUB_TIMEOUT=0\n'
                         'GRUB_CMDLINE_LINUX="console=ttyS0"\n'
                         'GRUB_TERMINAL=serial\n'
                         'GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"\n'),
}

# Runs in libguestfs's appliance over the export.  The partition starts
# at 1 MiB, leaving room for GRUB's core image after the MBR.
GUESTFISH_INSTALL = """\
run
part-init /dev/sda mbr
part-add /dev/sda p 2048 -1
part-set-bootable /dev/sda 1 true
mkfs ext4 /dev/sda1 label:root
mount /dev/sda1 /
tar-in {tar} /
command "grub-install --target=i386-pc /dev/sda"
command update-grub
umount-all
"""


def recipe_hash():
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def codename():
    with open("/etc/os-release") as f:
        for line in f:
            if line.startswith("VERSION_CODENAME="):
                return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("no VERSION_CODENAME in /etc/os-release")


def apt_sources():
    """(uri, suites, components) of every enabled `deb` source of apt."""
    out = []
    for path in ["/etc/apt/sources.list"] + sorted(
            glob.glob("/etc/apt/sources.list.d/*.list")):
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                words = line.split("#", 1)[0].split()
                if len(words) >= 3 and words[0] == "deb":
                    words = [w for w in words[1:] if not w.startswith("[")]
                    out.append((words[0], words[1:2], words[2:]))
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as f:
            stanzas = f.read().split("\n\n")
        for stanza in stanzas:
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.split()
            if "deb" in fields.get("types", []) and fields.get("uris") and \
                    fields.get("enabled", ["yes"]) != ["no"]:
                for uri in fields["uris"]:
                    out.append((uri, fields.get("suites", []),
                                fields.get("components", [])))
    return out


def mirror():
    """The mirror for debootstrap: $QCOW2_V2V_MIRROR, else the apt source
    that carries this release's main component."""
    if os.environ.get("QCOW2_V2V_MIRROR"):
        return os.environ["QCOW2_V2V_MIRROR"]
    suite = codename()
    for uri, suites, components in apt_sources():
        if suite in suites and "main" in components:
            return uri
    raise RuntimeError("no apt source for %s main: set QCOW2_V2V_MIRROR" % suite)


def sh(*cmd, timeout=1200, **kw):
    """Run a command; on failure raise with its output."""
    p = subprocess.run(cmd, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout, **kw)
    if p.returncode != 0:
        raise RuntimeError("%s exited %d:\n%s" % (" ".join(cmd), p.returncode,
                                                  p.stdout[-4000:]))
    return p.stdout


def build_root(root):
    """debootstrap the guest's tree into root and configure it.

    INITRD=No stops the kernel's package from building an initramfs with
    every module (minutes under load): it is built once, below, when the
    configuration for a small one is in place.
    """
    sh("debootstrap", "--variant=minbase", "--include=" + ",".join(PACKAGES),
       codename(), root, mirror(), env=dict(os.environ, INITRD="No"))
    for name, text in GUEST_FILES.items():
        with open(os.path.join(root, name), "w") as f:
            f.write(text)
    for name, text in GUEST_APPEND.items():
        with open(os.path.join(root, name), "a") as f:
            f.write(text)
    # The initramfs, with the modules listed above.  The downloaded
    # packages are not needed.
    sh("chroot", root, "update-initramfs", "-c", "-k", "all")
    for deb in glob.glob(os.path.join(root, "var/cache/apt/archives/*.deb")):
        os.unlink(deb)


def install(tar, image):
    """A new image made by the plugin, the tree unpacked in it, GRUB
    installed, through the export; the image checked afterwards."""
    with serve(image, "create=true", "size=" + SIZE) as srv:
        guestfish("--format=raw", "-a", nbd_drive(srv.sock),
                  script=GUESTFISH_INSTALL.format(tar=tar), timeout=900)
    qemu_img_check_clean(image)


def remove_tree(path):
    """rm -rf path, after unmounting what a killed debootstrap may have
    left mounted under it (proc, sys, a bind mount of the host's /dev):
    removing through a mount would reach the host's files."""
    prefix = os.path.realpath(path) + "/"
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    for m in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        sh("umount", "-l", m)
    shutil.rmtree(path, ignore_errors=True)


def log(what, since):
    print("v2v guest: %s took %.0f s" % (what, time.monotonic() - since),
          file=sys.stderr)


@contextlib.contextmanager
def locked(path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def cached_guest():
    """Path of the guest image, building it first if it is not cached.

    Returns (path, seconds spent building, 0 if it was cached).
    """
    os.makedirs(CACHE, exist_ok=True)
    image = os.path.join(CACHE, "debian-%s-%s.qcow2" % (codename(), recipe_hash()))
    with locked(os.path.join(CACHE, "lock")):
        if os.path.exists(image):
            return image, 0
        for old in glob.glob(os.path.join(CACHE, "debian-*.qcow2")):
            os.unlink(old)     # built by an older recipe
        start = time.monotonic()
        work = os.path.join(CACHE, "build")
        remove_tree(work)
        os.makedirs(work)
        try:
            root = os.path.join(work, "root")
            tar = os.path.join(work, "root.tar")
            build_root(root)
            log("debootstrap and configuration", start)
            sh("tar", "--numeric-owner", "-C", root, "-cf", tar, ".")
            remove_tree(root)
            t = time.monotonic()
            install(tar, os.path.join(work, "guest.qcow2"))
            log("installation into the image through the plugin", t)
            os.rename(os.path.join(work, "guest.qcow2"), image)
        finally:
            remove_tree(work)
        return image, time.monotonic() - start
