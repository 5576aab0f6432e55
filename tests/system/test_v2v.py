"""virt-v2v converts a guest whose disk the plugin serves; the result boots.

The Debian guest of v2v_guest.py (built once, cached) is served read-only
by the plugin on 127.0.0.1 (virt-v2v 2.2 takes an NBD disk from libvirt
XML only as <host name='localhost' port=...>).  virt-v2v -i libvirtxml
converts it to a local qcow2 image (-o local -of qcow2); the plugin then
serves that image over a Unix socket as the converted guest's disk, and
the guest must boot under QEMU (TCG) to a login prompt on its serial
console.  Both images pass `qemu-img check` afterwards.

Slow (minutes; up to ~9 when the guest is built on a fresh machine):
skipped when QUICK is set.
"""

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

import v2v_guest
from v2v_support import (guestfs_env, qemu_img_check_clean, require,
                         require_libguestfs, serve, serve_tcp,
                         workdir)  # noqa: F401 (a fixture)

BOOT_TIMEOUT = 300      # seconds to the login prompt (about 50 s here)
LOGIN_PROMPT = (v2v_guest.HOSTNAME + " login:").encode()

# The libvirt XML that examples/README.md shows; the test points its
# NBD disk at the port the plugin listens on.
SOURCE_XML = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "examples", "virt-v2v-nbd-source.xml")


def source_xml(port, path):
    """SOURCE_XML with its disk on port; returns the guest's name."""
    tree = ET.parse(SOURCE_XML)
    tree.find("devices/disk/source/host").set("port", str(port))
    tree.write(path)
    return tree.find("name").text


def converted_machine(domain_xml):
    """(machine type, memory in MiB, disk bus) of virt-v2v's output XML."""
    root = ET.parse(domain_xml).getroot()
    machine = root.find("os/type").get("machine", "pc")
    memory = root.find("memory")
    assert memory.get("unit", "KiB") == "KiB"
    bus = root.find("devices/disk/target").get("bus")
    return machine, int(memory.text) // 1024, bus


def boot_to_login(sock, machine, memory_mib, serial_log):
    """Boot the disk on the export at sock until the login prompt appears
    on the serial console; QEMU is stopped by its PID either way."""
    open(serial_log, "wb").close()      # polled before QEMU opens it
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", machine + ",accel=tcg",
         "-m", str(memory_mib), "-nodefaults", "-display", "none",
         "-serial", "file:" + serial_log,
         "-drive", "file=nbd+unix:///?socket=%s,format=raw,if=virtio" % sock],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline and qemu.poll() is None:
            with open(serial_log, "rb") as f:
                if LOGIN_PROMPT in f.read():
                    return
            time.sleep(1)
        with open(serial_log, "rb") as f:
            console = f.read()[-3000:].decode(errors="replace")
        if qemu.poll() is None:
            pytest.fail("no login prompt after %s s; console:\n%s"
                        % (BOOT_TIMEOUT, console))
        pytest.fail("QEMU exited %d before a login prompt: %s\nconsole:\n%s"
                    % (qemu.returncode, qemu.stdout.read().decode(errors="replace"),
                       console))
    finally:
        qemu.terminate()
        try:
            qemu.wait(30)
        except subprocess.TimeoutExpired:
            qemu.kill()
            qemu.wait()


def test_v2v_converts_guest_served_by_plugin(workdir):
    if os.environ.get("QUICK"):
        pytest.skip("QUICK is set: the virt-v2v conversion and boot take "
                    "minutes; unset QUICK to run it")
    require_libguestfs()
    require("virt-v2v", "debootstrap", "qemu-system-x86_64")
    guest, built = v2v_guest.cached_guest()
    print("guest image %s (%s)" % (guest, "built in %.0f s" % built
                                   if built else "cached"), file=sys.stderr)

    out = os.path.join(workdir, "out")
    os.mkdir(out)
    xml = os.path.join(workdir, "source.xml")
    with serve_tcp(guest, readonly=True) as port:
        name = source_xml(port, xml)
        p = subprocess.run(
            ["virt-v2v", "-i", "libvirtxml", xml,
             "-o", "local", "-os", str(out), "-of", "qcow2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=guestfs_env(), timeout=900)
    assert p.returncode == 0, "virt-v2v exited %d:\n%s" % (p.returncode, p.stdout)
    assert "This guest has virtio drivers installed" in p.stdout, p.stdout
    qemu_img_check_clean(guest)

    disk = os.path.join(out, name + "-sda")
    qemu_img_check_clean(disk)
    machine, memory, bus = converted_machine(os.path.join(out, name + ".xml"))
    assert bus == "virtio"
    with serve(disk) as srv:
        boot_to_login(srv.sock, machine, memory, os.path.join(workdir, "serial.log"))
    qemu_img_check_clean(disk)
