"""ITI-22 Patient Demographics and Visit Query over MLLP: visits kept from the ITI-8 feed's PV1."""

from __future__ import annotations

from pathlib import Path

from tests.actors.support import qcn, running_hub, segments

GB = "GB 18030-2000"


def feed(cid: str, pid3: str, name: str, pv1: str, *, event: str = "A01", facility: str = "HA",
         charset: str = "", encoding: str = "ascii") -> bytes:
    msh18 = f"||||||{charset}" if charset else ""
    return (f"MSH|^~\\&|ADT|{facility}|HUB|HUB|20261127101500||ADT^{event}|{cid}|P|2.3.1{msh18}\r"
            f"EVN|{event}|20261127101500\rPID|1||{pid3}||{name}||19800101|M\r{pv1}\r").encode(encoding)


def make_pv1(**fields: str) -> str:
    """A PV1 segment with the given fields by number (``f2="I"``)."""
    values = [""] * 46
    values[0], values[1] = "PV1", "1"
    for name, value in fields.items():
        values[int(name[1:])] = value
    while values[-1] == "":
        values.pop()
    return "|".join(values)


def zv1(cid: str, qpd3: str, *, tag: str, limit: str = "", dsc: str = "", charset: str = "",
        encoding: str = "ascii") -> bytes:
    msh18 = f"||||||{charset}" if charset else ""
    tail = f"\rDSC|{dsc}|I" if dsc else ""
    return (f"MSH|^~\\&|CONS|CF|HUB|HUB|20261127101500||QBP^ZV1^QBP_Q21|{cid}|P|2.5{msh18}\r"
            f"QPD|IHE PDQ Query|{tag}|{qpd3}\rRCP|I|{limit}{tail}\r").encode(encoding)


