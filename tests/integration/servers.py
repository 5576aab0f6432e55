"""Real servers for the transport tests, started from Debian's packages.

Each context manager starts one daemon in the foreground (no systemd, no
daemonising) on a free port of 127.0.0.1 with a throw-away configuration
in a private temporary directory, waits until it answers, yields what a
client needs, and on exit stops it by PID and removes the directory, also
when the test failed.

  sshd()        OpenSSH with a fresh host key and user key pair
  nginx(root)   static HTTP server (range requests) over a document root
  ceph_s3()     one-node Ceph: monitor, one bluestore OSD on a sparse file,
                radosgw (beast) answering S3, and an S3 user
  nbdkit(...)   nbdkit with any plugin and filters, on a Unix socket
"""

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

from conftest import Server, nbdkit_env, run

LOCALHOST = "127.0.0.1"


def free_port():
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def listening(port):
    with socket.socket() as s:
        return s.connect_ex((LOCALHOST, port)) == 0


class Daemon:
    """A foreground process with its output in a log file."""

    def __init__(self, name, cmd, log_dir, env=None):
        self.name = name
        self.log = os.path.join(log_dir, name + ".log")
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([str(c) for c in cmd], stdout=f,
                                         stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL)

    def output(self):
        with open(self.log) as f:
            return f.read()

    def wait_until(self, ready, timeout, what):
        """Poll ready() until true; fail with the log if the daemon exits
        or the time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited %d before %s:\n%s" % (
                    self.name, self.proc.returncode, what, self.output()))
            if time.monotonic() > deadline:
                raise RuntimeError("%s: no %s after %ds:\n%s" % (
                    self.name, what, timeout, self.output()))
            time.sleep(0.05)

    def stop(self):
        """SIGTERM by PID, SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def daemons(prefix):
    """A private directory and a list for Daemons: on exit every daemon is
    stopped (last started first) and the directory removed."""
    d = tempfile.mkdtemp(prefix=prefix)
    started = []
    try:
        yield d, started
    finally:
        for dm in reversed(started):
            dm.stop()
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------
# OpenSSH

class Ssh:
    def __init__(self, port, user, identity, known_hosts):
        self.port, self.user = port, user
        self.identity, self.known_hosts = identity, known_hosts

    def plugin_args(self, path):
        """nbdkit-ssh-plugin keys for a file on this server."""
        return ["ssh", "host=" + LOCALHOST, "port=%d" % self.port,
                "user=" + self.user, "identity=" + self.identity,
                "known-hosts=" + self.known_hosts, "path=" + str(path)]


@contextlib.contextmanager
def sshd():
    """sshd on 127.0.0.1 accepting one throw-away key for the current user
    (root logs in with keys only: PermitRootLogin prohibit-password)."""
    # sshd refuses to start without its privilege separation directory.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    with daemons("qcow2-sshd-") as (d, started):
        host_key = os.path.join(d, "host_key")
        user_key = os.path.join(d, "user_key")
        for k in (host_key, user_key):
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k)
        shutil.copy(user_key + ".pub", os.path.join(d, "authorized_keys"))
        port = free_port()
        config = os.path.join(d, "sshd_config")
        with open(config, "w") as f:
            f.write("\n".join([
                "ListenAddress %s:%d" % (LOCALHOST, port),
                "HostKey " + host_key,
                "PidFile " + os.path.join(d, "sshd.pid"),
                "AuthorizedKeysFile " + os.path.join(d, "authorized_keys"),
                "StrictModes no",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "Subsystem sftp internal-sftp",
                ""]))
        with open(host_key + ".pub") as f:
            key_type, key = f.read().split()[:2]
        known_hosts = os.path.join(d, "known_hosts")
        with open(known_hosts, "w") as f:
            f.write("[%s]:%d %s %s\n" % (LOCALHOST, port, key_type, key))
        # -D: no daemonising, so the PID is ours; -e: log to stderr.
        dm = Daemon("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", config], d)
        started.append(dm)
        dm.wait_until(lambda: listening(port), 30, "listening socket")
        yield Ssh(port, getpass.getuser(), user_key, known_hosts)


# --------------------------------------------------------------------------
# nginx

@contextlib.contextmanager
def nginx(docroot):
    """nginx serving docroot (static files, with range requests) on
    127.0.0.1; yields the base URL."""
    with daemons("qcow2-nginx-") as (d, started):
        port = free_port()
        config = os.path.join(d, "nginx.conf")
        tmp = os.path.join(d, "tmp")
        os.mkdir(tmp)
        with open(config, "w") as f:
            f.write("""
daemon off;
master_process off;
worker_processes 1;
pid %(d)s/nginx.pid;
error_log %(d)s/error.log;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path %(tmp)s;
    proxy_temp_path %(tmp)s;
    fastcgi_temp_path %(tmp)s;
    uwsgi_temp_path %(tmp)s;
    scgi_temp_path %(tmp)s;
    default_type application/octet-stream;
    server {
        listen %(addr)s:%(port)d;
        root %(root)s;
    }
}
""" % dict(d=d, tmp=tmp, addr=LOCALHOST, port=port, root=docroot))
        # -e: the startup error log, before the configuration is read.
        dm = Daemon("nginx", ["/usr/sbin/nginx", "-p", d, "-e",
                              os.path.join(d, "startup.log"), "-c", config],
                    d)
        started.append(dm)
        dm.wait_until(lambda: listening(port), 30, "listening socket")
        yield "http://%s:%d" % (LOCALHOST, port)


