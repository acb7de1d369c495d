"""``xdsi://publish`` destination: publish a study's imaging manifest with the hub's XDS-I.b Imaging Document
Source (RAD-68), through the bus's queued, retried, resendable deliveries.

The message names the study like the image manager's study-complete message (``{"study_uid": ...}``, JSON)
or as plain text (the Study Instance UID).  The hub builds this destination itself for its ``dicom-studies``
messages when ``actors.xds.imaging.auto_publish`` is on; a channel named ``dicom-studies`` (to filter or to
add other destinations) lists it like any other::

    destinations:
      - {name: xds-i, url: "xdsi://publish"}

A registry refusal (an XDS error in the ITI-41 response) or a study the index does not know is permanent
(dead letter, visible and resendable in the message browser); an Imaging Document Source that is not running
yet is retried.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, ConnectorSpec, DeliveryError, Response
from ihehub.channels.registry import ConnectorContext

__all__ = ["SPEC", "XdsiPublisher", "study_of"]


def study_of(message: Message) -> str:
    """The Study Instance UID a message names (JSON ``study_uid`` or the text itself)."""
    text = message.raw.decode(message.charset or "utf-8", "replace").strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = {}
        uid = data.get("study_uid") if isinstance(data, dict) else None
        return str(uid or "")
    return text if text and all(ch.isdigit() or ch == "." for ch in text) else ""


class XdsiPublisher:
    """RAD-68 for each message, by the hub's ``services["xds_imaging"]``."""

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        if url.rstrip("/") != "xdsi://publish":
            raise ConnectorError(f"xdsi destination {name!r}: the URL is xdsi://publish, not {url!r}")
        if options:
            raise ConnectorError(f"xdsi destination {name!r}: takes no options (settings are actors.xds.imaging)")
        self.name = name
        self.context = context

    async def send(self, message: Message) -> Response:
        study = study_of(message)
        if not study:
            raise DeliveryError("the message names no Study Instance UID (study_uid)", retryable=False)
        source = (self.context.services or {}).get("xds_imaging")
        if source is None:
            raise DeliveryError("the XDS-I.b Imaging Document Source is not running (actors.xds.imaging)")
        try:
            published = await asyncio.to_thread(source.publish, study)
        except Exception as exc:  # a PublishError (unknown study, no affinity patient id) says it is permanent
            raise DeliveryError(f"RAD-68 of study {study}: {exc}",
                                retryable=not getattr(exc, "permanent", False)) from exc
        body = json.dumps({"study_uid": study, "status": published.status,
                           "document_unique_id": published.document_unique_id, "patient_id": published.patient_id,
                           "instances": published.instances,
                           "errors": [{"code": e.code, "context": e.context} for e in published.errors]},
                          ensure_ascii=False).encode()
        if published.errors:
            codes = ", ".join(sorted({e.code for e in published.errors}))
            raise DeliveryError(f"RAD-68 of study {study} refused: {codes}: {published.errors[0].context}",
                                retryable=False)
        return Response(status=published.status.rsplit(":", 1)[-1], body=body)

    async def close(self) -> None:
        return None


SPEC = ConnectorSpec(
    schemes=("xdsi",),
    description="publish a study's KOS manifest with the hub's XDS-I.b Imaging Document Source (RAD-68)",
    destination="ihehub.channels.xdsi:XdsiPublisher",
    options_schema={"type": "object", "additionalProperties": False},
    example="xdsi://publish",
)
