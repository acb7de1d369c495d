"""The private CA and TLS contexts: real certificates, real handshakes over loopback sockets."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ihehub.config import HttpConfig, HubConfig, TlsConfig
from ihehub.tls import TlsError, client_ssl_context, ensure_tls, issue_client_cert, server_ssl_context


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(cert: x509.Certificate, kind: type[Any]) -> Any:
    return cert.extensions.get_extension_for_class(kind)


@pytest.fixture
def hub(tmp_path: Path) -> HubConfig:
    """A home with EC keys (fast); the RSA default has its own test."""
    cfg = HubConfig(home=tmp_path / "home", node_id="edge-7")
    ensure_tls(cfg, key_type="ec")
    return cfg


def test_first_start_writes_ca_and_server_with_private_keys(tmp_path: Path) -> None:
    cfg = HubConfig(home=tmp_path)
    written = ensure_tls(cfg)
    tls = cfg.tls
    assert sorted(written) == sorted([tls.ca, tls.ca_key, tls.cert, tls.key])
    assert tls.ca == tmp_path / "tls" / "ca.pem"
    for key in (tls.key, tls.ca_key):
        assert key.stat().st_mode & 0o777 == 0o600
    for cert in (tls.ca, tls.cert):
        assert cert.stat().st_mode & 0o777 == 0o644
    ca = load(tls.ca)
    public = ca.public_key()
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 3072
    assert [p.name for p in (tmp_path / "tls").iterdir() if p.name.startswith(".")] == []


def test_second_call_overwrites_nothing(hub: HubConfig) -> None:
    tls = hub.tls
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tls.ca, tls.ca_key, tls.cert, tls.key)}
    assert ensure_tls(hub, key_type="ec") == []
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before


def test_ca_certificate(hub: HubConfig) -> None:
    ca = load(hub.tls.ca)
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)
    constraints = ext(ca, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ext(ca, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert dt.timedelta(days=3650) <= lifetime <= dt.timedelta(days=3651)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ihehub CA edge-7"


def test_server_certificate_is_verified_by_the_ca(hub: HubConfig) -> None:
    ca, server = load(hub.tls.ca), load(hub.tls.cert)
    server.verify_directly_issued_by(ca)
    store = verification.Store([ca])
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        verifier = verification.PolicyBuilder().store(store).build_server_verifier(name)
        chain = verifier.verify(server, [])
        assert chain[-1] == ca
    san = ext(server, x509.SubjectAlternativeName).value
    assert {"localhost", socket.gethostname().lower()} <= set(san.get_values_for_type(x509.DNSName))
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    eku = ext(server, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not ext(server, x509.BasicConstraints).value.ca
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert dt.timedelta(days=730) <= lifetime <= dt.timedelta(days=731)
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edge-7"


def test_server_names_include_the_configured_host(tmp_path: Path) -> None:
    cfg = HubConfig(home=tmp_path, http=HttpConfig(host="10.1.2.3", port=8443))
    ensure_tls(cfg, key_type="ec", hostnames=["hub.hospital.example", "bad_name"])
    san = ext(load(cfg.tls.cert), x509.SubjectAlternativeName).value
    assert "hub.hospital.example" in san.get_values_for_type(x509.DNSName)
    assert "bad_name" not in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("10.1.2.3") in san.get_values_for_type(x509.IPAddress)


def test_missing_server_files_are_issued_by_the_existing_ca(hub: HubConfig) -> None:
    ca_before = hub.tls.ca.read_bytes()
    hub.tls.cert.unlink()
    hub.tls.key.unlink()
    assert ensure_tls(hub, key_type="ec") == [hub.tls.key, hub.tls.cert]
    assert hub.tls.ca.read_bytes() == ca_before
    load(hub.tls.cert).verify_directly_issued_by(load(hub.tls.ca))


def test_half_present_material_is_an_error_and_nothing_is_written(tmp_path: Path) -> None:
    cfg = HubConfig(home=tmp_path)
    ensure_tls(cfg, key_type="ec")
    cfg.tls.key.unlink()
    with pytest.raises(TlsError, match=r"server-key\.pem is missing but .*server\.pem exists"):
        ensure_tls(cfg, key_type="ec")
    assert not cfg.tls.key.exists()
    cfg.tls.cert.unlink()
    cfg.tls.ca_key.unlink()
    with pytest.raises(TlsError, match=r"ca-key\.pem is missing but .*ca\.pem exists"):
        ensure_tls(cfg, key_type="ec")
    assert not cfg.tls.cert.exists() and not cfg.tls.key.exists()


def test_foreign_key_for_the_ca_is_refused(tmp_path: Path) -> None:
    first, second = HubConfig(home=tmp_path / "a"), HubConfig(home=tmp_path / "b")
    ensure_tls(first, key_type="ec")
    ensure_tls(second, key_type="ec")
    mixed = HubConfig(
        home=tmp_path / "mixed",
        tls=TlsConfig(ca=first.tls.ca, ca_key=second.tls.ca_key),
    )
    with pytest.raises(TlsError, match="is not the key of"):
        ensure_tls(mixed)
    with pytest.raises(TlsError, match="is not the key of"):
        issue_client_cert(mixed, "pacs")


def test_issue_client_cert(hub: HubConfig, tmp_path: Path) -> None:
    cert_path, key_path = issue_client_cert(hub, "ris-01")
    assert (cert_path, key_path) == (
        hub.home / "tls/clients/ris-01.pem",
        hub.home / "tls/clients/ris-01-key.pem",
    )
    assert key_path.stat().st_mode & 0o777 == 0o600
    cert = load(cert_path)
    cert.verify_directly_issued_by(load(hub.tls.ca))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ris-01"
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)  # follows the CA's key type
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=825) <= lifetime <= dt.timedelta(days=826)
    with pytest.raises(TlsError, match="never overwritten"):
        issue_client_cert(hub, "ris-01")
    elsewhere, _ = issue_client_cert(hub, "pacs", out_dir=tmp_path / "out", days=30)
    assert elsewhere == tmp_path / "out" / "pacs.pem"


@pytest.mark.parametrize(("name", "days"), [("../etc/passwd", 1), ("", 1), ("ok", 0)])
def test_bad_client_requests(hub: HubConfig, name: str, days: int) -> None:
    with pytest.raises(TlsError):
        issue_client_cert(hub, name, days=days)


def test_client_cert_on_a_fresh_home_creates_the_ca_first(tmp_path: Path) -> None:
    cfg = HubConfig(home=tmp_path)
    cert_path, _ = issue_client_cert(cfg, "modality", key_type="ec")
    assert cfg.tls.ca.exists() and cfg.tls.ca_key.exists()
    load(cert_path).verify_directly_issued_by(load(cfg.tls.ca))


# --- handshakes over loopback -------------------------------------------------------------------


class OneShotServer:
    """Accepts one TLS connection on a free loopback port and echoes one read in upper case."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.peer: dict[str, Any] | None = None
        self.handshaken = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError as exc:
            self.error = exc
            return
        with conn:
            conn.settimeout(10)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.handshaken = True
                    self.peer = tls.getpeercert()
                    tls.sendall(tls.recv(1024).upper())
            except (ssl.SSLError, OSError) as exc:
                self.error = exc

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()


