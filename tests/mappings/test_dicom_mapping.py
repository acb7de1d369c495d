"""DICOM input and output in mapping files: paths by keyword, tag and sequence; tag morphing that keeps
everything else (compressed pixel data byte for byte); character sets (ISO 2022 IR 87, ISO_IR 192,
GB18030); new datasets as Part 10 files; bad input and bad mapping files reported clearly."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ihehub.cli import main
from ihehub.mappings import MappingError, check_mapping, compile_mapping, load_mapping, run_mapping_tests
from ihehub.mappings.testing import read_output_field

CT = Path(get_testdata_file("CT_small.dcm"))
J2K = Path(get_testdata_file("JPEG2000.dcm"))
PIXEL_TAG = b"\xe0\x7f\x10\x00"

MORPH = """\
name: pacs-coerce
input: {kind: dicom}
output: {kind: dicom, base: input}
tables:
  pid:
    values: {1CT1: "H1-000123", 8NM1: "H1-000456"}
    unmapped: error
rules:
  - PatientID <- table("pid", PatientID)
  - IssuerOfPatientID <- "2.16.156.10011.1.1"
  - InstitutionName <- "北京协和医院"
  - PatientBirthDate <- delete()
"""


def read(raw: bytes) -> pydicom.FileDataset:
    return pydicom.dcmread(io.BytesIO(raw))


def synthetic(*, part10: bool = True, implicit: bool = False) -> bytes:
    """A small dataset with sequences, a multi-valued element and a private element."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.PatientName = "Wang^XiaoDong=王^小东"
    ds.PatientID = "P1"
    ds.SliceThickness = "5.000000"
    ds.Rows = 512
    ds.add_new(0x00090010, "LO", "ACME 1.0")
    ds.add_new(0x00091001, "LO", "private text")
    series = []
    for uid in ("1.2.3.10", "1.2.3.11"):
        item = Dataset()
        item.SeriesInstanceUID = uid
        ref = Dataset()
        ref.ReferencedSOPInstanceUID = uid + ".1"
        item.ReferencedInstanceSequence = Sequence([ref])
        series.append(item)
    ds.ReferencedSeriesSequence = Sequence(series)
    buf = io.BytesIO()
    if part10:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        ds.save_as(buf, enforce_file_format=True)
    else:
        ds.save_as(buf, implicit_vr=implicit, little_endian=True)
    return buf.getvalue()


@pytest.fixture
def morph(write: Callable[..., Path]) -> Path:
    return write("coerce.yaml", MORPH)


def test_tag_morphing_changes_only_what_the_rules_name(morph: Path) -> None:
    data = CT.read_bytes()
    mapping = load_mapping(str(morph))
    out_raw = mapping.apply(data)
    assert isinstance(out_raw, bytes) and out_raw[128:132] == b"DICM"
    assert mapping.content_type == "application/dicom"
    src, out = read(data), read(out_raw)
    assert out.PatientID == "H1-000123"
    assert out.IssuerOfPatientID == "2.16.156.10011.1.1"
    assert out.InstitutionName == "北京协和医院"
    assert "PatientBirthDate" in src and "PatientBirthDate" not in out
    # ISO_IR 100 cannot encode Chinese: the dataset becomes UTF-8, every text still reads the same
    assert src.SpecificCharacterSet == "ISO_IR 100" and out.SpecificCharacterSet == "ISO_IR 192"
    changed = {"PatientID", "IssuerOfPatientID", "InstitutionName", "PatientBirthDate", "SpecificCharacterSet"}
    for elem in src:
        if elem.keyword not in changed:
            assert out[elem.tag].value == elem.value, elem.keyword
    assert out.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    assert out.file_meta.MediaStorageSOPInstanceUID == src.SOPInstanceUID
    assert out_raw[out_raw.index(PIXEL_TAG):] == data[data.index(PIXEL_TAG):]
    # the generated function and the traced closures give the same bytes
    result = mapping.run(data)
    assert result.output == out_raw
    assert [(e.target, e.value) for e in result.trace][:2] == [("PatientID", "H1-000123"),
                                                               ("IssuerOfPatientID", "2.16.156.10011.1.1")]


