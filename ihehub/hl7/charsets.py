"""MSH-18 character set names (HL7 table 0211) mapped to Python codecs.

HL7 v2.5 chapter 2, section 2.15.9.18 (MSH-18 Character Set) and table 0211 "Alternate character
sets"; the DICOM-style ``ISO IR nnn`` terms and common IANA spellings seen in the field are accepted
as aliases.  Names are compared without case, spaces, ``-`` and ``_`` (``GB 18030-2000`` equals
``gb18030-2000``).

Choices worth knowing:

* ``GB 2312`` decodes as GBK, a strict superset whose bytes are identical for every GB 2312
  character: hospital systems labelled GB 2312 routinely send GBK-only hanzi in patient names.
* ``CNS 11643-1992`` decodes as Big5: Python has no EUC-TW codec, and systems in Taiwan that send
  this label send Big5 bytes (Big5 covers CNS 11643 planes 1 and 2).
* ``UNICODE UTF-16`` / ``UTF-32`` are refused: their bytes are not ASCII-compatible, so MLLP
  framing and the MSH delimiters cannot be read (MLLP release 2, section 2.3 restricts the payload
  to single-byte-compatible encodings).
* ``ISO IR87`` / ``ISO IR159`` (JIS X 0208/0212 via ISO 2022 escapes) decode with the ISO-2022-JP
  codecs, also when they appear only as a later repetition of MSH-18 (code extension, HL7 v2.5
  section 2.15.9.18: the first repetition is the default set, later ones are switched to with
  escape sequences).
"""

from __future__ import annotations

import codecs
import difflib
import re
from types import MappingProxyType

from ihehub.hl7.errors import HL7Error

_STRIP = re.compile(r"[\s_\-]+")


def normalize_charset_name(name: str) -> str:
    """``"UNICODE UTF-8"`` -> ``"UNICODEUTF8"``: the key the table below is indexed by."""
    return _STRIP.sub("", name).upper()


def _table() -> dict[str, str]:
    table: dict[str, str] = {}

    def add(codec: str, *names: str) -> None:
        for n in names:
            table[normalize_charset_name(n)] = codec

    add("ascii", "ASCII", "ISO IR6", "ISO IR 6", "US-ASCII", "ISO646-US")
    latin = {1: "100", 2: "101", 3: "109", 4: "110", 5: "144", 6: "127", 7: "126", 8: "138", 9: "148"}
    for n, ir in latin.items():
        add(f"iso-8859-{n}", f"8859/{n}", f"ISO IR{ir}", f"ISO-8859-{n}", f"ISO8859-{n}")
    add("iso-8859-1", "LATIN1", "LATIN-1")
    add("iso-8859-15", "8859/15", "ISO IR203", "ISO-8859-15", "LATIN9")
    add("cp1252", "CP1252", "WINDOWS-1252")
    add("utf-8", "UNICODE UTF-8", "UNICODE", "UTF-8", "UTF8", "ISO IR192")
    add("gb18030", "GB 18030-2000", "GB 18030-2005", "GB18030", "GB 18030")
    add("gbk", "GB 2312", "GB2312", "GB 2312-80", "ISO IR58", "EUC-CN", "GBK", "CP936")
    add("big5", "BIG-5", "BIG5", "CNS 11643-1992", "CNS 11643")
    add("euc_kr", "KS X 1001", "KS C 5601", "ISO IR149", "EUC-KR")
    add("shift_jis", "ISO IR14", "SHIFT_JIS", "SJIS")
    add("iso2022_jp", "ISO IR87", "ISO-2022-JP")
    add("iso2022_jp_2", "ISO IR159", "ISO-2022-JP-2")
    return table


CHARSETS = MappingProxyType(_table())

# Table 0211 values that exist but cannot travel over MLLP.
_UNSUPPORTED = MappingProxyType(
    {
        normalize_charset_name(name): f"{name} is not ASCII-compatible, so MLLP cannot frame it"
        for name in ("UNICODE UTF-16", "UNICODE UTF-32", "UTF-16", "UTF-32")
    }
)

# ISO 2022 sets that, named in a later MSH-18 repetition, select the escape-aware codec.
_ISO2022 = MappingProxyType(
    {normalize_charset_name("ISO IR87"): "iso2022_jp", normalize_charset_name("ISO IR159"): "iso2022_jp_2"}
)


def python_codec(name: str, *, location: str = "MSH^1^18") -> str:
    """The Python codec for the HL7 character set ``name``; raises `HL7Error` 103 when unknown."""
    key = normalize_charset_name(name)
    codec = CHARSETS.get(key)
    if codec is not None:
        return codec
    if key in _UNSUPPORTED:
        raise HL7Error(f"character set {name!r} is not supported: {_UNSUPPORTED[key]}", "103", location)
    close = difflib.get_close_matches(key, list(CHARSETS), n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise HL7Error(
        f"unknown character set {name!r} in MSH-18{hint}; expected an HL7 table 0211 value such as "
        "ASCII, 8859/1, UNICODE UTF-8, GB 18030-2000, BIG-5",
        "103",
        location,
    )


def codec_for_msh18(value: str, repetition_sep: str) -> str | None:
    """The codec for a whole MSH-18 value, or None when it is empty (the channel default applies).

    The first repetition names the default character set; an ISO 2022 set named in a later
    repetition switches to the escape-aware codec, which decodes plain ASCII unchanged.
    """
    reps = value.split(repetition_sep) if repetition_sep else [value]
    first = reps[0].strip()
    for alt in reps[1:]:
        iso2022 = _ISO2022.get(normalize_charset_name(alt))
        if iso2022 is not None and (not first or python_codec(first) in ("ascii", "shift_jis")):
            return iso2022
    if not first:
        return None
    return python_codec(first)


def default_codec(name: str) -> str:
    """Resolve a channel's ``default_charset``: an HL7 name or an ASCII-compatible Python codec name.

    Raises `ValueError` with a clear message otherwise (configuration error, not a message error).
    """
    try:
        return python_codec(name)
    except HL7Error:
        pass
    try:
        info = codecs.lookup(name)
    except LookupError:
        raise ValueError(f"unknown character set {name!r}") from None
    try:
        ok = "MSH|^~\\&\r".encode(info.name) == b"MSH|^~\\&\r"
    except (UnicodeError, LookupError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"character set {name!r} is not ASCII-compatible, so it cannot carry HL7 over MLLP")
    return info.name
