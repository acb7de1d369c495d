"""PDQ Supplier on the wire: GB18030 names with wildcards, QPD-8, RCP-2 paging with DSC, QCN cancel, corpus queries."""

from __future__ import annotations

from pathlib import Path

from tests.actors.support import a01, corpus, qbp22, qcn, running_hub, segments

GB = "GB 18030-2000"


def test_chinese_names_paging_cancel_and_errors(tmp_path: Path) -> None:
    with running_hub(tmp_path) as hub:
        feeds = hub.pix(
            a01("C1", "A100^^^HOSPA", "张^三", "19800101", charset=GB, encoding="gb18030"),
            a01("C2", "A101^^^HOSPA", "张^伟", "19910505", "F", charset=GB, encoding="gb18030"),
            a01("C3", "A102^^^HOSPA", "李^四", "19700303", charset=GB, encoding="gb18030"),
            *(a01(f"W{i}", f"B{i}^^^HOSPB", f"WANG^{given}", f"19{60 + 5 * i}0{i + 1}1{i}", facility="HB")
              for i, given in enumerate(["ALICE", "BRUNO", "CARLA", "DMITRI", "EDITH"])),
        )
        assert all(b"MSA|AA|" in f for f in feeds), feeds

        # GB18030 query by hanzi with a wildcard: the reply is GB18030 too, MSH-18 echoed
        (zh,) = hub.pdq(qbp22("Z1", "@PID.5.1^张*", tag="QZ", charset=GB, encoding="gb18030"))
        s = segments(zh, "gb18030")
        assert s["MSH"][0][8] == "RSP^K22^RSP_K21" and s["MSH"][0][17] == GB
        assert s["MSA"][0][1:3] == ["AA", "Z1"] and s["QAK"][0][1:7] == ["QZ", "OK", "IHE PDQ Query", "2", "2", "0"]
        names = sorted(p[5] for p in s["PID"])
        assert names == ["张^三", "张^伟"] and "DSC" not in s
        assert any("A100^^^HOSPA&1.2.156.1.1&ISO^PI" in p[3] for p in s["PID"])
        # the pinyin spelling finds the hanzi record
        (py,) = hub.pdq(qbp22("Z2", "@PID.5.1^ZHANG~@PID.5.2^SAN", tag="QP"))
        assert b"QAK|QP|OK" in py and b"A100^^^HOSPA" in py

        # RCP-2 2^RD: 5 WANGs in pages of 2, DSC continuation pointer kept per query tag
        (p1,) = hub.pdq(qbp22("P1", "@PID.5.1^WANG*", tag="QW", limit="2^RD"))
        s1 = segments(p1)
        assert s1["QAK"][0][4:7] == ["5", "2", "3"] and [p[1] for p in s1["PID"]] == ["1", "2"]
        pointer = s1["DSC"][0][1]
        (p2,) = hub.pdq(qbp22("P2", "@PID.5.1^WANG*", tag="QW", limit="2^RD", dsc=pointer))
        s2 = segments(p2)
        assert s2["QAK"][0][4:7] == ["5", "2", "1"] and [p[1] for p in s2["PID"]] == ["3", "4"]
        seen = {p[5] for p in s1["PID"] + s2["PID"]}
        assert len(seen) == 4
        # cancel (QCN^J01), then the pointer is gone
        cancel, again = hub.pdq(qcn("X1", "QW"),
                                qbp22("P3", "@PID.5.1^WANG*", tag="QW", dsc=s2["DSC"][0][1]))
        assert b"MSA|AA|X1" in cancel and b"ACK^J01^ACK" in cancel
        assert b"MSA|AE|P3" in again and b"QAK|QW|AE" in again and b"ERR||DSC^1^1|204" in again
        # a query run to its end leaves no cursor
        (last,) = hub.pdq(qbp22("P4", "@PID.5.1^WANG*~@PID.7^1980", tag="QL", limit="2^RD"))
        assert segments(last)["QAK"][0][4:7] == ["1", "1", "0"] and b"DSC" not in last

        # QPD-8 restricts patients and their identifiers; unknown domains there are 204
        only_b, nf, bad8, bad_field, bad_rcp = hub.pdq(
            qbp22("D1", "@PID.5.1^WANG", tag="Q8", qpd8="^^^HOSPB"),
            qbp22("D2", "@PID.5.1^NOBODY", tag="QN"),
            qbp22("D3", "@PID.5.1^WANG", tag="Q9", qpd8="^^^HOSPB~^^^MARS"),
            qbp22("D4", "@PID.5.1^WANG~@PID.18.1^ACC1", tag="QF"),
            qbp22("D5", "@PID.5.1^WANG", tag="QR", limit="zero^RD"),
        )
        assert all(i.split("^")[3].startswith("HOSPB") for p in segments(only_b)["PID"] for i in p[3].split("~"))
        assert b"MSA|AA|D2" in nf and b"QAK|QN|NF" in nf and b"PID|" not in nf
        assert b"MSA|AE|D3" in bad8 and b"ERR||QPD^1^8^2|204" in bad8
        assert b"MSA|AE|D4" in bad_field and b"ERR||QPD^1^3^2|207" in bad_field
        assert b"MSA|AE|D5" in bad_rcp and b"ERR||RCP^1^2|102" in bad_rcp


def test_corpus_queries_match_the_sample_responses(tmp_path: Path) -> None:
    with running_hub(tmp_path) as hub:
        (fed,) = hub.pix(a01("H1", "X1^^^XREF2005", "Heidi^MARY", "19400101", "F",
                             extra_pid="|||3443 North Arctic Avenue^^Some City^^12345"))
        assert b"MSA|AA|H1" in fed
        query = corpus("pdq-PDQ_Maximal_Query.hl7")
        (reply,) = hub.pdq(query)
        got = segments(reply)
        want = segments(corpus("pdq-PDQ_Maximal_Query_Response.hl7").replace(b"\r\n", b"\r"))
        assert [k for k in got] == [k for k in want] == ["MSH", "MSA", "QAK", "QPD", "PID"]
        assert got["MSH"][0][8] == want["MSH"][0][8] == "RSP^K22^RSP_K21"
        assert got["QPD"] == want["QPD"]  # QPD echoed as received
        assert got["QAK"][0][1:3] == want["QAK"][0][1:3]
        assert got["PID"][0][3] == "X1^^^XREF2005&1.3.6.1.4.1.21367.2005.1.2&ISO^PI"  # QPD-8: XREF2005 only
        assert got["PID"][0][5:9] == ["Heidi^MARY", "", "19400101", "F"]
        (id_query,) = hub.pdq(corpus("pdq-PDQ_ID_Query.hl7"))
        assert b"MSA|AE|" in id_query and b"@PID.18.1 is not supported" in id_query
