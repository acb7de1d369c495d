"""A real OpenSSH server (Debian ``openssh-server``) on a loopback port, for the sftp:// tests.

``sshd -D -e -f <own config>`` with a generated host key and an authorized key for the current user,
all in a temporary folder.  What it takes to run it outside the system service: ``StrictModes no``
(pytest's temporary folders are not owned the way sshd wants), ``UsePAM no`` (no PAM session for a
test login), ``PidFile`` in the folder, and the privilege-separation folder ``/run/sshd`` that Debian's
service unit creates on boot (it is compiled into sshd, so when it is missing and we are root we
create it as the unit does: ``mkdir -m 0755 /run/sshd``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

SSHD = "/usr/sbin/sshd"
PRIVSEP = Path("/run/sshd")


@dataclasses.dataclass(frozen=True)
class Server:
    port: int
    user: str
    key_file: Path  # the client's private key
    host_key: str  # SHA256:... fingerprint of the server's key
    known_hosts: Path
    root: Path  # a folder to serve from

    def url(self, folder: str | Path) -> str:
        return f"sftp://{self.user}@127.0.0.1:{self.port}{folder}"


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ihehub-test", "-f", str(path)],
                   check=True, capture_output=True)


def _wait_for_banner(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            pytest.fail(f"sshd exited with {proc.returncode}: {err.strip()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            if sock.recv(64).startswith(b"SSH-2.0-"):
                return
        time.sleep(0.05)
    pytest.fail(f"sshd did not answer on port {port} within {timeout}s")


@contextlib.contextmanager
def sshd(folder: Path, port: int | None = None) -> Iterator[Server]:
    """A running sshd serving ``folder / "srv"``, on ``port`` or a free one; stopped on exit."""
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None:
        pytest.fail(f"{SSHD} or ssh-keygen is missing: install Debian's openssh-server")
    if not PRIVSEP.is_dir() and os.geteuid() == 0:
        PRIVSEP.mkdir(mode=0o755, exist_ok=True)
    conf = folder / "sshd"  # keys made once per folder: a restarted server keeps its identity
    if not conf.is_dir():
        conf.mkdir()
        _keygen(conf / "host")
        _keygen(conf / "client")
    (conf / "authorized_keys").write_bytes((conf / "client.pub").read_bytes())
    port = port or free_port()
    (conf / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {conf / 'host'}
PidFile {conf / 'sshd.pid'}
AuthorizedKeysFile {conf / 'authorized_keys'}
StrictModes no
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
LogLevel ERROR
""", encoding="utf-8")
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(conf / "host.pub")], check=True,
                                 capture_output=True, text=True).stdout.split()[1]
    host_pub = (conf / "host.pub").read_text(encoding="utf-8").split()
    (conf / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n", encoding="utf-8")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(conf / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        _wait_for_banner(port, proc)
        root = folder / "srv"
        root.mkdir(exist_ok=True)
        yield Server(port=port, user=getpass.getuser(), key_file=conf / "client", host_key=fingerprint,
                     known_hosts=conf / "known_hosts", root=root)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