def test_compressed_pixel_data_passes_untouched(morph: Path) -> None:
    data = J2K.read_bytes()
    out_raw = load_mapping(str(morph)).apply(data)
    assert isinstance(out_raw, bytes)
    src, out = read(data), read(out_raw)
    assert out.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.91"
    assert out.PatientID == "H1-000456"
    tail = data[data.index(PIXEL_TAG):]
    assert b"\xff\x4f\xff\x51" in tail  # a JPEG 2000 codestream (SOC, SIZ) in an encapsulated fragment
    assert out_raw.endswith(tail)  # the whole encapsulated pixel data, byte for byte


@pytest.mark.parametrize(
    ("name", "charset_before", "charset_after", "patient_name"),
    [
        ("chrH31.dcm", ["", "ISO 2022 IR 87"], "ISO_IR 192", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        ("chrX1.dcm", "ISO_IR 192", "ISO_IR 192", "Wang^XiaoDong=王^小東"),
        ("chrX2.dcm", "GB18030", "GB18030", "Wang^XiaoDong=王^小东"),
    ],
)
def test_character_sets(write: Callable[..., Path], name: str, charset_before: object, charset_after: str,
                        patient_name: str) -> None:
    path = write("cs.yaml", """\
        input: {kind: dicom}
        output: {kind: dicom, base: input}
        rules:
          - InstitutionName <- "北京协和医院"
          - StudyDescription <- concat("病人 ", PatientName)
        """)
    data = Path(get_charset_files(name)[0]).read_bytes()
    assert read(data).SpecificCharacterSet == charset_before
    out_raw = load_mapping(str(path)).apply(data)
    assert isinstance(out_raw, bytes)
    out = read(out_raw)
    assert out.SpecificCharacterSet == charset_after
    assert str(out.PatientName) == patient_name
    assert out.InstitutionName == "北京协和医院"
    assert out.StudyDescription == f"病人 {patient_name}"
    codec = {"GB18030": "gb18030", "ISO_IR 192": "utf-8"}[charset_after]
    assert "北京协和医院".encode(codec) in out_raw


def test_text_the_character_set_can_encode_keeps_it(write: Callable[..., Path]) -> None:
    path = write("jp.yaml", """\
        input: {kind: dicom}
        output: {kind: dicom, base: input}
        rules: [InstitutionName <- "山田病院"]
        """)
    out_raw = load_mapping(str(path)).apply(Path(get_charset_files("chrH31.dcm")[0]).read_bytes())
    assert isinstance(out_raw, bytes)
    out = read(out_raw)
    assert out.SpecificCharacterSet == ["", "ISO 2022 IR 87"] and out.InstitutionName == "山田病院"
    assert b"\x1b$B" in out_raw  # ISO 2022 escape to JIS X 0208


def test_paths_read_keywords_tags_sequences_and_private_elements(write: Callable[..., Path]) -> None:
    path = write("read.yaml", """\
        input: {kind: dicom}
        output: {kind: json}
        rules:
          - name <- PatientName
          - by_tag <- (0010,0020)
          - by_bare_tag <- 0010,0020
          - by_number <- 00100020
          - explicit <- dicom("(0010,0020)")
          - private <- (0009,1001)
          - image_type <- ImageType
          - second_type <- ImageType[1]
          - thickness <- SliceThickness
          - rows <- Rows
          - first_series <- ReferencedSeriesSequence[0].SeriesInstanceUID
          - all_series <- ReferencedSeriesSequence[*].SeriesInstanceUID
          - nested <- ReferencedSeriesSequence[*].ReferencedInstanceSequence[*].ReferencedSOPInstanceUID
          - missing_item <- ReferencedSeriesSequence[5].SeriesInstanceUID
          - absent <- default(AccessionNumber, "none")
          - is_ct <- SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        """)
    mapping = load_mapping(str(path))
    expected = {
        "name": "Wang^XiaoDong=王^小东", "by_tag": "P1", "by_bare_tag": "P1", "by_number": "P1", "explicit": "P1",
        "private": "private text", "image_type": ["ORIGINAL", "PRIMARY", "AXIAL"], "second_type": "PRIMARY",
        "thickness": "5.000000", "rows": "512", "first_series": "1.2.3.10", "all_series": ["1.2.3.10", "1.2.3.11"],
        "nested": ["1.2.3.10.1", "1.2.3.11.1"], "absent": "none", "is_ct": True,
    }
    for raw in (synthetic(), synthetic(part10=False), synthetic(implicit=True), synthetic(part10=False, implicit=True)):
        out = mapping.to_bytes(raw)
        assert json.loads(out) == expected
        assert json.loads(mapping.run(raw).output) == expected


def test_new_dataset_with_sequences_private_tags_and_spread(write: Callable[..., Path]) -> None:
    path = write("order.yaml", """\
        input: {kind: json}
        output: {kind: dicom}
        rules:
          - SOPClassUID <- "1.2.840.10008.5.1.4.31"
          - SOPInstanceUID <- /uid
          - PatientName <- /name
          - PatientID <- /pid
          - AccessionNumber <- /accession
          - RequestAttributesSequence[0].ScheduledProcedureStepID <- /step
          - RequestAttributesSequence[0].RequestedProcedureID <- /procedure
          - ScheduledProcedureStepSequence[0].Modality <- /modality
          - ReferencedSeriesSequence[*].SeriesInstanceUID <- /series
          - (0009,0010):LO <- "IHEHUB"
          - (0009,1001):LO <- /ward
          - OtherPatientIDs <- /other
          - Rows <- "256"
        """)
    order = {"uid": "1.2.3.99", "name": "张^三", "pid": "P9", "accession": "A1", "step": "SPS1", "procedure": "RP1",
             "modality": "CT", "series": ["1.2.3.7", "1.2.3.8"], "ward": "放射科", "other": ["X1", "X2"]}
    mapping = load_mapping(str(path))
    out_raw = mapping.apply(json.dumps(order, ensure_ascii=False).encode())
    assert isinstance(out_raw, bytes)
    out = read(out_raw)
    assert out.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.31"
    assert out.file_meta.MediaStorageSOPInstanceUID == "1.2.3.99"
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert out.SpecificCharacterSet == "ISO_IR 192"  # non-ASCII text was written into a dataset without one
    assert str(out.PatientName) == "张^三"
    assert out.RequestAttributesSequence[0].ScheduledProcedureStepID == "SPS1"
    assert out.RequestAttributesSequence[0].RequestedProcedureID == "RP1"
    assert out.ScheduledProcedureStepSequence[0].Modality == "CT"
    assert [s.SeriesInstanceUID for s in out.ReferencedSeriesSequence] == ["1.2.3.7", "1.2.3.8"]
    assert out[0x00091001].VR == "LO" and out[0x00091001].value == "放射科"
    assert list(out.OtherPatientIDs) == ["X1", "X2"]
    assert out.Rows == 256
    assert read_output_field(mapping, out_raw, "RequestAttributesSequence[0].ScheduledProcedureStepID") == "SPS1"
    assert read_output_field(mapping, out_raw, "(0009,1001)") == "放射科"


def test_bare_dataset_output_and_missing_sop_uids(write: Callable[..., Path]) -> None:
    rules = "rules:\n  - PatientID <- /pid\n  - Modality <- 'MR'\n"
    bare = load_mapping(str(write("bare.yaml", "input: {kind: json}\noutput: {kind: dicom, part10: false}\n" + rules)))
    raw = bare.apply(b'{"pid": "P2"}')
    assert isinstance(raw, bytes) and raw[128:132] != b"DICM"
    ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    assert (ds.PatientID, ds.Modality) == ("P2", "MR")
    part10 = load_mapping(str(write("p10.yaml", "input: {kind: json}\noutput: {kind: dicom}\n" + rules)))
    with pytest.raises(MappingError, match=r"SOPClassUID and SOPInstanceUID .*part10: false"):
        part10.apply(b'{"pid": "P2"}')
    # a dataset without preamble, morphed: a Part 10 file in the transfer syntax the dataset came in
    morph = load_mapping(str(write("m.yaml", "input: {kind: dicom}\noutput: {kind: dicom, base: input}\n"
                                             "rules: [PatientID <- 'X']\n")))
    for implicit, ts in ((True, ImplicitVRLittleEndian), (False, ExplicitVRLittleEndian)):
        out = read(morph.apply(synthetic(part10=False, implicit=implicit)))  # type: ignore[arg-type]
        assert out.file_meta.TransferSyntaxUID == ts and out.PatientID == "X"
        assert str(out.PatientName) == "Wang^XiaoDong=王^小东"


def test_delete_and_empty_values(write: Callable[..., Path]) -> None:
    path = write("empty.yaml", """\
        input: {kind: dicom}
        output: {kind: dicom, base: input, empty: keep}
        rules:
          - ReferencedSeriesSequence[0].SeriesInstanceUID <- delete()
          - ReferencedSeriesSequence[1].SeriesInstanceUID <- "1.2.3.12"
          - (0009,1001) <- delete()
          - AccessionNumber <- null
          - PatientID <- ""
        """)
    src = synthetic()
    out = read(load_mapping(str(path)).apply(src))  # type: ignore[arg-type]
    assert "SeriesInstanceUID" not in out.ReferencedSeriesSequence[0]
    assert out.ReferencedSeriesSequence[1].SeriesInstanceUID == "1.2.3.12"
    assert 0x00091001 not in out and 0x00090010 in out
    assert out.AccessionNumber in ("", None) and out.PatientID in ("", None)
    before = read(src)  # the input's sequence items were copied, not changed in place
    assert before.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.3.10"


@pytest.mark.parametrize("data", [b"MSH|^~\\&|HIS|H1|||20260101||ADT^A01|1|P|2.5\r", b"", b"{\"a\": 1}",
                                  bytes(128) + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f",
                                  CT.read_bytes()[:1000], CT.read_bytes()[:-100], J2K.read_bytes()[:-10]])
def test_input_that_is_not_dicom(morph: Path, data: bytes) -> None:
    mapping = load_mapping(str(morph))
    for run in (mapping.apply, mapping.run):
        with pytest.raises(MappingError) as err:
            run(data)
        assert "(reading the input)" in str(err.value)
        assert any(s in err.value.reason for s in ("not DICOM", "not a readable DICOM dataset", "truncated")), err.value
        assert err.value.code == "102"


def test_private_elements_of_the_input_keep_their_vr(write: Callable[..., Path]) -> None:
    path = write("private.yaml", """\
        input: {kind: dicom}
        output: {kind: dicom, base: input}
        rules:
          - (0009,1002) <- lower((0009,1002))
          - (0011,1001) <- "x"
        """)
    mapping = load_mapping(str(path))
    with pytest.raises(MappingError, match=r"say its VR, e.g. \(0011,1001\):LO") as err:
        mapping.apply(CT.read_bytes())
    assert err.value.target == "(0011,1001)"
    path.write_text(path.read_text().replace('  - (0011,1001) <- "x"\n', ""))
    out = read(load_mapping(str(path)).apply(CT.read_bytes()))  # type: ignore[arg-type]
    src = read(CT.read_bytes())
    assert out[0x00091002].VR == src[0x00091002].VR == "SH"
    assert out[0x00091002].value == src[0x00091002].value.lower()


def test_value_that_does_not_fit_its_vr(write: Callable[..., Path]) -> None:
    path = write("vr.yaml", """\
        input: {kind: dicom}
        output: {kind: dicom, base: input}
        rules:
          - PatientID <- "ok"
          - Rows <- PatientName
        """)
    with pytest.raises(MappingError) as err:
        load_mapping(str(path)).apply(CT.read_bytes())
    assert err.value.location.endswith(":5") and err.value.target == "Rows"
    assert "not a valid US value" in err.value.reason and err.value.code == "102"


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [
        ("PatientID <- PatientNme", "unknown DICOM keyword 'PatientNme' (did you mean 'PatientName'?)"),
        ("PatientNmae <- PatientID", "unknown DICOM keyword 'PatientNmae' (did you mean 'PatientName'?)"),
        ("PatientID <- PatientName[0].Foo", "unknown DICOM keyword 'Foo'"),
        ("PatientID <- PatientName.PatientID", "PatientName is not a sequence"),
        ("PatientID <- ReferencedSeriesSequence.SeriesInstanceUID", "ReferencedSeriesSequence[0] (the first)"),
        ("PatientID:XX <- PatientID", "'XX' is not a DICOM VR"),
        ("PatientID <- PID-3", "unknown DICOM keyword 'PID'"),
    ],
)
def test_check_reports_unknown_keywords_with_file_and_line(write: Callable[..., Path], rule: str,
                                                           fragment: str) -> None:
    path = write("bad.yaml", f"input: {{kind: dicom}}\noutput: {{kind: dicom, base: input}}\nrules:\n  - {rule}\n")
    problems = check_mapping(path)
    assert problems, rule
    text = "\n".join(str(p) for p in problems)
    assert fragment in text and all(p.line == 4 for p in problems), text


