"""Modality Worklist feed: HL7 orders (IHE RAD-4 "Procedure Scheduled" / RAD-13 "Procedure Update") become
the scheduled procedure steps that the image manager's Modality Worklist C-FIND SCP returns (RAD-5).

Two message structures (IHE RAD TF-2 4.4.4, and the HL7 v2.5.1 option of RAD TF-2 Appendix B):

* **ORM^O01** (HL7 v2.3.1): one step per ORC/OBR pair: OBR-18 Accession Number, OBR-19 Requested
  Procedure ID, OBR-20 Scheduled Procedure Step ID, OBR-24 Modality, OBR-27.4 (else ORC-7.4) start date and
  time, OBR-4 the requested procedure code, ZDS-1 Study Instance UID.
* **OMI^O23** (HL7 v2.5.1): one step per IPC segment: IPC-1 Accession Number, IPC-2 Requested Procedure ID,
  IPC-3 Study Instance UID, IPC-4 Scheduled Procedure Step ID, IPC-5 Modality, IPC-7 Scheduled Station Name,
  IPC-9 Scheduled Station AE Title; TQ1-7 start date and time.

Both: PID-3 (first repetition) the patient id and issuer, PID-5 the name (repetitions become the PN
component groups: alphabetic, ideographic, phonetic), PID-7 birth date, PID-8 sex, ORC-12 (else OBR-16)
the referring physician.  ORC-1 NW / XO / SC schedule or replace, CA / DC / OC remove the order's steps.
The answer is an ACK: AA, or AE with ERR (HL7 table 0357: 101 required field missing, 200 unsupported
message type or order control) naming the field.

Options: ``sending_application`` / ``sending_facility`` of the ACK.  The channel is an ordinary HL7 channel
(``mllp://``) with ``actor: modality-worklist``; the image manager (``actors.dicom``) must run in the hub.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ihehub.actors.base import ActorContext
from ihehub.actors.hl7v2 import Segments, comp, parse_cx
from ihehub.bus.message import Message
from ihehub.channels.base import Outcome
from ihehub.dicom import worklist
from ihehub.hl7 import Header, HL7Error, parse_header
from ihehub.hl7.ack import build_ack

__all__ = ["SCHEDULE", "WITHDRAW", "OrderError", "WorklistFeed", "steps_of"]

SCHEDULE = frozenset({"NW", "XO", "SC"})  # new order, change order, status changed (still scheduled)
WITHDRAW = frozenset({"CA", "DC", "OC"})  # cancel, discontinue, order cancelled


class OrderError(ValueError):
    """The order cannot be read; ``code`` is the HL7 table 0357 error code, ``location`` the ERR-2 field."""

    def __init__(self, text: str, code: str, location: str) -> None:
        super().__init__(text)
        self.code = code
        self.location = location


def steps_of(header: Header) -> tuple[str, list[worklist.ScheduledStep]]:
    """The order control (ORC-1) and the scheduled steps of an ORM^O01 or OMI^O23."""
    seg = Segments(header)
    if (header.message_type, header.trigger) not in (("ORM", "O01"), ("OMI", "O23")):
        raise OrderError(f"{header.message_code} is not an ORM^O01 or OMI^O23 order", "200", "MSH^1^9")
    pid, orc = seg.first("PID"), seg.first("ORC")
    if pid is None:
        raise OrderError("no PID segment", "100", "PID")
    if orc is None:
        raise OrderError("no ORC segment", "100", "ORC")
    control = seg.text(seg.field(orc, 1)).upper()
    if control not in SCHEDULE | WITHDRAW:
        raise OrderError(f"order control {control or '(empty)'} is not NW, XO, SC, CA, DC or OC", "200", "ORC^1^1")
    ids = seg.reps(seg.field(pid, 3))
    cx = parse_cx(seg, ids[0]) if ids else None
    if cx is None or not cx.value:
        raise OrderError("PID-3 has no patient identifier", "101", "PID^1^3")
    issuer = (cx.authority.namespace or cx.authority.universal_id or "") if cx.authority else ""
    obr = seg.first("OBR")
    common: dict[str, Any] = {
        "patient_id": cx.value, "issuer": issuer, "patient_name": _name(seg, seg.field(pid, 5)),
        "birth_date": _digits(seg.text(seg.field(pid, 7)), 8), "sex": seg.text(seg.field(pid, 8)) or None,
        "placer_order": seg.text(comp(seg.comps(seg.field(orc, 2)), 1)) or None,
        "filler_order": seg.text(comp(seg.comps(seg.field(orc, 3)), 1)) or None,
        "referring_physician": _xcn(seg, seg.field(orc, 12)) or _xcn(seg, seg.field(obr, 16)),
    }
    service = seg.comps(seg.field(obr, 4))
    common.update(code_value=seg.text(comp(service, 1)) or None, description=seg.text(comp(service, 2)) or None,
                  code_scheme=seg.text(comp(service, 3)) or None)
    if header.message_type == "ORM":
        return control, [_orm_step(seg, orc, obr, common)]
    return control, _omi_steps(seg, obr, common)


def _orm_step(seg: Segments, orc: list[str], obr: list[str] | None, common: dict[str, Any]) -> worklist.ScheduledStep:
    accession = seg.text(seg.field(obr, 18))
    if obr is None or not accession:
        raise OrderError("OBR-18 (Accession Number) is missing", "101", "OBR^1^18")
    when = seg.text(comp(seg.comps(seg.field(obr, 27)), 4)) or seg.text(comp(seg.comps(seg.field(orc, 7)), 4))
    zds = seg.first("ZDS")
    return worklist.ScheduledStep(
        accession_number=accession, sps_id=seg.text(seg.field(obr, 20)) or accession,
        requested_procedure_id=seg.text(seg.field(obr, 19)) or accession,
        study_uid=seg.text(comp(seg.comps(seg.field(zds, 1)), 1)) or None,
        modality=seg.text(seg.field(obr, 24)) or None, start_date=_digits(when, 8),
        start_time=_digits(when[8:], 6) if len(when) > 8 else None, **common)


def _omi_steps(seg: Segments, obr: list[str] | None, common: dict[str, Any]) -> list[worklist.ScheduledStep]:
    ipcs = seg.all("IPC")
    if not ipcs:
        raise OrderError("no IPC segment (Imaging Procedure Control)", "100", "IPC")
    tq1 = seg.first("TQ1")
    when = seg.text(comp(seg.comps(seg.field(tq1, 7)), 1))
    out = []
    for n, ipc in enumerate(ipcs, start=1):
        accession = seg.text(comp(seg.comps(seg.field(ipc, 1)), 1))
        if not accession:
            raise OrderError("IPC-1 (Accession Identifier) is missing", "101", f"IPC^{n}^1")
        sps = seg.text(comp(seg.comps(seg.field(ipc, 4)), 1))
        if not sps:
            raise OrderError("IPC-4 (Scheduled Procedure Step ID) is missing", "101", f"IPC^{n}^4")
        out.append(worklist.ScheduledStep(
            accession_number=accession, sps_id=sps,
            requested_procedure_id=seg.text(comp(seg.comps(seg.field(ipc, 2)), 1)) or None,
            study_uid=seg.text(comp(seg.comps(seg.field(ipc, 3)), 1)) or None,
            modality=seg.text(comp(seg.comps(seg.field(ipc, 5)), 1)) or None,
            station_name=seg.text(seg.field(ipc, 7)) or None, station_ae=seg.text(seg.field(ipc, 9)) or None,
            start_date=_digits(when, 8), start_time=_digits(when[8:], 6) if len(when) > 8 else None, **common))
    return out


def _name(seg: Segments, value: str) -> str | None:
    """XPN repetitions -> PN component groups (family^given^middle^prefix^suffix, PS3.5 6.2.1)."""
    groups = []
    for rep in seg.reps(value)[:3]:
        c = [seg.text(p) for p in seg.comps(rep)]
        groups.append("^".join([comp(c, 1), comp(c, 2), comp(c, 3), comp(c, 5), comp(c, 4)]).rstrip("^"))
    text = "=".join(groups).rstrip("=")
    return text or None


def _xcn(seg: Segments, value: str) -> str | None:
    """The first XCN repetition (id^family^given^middle) as a PN."""
    reps = seg.reps(value)
    if not reps:
        return None
    c = [seg.text(p) for p in seg.comps(reps[0])]
    text = "^".join([comp(c, 2), comp(c, 3), comp(c, 4)]).rstrip("^")
    return text or None


def _digits(value: str, n: int) -> str | None:
    digits = "".join(ch for ch in value if ch.isdigit())[:n]
    return digits or None


class WorklistFeed:
    """The actor: keeps the image manager's worklist in step with the orders of its channel."""

    def __init__(self, *, name: str, options: Mapping[str, Any], context: ActorContext) -> None:
        unknown = sorted(set(options) - {"sending_application", "sending_facility"})
        if unknown:
            raise ValueError(f"modality-worklist options: unknown option {unknown[0]!r}; "
                             "options are sending_application, sending_facility")
        self.name = name
        self.options = dict(options)
        self.context = context

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def handle(self, message: Message) -> Outcome:
        try:
            header = parse_header(message.raw, message.charset or "ascii")
        except HL7Error as exc:
            return Outcome(code="AR", error=exc.message, error_code=exc.code, error_location=exc.location)
        manager = self.context.extras.get("dicom")
        if manager is None:
            return self._ack(header, "AR", "207", "MSH^1^9", "the DICOM image manager is not running")
        try:
            control, steps = steps_of(header)
        except OrderError as exc:
            return self._ack(header, "AE", exc.code, exc.location, str(exc))
        if control in WITHDRAW:
            for accession in sorted({s.accession_number for s in steps}):
                ids = [s.sps_id for s in steps if s.accession_number == accession and header.message_type == "OMI"]
                await asyncio.to_thread(worklist.cancel, manager.engine, accession, ids)
        else:
            await asyncio.to_thread(worklist.schedule, manager.engine, steps)
        return self._ack(header, "AA")

    def _ack(self, header: Header, code: str, error_code: str | None = None, location: str | None = None,
             text: str | None = None) -> Outcome:
        body = build_ack(header, code, text=text, error_code=error_code, error_location=location,
                         sending_app=self.options.get("sending_application"),
                         sending_facility=self.options.get("sending_facility"))
        return Outcome(code=code, error=text, error_code=error_code, error_location=location, body=body)
