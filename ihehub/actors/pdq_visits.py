"""HL7 v2 side of visits: PV1 of an ITI-8 feed → `Visit`, ITI-22 QPD-3 visit fields → `VisitQuery`, and the
PV1 segment of an RSP^ZV2 (IHE ITI TF-2a 3.22.4.2.2.x).

A PV1 received with the standard delimiters ``|^~\\&`` is kept and returned exactly as received (PV1-1 set to
the hit's sequence); otherwise (a feed or a query with other delimiters) the reply's PV1 is rebuilt from the
parsed fields (PV1-2, 3.1, 7.1, 8.1, 10, 17.1, 19, 44, 45) in the query's delimiters.
"""

from __future__ import annotations

from ihehub.actors.hl7v2 import Segments, comp, esc
from ihehub.empi import Visit
from ihehub.hl7 import Header

STANDARD = ("|", "^~\\&")

# QPD-3 field name (@PV1.x[.y]) -> VisitQuery attribute (ITI TF-2a 3.22.4.1.2.2)
VISIT_FIELDS = {
    "PV1.2": "patient_class", "PV1.2.1": "patient_class",
    "PV1.3": "point_of_care", "PV1.3.1": "point_of_care",
    "PV1.7": "attending", "PV1.7.1": "attending", "PV1.7.2": "attending", "PV1.7.2.1": "attending",
    "PV1.10": "hospital_service", "PV1.10.1": "hospital_service",
    "PV1.19": "visit_number", "PV1.19.1": "visit_number",
}


def pv1_visit(seg: Segments, pv1: list[str] | None) -> Visit | None:
    """The visit a feed's PV1 describes, or None without a PV1 (or with an empty one)."""
    if pv1 is None or not any(pv1[2:]):  # PV1-1 (set id) alone is no visit
        return None

    def text(n: int) -> str:
        return seg.text(seg.field(pv1, n))

    def first_comp(n: int, c: int = 1) -> str:
        return seg.text(comp(seg.comps(seg.reps(seg.field(pv1, n))[0] if seg.field(pv1, n) else ""), c))

    attending = seg.reps(seg.field(pv1, 7))[0] if seg.field(pv1, 7) else ""
    att_parts = seg.comps(attending)
    visit = Visit(
        visit_number=first_comp(19), patient_class=first_comp(2), location=text(3), point_of_care=first_comp(3),
        attending=seg.text(attending), attending_key=seg.text(comp(att_parts, 1)) or seg.text(comp(att_parts, 2)),
        referring=seg.text(seg.reps(seg.field(pv1, 8))[0] if seg.field(pv1, 8) else ""),
        hospital_service=first_comp(10), admitting=seg.text(seg.reps(seg.field(pv1, 17))[0] if seg.field(pv1, 17)
                                                             else ""),
        admit_time=first_comp(44), discharge_time=first_comp(45), pv1="")
    header = seg.header
    if (header.field_sep, header.encoding_chars) == STANDARD:
        return Visit(**{**{f: getattr(visit, f) for f in Visit.__dataclass_fields__},
                        "pv1": header.field_sep.join(pv1)})
    return visit


def pv1_segment(visit: Visit, seq: int, header: Header) -> str:
    """The PV1 of one ITI-22 hit: the stored segment with PV1-1 = ``seq``, in the query's delimiters."""
    if (header.field_sep, header.encoding_chars) == STANDARD and visit.pv1.startswith("PV1|"):
        fields = visit.pv1.split("|")
        if len(fields) > 1:
            fields[1] = str(seq)
        return "|".join(fields)
    return _rebuild(visit, seq, header)


def _rebuild(visit: Visit, seq: int, header: Header) -> str:
    def e(v: str) -> str:
        return esc(v, header)

    f = [""] * 46
    f[0], f[1], f[2], f[3] = "PV1", str(seq), e(visit.patient_class), e(visit.point_of_care)
    f[7], f[8], f[10], f[17] = e(visit.attending_key), e(visit.referring.split("^")[0]), e(visit.hospital_service), \
        e(visit.admitting.split("^")[0])
    f[19], f[44], f[45] = e(visit.visit_number), e(visit.admit_time), e(visit.discharge_time)
    while f and f[-1] == "":
        f.pop()
    return header.field_sep.join(f)