def test_dicom_options_checked(write: Callable[..., Path]) -> None:
    cases = [
        ("input: {kind: hl7}\noutput: {kind: dicom, base: input}\nrules: [PatientID <- PID-3]\n",
         "base: input needs the input and output to be alike"),
        ("input: {kind: dicom}\noutput: {kind: json, base: input}\nrules: [a <- PatientID]\n",
         "base applies to DICOM output"),
        ("input: {kind: dicom}\noutput: {kind: json}\nrules: [a <- delete()]\n",
         "delete() removes an element of a DICOM"),
        ("input: {kind: dicom}\noutput: {kind: dicom, base: elsewhere}\nrules: [a <- delete()]\n", "'elsewhere'"),
        ("input: {kind: json}\noutput: {kind: dicom}\nrules: ['(0009,1002) <- /x']\n",
         "private or unknown tag, so say its VR, e.g. (0009,1002):LO"),
    ]
    for text, fragment in cases:
        mapping, problems = compile_mapping(write("opt.yaml", text))
        assert mapping is None and fragment in "\n".join(str(p) for p in problems), text


def test_tests_block_and_cli_dump(write: Callable[..., Path], tmp_path: Path) -> None:
    (tmp_path / "ct.dcm").write_bytes(CT.read_bytes())
    path = write("coerce.yaml", MORPH + """\
tests:
  - name: coerced
    input: ct.dcm
    expect: {PatientID: H1-000123, "(0008,0080)": 北京协和医院, PatientBirthDate: null}
""")
    outcomes = run_mapping_tests(load_mapping(str(path)), tmp_path)
    assert [o.passed for o in outcomes] == [True], outcomes
    result = CliRunner().invoke(main, ["map", "test", str(path), str(tmp_path / "ct.dcm")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "(0010,0020) Patient ID" in result.output and "H1-000123" in result.output
    assert "北京协和医院" in result.output and "DICM" not in result.output
    assert "PatientID <- \"H1-000123\"" in result.output  # the trace
    (tmp_path / "x.hl7").write_bytes(b"MSH|^~\\&|HIS\r")
    bad = CliRunner().invoke(main, ["map", "test", str(path), str(tmp_path / "x.hl7")])
    assert bad.exit_code != 0 and "input is not DICOM" in bad.output
