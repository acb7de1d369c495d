"""``dicom://`` destination: forward stored instances to a DICOM node with C-STORE (PS3.4 Annex B).

URLs: ``dicom://NODE`` names a node of the image manager's registry (``actors.dicom.nodes``: its name or AE
title; host, port and TLS come from there); ``dicom://AET@host:port`` names a peer directly (TLS when
``options.tls`` is given).  The message body says which stored instances to send, as JSON or as text:

* the ``dicom-studies`` study-complete message of the hub (``{"study_uid": ..., ...}``) or any object with
  ``study_uid``, ``series_uid`` and/or ``sop_instance_uid`` / ``sop_instance_uids``: the instances the image
  manager stored under them (``<root>/<study>/<series>/<instance>.dcm``);
* ``{"paths": [...]}`` or a JSON list, or plain text with one path per line: files under the root.

All the instances of a message go over one association (`ihehub.dicom.scu.StorageSCU`: files as stored, in
their own transfer syntax; uncompressed ones converted only if the peer wants another).  The response body
is a JSON report with each instance's status.  Any failed instance, or a peer that cannot be associated
with, raises a retryable `DeliveryError`, so the bus retries the message (resending what succeeded is
harmless: C-STORE of the same SOP Instance UID replaces it); a body that names nothing sendable goes to
dead letters at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, ConnectorSpec, DeliveryError, Response
from ihehub.channels.mllp import DESTINATION_TLS_SCHEMA, _client_tls, _tls_settings
from ihehub.channels.options import check_options
from ihehub.channels.registry import ConnectorContext
from ihehub.dicom.scu import AssociationFailed, SendResult, StorageSCU
from ihehub.dicom.settings import DicomNode, InvalidSettings
from ihehub.dicom.storage import uid_component

__all__ = ["SPEC", "DicomDestination", "instance_paths", "load_morph", "morph_files", "storage_root"]

log = logging.getLogger("ihehub.dicom")

DEFAULT_PORT = 104  # the IANA "dicom" port, when dicom://AET@host names none
_AE = {"type": "string", "minLength": 1, "maxLength": 16}
DESTINATION_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "calling_ae": {**_AE, "description": "our AE title (default: the image manager's, else IHEHUB)"},
        "root": {"type": "string", "minLength": 1,
                 "description": "folder of the stored instances (default: the image manager's, else data/dicom)"},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "default": 30,
                    "description": "seconds for connecting, negotiating and each C-STORE response"},
        "max_pdu": {"type": "integer", "minimum": 0, "default": 0, "description": "largest PDU we receive (0: any)"},
        "tls": {**DESTINATION_TLS_SCHEMA,
                "description": "dicom://AET@host:port over TLS (PS3.15 B.1); for a node, used when it has tls: true"},
        "mapping": {"type": "string", "minLength": 1,
                    "description": "a mapping file (input and output kind dicom, base: input) applied to each "
                                   "instance before it is sent: tag morphing (coerce Patient ID, Institution "
                                   "Name); the stored file is not changed"},
    },
}


class DicomDestination:
    """Send the instances a message names to one DICOM node over one association per message."""

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        self.where = f"dicom destination {name!r}"
        check_options(options, DESTINATION_OPTIONS_SCHEMA, self.where)
        self.name = name
        self.url = url
        self.options = dict(options)
        self.context = context
        self.timeout = float(options.get("timeout", 30))
        self.max_pdu = int(options.get("max_pdu", 0))
        self._direct = _parse_url(url)
        self._ssl: ssl.SSLContext | None = None
        self._morph = load_morph(options, context, self.where)
        if self._direct is not None or self.manager is not None:
            self.node()  # an unknown node, a bad AE title or bad TLS settings fail the channel now
        else:  # e.g. an `ihehub worker` process, which runs no image manager: each send says why it fails
            log.warning("%s: %s names a node but no DICOM image manager runs in this process", self.where, url)

    @property
    def manager(self) -> Any:
        """The hub's running image manager — or, in an ``ihehub worker``, its `NodeDirectory` — when there is
        one: the nodes registry, AE title and storage folder."""
        return image_manager(self.context)

    @property
    def root(self) -> Path:
        return storage_root(self.options, self.context)

    @property
    def calling_ae(self) -> str:
        manager = self.manager
        return str(self.options.get("calling_ae") or (manager.ae_title if manager is not None else "IHEHUB"))

    def node(self) -> DicomNode:
        """The peer: from the URL, or the image manager's registry entry named by it."""
        if self._direct is not None:
            title, host, port = self._direct
            try:
                node = DicomNode(name=title, ae_title=title, host=host, port=port, tls="tls" in self.options)
            except InvalidSettings as exc:
                raise ConnectorError(f"{self.where}: {exc}") from None
        else:
            wanted = unquote(urlsplit(self.url).netloc)
            manager = self.manager
            if manager is None:
                raise ConnectorError(f"{self.where}: {self.url} names a node, but the DICOM image manager "
                                     "(actors.dicom) is not running; write dicom://AET@host:port instead")
            nodes = manager.settings.nodes
            found = next((n for n in nodes if n.name == wanted), None) or manager.settings.node(wanted)
            if found is None or found.host is None or found.port is None:
                known = ", ".join(n.name for n in nodes if n.host and n.port) or "none"
                raise ConnectorError(f"{self.where}: no DICOM node {wanted!r} with host and port (known: {known})")
            node = found
        if node.tls and self._ssl is None:
            settings = _tls_settings(self.options, self.context, ("ca", "cert", "key"))
            self._ssl = _client_tls(settings, self.where)
        return node

    async def send(self, message: Message) -> Response:
        try:
            node = self.node()
        except ConnectorError as exc:
            raise DeliveryError(str(exc)) from None  # the registry may come back (hub restart): retry
        try:
            paths = instance_paths(message.raw, self.root)
        except ValueError as exc:
            raise DeliveryError(f"{self.name}: {exc}", retryable=False) from None
        if not paths:
            raise DeliveryError(f"{self.name}: the message names no stored instance under {self.root}",
                                retryable=False)
        scu = StorageSCU(calling_ae=self.calling_ae, node=node, ssl_context=self._ssl, timeout=self.timeout,
                         max_pdu=self.max_pdu)
        spool: tempfile.TemporaryDirectory[str] | None = None
        try:
            if self._morph is not None:
                spool = tempfile.TemporaryDirectory(prefix="ihehub-morph-")
                paths = await asyncio.to_thread(morph_files, self._morph, paths, Path(spool.name), self.name)
            results = await asyncio.to_thread(scu.send_all, paths)
        except AssociationFailed as exc:
            raise DeliveryError(f"{self.name}: {exc}") from None
        except OSError as exc:
            raise DeliveryError(f"{self.name}: cannot reach {node.host}:{node.port}: {exc}") from None
        finally:
            if spool is not None:
                spool.cleanup()
        body = _report(node, results)
        failed = [r for r in results if r.failed]
        if failed:
            first = failed[0]
            raise DeliveryError(f"{self.name}: {len(failed)} of {len(results)} instances failed, first "
                                f"{first.sop_instance_uid or first.path}: {first.status:04X} {first.comment or ''}"
                                .rstrip(), response=body)
        warned = sum(1 for r in results if r.warning)
        return Response(ok=True, body=body, status=f"{len(results)} sent" + (f", {warned} warnings" if warned else ""))

    async def close(self) -> None:
        return None


