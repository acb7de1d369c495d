"""The node's private CA, its server and client certificates, and TLS contexts for listeners and clients.

IHE ATNA Secure Node / Secure Application (ITI TF-2 §3.19, Authenticate Node [ITI-19]) requires
mutually authenticated TLS between nodes; with the "STX: TLS 1.2 floor" option that means TLS 1.2
or later (BCP 195, RFC 9325).  On first start `ensure_tls` gives a home a private CA and a
server certificate signed by it, so MLLPS, HTTPS and syslog over TLS (RFC 5425) work out of the
box; `issue_client_cert` gives a peer a client certificate (``ihehub tls client NAME``).
Replace the files with the hospital's own PKI whenever there is one: existing files are never
overwritten.

Certificates follow RFC 5280: the CA has basicConstraints CA (critical, path length 0) and
keyUsage keyCertSign/cRLSign; leaf certificates carry subjectAltName (RFC 6125 matches host names
against it, not the CN), extendedKeyUsage, and subject/authority key identifiers.  RSA 3072 keys
are the default because older IHE peers only speak RSA cipher suites; ``key_type="ec"`` gives
P-256 keys.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ihehub.config.model import HubConfig

__all__ = [
    "CA_DAYS",
    "CLIENT_DAYS",
    "SERVER_DAYS",
    "TlsError",
    "client_ssl_context",
    "ensure_tls",
    "issue_client_cert",
    "server_ssl_context",
]

KeyType = Literal["rsa", "ec"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

CA_DAYS = 3650
SERVER_DAYS = 730
CLIENT_DAYS = 825
RSA_BITS = 3072
_CLOCK_SKEW = dt.timedelta(minutes=5)  # peers whose clocks run a little behind still accept a new cert
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "*"}


class TlsError(Exception):
    """TLS material is missing, inconsistent or unreadable; the message names the file and the fix."""


# --- certificates -------------------------------------------------------------------------------


def ensure_tls(
    home_cfg: HubConfig, *, key_type: KeyType = "rsa", hostnames: Sequence[str] = ()
) -> list[Path]:
    """Create the private CA and the server certificate if the configured files are missing.

    Returns the files written (empty when everything existed).  Existing files are never
    overwritten; a half-present pair (a certificate without its key) raises `TlsError`.
    The server certificate names ``localhost``, this machine's host name, ``http.host`` when it
    is a specific address, ``hostnames``, 127.0.0.1 and ::1, for server and client authentication.
    """
    tls = home_cfg.tls
    cert_there, key_there = tls.cert.exists(), tls.key.exists()
    if cert_there != key_there:
        present, missing = (tls.cert, tls.key) if cert_there else (tls.key, tls.cert)
        raise TlsError(
            f"{missing} is missing but {present} exists: provide both files or remove {present} "
            "to have a new pair generated"
        )
    if cert_there:
        if not tls.ca.exists():
            raise TlsError(f"{tls.ca} is missing: put the CA certificate that verifies peers there")
        return []
    written: list[Path] = []
    ca_cert, ca_key = _load_or_create_ca(home_cfg, key_type=key_type, written=written)
    names = [*hostnames]
    if home_cfg.http.host not in _WILDCARD_HOSTS:
        names.append(home_cfg.http.host)
    key = _new_key(key_type)
    cert = _issue(
        ca_cert=ca_cert,
        ca_key=ca_key,
        key=key,
        common_name=home_cfg.node_id,
        days=SERVER_DAYS,
        alt_names=_alt_names(["localhost", socket.gethostname(), *names, "127.0.0.1", "::1"]),
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    _write_new(tls.key, _key_pem(key), 0o600, written)
    _write_new(tls.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644, written)
    return written


def issue_client_cert(
    home_cfg: HubConfig,
    name: str,
    out_dir: str | os.PathLike[str] | None = None,
    days: int = CLIENT_DAYS,
    *,
    key_type: KeyType | None = None,
) -> tuple[Path, Path]:
    """Issue a client certificate (CN=name, extendedKeyUsage clientAuth) signed by the node's CA.

    Writes ``<out_dir>/<name>.pem`` and ``<name>-key.pem`` (0600); ``out_dir`` defaults to
    ``<home>/tls/clients``.  The CA is created first if the home has none yet.  ``key_type``
    defaults to the CA's.  Existing files are not overwritten: `TlsError` asks for another name.
    """
    if not _CLIENT_NAME.match(name):
        raise TlsError(
            f"{name!r} is not a usable client name: letters, digits, '.', '-', '_' (at most 64), "
            "starting with a letter or digit"
        )
    if days < 1:
        raise TlsError(f"days must be at least 1, not {days}")
    folder = Path(out_dir) if out_dir is not None else home_cfg.home / "tls" / "clients"
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}-key.pem"
    for path in (cert_path, key_path):
        if path.exists():
            raise TlsError(f"{path} exists and is never overwritten: remove it or choose another name")
    written: list[Path] = []
    ca_cert, ca_key = _load_or_create_ca(home_cfg, key_type=key_type or "rsa", written=written)
    if key_type is None:
        key_type = "ec" if isinstance(ca_key, ec.EllipticCurvePrivateKey) else "rsa"
    key = _new_key(key_type)
    cert = _issue(
        ca_cert=ca_cert,
        ca_key=ca_key,
        key=key,
        common_name=name,
        days=days,
        alt_names=_alt_names([name]) if _DNS_NAME.match(name) else [],
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    _write_new(key_path, _key_pem(key), 0o600, written)
    _write_new(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, written)
    return cert_path, key_path


def _load_or_create_ca(
    home_cfg: HubConfig, *, key_type: KeyType, written: list[Path]
) -> tuple[x509.Certificate, PrivateKey]:
    tls = home_cfg.tls
    ca_there, ca_key_there = tls.ca.exists(), tls.ca_key.exists()
    if ca_there and ca_key_there:
        return _load_ca(tls.ca, tls.ca_key)
    if ca_there or ca_key_there:
        present, missing = (tls.ca, tls.ca_key) if ca_there else (tls.ca_key, tls.ca)
        raise TlsError(
            f"cannot issue certificates: {missing} is missing but {present} exists "
            "(put the CA's key there, or remove both to have a new private CA generated)"
        )
    key = _new_key(key_type)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ihehub"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"ihehub CA {home_cfg.node_id}"[:64]),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_new(tls.ca_key, _key_pem(key), 0o600, written)
    _write_new(tls.ca, cert.public_bytes(serialization.Encoding.PEM), 0o644, written)
    return cert, key


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, PrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise TlsError(f"cannot read the CA certificate {cert_path}: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise TlsError(
            f"cannot read the CA key {key_path} (it must be an unencrypted PEM key): {exc}"
        ) from exc
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise TlsError(f"{key_path}: only RSA and EC CA keys are supported")
    if _spki(key.public_key()) != _spki(cert.public_key()):
        raise TlsError(f"{key_path} is not the key of {cert_path}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise TlsError(f"{cert_path} is not a CA certificate (basicConstraints CA is not set)")
    return cert, key


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _issue(
    *,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    key: PrivateKey,
    common_name: str,
    days: int,
    alt_names: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ihehub"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64]),
        ]
    )
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(encipher=isinstance(key, rsa.RSAPrivateKey)), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _key_usage(*, cert_sign: bool = False, encipher: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=encipher,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _alt_names(names: Iterable[str]) -> list[x509.GeneralName]:
    """DNS and IP subjectAltName entries, without duplicates; names that are neither are skipped."""
    out: list[x509.GeneralName] = []
    for name in names:
        entry: x509.GeneralName
        try:
            entry = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            if not _DNS_NAME.match(name):
                continue  # e.g. a host name with '_' is not a valid DNS name
            entry = x509.DNSName(name.lower())
        if entry not in out:
            out.append(entry)
    return out


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise TlsError(f"unknown key type {key_type!r}: use 'rsa' or 'ec'")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_new(path: Path, data: bytes, mode: int, written: list[Path]) -> None:
    """Create ``path`` with ``data`` and ``mode``, atomically, failing if it exists (never overwrite).

    The data goes to a temporary file that is hard-linked into place, so a crash never leaves a
    half-written key; where hard links are unsupported, ``O_EXCL`` creation is used instead.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)  # the umask must not widen or narrow it
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise TlsError(f"{path} appeared while it was being created; it was not overwritten") from None
        except OSError:  # no hard links on this file system
            _write_exclusive(path, data, mode)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    written.append(path)


