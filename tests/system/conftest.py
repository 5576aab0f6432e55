"""Fixtures of the system tests: real stacks on the plugin's export.

A Linux guest under QEMU, libvirt, FUSE and the NBD clients use the
plugin as users run them; QEMU (qemu-img check, compare, convert) and the
host's own tools (debugfs) judge the result.

The plugin-serving helpers are those of tests/integration/conftest.py
(serve, run, qemu_img, PLUGIN ... and the QCOW2_PLUGIN and
QCOW2_NBDKIT_ENV variables), re-exported here: test modules write
`from conftest import serve`.  pytest imports every conftest.py as the
top-level module "conftest", so the integration one is loaded from its
path under another name rather than imported.

Environment: the integration suite's.
"""

import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
INTEGRATION = os.path.join(os.path.dirname(HERE), "integration")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


integration = _load("integration_conftest", os.path.join(INTEGRATION, "conftest.py"))
PLUGIN = integration.PLUGIN
ROOT = integration.ROOT
Server = integration.Server
COMPRESS_FILTER = integration.COMPRESS_FILTER
assert_same_as_raw = integration.assert_same_as_raw
engine_args = integration.engine_args
extents = integration.extents
nbdkit_env = integration.nbdkit_env
qemu_img = integration.qemu_img
qemu_io = integration.qemu_io
qemu_raw = integration.qemu_raw
run = integration.run
serve = integration.serve

# The integration suite's image builders (images.py) import the names
# above from "conftest", which is this module here.
sys.path.append(INTEGRATION)

@pytest.fixture(scope="session")
def guest():
    """The test guest (guest.py), built once per session into a directory
    that every user may read: libvirt's QEMU runs as libvirt-qemu."""
    import guest as guest_module     # here: guest.py imports this module
    d = tempfile.mkdtemp(prefix="qcow2-guest-")
    os.chmod(d, 0o755)
    try:
        try:
            built = guest_module.build(d)
        except guest_module.GuestUnavailable as e:
            pytest.skip("cannot build the test guest: %s" % e)
        yield built
    finally:
        shutil.rmtree(d, ignore_errors=True)