def storage_root(options: Mapping[str, Any], context: ConnectorContext) -> Path:
    """Where the stored instances are: ``options.root`` (relative to the home), else the running image
    manager's folder, else ``data/dicom`` of the home (an ``ihehub worker`` process)."""
    if "root" in options:
        return Path(os.path.join(context.home, os.path.expanduser(str(options["root"]))))
    manager = image_manager(context)
    return Path(manager.root) if manager is not None else Path(context.home) / "data" / "dicom"


def image_manager(context: ConnectorContext) -> Any:
    """The running image manager (``services["dicom"]``), else the `ihehub.dicom.server.NodeDirectory` of
    an ``ihehub worker`` (``services["dicom_nodes"]``), else None."""
    services = getattr(context, "services", None) or {}
    return services.get("dicom") or services.get("dicom_nodes")


def load_morph(options: Mapping[str, Any], context: ConnectorContext, where: str) -> Any:
    """The tag-morphing mapping of ``options.mapping`` (compiled and checked now, reloaded when the file
    changes), or None."""
    if "mapping" not in options:
        return None
    from ihehub.mappings import MappingSet

    try:
        return MappingSet(Path(context.home)).transformer(str(options["mapping"]))
    except Exception as exc:
        raise ConnectorError(f"{where}: mapping {options['mapping']!r}: {exc}") from None