# --------------------------------------------------------------------------
# Ceph: one monitor, one OSD, radosgw

class S3:
    def __init__(self, endpoint, access_key, secret_key):
        self.endpoint = endpoint
        self.access_key, self.secret_key = access_key, secret_key

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint,
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            region_name="us-east-1")

    def plugin_args(self, bucket, key, *more):
        """nbdkit-S3-plugin keys for an object prefix on this server."""
        return ["S3", "endpoint-url=" + self.endpoint,
                "access-key=" + self.access_key,
                "secret-key=" + self.secret_key,
                "bucket=" + bucket, "key=" + key, *more]


CEPH_CONF = """
[global]
fsid = %(fsid)s
mon host = [v2:%(addr)s:%(mon_port)d]
# A throw-away cluster on loopback: no cephx.  radosgw still needs the
# secure mode offered to log in to the monitor.
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc secure
keyring = /dev/null
# One OSD holds every placement group.
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon data avail warn = 1
run dir = %(d)s/run
admin socket = %(d)s/run/$name.asok
pid file = %(d)s/run/$name.pid
log file = %(d)s/log/$name.log
[mon.a]
mon data = %(d)s/mon
[osd.0]
osd data = %(d)s/osd
osd objectstore = bluestore
# A sparse file, created by mkfs.
bluestore block create = true
bluestore block size = 4294967296
bluestore cache autotune = false
bluestore cache size = 134217728
[client.rgw]
rgw frontends = beast endpoint=%(addr)s:%(rgw_port)d
rgw data = %(d)s/rgw
"""


@contextlib.contextmanager
def ceph_s3(timeout=120):
    """A one-node Ceph cluster answering S3 on 127.0.0.1; yields an S3 with
    a user's keys.  About 20 s to start here and 300 MB of memory."""
    with daemons("qcow2-ceph-") as (d, started):
        for sub in ("mon", "osd", "rgw", "run", "log"):
            os.mkdir(os.path.join(d, sub))
        conf = os.path.join(d, "ceph.conf")
        fsid = str(uuid.uuid4())
        mon_port, rgw_port = free_port(), free_port()
        with open(conf, "w") as f:
            f.write(CEPH_CONF % dict(fsid=fsid, addr=LOCALHOST, d=d,
                                     mon_port=mon_port, rgw_port=rgw_port))
        c = ["-c", conf]
        monmap = os.path.join(d, "monmap")
        run("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
            "[v2:%s:%d]" % (LOCALHOST, mon_port), monmap)
        run("ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", monmap)
        mon = Daemon("ceph-mon", ["ceph-mon", *c, "-f", "-i", "a"], d)
        started.append(mon)
        mon.wait_until(lambda: listening(mon_port), timeout, "monitor")

        osd_uuid = str(uuid.uuid4())
        run("ceph", *c, "--connect-timeout", "30", "osd", "new", osd_uuid)
        run("ceph-osd", *c, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        osd = Daemon("ceph-osd", ["ceph-osd", *c, "-f", "-i", "0"], d)
        started.append(osd)

        rgw = Daemon("radosgw", ["radosgw", *c, "-f", "-n", "client.rgw"], d)
        started.append(rgw)
        # radosgw creates its pools, which needs the OSD up: it listens
        # only once they exist.
        rgw.wait_until(lambda: osd.proc.poll() is None and
                       listening(rgw_port), timeout, "S3 endpoint")
        keys = ("qcow2test", uuid.uuid4().hex)
        run("radosgw-admin", *c, "-n", "client.admin", "user", "create",
            "--uid=qcow2test", "--display-name=qcow2 tests",
            "--access-key=" + keys[0], "--secret-key=" + keys[1])
        yield S3("http://%s:%d" % (LOCALHOST, rgw_port), *keys)


# --------------------------------------------------------------------------
# nbdkit with any plugin

@contextlib.contextmanager
def nbdkit(*args, readonly=False):
    """nbdkit -f on a private Unix socket: args are the filters
    (--filter=...), the plugin and its keys.  Yields a conftest.Server;
    stopped by PID on exit."""
    with daemons("qcow2-nbdkit-") as (d, started):
        sock = os.path.join(d, "sock")
        pidfile = os.path.join(d, "pid")
        dm = Daemon("nbdkit", ["nbdkit", *(["-r"] if readonly else []),
                               "-f", "-U", sock, "-P", pidfile,
                               *[str(a) for a in args]], d, env=nbdkit_env())
        started.append(dm)
        dm.wait_until(lambda: os.path.exists(pidfile), 60, "pid file")
        with open(dm.log) as log:
            yield Server("nbd+unix:///?socket=" + sock, sock, log)


def nbdkit_refuses(*args):
    """Start nbdkit expecting a refusal at startup: (returncode, stderr).

    In the foreground without --run: the filter opens its image in
    .after_fork, and a failure there under --run leaves nbdkit 1.32's
    captive command waiting on a socket that nobody serves.
    """
    with tempfile.TemporaryDirectory(prefix="qcow2-nbdkit-") as d:
        p = subprocess.run(["nbdkit", "-f", "-U", os.path.join(d, "sock"),
                            *[str(a) for a in args]], text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=nbdkit_env(), timeout=120)
    return p.returncode, p.stderr
