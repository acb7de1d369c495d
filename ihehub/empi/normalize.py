"""Normalisation of a received `PatientRecord` into the comparable form the matcher and the index use.

Names: Western names are upper-cased, accents folded, punctuation and spaces removed for the key
(``"O'Neil-Smith"`` -> ``ONEILSMITH``); Chinese names keep their hanzi and add toneless pinyin (see
`ihehub.empi.chinese`).  Birth date (HL7 v2.5 DTM/TS, ISO), sex (HL7 table 0001; GB/T 2261.1 codes),
phone (digits, country code 86 dropped), address (XAD parts, folded), national id (Chinese resident ID
checked and its birth date and sex compared with the record's).

Impossible values raise `InvalidData` naming the field; values that are merely doubtful (a resident ID
whose birth date differs from PID-7, an unreadable phone) are kept and reported as warnings.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import re
import unicodedata
from types import MappingProxyType
from typing import Any

from ihehub.empi.chinese import chinese_name, has_hanzi, parse_resident_id
from ihehub.empi.errors import InvalidData, MissingField, UnknownValue
from ihehub.empi.model import Address, PatientRecord, PersonName

# HL7 table 0001 (administrative sex) plus the spellings and GB/T 2261.1-2003 codes hospitals send.
SEX_CODES = MappingProxyType(
    {
        "M": "M", "MALE": "M", "MAN": "M", "男": "M", "男性": "M", "1": "M",
        "F": "F", "FEMALE": "F", "WOMAN": "F", "女": "F", "女性": "F", "2": "F",
        "O": "O", "OTHER": "O", "A": "O", "未说明的性别": "U", "9": "U",
        "U": "U", "UNKNOWN": "U", "N": "U", "0": "U", "未知": "U", "未知的性别": "U", "": "U",
    }
)
EARLIEST_BIRTH = dt.date(1870, 1, 1)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class NormName:
    """One name: ``family``/``given`` keys (Latin: upper-case letters; Chinese: pinyin upper-case) and the
    hanzi when the name was written in hanzi."""

    family: str
    given: str
    family_hanzi: str = ""
    given_hanzi: str = ""
    middle: str = ""

    @property
    def hanzi(self) -> bool:
        return bool(self.family_hanzi or self.given_hanzi)

    @property
    def given_initials(self) -> str:
        return self.given[:1]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class NormRecord:
    """The comparable form of one record.  ``given_syllables`` keeps the pinyin syllables of a Chinese
    given name so that initials ("XM" for 晓明) and swapped characters can be compared."""

    names: tuple[NormName, ...]
    given_syllables: tuple[str, ...] = ()
    birth_date: str | None = None  # YYYY, YYYYMM or YYYYMMDD
    sex: str | None = None  # M, F, O (U is None: unknown tells nothing)
    phones: tuple[str, ...] = ()
    national_id: str | None = None
    line1: str | None = None
    line2: str | None = None
    city: str | None = None
    state: str | None = None
    postcode: str | None = None
    department: str | None = None
    mother_maiden_name: str | None = None

    @property
    def name(self) -> NormName | None:
        return self.names[0] if self.names else None

    @property
    def birth_year(self) -> int | None:
        return int(self.birth_date[:4]) if self.birth_date else None


def fold(text: str) -> str:
    """Upper-case ASCII letters and digits with single spaces: accents and punctuation dropped."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    text = "".join(c for c in text if not unicodedata.combining(c)).upper()
    text = text.replace("Ü", "V").replace("ß", "SS").replace("Æ", "AE").replace("Ø", "O")
    text = re.sub(r"[^A-Z0-9\u3400-\u9fff\s]+", "", text)
    return re.sub(r"\s+", " ", text).strip()


def key(text: str) -> str:
    """`fold` without spaces: the comparison key of a name (``"San Feng"`` == ``"SANFENG"``)."""
    return fold(text).replace(" ", "")


