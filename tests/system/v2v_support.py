"""What the guestfish and virt-v2v system tests share.

The helpers of tests/integration (serve, run, qemu_img, PLUGIN) are
loaded from tests/integration/conftest.py under their own module name, so
that they do not collide with another directory's conftest module.

libguestfs runs its appliance under QEMU (TCG when there is no KVM) with
the direct backend: no libvirtd is needed.  Its kernel is the host's
(Debian's linux-image-amd64 in /boot); the first run builds the appliance
with supermin and caches it in /var/tmp/.guestfs-UID.
"""

import contextlib
import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile

import pytest

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "qcow2_integration_helpers",
    os.path.join(os.path.dirname(_here), "integration", "conftest.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

PLUGIN = helpers.PLUGIN
run = helpers.run
qemu_img = helpers.qemu_img
serve = helpers.serve
nbdkit_env = helpers.nbdkit_env


def require(*tools):
    """Skip the test, naming what is missing, unless every tool is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip("not installed: %s (scripts/bootstrap.sh installs them)"
                    % " ".join(missing))


def require_libguestfs():
    """guestfish and a kernel for its appliance, or skip saying which."""
    require("guestfish")
    if not glob.glob("/boot/vmlinuz-*"):
        pytest.skip("no kernel in /boot for the libguestfs appliance "
                    "(install linux-image-amd64)")


@pytest.fixture
def workdir():
    """A private directory in /var/tmp, removed afterwards.

    Not pytest's tmp_path: pytest removes old tmp_path directories of any
    concurrent pytest run of the same user, and images of gigabytes are
    better kept off a /tmp that may be in memory.
    """
    d = tempfile.mkdtemp(prefix="nbdkit-qcow2-system-", dir="/var/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def guestfs_env():
    env = dict(os.environ)
    env["LIBGUESTFS_BACKEND"] = "direct"
    return env


def guestfish(*args, script="", timeout=600):
    """Run guestfish with the commands of script on its standard input.

    Returns its standard output; fails the test with guestfish's messages
    if it exits non-zero.
    """
    p = subprocess.run(["guestfish", *args], input=script, text=True,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=guestfs_env(), timeout=timeout)
    if p.returncode != 0:
        pytest.fail("guestfish %s exited %d:\n%s\n%s"
                    % (" ".join(args), p.returncode, p.stdout, p.stderr))
    return p.stdout


def nbd_drive(sock):
    """guestfish's -a for an NBD export on a Unix socket.

    libguestfs takes nbd://?socket=PATH, not nbd+unix:// URIs.
    """
    return "nbd://?socket=" + sock


def qemu_img_check_clean(image):
    """qemu-img check finds no corruption and no leak (exit 0)."""
    p = qemu_img("check", image, check=False)
    assert p.returncode == 0, "qemu-img check %s: %s%s" % (image, p.stdout, p.stderr)


def free_tcp_port():
    """A port on 127.0.0.1 that nothing listens on now (never 10809)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 10809:
            return port


@contextlib.contextmanager
def serve_tcp(image, *params, readonly=False):
    """Serve image with the plugin on 127.0.0.1, a free port; yield the port.

    For clients that take NBD only over TCP (virt-v2v's libvirt XML input).
    nbdkit is stopped by its PID on exit.
    """
    with helpers.nbdkit_server([PLUGIN, "file=" + str(image), *params],
                               readonly, tcp_port=free_tcp_port()) as srv:
        yield int(srv.uri.rsplit(":", 1)[1])


