"""End-to-end conversions between kinds: HL7 -> JSON/dict, HL7 -> HL7, XML -> XML (XSLT and rules),
JSON -> HL7, CSV row -> dict, database row -> dict; Chinese names in UTF-8 and GB18030."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree

from ihehub.bus.message import Message
from ihehub.mappings import HL7Doc, MappingError, compile_path, load_mapping
from ihehub.mappings.testing import decode_hl7

from .conftest import CORPUS, DATA

GB_A01 = (DATA / "adt-a01-gb18030.hl7").read_bytes()


def hl7_field(raw: bytes, path: str) -> object:
    if "[" in path and "==" in path:
        from ihehub.mappings.functions import FUNCTIONS
        from ihehub.mappings.lang import Ctx, Env
        from ihehub.mappings.readers import (
            InputSpec,
            path_compilers,  # conditions need the expression language
        )

        env = Env(input_kind="hl7", paths=path_compilers("hl7"), functions=FUNCTIONS, tables={}, variables=set(),
                  extra={"input": InputSpec(kind="hl7")})
        ctx = Ctx(None, {}, {})
        ctx.doc = HL7Doc(decode_hl7(raw), ctx)
        return env.path("hl7", path, 0)(ctx)
    return compile_path(path).value(HL7Doc(decode_hl7(raw)))


def test_hl7_to_json_patient_model_gb18030() -> None:
    mapping = load_mapping(str(DATA / "adt-patient.yaml"))
    out = json.loads(mapping.to_bytes(GB_A01))
    assert out == {
        "patient": {
            "id": "100234",
            "ids": [{"value": "100234", "system": "1.2.156.1"},
                    {"value": "110101199003074518", "system": "1.2.156.112604"}],
            "name": {"family": "单", "given": "田芳", "pinyin": "SHAN TIANFANG", "initials": "stf"},
            "birth_date": "1990-03-07",
            "sex": "female",
            "phone": "138****5678",
        },
        "visit": {"department": "radiology", "class": "inpatient", "admitted": "2026-01-10T09:00+08:00"},
        "message": {"id": "MSG0001", "event": "A01", "hospital": "H1"},
    }


def test_same_message_in_utf8_maps_the_same() -> None:
    mapping = load_mapping(str(DATA / "adt-patient.yaml"))
    utf8 = GB_A01.decode("gb18030").replace("GB 18030-2000", "UNICODE UTF-8").encode("utf-8")
    assert mapping.apply(utf8) == mapping.apply(GB_A01)
    # MSH-18 empty: the input's charset (GB18030) applies
    unlabeled = GB_A01.replace(b"CHN|GB 18030-2000", b"CHN|")
    assert json.loads(mapping.to_bytes(unlabeled))["patient"]["name"]["family"] == "单"


def test_channel_message_as_transformer() -> None:
    mapping = load_mapping(str(DATA / "adt-patient.yaml"))
    msg = Message(channel="adt", raw=GB_A01, charset="gb18030", control_id="MSG0001")
    body = mapping(msg)
    assert isinstance(body, bytes) and json.loads(body)["patient"]["id"] == "100234"
    assert mapping.content_type == "application/json" and len(mapping.version) == 16


def test_hl7_to_dict_from_the_public_corpus(write: Callable[..., Path]) -> None:
    raw = (CORPUS / "ipf" / "hl7v2" / "pixfeed-PIX_FEED_REG_Maximal_Request.hl7").read_bytes()
    path = write("m.yaml", """
        input: {kind: hl7}
        output: {kind: dict}
        rules:
          - patient_id <- PID-3[1].1
          - authorities <- join(PID-3[*].4.2, ",")
          - family <- PID-5.1
          - alias_given <- PID-5[2].2
          - birth_date <- date(PID-7, "date")
          - phones <- PID-13[*].1
          - email <- PID-13[4].1
          - city <- PID-11.3
          - missing <- PID-30
        """)
    row = load_mapping(str(path)).apply(raw)
    assert row == {"patient_id": "PIX10515W3", "authorities": "1.3.6.1.4.1.21367.2005.1.1,1.2.3.4.5.1000",
                   "family": "WASHINGTON", "alias_given": "ANNE", "birth_date": "1977-12-08",
                   "phones": ["012-0001", "012-0003", "012-0004", "marywash@gmx.de"], "email": "marywash@gmx.de",
                   "city": "CHICAGO", "missing": "N"}


def test_hl7_to_hl7_reencodes_escapes_and_copies() -> None:
    mapping = load_mapping(str(DATA / "adt-to-pacs.yaml"))
    raw = GB_A01.replace(b"\rPV1", b"\rZPI|1|x\rPV1")
    out = mapping.to_bytes(raw)
    text = out.decode("utf-8")  # re-encoded from GB18030
    assert hl7_field(out, "MSH-18") == "UNICODE UTF-8"
    assert hl7_field(out, "MSH-5") == "PACS"
    assert hl7_field(out, "PID-5.1") == "单" and hl7_field(out, "PID-5[2].1") == "SHAN"
    assert hl7_field(out, "PID-5[2].2") == "TIANFANG" and hl7_field(out, "PID-8") == "F"
    assert hl7_field(out, "PID-3[*].5") == ["PI", "PI"]
    assert "ZPI" not in text
    # every delimiter in a value is escaped (HL7 v2.5 section 2.7.4) and reads back unchanged
    assert 'W3^12^1^Ward "A"\\F\\B\\S\\C\\T\\D\\R\\E\\E\\F|' in text
    assert hl7_field(out, "PV1-3.4") == 'Ward "A"|B^C&D~E\\F'
    assert hl7_field(out, "NTE-3") == "first line\nsecond line"
    assert hl7_field(out, "EVN-2") == "20260110083000"  # untouched segments copied


def test_hl7_to_gb18030_and_an_unencodable_character(write: Callable[..., Path]) -> None:
    path = write("m.yaml", """
        input: {kind: hl7}
        output: {kind: hl7, copy: true, charset: GB 18030-2000}
        rules:
          - PID-5.3 <- "测试"
        """)
    mapping = load_mapping(str(path))
    utf8 = GB_A01.decode("gb18030").replace("GB 18030-2000", "UNICODE UTF-8").encode()
    out = mapping.to_bytes(utf8)
    assert out.decode("gb18030").count("单^田芳^测试") == 1 and hl7_field(out, "MSH-18") == "GB 18030-2000"
    latin = write("l.yaml", """
        input: {kind: hl7}
        output: {kind: hl7, copy: true, charset: 8859/1}
        rules:
          - PID-5.3 <- "x"
        """)
    with pytest.raises(MappingError, match=r"PID-5 holds '单', which iso-8859-1 cannot encode"):
        load_mapping(str(latin)).apply(utf8)


def test_json_to_hl7_oru_validated_by_hl7apy() -> None:
    mapping = load_mapping(str(DATA / "report-to-oru.yaml"))
    report = {"id": "R1", "patient": {"id": "P1", "family": "张", "given": "三|丰", "birth": "1980-01-02"},
              "exam": {"code": "CT01", "name": "胸部CT"},
              "findings": [{"code": "IMP", "text": "未见异常"}, {"code": "REC", "text": "随访 a^b"}]}
    out = mapping.to_bytes(json.dumps(report, ensure_ascii=False).encode())
    assert hl7_field(out, "MSH-9") == "ORU^R01^ORU_R01"
    assert hl7_field(out, "MSH-12") == "2.5" and hl7_field(out, "MSH-18") == "GB 18030-2000"
    assert hl7_field(out, "PID-5.2") == "三|丰" and hl7_field(out, "PID-7") == "19800102"
    assert hl7_field(out, "OBX[*]-5") == ["未见异常", "随访 a^b"]
    assert hl7_field(out, "OBX[*]-2") == ["TX", "TX"]  # one value fills every OBX
    assert hl7_field(out, 'OBX[OBX-3 == "REC"]-1') == "2"
    bad = dict(report, patient={"id": "P1", "birth": "1980-13-40"})
    with pytest.raises(MappingError) as info:
        mapping.apply(json.dumps(bad).encode())
    assert info.value.target == "PID-7" and info.value.value == "1980-13-40" and info.value.code == "102"


def test_xml_to_xml_with_xslt() -> None:
    mapping = load_mapping(str(DATA / "order-xslt.yaml"))
    out = etree.fromstring(mapping.to_bytes((DATA / "order.xml").read_bytes()))
    assert out.tag == "Request" and out.get("hub") == "IHEHUB" and out.get("received") == "yes"
    assert out.find("Patient").get("id") == "P100" and out.find("Patient").text == "欧阳娜娜"
    assert [(e.get("code"), e.text) for e in out.findall("Exam")] == [("CT01", "胸部CT"), ("MR02", "头颅MR")]


def test_xml_to_xml_with_rules_in_gb18030() -> None:
    mapping = load_mapping(str(DATA / "order-rules.yaml"))
    raw = mapping.to_bytes((DATA / "order.xml").read_bytes())
    assert raw.startswith(b"<?xml version='1.0' encoding='GB18030'?>")
    out = etree.fromstring(raw)
    ns = {"r": "urn:ris:request"}
    assert out.xpath("string(r:Patient/r:Pinyin)", namespaces=ns) == "OUYANG NANA"
    assert out.xpath("r:Exam/@code", namespaces=ns) == ["CT01", "MR02"]
    assert out.xpath("r:Exam/text()", namespaces=ns) == ["胸部CT", "头颅MR"]
    assert out.xpath("string(r:Count)", namespaces=ns) == "2"


def test_xml_input_does_not_resolve_entities(write: Callable[..., Path], tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    path = write("m.yaml", """
        input: {kind: xml}
        output: {kind: json}
        rules:
          - x <- /a
        """)
    xxe = f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY e SYSTEM "file://{secret}">]><a>&e;</a>'.encode()
    out = load_mapping(str(path)).to_bytes(xxe)
    assert b"top secret" not in out


def test_csv_row_to_dict() -> None:
    mapping = load_mapping(str(DATA / "lab-row.yaml"))
    csv_text = ("PatientID;Patient Name;IDCard;Test;Value;Unit;Collected;Comment\n"
                "P1;张三丰;110101199003074518;glu;5.6;MMOL/L;10/01/2026 08:30; \n")
    row = mapping.apply(csv_text.encode("utf-8"))
    assert isinstance(row, dict)
    assert {k: v for k, v in row.items() if k != "row_key"} == {
        "patient_id": "P1", "patient_name": "张三丰", "masked_name": "张**", "id_card": "1101**********4518",
        "test_code": "GLU", "value": 5.6, "unit": "mmol/L", "collected": "2026-01-10T08:30", "comment": "none"}
    assert len(row["row_key"]) == 64
    rows = mapping.map_rows(csv_text + "P2;李四;110101199003074518;hb;140;g/L;11/01/2026 09:00;ok\n")
    assert all(isinstance(r, dict) for r in rows)
    assert [r["patient_id"] for r in rows if isinstance(r, dict)] == ["P1", "P2"]
    with pytest.raises(MappingError, match="2 data rows"):
        mapping.apply(csv_text + "P2;x;1;hb;1;g;11/01/2026 09:00;\n")


def test_database_row_to_dict(write: Callable[..., Path]) -> None:
    path = write("m.yaml", """
        input: {kind: dict}
        output: {kind: dict}
        rules:
          - mrn <- @PAT_NO
          - name <- @PAT_NAME
          - name_pinyin <- upper(name_pinyin(@PAT_NAME))
          - visit <- /VISIT/no
          - note <- @NOTE
        """)
    mapping = load_mapping(str(path))
    row = {"PAT_NO": 42, "PAT_NAME": "曾小贤", "VISIT": {"no": "V1"}, "NOTE": None}
    assert mapping.apply(row) == {"mrn": 42, "name": "曾小贤", "name_pinyin": "ZENG XIAOXIAN", "visit": "V1",
                                  "note": None}
    assert json.loads(mapping(Message(channel="c", raw=json.dumps(row).encode())))["mrn"] == 42


def test_python_hook_as_last_resort(write: Callable[..., Path]) -> None:
    path = write("m.yaml", """
        input: {kind: hl7}
        output: {kind: json}
        hook: tests.mappings.hooks:add_checksum
        rules:
          - id <- PID-3.1
        """)
    assert json.loads(load_mapping(str(path)).to_bytes(GB_A01)) == {"id": "100234", "checksum": 6}


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("adt-patient.yaml", "adt-a01-gb18030.hl7"),
        ("adt-to-pacs.yaml", "adt-a01-gb18030.hl7"),
        ("order-rules.yaml", "order.xml"),
        ("order-xslt.yaml", "order.xml"),
    ],
)
def test_generated_function_and_rule_closures_agree(name: str, source: str) -> None:
    """`apply` runs the generated function, `run` (with a trace) the closures: same output."""
    mapping = load_mapping(str(DATA / name))
    data = (DATA / source).read_bytes()
    assert mapping.apply(data) == mapping.run(data).output


def test_generated_source_is_kept_for_inspection() -> None:
    mapping = load_mapping(str(DATA / "adt-patient.yaml"))
    source = mapping.generated_source
    assert source is not None and source.startswith("def _mapped(c, out):") and "_s_PID = _F.get('PID')" in source


def test_structure_is_copied_across_delimiters(write: Callable[..., Path]) -> None:
    """A field read whole keeps its structure; written with other delimiters it is re-delimited."""
    path = write("m.yaml", """
        input: {kind: hl7}
        output: {kind: hl7, version: "2.5"}
        rules:
          - MSH-9.1 <- "ADT"
          - PID-3[*] <- PID-3[*]
          - PID-5 <- PID-5
          - ZPI <- ZPI
          - PID-6.1 <- PID-5.1
        """)
    text = "MSH#$~\\&#HIS#H1#A#B#2026##ADT$A01#1#P#2.5\rPID#1##111$$$H1&1.2$ISO~222$$$H2##Li$Lei\rZPI#1#a$b\r"
    out = load_mapping(str(path)).to_bytes(text).decode()
    assert out.startswith("MSH|^~\\&|")
    assert "PID|||111^^^H1&1.2^ISO~222^^^H2||Li^Lei|Li\r" in out
    assert "ZPI|1|a^b\r" in out
