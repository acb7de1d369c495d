"""Code tables: local codes to target codes, per hospital, with a fallback table and an unmapped-code policy.

A mapping file declares its tables::

    hospital: MSH-4.1                  # which hospital a message comes from (an expression)
    tables:
      sex: tables/sex.csv              # one table for everyone
      dept:
        file: tables/dept.csv          # the fallback table, used when the hospital's has no entry
        hospitals: {H1: tables/h1/dept.csv, H2: tables/h2/dept.yaml}
        unmapped: default              # error (the default) | pass | default
        default: UNK

CSV files have a header row; the ``code`` and ``value`` columns are used (else the first two).
YAML files are a mapping ``code: value``.  Every code that no table maps is counted in an
`UnmappedReport`, whatever the policy, so the integration engineer sees what to add.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ihehub.config.errors import Problem
from ihehub.config.yamlfile import plain, read_yaml
from ihehub.mappings.errors import EvalError

POLICIES = ("error", "pass", "default")


@dataclasses.dataclass(frozen=True, slots=True)
class UnmappedCode:
    table: str
    hospital: str
    code: str
    count: int


class UnmappedReport:
    """Counts codes no table could map; shared by every version of one mapping (survives reloads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: Counter[tuple[str, str, str]] = Counter()

    def record(self, table: str, hospital: str, code: str) -> None:
        with self._lock:
            self._seen[(table, hospital, code)] += 1

    def items(self) -> list[UnmappedCode]:
        with self._lock:
            seen = sorted(self._seen.items())
        return [UnmappedCode(t, h, c, n) for (t, h, c), n in seen]

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CodeTable:
    """One code table; `lookup` applies hospital table, fallback table, then the policy."""

    name: str
    fallback: dict[str, str]
    hospitals: dict[str, dict[str, str]]
    policy: str = "error"
    default: str | None = None
    ignore_case: bool = False
    report: UnmappedReport

    def lookup(self, code: Any, hospital: str = "") -> Any:
        if code is None or code == "":
            return code
        key = (code if type(code) is str else str(code)).strip()
        if self.ignore_case:
            key = key.upper()
        if self.hospitals:
            own = self.hospitals.get(hospital)
            if own is not None:
                found = own.get(key)
                if found is not None:
                    return found
        found = self.fallback.get(key)
        if found is not None:
            return found
        return self.unmapped(code, hospital)

    def compiled_lookup(self) -> Callable[[Any, str], Any]:
        """`lookup` as a closure over this table's dicts (what the compiled mapping calls per message)."""
        fallback, hospitals, ignore_case, unmapped = self.fallback, self.hospitals, self.ignore_case, self.unmapped

        def lookup(code: Any, hospital: str = "") -> Any:
            if code is None or code == "":
                return code
            key = code.strip() if code.__class__ is str else str(code).strip()
            if ignore_case:
                key = key.upper()
            if hospitals:
                own = hospitals.get(hospital)
                if own is not None:
                    found = own.get(key)
                    if found is not None:
                        return found
            found = fallback.get(key)
            return found if found is not None else unmapped(code, hospital)

        return lookup

    def unmapped(self, code: Any, hospital: str) -> Any:
        """Apply the policy to a code no table maps (and count it)."""
        self.report.record(self.name, hospital, str(code))
        if self.policy == "pass":
            return code
        if self.policy == "default":
            return self.default
        where = f" for hospital {hospital!r}" if hospital and self.hospitals else ""
        raise EvalError(f"code {code!r} is not in code table {self.name!r}{where}", code, code="103")


def read_table_file(path: Path, display: str, *, charset: str = "utf-8", ignore_case: bool = False
                    ) -> tuple[dict[str, str], list[Problem]]:
    """Load one CSV or YAML code table; problems carry the table file's line numbers."""
    if path.suffix.lower() in (".yaml", ".yml"):
        return _read_yaml_table(path, display, ignore_case)
    try:
        text = path.read_bytes().decode("utf-8-sig" if charset.lower().replace("_", "-") in ("utf-8", "utf8")
                                        else charset)
    except OSError as exc:
        return {}, [Problem(file=display, message=f"cannot read code table: {exc.strerror or exc}")]
    except (UnicodeDecodeError, LookupError) as exc:
        return {}, [Problem(file=display, message=f"code table is not valid {charset}: {exc}")]
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return {}, [Problem(file=display, message="code table is empty (expected a header row code,value)")]
    header = [h.strip().lower() for h in rows[0]]
    code_i = header.index("code") if "code" in header else 0
    value_i = header.index("value") if "value" in header else 1
    table: dict[str, str] = {}
    first_line: dict[str, int] = {}
    problems: list[Problem] = []
    for n, row in enumerate(rows[1:], start=2):
        if not row or not any(c.strip() for c in row) or row[0].lstrip().startswith("#"):
            continue
        if len(row) <= max(code_i, value_i):
            problems.append(Problem(file=display, line=n, message=f"row has {len(row)} column(s); "
                                    f"expected a code and a value"))
            continue
        key = row[code_i].strip()
        if ignore_case:
            key = key.upper()
        if key in table:
            problems.append(Problem(file=display, line=n, message=f"code {key!r} repeated "
                                    f"(first on line {first_line[key]})"))
            continue
        table[key] = row[value_i].strip()
        first_line[key] = n
    return table, problems


def _read_yaml_table(path: Path, display: str, ignore_case: bool) -> tuple[dict[str, str], list[Problem]]:
    document, problems = read_yaml(path, display)
    if document is None:
        return {}, problems
    data = plain(document)
    if not isinstance(data, dict):
        return {}, [*problems, Problem(file=display, line=1, message="a YAML code table is a mapping code: value")]
    table: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict | list):
            line = document.lc.key(key)[0] + 1
            problems.append(Problem(file=display, line=line, path=str(key),
                                    message="a code maps to one value, not a list or mapping"))
            continue
        k = str(key).strip()
        table[k.upper() if ignore_case else k] = "" if value is None else str(value)
    return table, problems