def test_visits_from_the_feed_answer_iti22(tmp_path: Path) -> None:
    with running_hub(tmp_path) as hub:
        acks = hub.pix(
            feed("V1", "A1^^^HOSPA", "WANG^LEI", make_pv1(f2="I", f3="3W^301^1^HA", f7="1234^LI^MING^^^DR", f10="MED",
                                                     f17="5678^ZHAO^YUN", f19="V100", f44="20261120080000")),
            feed("V2", "A2^^^HOSPA", "CHEN^JING", make_pv1(f2="O", f3="CLINIC2^^^HA", f7="1234^LI^MING", f10="SUR",
                                                       f19="V200")),
            # a second visit of A1 (A08 with another visit number) and an update of the first one
            feed("V3", "A1^^^HOSPA", "WANG^LEI",
                 make_pv1(f2="O", f3="ER^^^HA", f7="9999^SUN^BO", f10="EMR", f19="V101"), event="A08"),
            feed("V4", "A3^^^HOSPA", "张^伟",
                 make_pv1(f2="I", f3="3W^305^2^HA", f7="1234^LI^MING", f10="MED", f19="V300"),
                 charset=GB, encoding="gb18030"),
            feed("V5", "A4^^^HOSPA", "ZHAO^NOVISIT", "PV1|1"),  # an empty PV1: no visit
        )
        assert all(b"MSA|AA|" in a for a in acks), acks

        # by ward (PV1-3.1): both inpatients, each with its PV1 as received (PV1-1 = the hit's sequence)
        (r,) = hub.pdq(zv1("Q1", "@PV1.3.1^3W", tag="T1"))
        s = segments(r)
        assert s["MSH"][0][8] == "RSP^ZV2^RSP_ZV2" and s["QAK"][0][1:5] == ["T1", "OK", "IHE PDQ Query", "2"]
        assert sorted(p[19] for p in s["PV1"]) == ["V100", "V300"]
        pv1_a1 = next(p for p in s["PV1"] if p[19] == "V100")
        assert pv1_a1[3] == "3W^301^1^HA" and pv1_a1[7] == "1234^LI^MING^^^DR" and pv1_a1[44] == "20261120080000"
        # PID then its PV1, in order
        order = [seg[:3] for seg in r.decode().split("\r") if seg[:3] in ("PID", "PV1")]
        assert order == ["PID", "PV1", "PID", "PV1"]

        # one patient with two visits: two hits; visit number narrows it to one
        (r,) = hub.pdq(zv1("Q2", "@PID.5.1^WANG", tag="T2"))
        assert sorted(p[19] for p in segments(r)["PV1"]) == ["V100", "V101"]
        (r,) = hub.pdq(zv1("Q3", "@PID.5.1^WANG~@PV1.19.1^V101", tag="T3"))
        (pv1,) = segments(r)["PV1"]
        assert pv1[2] == "O" and pv1[3] == "ER^^^HA"

        # attending doctor and patient class together; a hanzi name in GB18030
        (r,) = hub.pdq(zv1("Q4", "@PV1.7.1^1234~@PV1.2^I", tag="T4"))
        assert sorted(p[19] for p in segments(r)["PV1"]) == ["V100", "V300"]
        (r,) = hub.pdq(zv1("Q5", "@PID.5.1^张~@PV1.10^MED", tag="T5", charset=GB, encoding="gb18030"))
        s = segments(r, "gb18030")
        assert [p[5] for p in s["PID"]] == ["张^伟"] and s["PV1"][0][19] == "V300"

        # paging with RCP-2 and DSC, then the pointer belongs to ITI-22 only; cancel drops it
        (p1,) = hub.pdq(zv1("Q6", "@PV1.7.1^1234", tag="T6", limit="1^RD"))
        s1 = segments(p1)
        assert s1["QAK"][0][4:7] == ["3", "1", "2"] and len(s1["PV1"]) == 1
        pointer = s1["DSC"][0][1]
        (p2,) = hub.pdq(zv1("Q7", "@PV1.7.1^1234", tag="T6", limit="1^RD", dsc=pointer))
        s2 = segments(p2)
        assert s2["PV1"][0][1] == "2" and s2["PV1"][0][19] != s1["PV1"][0][19]
        (c,) = hub.pdq(qcn("Q8", "T6"))
        assert b"MSA|AA|Q8" in c
        (p3,) = hub.pdq(zv1("Q9", "@PV1.7.1^1234", tag="T6", limit="1^RD", dsc=s2["DSC"][0][1]))
        assert segments(p3)["ERR"][0][3].startswith("204")

        # no match: QAK NF; an unknown visit field: AE with ERR 207 at QPD-3; visit fields in an ITI-21: refused
        (r,) = hub.pdq(zv1("Q10", "@PV1.3.1^NOWHERE", tag="T10"))
        assert segments(r)["QAK"][0][2] == "NF"
        (r,) = hub.pdq(zv1("Q11", "@PV1.99^X", tag="T11"))
        s = segments(r)
        assert s["MSA"][0][1] == "AE" and s["ERR"][0][2] == "QPD^1^3^1" and s["ERR"][0][3].startswith("207")
        q22 = (b"MSH|^~\\&|CONS|CF|HUB|HUB|20261127101500||QBP^Q22^QBP_Q21|Q12|P|2.5\r"
               b"QPD|IHE PDQ Query|T12|@PV1.3.1^3W\rRCP|I\r")
        (r,) = hub.pdq(q22)
        assert segments(r)["MSA"][0][1] == "AE"
        # the record without a visit is found by ITI-21 but not by a visit query on its name
        (r,) = hub.pdq(zv1("Q13", "@PID.5.1^ZHAO", tag="T13"))
        assert segments(r)["QAK"][0][2] == "NF"

        # the EMPI keeps both visits of A1, newest first
        from ihehub.empi import Identifier

        empi = hub.hub.services["empi"]
        assert [v.visit_number for v in empi.visits(Identifier(value="A1", domain="HOSPA"))] == ["V101", "V100"]
