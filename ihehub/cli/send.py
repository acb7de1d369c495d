"""``ihehub send`` — a small MLLP client for integration engineers (and the README's first steps)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from urllib.parse import urlsplit

import click

from ihehub.cli.common import fail


def _messages(files: tuple[Path, ...], text: str | None) -> list[bytes]:
    payloads: list[bytes] = []
    if text is not None:
        payloads.append(text.encode("utf-8"))
    for f in files:
        data = sys.stdin.buffer.read() if str(f) == "-" else f.read_bytes()
        # A file may hold several messages; each starts with MSH.  CRLF / LF become CR (HL7 v2 segment end).
        data = data.replace(b"\r\n", b"\r").replace(b"\n", b"\r")
        chunks = [c for c in data.split(b"\rMSH") if c.strip(b"\r")]
        payloads += [(c if i == 0 and c.startswith(b"MSH") else b"MSH" + c).rstrip(b"\r") + b"\r"
                     for i, c in enumerate(chunks)]
    return payloads


@click.command()
@click.argument("url")
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path))
@click.option("--text", "-t", help="A message given inline; use \\r between segments.")
@click.option("--ca", type=click.Path(exists=True, dir_okay=False), help="CA to trust (mllps://).")
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="Client certificate (mllps://).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="Client key (mllps://).")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for each ACK.")
def send(url: str, files: tuple[Path, ...], text: str | None, ca: str | None, cert: str | None, key: str | None,
         timeout: float) -> None:
    """Send HL7 v2 messages over MLLP and print each ACK.

    \b
    Examples:
      ihehub send mllp://127.0.0.1:2575 adt_a01.hl7 more.hl7
      ihehub send mllp://127.0.0.1:2575 -t 'MSH|^~\\&|HIS|H1|HUB|H|20261127||ADT^A01|1|P|2.5\\rPID|1||123^^^H1'
      ihehub send mllps://hub.example:2576 --ca ca.pem --cert me.pem --key me-key.pem msg.hl7

    Exit status 1 when any ACK is not AA/CA.
    """
    from ihehub.channels.mllp_wire import mllp_send
    from ihehub.hl7 import HL7Error, read_ack

    parts = urlsplit(url)
    if parts.scheme not in ("mllp", "mllps") or not parts.hostname or not parts.port:
        fail(f"{url!r}: expected mllp://HOST:PORT or mllps://HOST:PORT")
    if text is not None:
        text = text.replace("\\r", "\r")
    payloads = _messages(files, text)
    if not payloads:
        fail("nothing to send: give files, '-' for standard input, or --text")
    ssl = None
    if parts.scheme == "mllps":
        from ihehub.tls import client_ssl_context

        ssl = client_ssl_context(ca, cert, key)
    try:
        acks = asyncio.run(mllp_send(parts.hostname, parts.port, payloads, ssl, timeout=timeout))
    except asyncio.IncompleteReadError:
        fail(f"{url} closed the connection before answering (for mllps://: was a client certificate required?)")
    except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
        fail(f"cannot reach {url}: {exc or type(exc).__name__}")
    bad = 0
    for ack in acks:
        try:
            info = read_ack(ack)
        except HL7Error as exc:
            click.echo(ack.decode("utf-8", errors="replace").replace("\r", "\n"))
            click.secho(f"(unreadable ACK: {exc})", fg="red", err=True)
            bad += 1
            continue
        click.echo(info.header.text.replace("\r", "\n"))
        bad += not info.accepted
    raise SystemExit(1 if bad else 0)