def talk(ctx: ssl.SSLContext, port: int, server_hostname: str = "localhost") -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        tls.sendall(b"hello")
        return tls.recv(1024)


def test_mutual_tls_with_an_issued_client_certificate(hub: HubConfig) -> None:
    cert, key = issue_client_cert(hub, "ris-01")
    server = OneShotServer(
        server_ssl_context(hub.tls.cert, hub.tls.key, hub.tls.ca, require_client_cert=True)
    )
    try:
        assert talk(client_ssl_context(hub.tls.ca, cert, key), server.port) == b"HELLO"
    finally:
        server.close()
    assert server.error is None and server.handshaken
    assert server.peer is not None
    assert dict(x[0] for x in server.peer["subject"])["commonName"] == "ris-01"


def test_the_ip_address_is_a_valid_server_name(hub: HubConfig) -> None:
    server = OneShotServer(
        server_ssl_context(hub.tls.cert, hub.tls.key, hub.tls.ca, require_client_cert=False)
    )
    try:
        assert talk(client_ssl_context(hub.tls.ca), server.port, server_hostname="127.0.0.1") == b"HELLO"
    finally:
        server.close()
    assert server.error is None and server.handshaken and server.peer is None  # no certificate asked


def test_a_required_client_certificate_cannot_be_skipped(hub: HubConfig) -> None:
    server = OneShotServer(
        server_ssl_context(hub.tls.cert, hub.tls.key, hub.tls.ca, require_client_cert=True)
    )
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            reply = talk(client_ssl_context(hub.tls.ca), server.port)
            if reply == b"":  # TLS 1.3: the server's alert may arrive as a closed connection
                raise ConnectionError("closed by the server")
    finally:
        server.close()
    assert isinstance(server.error, ssl.SSLError) and not server.handshaken
    assert "certificate" in str(server.error).lower()


def test_a_client_certificate_from_another_ca_is_refused(hub: HubConfig, tmp_path: Path) -> None:
    other = HubConfig(home=tmp_path / "other")
    cert, key = issue_client_cert(other, "intruder", key_type="ec")
    server = OneShotServer(
        server_ssl_context(hub.tls.cert, hub.tls.key, hub.tls.ca, require_client_cert=None)
    )
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            reply = talk(client_ssl_context(hub.tls.ca, cert, key), server.port)
            if reply == b"":
                raise ConnectionError("closed by the server")
    finally:
        server.close()
    assert isinstance(server.error, ssl.SSLError)


def test_the_client_checks_the_server_name(hub: HubConfig) -> None:
    server = OneShotServer(server_ssl_context(hub.tls.cert, hub.tls.key, None, require_client_cert=False))
    try:
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            talk(client_ssl_context(hub.tls.ca), server.port, server_hostname="pacs.example.org")
    finally:
        server.close()


def test_contexts_require_tls_1_2_or_later(hub: HubConfig) -> None:
    server = server_ssl_context(hub.tls.cert, hub.tls.key, hub.tls.ca, require_client_cert=None)
    client = client_ssl_context(hub.tls.ca)
    assert server.minimum_version == client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_OPTIONAL
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname


def test_context_errors_name_the_file(hub: HubConfig, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TlsError, match=r"nope\.pem does not exist"):
        server_ssl_context(missing, hub.tls.key, hub.tls.ca)
    with pytest.raises(TlsError, match="cannot load the certificate"):
        server_ssl_context(hub.tls.cert, hub.tls.ca_key, hub.tls.ca)  # key of another certificate
    with pytest.raises(TlsError, match="CA file is needed"):
        server_ssl_context(hub.tls.cert, hub.tls.key, None, require_client_cert=True)
    with pytest.raises(TlsError, match=r"nope\.pem does not exist"):
        client_ssl_context(missing)
    with pytest.raises(TlsError, match="without its certificate"):
        client_ssl_context(hub.tls.ca, key=hub.tls.key)
