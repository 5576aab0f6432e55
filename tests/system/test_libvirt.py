"""libvirt runs a domain whose disk is the plugin's export.

The test starts virtlogd and libvirtd itself (no systemd), with libvirtd's
sockets in a private directory, and stops both by PID.  The domain is
examples/libvirt-domain.xml, changed only where a test must: TCG instead
of KVM, the test guest's kernel and initramfs (guest.py) booted directly,
the test's socket, and the serial console into a file.  It runs the same
write / read back / trim scenario as test_guest.py.

libvirt's QEMU runs as an unprivileged user and cannot connect to a
socket that root's nbdkit created: the test checks the message users then
see, and that both documented ways give QEMU access: the ownership and
mode of examples/nbdkit-qcow2@.socket.d/libvirt.conf, and the chown of
examples/libvirt-domain.xml's comment.
"""

import configparser
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET

import pytest

from conftest import ROOT, qemu_img, serve
import guest as g

DOMAIN_XML = os.path.join(ROOT, "examples", "libvirt-domain.xml")
SOCKET_DROPIN = os.path.join(ROOT, "examples", "nbdkit-qcow2@.socket.d", "libvirt.conf")
SYSTEM_SOCKET = "/run/libvirt/libvirt-sock"
VIRTLOGD_SOCKET = "/run/libvirt/virtlogd-sock"
START_TIMEOUT = 60


# --------------------------------------------------------------------------
# The daemons

