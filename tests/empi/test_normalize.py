"""Normalisation: Western and Chinese names (GB18030 and UTF-8), surname readings, resident IDs, dates, sex, phones."""

from __future__ import annotations

import datetime as dt

import pytest
from pypinyin import lazy_pinyin

from ihehub.empi import InvalidData, MissingField, PatientRecord, PersonName, UnknownValue
from ihehub.empi.chinese import (
    COMPOUND_SURNAMES,
    SURNAME_PINYIN,
    chinese_name,
    parse_resident_id,
    split_surname,
    surname_pinyin,
)
from ihehub.empi.normalize import (
    norm_from_json,
    norm_to_json,
    normalize,
    normalize_name,
    normalize_phone,
    parse_birth_date,
    parse_sex,
)
from tests.empi.conftest import make_ric

# Surnames that pypinyin reads with the common (non-surname) reading: the override table must fix each.
MISREAD = {
    "单": "shan", "曾": "zeng", "解": "xie", "仇": "qiu", "区": "ou", "朴": "piao", "查": "zha", "盖": "ge",
    "缪": "miao", "翟": "zhai", "覃": "qin", "秘": "bi", "召": "shao", "折": "she", "种": "chong", "员": "yun",
    "繁": "po", "句": "gou", "阚": "kan", "佴": "nai", "隗": "wei", "薄": "bo", "卜": "bu", "么": "yao",
    "藏": "zang", "能": "nai", "都": "du", "角": "jue", "重": "chong", "祭": "zhai", "乜": "nie", "洗": "xian",
    "颉": "xie",
}


@pytest.mark.parametrize(("surname", "reading"), sorted(MISREAD.items()))
def test_heteronym_surnames_are_read_as_surnames(surname: str, reading: str) -> None:
    assert lazy_pinyin(surname + "小明")[0] != reading, "pypinyin now reads it right: drop it from MISREAD"
    assert SURNAME_PINYIN[surname] == reading
    cn = chinese_name(surname + "小明")
    assert (cn.family, cn.given, cn.family_pinyin, cn.given_pinyin) == (surname, "小明", reading, ("xiao", "ming"))


def test_surname_reading_does_not_bleed_into_the_given_name() -> None:
    # 曾经 is "ceng jing" as a word; as a name it is Zeng Jing.  单于 is a compound surname (Chanyu).
    assert chinese_name("曾经").family_pinyin == "zeng"
    assert chinese_name("单于飞").family_pinyin == "chanyu"
    assert chinese_name("尉迟恭").family_pinyin == "yuchi"
    assert chinese_name("万俟卨").family == "万俟"


def test_whole_names_split_on_compound_surnames() -> None:
    assert split_surname("欧阳娜娜") == ("欧阳", "娜娜")
    assert split_surname("司马 光") == ("司马", "光")
    assert split_surname("张三") == ("张", "三")
    assert split_surname("欧阳") == ("欧", "阳")  # two characters: a surname and a given name
    assert all(len(s) == 2 for s in COMPOUND_SURNAMES)
    assert surname_pinyin("诸葛") == "zhuge"


def test_chinese_name_from_gb18030_and_utf8_bytes_is_the_same() -> None:
    # 刘䶮 (U+4DAE, CJK extension A) is in GB18030 but not in GBK: it must survive either encoding.
    name = "刘䶮"
    raw_gb, raw_utf8 = name.encode("gb18030"), name.encode("utf-8")
    with pytest.raises(UnicodeEncodeError):
        name.encode("gbk")
    a = normalize_name(PersonName(family=raw_gb.decode("gb18030")))
    b = normalize_name(PersonName(family=raw_utf8.decode("utf-8")))
    assert a == b and a is not None
    assert (a[0].family_hanzi, a[0].given_hanzi, a[0].family, a[0].given) == ("刘", "䶮", "LIU", "YAN")


def test_minority_names_full_width_and_western_names() -> None:
    got = normalize_name(PersonName(family="阿卜杜·热合曼"))
    assert got is not None and got[0].family_hanzi == "阿" and "·" not in got[0].given_hanzi
    fw = normalize_name(PersonName(family="ＺＨＡＮＧ", given="Ｓａｎ"))
    assert fw is not None and (fw[0].family, fw[0].given) == ("ZHANG", "SAN")
    west = normalize_name(PersonName(family="O'Neil-Smith", given="José María"))
    assert west is not None and (west[0].family, west[0].given) == ("ONEILSMITH", "JOSEMARIA")
    assert west[1] == ("JOSE", "MARIA")
    whole = normalize_name(PersonName(family="Zhang San Feng"))
    assert whole is not None and (whole[0].family, whole[0].given) == ("ZHANG", "SANFENG")
    assert normalize_name(PersonName()) is None