def morph_files(morph: Any, paths: list[Path], spool: Path, name: str) -> list[Path]:
    """Each instance through the mapping, written to ``spool`` (the stored files stay as they came); a
    mapping that fails on an instance is a permanent error naming it."""
    out = []
    for n, path in enumerate(paths):
        try:
            data = morph(path.read_bytes())
        except Exception as exc:
            raise DeliveryError(f"{name}: mapping of {path.name}: {exc}", retryable=False) from None
        target = spool / f"{n:06d}.dcm"
        target.write_bytes(data if isinstance(data, bytes) else bytes(data))
        out.append(target)
    return out


def _parse_url(url: str) -> tuple[str, str, int] | None:
    """``dicom://AET@host:port`` -> (AE title, host, port); ``dicom://NODE`` -> None."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "dicom":
        raise ConnectorError(f"{url!r} is not a dicom:// URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConnectorError(f"{url!r}: write dicom://NODE or dicom://AET@host:port (no path or query)")
    if not parts.netloc:
        raise ConnectorError(f"{url!r} names no node: write dicom://NODE or dicom://AET@host:port")
    if "@" not in parts.netloc:
        return None
    title = unquote(parts.username or "")
    try:
        port = parts.port
    except ValueError:
        raise ConnectorError(f"{url!r}: the port is not a number between 0 and 65535") from None
    if not title or not parts.hostname:
        raise ConnectorError(f"{url!r}: write dicom://AET@host:port")
    return title, parts.hostname, DEFAULT_PORT if port is None else port


def instance_paths(body: bytes, root: Path) -> list[Path]:
    """The stored files a message body names (see the module docstring); `ValueError` when it cannot be read
    or names a file outside ``root``."""
    text = body.decode("utf-8-sig", errors="strict").strip() if body else ""
    if not text:
        raise ValueError("empty message: nothing to send")
    if text[0] in "{[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the body is not valid JSON: {exc}") from None
    else:
        data = [line.strip() for line in text.splitlines() if line.strip()]
    items = data if isinstance(data, list) else [data]
    out: list[Path] = []
    for item in items:
        out += _paths_of(item, root)
    return list(dict.fromkeys(out))


def _paths_of(item: Any, root: Path) -> list[Path]:
    if isinstance(item, str):
        return [_inside(root, item)]
    if not isinstance(item, Mapping):
        raise ValueError(f"cannot name instances with {type(item).__name__} {item!r}")
    if "paths" in item:
        paths = item["paths"]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError("paths must be a list of file paths")
        return [_inside(root, p) for p in paths]
    study, series = item.get("study_uid"), item.get("series_uid")
    sops = item.get("sop_instance_uids") or ([item["sop_instance_uid"]] if item.get("sop_instance_uid") else [])
    for key, value in (("study_uid", study), ("series_uid", series)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key} must be a UID string")
    if not isinstance(sops, list) or not all(isinstance(s, str) for s in sops):
        raise ValueError("sop_instance_uids must be a list of UID strings")
    if not (study or series or sops):
        raise ValueError("the body names no study_uid, series_uid, sop_instance_uid(s) or paths")
    study_dir = uid_component(study) if study else "*"
    series_dir = uid_component(series) if series else "*"
    if sops:
        found = [p for s in sops for p in sorted(root.glob(f"{study_dir}/{series_dir}/{uid_component(s)}.dcm"))]
    else:
        found = sorted(root.glob(f"{study_dir}/{series_dir}/*.dcm"))
    return [p for p in found if not p.name.startswith(".")]


def _inside(root: Path, value: str) -> Path:
    path = Path(os.path.abspath(root / value))
    base = Path(os.path.abspath(root))
    if path != base and base not in path.parents:
        raise ValueError(f"{value!r} is outside the DICOM storage folder {base}")
    return path


def _report(node: DicomNode, results: list[SendResult]) -> bytes:
    return json.dumps({
        "destination": {"ae_title": node.ae_title, "host": node.host, "port": node.port},
        "sent": sum(1 for r in results if not r.failed),
        "failed": sum(1 for r in results if r.failed),
        "instances": [r.as_dict() for r in results],
    }).encode()


SPEC = ConnectorSpec(
    schemes=("dicom",),
    description="Forward stored DICOM instances to a node with C-STORE (files as stored, one association)",
    destination="ihehub.channels.dicom:DicomDestination",
    options_schema=DESTINATION_OPTIONS_SCHEMA,
    example="""\
# channels/dicom-studies.yaml: every study-complete event of the image manager goes to PACS2
source:
  url: http://0.0.0.0:8080/dicom-studies   # also lets other systems post {"study_uid": ...}
destinations:
  - name: pacs2
    url: dicom://PACS2                      # a node of actors.dicom.nodes (or dicom://AET@host:port)
    retry: {max_attempts: 10}
""",
)