def listening(path):
    """Whether a server accepts connections on Unix socket path."""
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def start_daemon(cmd, pidfile, log):
    """Run a daemon that forks into the background (-d) writing pidfile
    (-p); returns its PID, or skips the test with the reason."""
    p = subprocess.run(cmd + ["-p", pidfile], text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while p.returncode == 0 and time.monotonic() < deadline:
        try:
            with open(pidfile) as f:
                return int(f.read())
        except (OSError, ValueError):     # not written yet
            time.sleep(0.1)
    pytest.skip("%s could not start (exit %d): %s%s"
                % (cmd[0], p.returncode, p.stdout, g.file_tail(log)))


def running(pid):
    """Whether process pid runs (a zombie waiting for its parent, which
    for a daemon is PID 1, has finished)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid, timeout=20):
    """SIGTERM a daemon (not our child), SIGKILL it if it lingers."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)


@pytest.fixture(scope="module")
def libvirt():
    """libvirtd (QEMU driver, system mode: QEMU runs as libvirt's user)
    with its sockets in a private directory; yields virsh's URI."""
    for prog in ("libvirtd", "virtlogd", "virsh"):
        if shutil.which(prog) is None:
            pytest.skip("%s not installed (libvirt-daemon-system, libvirt-clients)" % prog)
    # A second system libvirtd would share /run/libvirt/qemu with it.
    if listening(SYSTEM_SOCKET):
        pytest.skip("a libvirtd already runs (%s); the test starts its own"
                    % SYSTEM_SOCKET)
    d = tempfile.mkdtemp(prefix="qcow2-libvirt-")
    conf = os.path.join(d, "libvirtd.conf")
    log = os.path.join(d, "libvirtd.log")
    with open(conf, "w") as f:
        f.write('unix_sock_dir = "%s"\n' % d)
        f.write('auth_unix_rw = "none"\n')
        f.write('log_outputs = "3:file:%s"\n' % log)
    uri = "qemu:///system?socket=%s/libvirt-sock" % d
    pids = []
    try:
        # libvirt's QEMU driver hands QEMU's stdout and stderr to virtlogd
        # (qemu.conf stdio_handler); its socket path is fixed.
        if not listening(VIRTLOGD_SOCKET):
            pids.append(start_daemon(["virtlogd", "-d"], os.path.join(d, "virtlogd.pid"), log))
        pids.append(start_daemon(["libvirtd", "-d", "-f", conf],
                                 os.path.join(d, "libvirtd.pid"), log))
        deadline = time.monotonic() + START_TIMEOUT
        while subprocess.run(["virsh", "-c", uri, "version"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL).returncode != 0:
            if time.monotonic() > deadline:
                pytest.skip("libvirtd did not answer within %d s:\n%s"
                            % (START_TIMEOUT, g.file_tail(log)))
            time.sleep(0.2)
        yield uri
    finally:
        for pid in reversed(pids):
            stop_pid(pid)
        shutil.rmtree(d, ignore_errors=True)


def qemu_user():
    """The user and group libvirt runs QEMU as (qemu.conf; Debian's
    built-in default is libvirt-qemu)."""
    user = group = "libvirt-qemu"
    try:
        with open("/etc/libvirt/qemu.conf") as f:
            conf = f.read()
    except OSError:
        conf = ""
    m = re.search(r'^\s*user\s*=\s*"([^"]+)"', conf, re.M)
    user = m.group(1) if m else user
    m = re.search(r'^\s*group\s*=\s*"([^"]+)"', conf, re.M)
    group = m.group(1) if m else group
    return user, group


# --------------------------------------------------------------------------
# The domain

def domain_xml(guest, sock, steps, console, name):
    """examples/libvirt-domain.xml adapted to the test (see the module's
    docstring)."""
    dom = ET.parse(DOMAIN_XML).getroot()
    dom.set("type", "qemu")         # TCG: CI machines have no /dev/kvm
    dom.find("name").text = name
    dom.find("memory").text = "256"
    dom.find("vcpu").text = "1"
    dom.find("on_reboot").text = "destroy"
    os_ = dom.find("os")
    os_.remove(os_.find("boot"))
    ET.SubElement(os_, "kernel").text = guest.kernel
    ET.SubElement(os_, "initrd").text = guest.initramfs
    ET.SubElement(os_, "cmdline").text = g.kernel_cmdline(steps)
    dom.find("devices/disk/source/host").set("socket", sock)
    devices = dom.find("devices")
    for tag in ("serial", "console"):
        devices.remove(devices.find(tag))
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=console)
    ET.SubElement(serial, "target", port="0")
    return ET.tostring(dom, encoding="unicode")


def virsh(uri, *args, check=True):
    return subprocess.run(["virsh", "-c", uri, *args], check=check, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def create_domain(uri, guest, sock, steps, workdir):
    """virsh create a transient domain booting guest on the export at sock;
    returns (CompletedProcess of virsh create, domain name, console path)."""
    name = "qcow2-test-" + uuid.uuid4().hex[:8]
    console = os.path.join(workdir, name + ".console")
    xml = os.path.join(workdir, name + ".xml")
    with open(xml, "w") as f:
        f.write(domain_xml(guest, sock, steps, console, name))
    return virsh(uri, "create", xml, check=False), name, console


def boot_domain(uri, guest, sock, steps, workdir):
    """Boot the domain, wait until the guest powers it off (a transient
    domain then disappears); returns the guest's Outcome."""
    p, name, console = create_domain(uri, guest, sock, steps, workdir)
    assert p.returncode == 0, "virsh create: %s%s" % (p.stdout, p.stderr)
    deadline = time.monotonic() + g.BOOT_TIMEOUT
    while virsh(uri, "domstate", name, check=False).returncode == 0:
        if time.monotonic() > deadline:
            virsh(uri, "destroy", name, check=False)
            pytest.fail("domain %s still running after %d s:\n%s"
                        % (name, g.BOOT_TIMEOUT, g.file_tail(console)))
        time.sleep(0.2)
    return g.check_outcome(console, steps)


@pytest.fixture
def workdir():
    """A directory libvirt's QEMU may enter (pytest's tmp_path is private
    to root) for the domain XML and the console file."""
    d = tempfile.mkdtemp(prefix="qcow2-domain-")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def open_socket_directory(sock):
    """The directory of serve()'s socket is private to root; a socket
    unit's directory is searchable (DirectoryMode=0755)."""
    os.chmod(os.path.dirname(sock), 0o755)


def socket_unit_ownership():
    """(user, group, mode) that the socket unit drop-in sets."""
    conf = configparser.ConfigParser()
    conf.optionxform = str
    conf.read(SOCKET_DROPIN)
    s = conf["Socket"]
    return s["SocketUser"], s["SocketGroup"], int(s["SocketMode"], 8)


# --------------------------------------------------------------------------
# Tests

def test_root_socket_refused_then_chown(libvirt, guest, tmp_path, workdir):
    """nbdkit run by root makes a socket that only root may write to:
    libvirt's QEMU cannot connect and virsh create says so.  After the
    chown of examples/libvirt-domain.xml the same domain starts."""
    image = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    with serve(image) as srv:
        open_socket_directory(srv.sock)
        p, _, _ = create_domain(libvirt, guest, srv.sock, ["mkfs"], workdir)
        assert p.returncode != 0
        assert "Failed to connect to '%s': Permission denied" % srv.sock in p.stderr, p.stderr

        user, _ = qemu_user()
        os.chown(srv.sock, pwd.getpwnam(user).pw_uid, -1)
        boot_domain(libvirt, guest, srv.sock, ["mkfs"], workdir)
    g.assert_clean(image)
    assert g.host_files(image, tmp_path) == {}


def test_domain_writes_reads_back_and_trims(libvirt, guest, tmp_path, workdir):
    """The domain on a socket with the socket unit drop-in's ownership and
    mode: format and write, then read back and trim (guest.write_then_trim)."""
    user, group, mode = socket_unit_ownership()
    if (user, group) != qemu_user():
        pytest.skip("libvirt runs QEMU as %s:%s here (qemu.conf), not as the "
                    "drop-in's %s:%s" % (*qemu_user(), user, group))

    def boot(sock, steps):
        open_socket_directory(sock)
        os.chown(sock, pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid)
        os.chmod(sock, mode)
        return boot_domain(libvirt, guest, sock, steps, workdir)

    image = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", image, "128M")
    g.write_then_trim(image, tmp_path, boot)