@functools.lru_cache(maxsize=65536)
def normalize_name(name: PersonName) -> tuple[NormName, tuple[str, ...]] | None:
    """One `NormName` (and the pinyin syllables of a Chinese given name), or None for an empty name.  Kept for
    the names seen most often (pinyin is the slow part of normalising a record; both values are immutable)."""
    family, given = name.family.strip(), " ".join(p for p in (name.given.strip(), name.middle.strip()) if p)
    if not family and not given:
        return None
    if has_hanzi(family) or has_hanzi(given):
        cn = chinese_name(family, given)
        return (NormName(family=cn.family_pinyin.upper(), given="".join(cn.given_pinyin).upper(),
                         family_hanzi=cn.family, given_hanzi=cn.given),
                tuple(s.upper() for s in cn.given_pinyin))
    given = name.given
    if family and not given and " " in fold(family):  # "ZHANG SAN" sent whole in XPN-1
        family, _, given = fold(family).partition(" ")
    return NormName(family=key(family), given=key(given), middle=key(name.middle)), tuple(fold(given).split())


def parse_birth_date(value: dt.date | str | None, *, field: str = "birth_date",
                     today: dt.date | None = None) -> str | None:
    """``YYYYMMDD`` (or ``YYYY``/``YYYYMM`` for partial dates) from a date, an HL7 TS or ISO text."""
    if value is None:
        return None
    today = today or dt.date.today()
    if isinstance(value, dt.datetime):
        value = value.date()
    if isinstance(value, dt.date):
        text = value.strftime("%Y%m%d")
    else:
        raw = value.strip()
        if not raw:
            return None
        text = re.sub(r"[-/.]", "", raw.split("T")[0].split(" ")[0])
        text = re.split(r"[+\-]", text)[0]
        if not text.isdigit() or len(text) not in (4, 6, 8, 10, 12, 14):
            raise InvalidData(f"birth date {value!r} is not a date (YYYYMMDD or YYYY-MM-DD)", field=field)
        text = text[:8]
    year, month, day = int(text[:4]), int(text[4:6] or 1), int(text[6:8] or 1)
    try:
        date = dt.date(year, month, day)
    except ValueError:
        raise InvalidData(f"birth date {value!r} does not exist", field=field) from None
    if date > today:
        raise InvalidData(f"birth date {value!r} is in the future", field=field)
    if date < EARLIEST_BIRTH:
        raise InvalidData(f"birth date {value!r} is before {EARLIEST_BIRTH.year}", field=field)
    return text


def parse_sex(value: str | None, *, field: str = "sex") -> str | None:
    """HL7 table 0001 code; None for unknown (U, N, empty)."""
    if value is None:
        return None
    code = SEX_CODES.get(unicodedata.normalize("NFKC", value).strip().upper())
    if code is None:
        raise UnknownValue(f"sex {value!r} is not in HL7 table 0001 (F, M, O, U, A, N)", field=field)
    return None if code == "U" else code


def normalize_phone(value: str) -> str | None:
    """Digits only, without the +86 / 0086 country code and extensions; None when under 5 digits."""
    value = unicodedata.normalize("NFKC", value)
    value = re.split(r"(?i)(?:ext\.?|x|转)\s*\d+$", value.strip())[0]
    digits = re.sub(r"\D", "", value)
    if value.strip().startswith("+") and digits.startswith("86"):
        digits = digits[2:]
    elif digits.startswith("0086"):
        digits = digits[4:]
    elif len(digits) == 13 and digits.startswith("861"):
        digits = digits[2:]
    return digits if len(digits) >= 5 else None


def normalize_address(addr: Address) -> dict[str, str | None]:
    def f(v: str) -> str | None:
        out = fold(v) if not has_hanzi(v) else re.sub(r"\s+", "", unicodedata.normalize("NFKC", v))
        return out or None

    return {"line1": f(addr.line1), "line2": f(addr.line2), "city": f(addr.city) or f(addr.district),
            "state": f(addr.state), "postcode": re.sub(r"\s", "", addr.postcode).upper() or None}


def _limit(value: str, size: int, field: str) -> None:
    if len(value) > size:
        raise InvalidData(f"{field} {value[:20]!r}... is {len(value)} characters long, at most {size} are kept",
                          field=field)