def test_resident_id_checksum_and_derived_fields() -> None:
    number = make_ric("19491231", "002")
    rid = parse_resident_id(number)
    assert rid.birth_date == dt.date(1949, 12, 31) and rid.sex == "F" and rid.region == "110105" and rid.region_known
    assert parse_resident_id("11010519491231002x").number == "11010519491231002X"
    wrong = number[:-1] + ("0" if number[-1] != "0" else "1")
    with pytest.raises(InvalidData, match="check digit") as exc:
        parse_resident_id(wrong)
    assert exc.value.field == "national_id" and exc.value.code == "102"
    with pytest.raises(InvalidData, match="18"):
        parse_resident_id("1101051949")
    with pytest.raises(InvalidData, match="birth date"):
        parse_resident_id(make_ric("19491331"))
    # a first-generation 15-digit number: century 19 and a check digit are added
    old = parse_resident_id("110105491231002")
    assert old.number == "11010519491231002X" and old.sex == "F"
    assert not parse_resident_id(make_ric("19800101", region="990101")).region_known


def test_resident_id_fills_and_checks_birth_date_and_sex() -> None:
    number = make_ric("19800101", "011")
    rec = PatientRecord(pid="1", names=(PersonName(family="张三"),), national_id=number)
    norm, warnings = normalize(rec)
    assert (norm.birth_date, norm.sex, norm.national_id, warnings) == ("19800101", "M", number, ())
    clash = PatientRecord(pid="1", names=(PersonName(family="张三"),), national_id=number, birth_date="19800102",
                          sex="F")
    norm, warnings = normalize(clash)
    assert norm.birth_date == "19800102"
    assert any("differs from the resident ID's 19800101" in w for w in warnings)
    assert any("sex F differs" in w for w in warnings)
    bad = PatientRecord(pid="1", names=(PersonName(family="张三"),), national_id=number[:-1] + "0")
    with pytest.raises(InvalidData):
        normalize(bad)
    norm, warnings = normalize(bad, strict_national_id=False)
    assert norm.national_id is None and "check digit" in warnings[0]
    other = PatientRecord(pid="1", names=(PersonName(family="Smith"),), national_id="123-45 6789",
                          national_id_type="US-SSN")
    assert normalize(other)[0].national_id == "123456789"


@pytest.mark.parametrize(("raw", "expected"), [
    ("19800101", "19800101"), ("1980-01-01", "19800101"), ("198001011230+0800", "19800101"),
    ("1980", "1980"), ("198002", "198002"), (dt.date(1980, 1, 1), "19800101"), ("", None), (None, None),
    ("2024-02-29", "20240229"),
])
def test_birth_dates(raw: object, expected: str | None) -> None:
    assert parse_birth_date(raw, today=dt.date(2026, 1, 1)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", ["19800230", "2023-02-29", "19801301", "abc", "1980010", "18000101", "20990101"])
def test_impossible_birth_dates(raw: str) -> None:
    with pytest.raises(InvalidData) as exc:
        parse_birth_date(raw, today=dt.date(2026, 1, 1))
    assert exc.value.field == "birth_date"


def test_sex_codes() -> None:
    assert [parse_sex(v) for v in ("M", "f", "男", "女", "1", "2", "U", "0", "9", "O", "A", None)] == [
        "M", "F", "M", "F", "M", "F", None, None, None, "O", "O", None]
    with pytest.raises(UnknownValue):
        parse_sex("X")


def test_phones() -> None:
    assert normalize_phone("+86 138-1234-5678") == "13812345678"
    assert normalize_phone("0086 13812345678") == "13812345678"
    assert normalize_phone("8613812345678") == "13812345678"
    assert normalize_phone("(010) 6512-3456 ext. 12") == "01065123456"
    assert normalize_phone("０１０-６５１２３４５６") == "01065123456"
    assert normalize_phone("123") is None
    rec = PatientRecord(pid="1", names=(PersonName(family="Li"),), phones=("12", "13812345678", "138 1234 5678"))
    norm, warnings = normalize(rec)
    assert norm.phones == ("13812345678",) and "too few digits" in warnings[0]


def test_missing_identifier_and_json_round_trip() -> None:
    with pytest.raises(MissingField):
        normalize(PatientRecord(pid=" ", names=(PersonName(family="Li"),)))
    rec = PatientRecord(pid="1", names=(PersonName(family="欧阳娜娜"), PersonName(family="OUYANG", given="NANA")),
                        birth_date="19990909", phones=("13700000000",))
    norm, _ = normalize(rec)
    assert len(norm.names) == 2 and norm.given_syllables == ("NA", "NA")
    assert norm_from_json(norm_to_json(norm)) == norm
