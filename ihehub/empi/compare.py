"""Graded field comparisons: each field of a record pair gets an agreement level (0 = best) and a similarity.

The levels are the comparison vector γ of Fellegi & Sunter (1969, "A Theory for Record Linkage", JASA 64):
one m/u probability pair per level, so a near miss (a typo, a homophone, swapped day and month) keeps part of
the weight of an exact agreement instead of counting as a disagreement.  Strings use rapidfuzz
Jaro–Winkler; identifiers and digits use the optimal string alignment distance (one substitution or one
transposition of adjacent characters is a typo).  A field missing on either side gets level -1 and
weight 0.

Chinese names: the same hanzi is *exact*; the same pinyin with other hanzi (homophone, 张/章) or the same
characters in another order (张三丰/张丰三) is *close*; one character different is *similar*.  A hanzi name
and a pinyin-only name are compared on the pinyin.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from rapidfuzz.distance import OSA, JaroWinkler

from ihehub.empi.normalize import NormName, NormRecord

LEVELS = MappingProxyType(
    {
        "family": ("exact", "close", "similar", "different"),
        "given": ("exact", "close", "similar", "different"),
        "birth_date": ("exact", "transposed", "partial", "different"),
        "sex": ("same", "different"),
        "national_id": ("exact", "typo", "different"),
        "phone": ("exact", "close", "different"),
        "line1": ("exact", "close", "similar", "different"),
        "line2": ("exact", "close", "similar", "different"),
        "city": ("exact", "close", "different"),
        "state": ("same", "different"),
        "postcode": ("exact", "close", "different"),
        "mother_maiden_name": ("exact", "close", "different"),
    }
)
FIELDS: tuple[str, ...] = tuple(LEVELS)
MISSING = -1


@dataclasses.dataclass(frozen=True, slots=True)
class Comparison:
    """The level (``-1`` missing) and similarity of every field of `FIELDS`, in that order."""

    levels: tuple[int, ...]
    similarities: tuple[float, ...]

    def level_name(self, index: int) -> str:
        lvl = self.levels[index]
        return "missing" if lvl == MISSING else LEVELS[FIELDS[index]][lvl]


def _string(a: str, b: str, close: float = 0.92, similar: float = 0.80) -> tuple[int, float]:
    if a == b:
        return 0, 1.0
    sim = JaroWinkler.similarity(a, b)
    return (1 if sim >= close else 2 if sim >= similar else 3), sim


def _family(x: NormName, y: NormName) -> tuple[int, float]:
    if not x.family or not y.family:
        return MISSING, 0.0
    if x.family_hanzi and y.family_hanzi:
        if x.family_hanzi == y.family_hanzi:
            return 0, 1.0
        if x.family == y.family:
            return 1, 0.95  # homophone surname
        lvl, sim = _string(x.family, y.family)
        return max(lvl, 2), min(sim, 0.85)
    return _string(x.family, y.family)


def _given(x: NormName, y: NormName, xs: tuple[str, ...], ys: tuple[str, ...]) -> tuple[int, float]:
    if not x.given or not y.given:
        return MISSING, 0.0
    if x.given_hanzi and y.given_hanzi:
        a, b = x.given_hanzi, y.given_hanzi
        if a == b:
            return 0, 1.0
        if sorted(a) == sorted(b) or x.given == y.given:
            return 1, 0.9  # swapped characters, or homophones
        if len(a) == len(b) >= 2 and sum(p != q for p, q in zip(a, b, strict=True)) == 1:
            return 2, 0.7  # one character miswritten (similar-looking or mistyped)
        lvl, sim = _string(x.given, y.given)
        return max(lvl, 2), min(sim, 0.8)
    if x.given == y.given:
        return 0, 1.0
    if len(xs) > 1 and sorted(xs) == sorted(ys):
        return 1, 0.9
    lvl, sim = _string(x.given, y.given)
    short, long_ = sorted((x.given, y.given), key=len)
    if lvl == 3 and long_.startswith(short) and (len(short) == 1 or len(short) >= 3):
        return 2, 0.6  # an initial or a shortened given name
    return lvl, sim


def _names(a: NormRecord, b: NormRecord) -> tuple[tuple[int, float], tuple[int, float]]:
    best: tuple[tuple[int, float], tuple[int, float]] = ((MISSING, 0.0), (MISSING, 0.0))
    best_sim = -1.0
    for i, x in enumerate(a.names):
        for j, y in enumerate(b.names):
            xs = a.given_syllables if i == 0 else ()
            ys = b.given_syllables if j == 0 else ()
            fam, giv = _family(x, y), _given(x, y, xs, ys)
            if fam[0] >= 2 and giv[0] >= 2 and x.family and x.family == y.given and x.given == y.family:
                fam, giv = (1, 0.9), (1, 0.9)  # family and given swapped (Western order of a Chinese name)
            total = fam[1] + giv[1]
            if total > best_sim:
                best, best_sim = (fam, giv), total
    return best


def _birth_date(a: str | None, b: str | None) -> tuple[int, float]:
    if not a or not b:
        return MISSING, 0.0
    if a == b:
        return 0, 1.0
    if len(a) == 8 and len(b) == 8:
        if a[:4] == b[:4] and a[4:6] == b[6:8] and a[6:8] == b[4:6]:
            return 1, 0.8  # day and month swapped
        if OSA.distance(a, b) <= 1:
            return 1, 0.8  # one digit mistyped or two adjacent digits swapped
        if a[:4] == b[:4] and (a[4:6] == b[4:6] or a[6:8] == b[6:8]):
            return 2, 0.5
        return 3, 0.0
    n = min(len(a), len(b))
    return (2, 0.5) if a[:n] == b[:n] else (3, 0.0)


def _ident(a: str | None, b: str | None) -> tuple[int, float]:
    if not a or not b:
        return MISSING, 0.0
    if a == b:
        return 0, 1.0
    return (1, 0.7) if OSA.distance(a, b) <= 1 else (2, 0.0)


def _phone(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[int, float]:
    if not a or not b:
        return MISSING, 0.0
    if set(a) & set(b):
        return 0, 1.0
    for p in a:
        for q in b:
            if (len(p) >= 7 and len(q) >= 7 and p[-7:] == q[-7:]) or OSA.distance(p, q) <= 1:
                return 1, 0.7
    return 2, 0.0


def _text(a: str | None, b: str | None, close: float = 0.90, similar: float = 0.75) -> tuple[int, float]:
    if not a or not b:
        return MISSING, 0.0
    return _string(a, b, close, similar)


def _text3(a: str | None, b: str | None) -> tuple[int, float]:
    lvl, sim = _text(a, b, 0.88, 0.88)
    return (min(lvl, 2), sim) if lvl != MISSING else (lvl, sim)


def _same(a: str | None, b: str | None) -> tuple[int, float]:
    if not a or not b:
        return MISSING, 0.0
    return (0, 1.0) if a == b else (1, 0.0)


def compare(a: NormRecord, b: NormRecord) -> Comparison:
    """Compare two normalised records field by field (the fields of `FIELDS`, in that order)."""
    fam, giv = _names(a, b)
    bd = _birth_date(a.birth_date, b.birth_date)
    sex = _same(a.sex, b.sex)
    nid = _ident(a.national_id, b.national_id)
    ph = _phone(a.phones, b.phones)
    l1 = _text(a.line1, b.line1)
    l2 = _text(a.line2, b.line2)
    city = _text3(a.city, b.city)
    st = _same(a.state, b.state)
    pc = _ident(a.postcode, b.postcode)
    mmn = _text3(a.mother_maiden_name, b.mother_maiden_name)
    return Comparison(
        levels=(fam[0], giv[0], bd[0], sex[0], nid[0], ph[0], l1[0], l2[0], city[0], st[0], pc[0], mmn[0]),
        similarities=(fam[1], giv[1], bd[1], sex[1], nid[1], ph[1], l1[1], l2[1], city[1], st[1], pc[1], mmn[1]))