def normalize(record: PatientRecord, *, strict_national_id: bool = True,
              today: dt.date | None = None) -> tuple[NormRecord, tuple[str, ...]]:
    """The comparable form of ``record`` and the warnings found; `InvalidData` for impossible values."""
    if not record.pid or not record.pid.strip():
        raise MissingField("the record has no patient identifier", field="identifier.value")
    _limit(record.pid, 128, "identifier.value")
    for n in record.names:
        for part in (n.family, n.given, n.middle):
            _limit(part, 128, "names")
    _limit(record.national_id or "", 32, "national_id")
    for a in record.addresses:
        _limit(a.postcode, 16, "addresses")
        _limit(a.city or a.district, 128, "addresses")
    warnings: list[str] = []
    names: list[NormName] = []
    syllables: tuple[str, ...] = ()
    for i, n in enumerate(record.names):
        got = normalize_name(n)
        if got is None:
            continue
        norm, syl = got
        if not names:
            syllables = syl
        if norm not in names:
            names.append(norm)
        if not norm.family and not norm.given:
            warnings.append(f"names[{i}] has no letters: {n.family!r} {n.given!r}")
    birth = parse_birth_date(record.birth_date, today=today)
    sex = parse_sex(record.sex)
    national = None
    if record.national_id and record.national_id.strip():
        if record.national_id_type.upper() in ("CN-RIC", "RIC", "NI-CN"):
            try:
                rid = parse_resident_id(record.national_id)
            except InvalidData as exc:
                if strict_national_id:
                    raise
                warnings.append(exc.message)
            else:
                national = rid.number
                if not rid.region_known:
                    warnings.append(f"resident ID region {rid.region} is not a known division code")
                derived = rid.birth_date.strftime("%Y%m%d")
                if birth is None:
                    birth = derived
                elif len(birth) == 8 and birth != derived:
                    warnings.append(f"birth date {birth} differs from the resident ID's {derived}")
                if sex is None:
                    sex = rid.sex
                elif sex in ("M", "F") and sex != rid.sex:
                    warnings.append(f"sex {sex} differs from the resident ID's {rid.sex}")
        else:
            national = re.sub(r"[\s\-]", "", unicodedata.normalize("NFKC", record.national_id)).upper() or None
    phones: list[str] = []
    for p in record.phones:
        norm_phone = normalize_phone(p) if p and p.strip() else None
        if norm_phone is None:
            if p and p.strip():
                warnings.append(f"phone {p!r} has too few digits; ignored for matching")
        elif norm_phone not in phones:
            phones.append(norm_phone)
    addr = normalize_address(record.addresses[0]) if record.addresses else {}
    mmn = key(record.mother_maiden_name) if record.mother_maiden_name else None
    dept = fold(record.department) if record.department else None
    return NormRecord(names=tuple(names), given_syllables=syllables, birth_date=birth, sex=sex,
                      phones=tuple(phones), national_id=national, line1=addr.get("line1"),
                      line2=addr.get("line2"), city=addr.get("city"), state=addr.get("state"),
                      postcode=addr.get("postcode"), department=dept or None,
                      mother_maiden_name=mmn or None), tuple(warnings)


def normalize_feed(record: PatientRecord, *, strict_national_id: bool = True) -> tuple[NormRecord, tuple[str, ...]]:
    """`normalize` as a feed applies it: a record without any patient name is refused (`MissingField`)."""
    if not record.names or not any(n.family.strip() or n.given.strip() for n in record.names):
        raise MissingField("the record has no patient name", field="names")
    return normalize(record, strict_national_id=strict_national_id)


def norm_to_json(norm: NormRecord) -> dict[str, Any]:
    """A JSON-able dict of ``norm`` (stored with the record so that candidates need no re-normalising): what
    `dataclasses.asdict` gives, without its deep copies (this runs once per fed or bulk-loaded record)."""
    d: dict[str, Any] = {f: getattr(norm, f) for f in _NORM_FIELDS}
    d["names"] = [{f: getattr(n, f) for f in _NAME_FIELDS} for n in norm.names]
    return d


_NORM_FIELDS = tuple(f.name for f in dataclasses.fields(NormRecord))
_NAME_FIELDS = tuple(f.name for f in dataclasses.fields(NormName))


def norm_from_json(data: dict[str, Any]) -> NormRecord:
    d = dict(data)
    names = tuple(NormName(**n) for n in d.pop("names", ()))
    syl: tuple[str, ...] = tuple(d.pop("given_syllables", ()))
    phones: tuple[str, ...] = tuple(d.pop("phones", ()))
    return NormRecord(names=names, given_syllables=syl, phones=phones, **d)
