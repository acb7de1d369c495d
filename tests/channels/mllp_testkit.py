"""Helpers shared by the MLLP connector tests: loopback sources, raw clients, throwaway PKI."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ihehub.bus.message import Message
from ihehub.channels.base import Outcome
from ihehub.channels.mllp import MLLPSource, frame, read_frame
from ihehub.channels.registry import ConnectorContext

CORPUS = (Path(__file__).parents[2] / "../shared/corpus/ipf/hl7v2").resolve()
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run one test coroutine on a fresh loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def adt(
    control_id: str = "MSG1",
    *,
    msh18: str = "",
    name: str = "DOE^JOHN",
    msg_type: str = "ADT^A01^ADT_A01",
    version: str = "2.5",
    pad: int = 0,
) -> str:
    text = (
        f"MSH|^~\\&|HIS|HOSP|HUB|CENTRE|20240102030405||{msg_type}|{control_id}|P|{version}|||||CHN|{msh18}\r"
        f"EVN|A01|20240102030405\rPID|1||12345^^^HOSP^MR||{name}||19800101|M\r"
    )
    if pad:
        text += "NTE|1||" + "x" * pad + "\r"
    return text


class Recorder:
    """An ``Inbound`` that records messages and answers with ``outcome`` (or what ``decide`` says)."""

    def __init__(self, decide: Callable[[Message], Awaitable[Outcome]] | None = None) -> None:
        self.messages: list[Message] = []
        self._decide = decide

    async def __call__(self, message: Message) -> Outcome:
        self.messages.append(message)
        if self._decide is not None:
            return await self._decide(message)
        return Outcome(code="AA", message_id=message.id)


@contextlib.asynccontextmanager
async def running_source(
    inbound: Callable[[Message], Awaitable[Outcome]] | None = None,
    options: dict[str, Any] | None = None,
    url: str = "mllp://127.0.0.1:0",
    **kwargs: Any,
) -> AsyncIterator[MLLPSource]:
    source = MLLPSource(name="test-in", url=url, options=options or {}, context=ConnectorContext(), **kwargs)
    await source.start(inbound or Recorder())
    try:
        yield source
    finally:
        await source.stop()


@contextlib.asynccontextmanager
async def client(
    port: int, **kwargs: Any
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, **kwargs)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> bytes:
    writer.write(frame(payload))
    await writer.drain()
    return await asyncio.wait_for(read_frame(reader), 5)


async def closed(reader: asyncio.StreamReader, timeout: float = 3.0) -> bool:
    """True when the server closes the connection within ``timeout`` (a last frame's CR may be left)."""
    rest = await asyncio.wait_for(reader.read(), timeout)
    return rest in (b"", b"\r")


def msa(ack: bytes, charset: str = "ascii") -> list[str]:
    """MSA fields of an ACK (index 1 = MSA-1)."""
    for seg in ack.decode(charset).split("\r"):
        if seg.startswith("MSA|"):
            return seg.split("|")
    raise AssertionError(f"no MSA in {ack!r}")


def err(ack: bytes, charset: str = "ascii") -> list[str]:
    for seg in ack.decode(charset).split("\r"):
        if seg.startswith("ERR|"):
            return seg.split("|")
    raise AssertionError(f"no ERR in {ack!r}")


# -- throwaway PKI ----------------------------------------------------------------------------
def make_pki(folder: Path) -> dict[str, str]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("ihehub test CA"))
        .issuer_name(name("ihehub test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]) -> tuple[Any, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = leaf(
        "localhost",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key, client_cert = leaf("RIS-1", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    files = {}
    for label, cert in (("ca", ca_cert), ("server", server_cert), ("client", client_cert)):
        path = folder / f"{label}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[label] = str(path)
    for label, key in (("server_key", server_key), ("client_key", client_key)):
        path = folder / f"{label}.pem"
        write_key(key, path)
        files[label] = str(path)
    return files
