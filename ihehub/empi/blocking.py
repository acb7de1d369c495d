"""Blocking keys: the few indexed values under which a record's possible matches are looked up.

A new record is compared only with the records that share at least one key with it (Christen 2012,
"Data Matching", ch. 4), so an index of a million patients is never compared pairwise.  Several keys, each
robust to a different error, keep the pair recall high:

* ``n`` phonetic surname + given initial + birth year, and phonetic given name + surname initial + birth
  year — survive typos in the rest of the name, a wrong day or month, spelling variants (Soundex; for
  Chinese names of the pinyin, so 张三 and the pinyin-only "ZHANG SAN" share the key), and surname and
  given name swapped (both orders share the ``n`` prefix);
* ``d`` full birth date + either initial — survives misspelt names;
* ``a`` postcode + phonetic surname or given name — survives a missing or wrong birth date;
* ``h`` hanzi full name — survives a missing or wrong birth date;
* ``i`` national id, ``p`` each phone number — exact identifiers.

Keys are stored in ``empi_block_keys`` (key, record) with the key indexed; a key shared by more than
``max_block`` records (a family phone of a whole village, a data-entry default) is skipped at lookup.
"""

from __future__ import annotations

from ihehub.empi.normalize import NormRecord

_SOUNDEX = {c: d for d, letters in {"1": "BFPV", "2": "CGJKQSXZ", "3": "DT", "4": "L", "5": "MN", "6": "R"}.items()
            for c in letters}


def soundex(word: str) -> str:
    """American Soundex (US National Archives, 1920 census coding rules), 4 characters; "" for no letters."""
    word = "".join(c for c in word.upper() if "A" <= c <= "Z")
    if not word:
        return ""
    out = word[0]
    last = _SOUNDEX.get(word[0], "")
    for c in word[1:]:
        code = _SOUNDEX.get(c, "")
        if code and code != last:
            out += code
            if len(out) == 4:
                break
        if c not in "HW":
            last = code
    return out.ljust(4, "0")


def blocking_keys(rec: NormRecord) -> list[str]:
    """The blocking keys of a normalised record (every name variant contributes)."""
    keys: list[str] = []
    year = rec.birth_date[:4] if rec.birth_date else ""
    full = rec.birth_date if rec.birth_date and len(rec.birth_date) == 8 else ""
    for nm in rec.names:
        fam, giv = soundex(nm.family), soundex(nm.given)
        if year and fam:
            keys.append(f"n:{fam}:{nm.given[:1]}:{year}")
        if year and giv:
            keys.append(f"n:{giv}:{nm.family[:1]}:{year}")
        if full:
            keys += [f"d:{full}:{x[:1]}" for x in (nm.family, nm.given) if x]
        if rec.postcode:
            keys += [f"a:{rec.postcode}:{x}" for x in (fam, giv) if x]
        if nm.family_hanzi and nm.given_hanzi:
            keys.append(f"h:{nm.family_hanzi}{nm.given_hanzi}")
    if rec.national_id:
        keys.append(f"i:{rec.national_id}")
    keys += [f"p:{p}" for p in rec.phones]
    return list(dict.fromkeys(keys))