def _write_exclusive(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise TlsError(f"{path} appeared while it was being created; it was not overwritten") from None
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), mode)
        out.write(data)


# --- SSL contexts -------------------------------------------------------------------------------


def server_ssl_context(
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str] | None,
    require_client_cert: bool | None = True,
) -> ssl.SSLContext:
    """A listener's context: TLS 1.2 or later, with this node's certificate.

    ``require_client_cert`` True demands a client certificate signed by ``ca`` (mutual TLS, as
    ATNA nodes authenticate each other); None asks for one and verifies it when given; False does
    not ask.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cert, key)
    if require_client_cert is False:
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if ca is None:
        raise TlsError("a CA file is needed to verify client certificates")
    _load_ca_file(ctx, ca)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(
    ca: str | os.PathLike[str] | None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client's context: TLS 1.2 or later, server verified against ``ca`` (the system's CAs if
    None), presenting ``cert``/``key`` when given (``key`` may be omitted if ``cert`` holds it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        _load_ca_file(ctx, ca)
    ctx.check_hostname = check_hostname
    if cert is not None:
        _load_chain(ctx, cert, key)
    elif key is not None:
        raise TlsError("a client key was given without its certificate")
    return ctx


def _load_chain(
    ctx: ssl.SSLContext, cert: str | os.PathLike[str], key: str | os.PathLike[str] | None
) -> None:
    try:
        ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key is not None else None)
    except FileNotFoundError as exc:
        raise TlsError(f"cannot load the certificate: {exc.filename or cert} does not exist") from exc
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot load the certificate {cert} with key {key}: {exc}") from exc


def _load_ca_file(ctx: ssl.SSLContext, ca: str | os.PathLike[str]) -> None:
    try:
        ctx.load_verify_locations(cafile=os.fspath(ca))
    except FileNotFoundError as exc:
        raise TlsError(f"cannot load the CA certificates: {ca} does not exist") from exc
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"cannot load the CA certificates {ca}: {exc}") from exc
