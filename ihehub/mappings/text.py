"""Text helpers for mappings: pinyin of Chinese names, masking of names, ID numbers and phones, hashes.

Pinyin of names reads the surname from the EMPI's surname table (`ihehub.empi.chinese`: 单 is Shàn,
not dān; compound surnames such as 欧阳 are split off whole), so a mapping and the EMPI spell a
patient the same way.  Masking follows the usual display rule for personal information in China
(GB/T 35273-2020, annex on de-identification): keep the surname, the first and last digits of an
identity number and a mobile number's first three and last four digits.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from types import ModuleType

_WORD = re.compile(r"\S+")
_HANZI = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")


def _empi() -> ModuleType:
    """The EMPI's name module, imported on first use: ``ihehub.empi`` pulls in its store and statistics,
    which a hub without Chinese-name rules should not pay for at start-up."""
    import ihehub.empi.chinese as chinese

    return chinese


def has_hanzi(text: str) -> bool:
    return bool(_HANZI.search(text))
UUID_NAMESPACE = uuid.UUID("6f3d0c34-7d1e-5b3a-9f44-0a1e2c3b4d5e")  # ihehub mapping uuid(x) namespace


def _syllables(text: str) -> list[str]:
    from pypinyin import Style, lazy_pinyin  # its phrase dictionary takes a while to load: on first use

    out: list[str] = []
    for piece in lazy_pinyin(text, style=Style.NORMAL, errors="default", v_to_u=False):
        piece = piece.strip().replace("ü", "v")
        if piece:
            out.append(piece)
    return out


def pinyin(text: str, sep: str = "") -> str:
    """Toneless pinyin of any text (``放射科`` -> ``fangsheke``); characters that are not hanzi are kept."""
    return sep.join(_syllables(text))


def name_pinyin(text: str, sep: str = " ") -> str:
    """A whole Chinese name in pinyin, surname first and apart: ``单田芳`` -> ``shan tianfang``."""
    if not has_hanzi(text):
        return text.strip()
    name = _empi().chinese_name(text)
    return f"{name.family_pinyin}{sep}{''.join(name.given_pinyin)}" if name.given_pinyin else name.family_pinyin


def surname_pinyin(text: str) -> str:
    """The pinyin of a family name as a surname (``曾`` -> ``zeng``, ``欧阳`` -> ``ouyang``)."""
    if not has_hanzi(text):
        return text.strip()
    chinese = _empi()
    return str(chinese.surname_pinyin(chinese.clean_hanzi(text)))


def initials(text: str) -> str:
    """Initials of a name's pinyin: ``单田芳`` -> ``stf`` (surname reading from the surname table)."""
    if not has_hanzi(text):
        return "".join(w[0] for w in _WORD.findall(text)).lower()
    return str(_empi().chinese_name(text).initials)


def mask(text: str, keep_start: int, keep_end: int, char: str = "*") -> str:
    """Replace all but the first ``keep_start`` and last ``keep_end`` characters by ``char``."""
    n = len(text)
    if keep_start + keep_end >= n:
        keep_start, keep_end = n // 4, n // 4
    return text[:keep_start] + char * (n - keep_start - keep_end) + (text[n - keep_end:] if keep_end else "")


def mask_name(text: str, char: str = "*") -> str:
    """``张三丰`` -> ``张**``; ``欧阳娜娜`` -> ``欧阳**``; ``John Smith`` -> ``J*** S****``."""
    text = text.strip()
    if has_hanzi(text):
        name = _empi().chinese_name(text)
        family = name.family or text[:1]
        return family + char * max(len(text) - len(family), 1)
    return " ".join(w[0] + char * (len(w) - 1) for w in _WORD.findall(text))


def mask_id(text: str, keep_start: int = 4, keep_end: int = 4, char: str = "*") -> str:
    """``110101199003074518`` -> ``1101**********4518``."""
    return mask(text.strip(), keep_start, keep_end, char)


def mask_phone(text: str, char: str = "*") -> str:
    """``13812345678`` -> ``138****5678``: digits are masked, separators and ``+86`` kept."""
    n = len(text)
    if text.isdigit() and text.isascii():
        return text[:3] + char * (n - 7) + text[-4:] if n >= 8 else char * (n - 2) + text[-2:]
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    offset = 2 if text.lstrip().startswith("+86") else 0
    body = digits[offset:]
    hidden = set(body[3:-4]) if len(body) >= 8 else set(body[: max(len(body) - 2, 0)])
    return "".join(char if i in hidden else c for i, c in enumerate(text))


def digest(text: str, algorithm: str = "sha256", salt: str = "") -> str:
    """Hex digest; with a ``salt`` it is an HMAC keyed by it (a pseudonym that cannot be recomputed without it)."""
    data = text.encode("utf-8")
    if salt:
        return hmac.digest(salt.encode("utf-8"), data, algorithm).hex()
    return hashlib.new(algorithm, data).hexdigest()


def check_algorithm(algorithm: str) -> str | None:
    try:
        hashlib.new(algorithm)
    except (ValueError, TypeError):
        return f"unknown hash algorithm {algorithm!r}; use one of sha256, sha512, sha1, md5"
    return None


def make_uuid(seed: str | None = None) -> str:
    """A random UUID, or with ``seed`` the same name-based UUID (RFC 9562 version 5) every time."""
    if seed is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(UUID_NAMESPACE, seed))
