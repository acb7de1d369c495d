"""PIX Manager on the wire: every corpus ITI-8 sample, then ITI-9 queries (ok, NF, unknown id / domain, merged id)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.actors.support import a01, corpus, qbp22, qbp23, running_hub, segments

# corpus sample -> (MSA-1, ERR-3 code or None); order matters (later samples find what earlier ones fed).
FEEDS = [
    ("pixsource-A01.hl7", "AA", None),
    ("pixsource-A01_with_BR.hl7", "AA", None),  # same MPI id again: an update of the record
    ("pixsource-A04.hl7", "AA", None),
    ("pixsource-A08.hl7", "AA", None),
    ("pixsource-A10.hl7", "AR", "201"),  # not an ITI-8 event
    ("pixsource-A40.hl7", "AE", "204"),  # MRG-1 704686 was never fed
    ("camel-iti-8.hl7", "AE", "204"),  # MRG-1 PDQ113XX03 was never fed
    ("mllp-iti8-a01-incomplete.hl7", "AE", "100"),  # no PID segment
    ("pixfeed-PIX_FEED_REG_Maximal_Request.hl7", "AA", None),
    ("pixfeed-PIX_FEED_REV_Maximal_Request.hl7", "AA", None),
    ("pixfeed-PIX_FEED_MERGE_Maximal_Request.hl7", "AE", "102"),  # MRG-1 in another domain than PID-3
    ("mllp-iti8-a40.hl7", "AA", None),  # after 305014 and 305010 were registered below
    ("mllp-iti8-a40-iso-8859-1.hl7", "AE", "204"),  # 305010 is already merged away
]


def test_corpus_feeds_and_queries(tmp_path: Path) -> None:
    with running_hub(tmp_path) as hub:
        # the two records mllp-iti8-a40 merges; 305010 comes without PID-3.4 from facility ENTERPRISE -> MPI
        pre = hub.pix(a01("P1", "305014^^^MPI", "STILLER^BEN", "19810327", facility="ENTERPRISE"),
                      a01("P2", "305010", "STILLER^BENJAMIN", "19810328", facility="ENTERPRISE"))
        assert all(b"MSA|AA|P" in r for r in pre), pre
        for name, code, err in FEEDS:
            raw = corpus(name)
            (reply,) = hub.pix(raw)
            seg = segments(reply, "latin-1")
            cid = raw.split(b"\r", 1)[0].split(b"|")[9].decode()
            assert seg["MSA"][0][1:3] == [code, cid], (name, reply)
            if err is None:
                assert "ERR" not in seg, (name, reply)
            else:
                assert err in "|".join(seg["ERR"][0]), (name, reply)
            assert seg["MSH"][0][11] == "2.3.1" and seg["MSH"][0][8].startswith("ACK")
        # with its surviving PID-3 known, pixsource-A40 fails on MRG-1 (v2.3.1 ELD layout names the MRG field)
        ok_survivor, r = hub.pix(a01("P3", "142025^^^MPI", "LENNON^JOHN", "19730811"), corpus("pixsource-A40.hl7"))
        assert b"MSA|AA|P3" in ok_survivor and b"ERR|MRG^1^1" in r and b"704686" in r

        # ITI-9: the REG sample's HIMSS2005 id, cross-referenced into the enterprise domain
        ok, nf, unknown, bad_dom, bad_what, merged = hub.pix(
            qbp23("Q1", "PIX10515W3^^^HIMSS2005"),
            qbp23("Q2", "PIX10515W3^^^&1.3.6.1.4.1.21367.2005.1.1&ISO", "^^^KHKN"),
            qbp23("Q3", "NOPE^^^HIMSS2005"),
            qbp23("Q4", "PIX10515W3^^^NOWHERE"),
            qbp23("Q5", "PIX10515W3^^^HIMSS2005", "^^^IHEHUB~^^^NOWHERE"),
            qbp23("Q6", "305010^^^MPI"),
        )
        s = segments(ok)
        assert s["MSH"][0][8] == "RSP^K23^RSP_K23" and s["MSH"][0][11] == "2.5"
        assert s["MSA"][0][1:3] == ["AA", "Q1"] and s["QAK"][0][1:3] == ["TQ1", "OK"]
        assert s["QPD"][0] == ["QPD", "IHE PIX Query", "TQ1", "PIX10515W3^^^HIMSS2005", ""]
        pid3 = s["PID"][0][3].split("~")
        assert pid3[0].startswith("E000000") and pid3[0].endswith("^^^IHEHUB&1.2.156.9&ISO^PI")
        assert "PIX10515W3^^^HIMSS2005" not in s["PID"][0][3]  # the queried id is never returned
        assert s["PID"][0][5] == "~^^^^^^S"
        assert segments(nf)["MSA"][0][1] == "AA" and segments(nf)["QAK"][0][2] == "NF" and b"PID" not in nf
        assert b"MSA|AE|Q3" in unknown and b"QAK|TQ3|AE" in unknown and b"ERR||QPD^1^3^1^1|204" in unknown
        assert b"MSA|AE|Q4" in bad_dom and b"ERR||QPD^1^3^1^4|204" in bad_dom
        assert b"MSA|AE|Q5" in bad_what and b"ERR||QPD^1^4^2|204" in bad_what
        # the merged-away id of mllp-iti8-a40 is no longer a key
        assert b"MSA|AE|Q6" in merged and b"ERR||QPD^1^3^1^1|204" in merged and b"merged into" in merged
        # its survivor still answers, now with the enterprise id only (one patient)
        (surv,) = hub.pix(qbp23("Q7", "305014^^^MPI"))
        assert b"MSA|AA|Q7" in surv and b"305010" not in surv


def test_feed_errors_name_the_field(tmp_path: Path) -> None:
    with running_hub(tmp_path) as hub:
        bad_date, no_domain, bad_domain, v25, not_feed = hub.pix(
            a01("F1", "A1^^^HOSPA", "ZHANG^SAN", "20261345"),
            a01("F2", "A2", "LI^SI", "19800101", facility="NOWHERE"),
            a01("F3", "A3^^^MARS", "LI^SI", "19800101"),
            a01("F4", "A4^^^HOSPA", "WANG^WU", "19800101", version="2.5", event="A04"),
            b"MSH|^~\\&|S|HA|HUB|HUB|20261127||ORU^R01|F5|P|2.5\rPID|1||A5\r",
        )
        assert b"MSA|AE|F1" in bad_date and b"PID^1^7" in bad_date and b"102" in bad_date
        assert b"MSA|AE|F2" in no_domain and b"ERR|PID^1^3^204" in no_domain  # 2.3.1: ERR-1 ELD
        assert b"MSA|AE|F3" in bad_domain and b"204" in bad_domain
        assert b"MSA|AA|F4" in v25 and b"ACK^A04^ACK" in v25
        assert b"MSA|AR|F5" in not_feed and b"|200" in not_feed


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.scaleout)])
def test_link_merge_and_query(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """Two hospitals' records of one person are cross-referenced; an A40 (v2.5) merge retires the subsumed id."""
    database = request.getfixturevalue("pg_database")[1] if backend == "postgresql" else None
    with running_hub(tmp_path, database=database) as hub:
        same = "|||1 RENMIN RD^^BEIJING^^100000||13800138000"  # address and phone: enough evidence to link
        fed = hub.pix(a01("G1", "A1^^^HOSPA", "ZHANG^SAN", "19800101", extra_pid=same),
                      a01("G2", "A2^^^HOSPA", "ZHANG^SANFENG", "19800102"),
                      a01("G3", "B1^^^HOSPB", "ZHANG^SAN", "19800101", facility="HB", extra_pid=same),
                      b"MSH|^~\\&|S|HA|HUB|HUB|20261127||ADT^A40^ADT_A39|G4|P|2.5\rEVN|A40\r"
                      b"PID|1||A1^^^HOSPA||ZHANG^SAN\rMRG|A2^^^HOSPA\r")
        assert all(b"MSA|AA|G" in f for f in fed), fed
        xref, gone = hub.pix(qbp23("Q1", "A1^^^HOSPA", "^^^HOSPB"), qbp23("Q2", "A2^^^HOSPA"))
        assert b"MSA|AA|Q1" in xref and b"B1^^^HOSPB&1.2.156.1.2&ISO^PI" in xref
        assert b"MSA|AE|Q2" in gone and b"ERR||QPD^1^3^1^1|204" in gone
        (found,) = hub.pdq(qbp22("D1", "@PID.5.1^ZHANG*~@PID.7^1980", tag="T1"))
        assert b"QAK|T1|OK|IHE PDQ Query|1|1|0" in found
