"""Validation of received audit messages: the DICOM audit schema (XSD) and the per-transaction
Schematron rules of the connectathon Syslog Collector (IHE-WUSTL).

The rules live outside the repository (an operator puts them anywhere; the tests read
``../shared/corpus/wustl/atna-schematron``).  Their layout is
``<transaction folder>/<EventID>/mtNNDG.sch``: the folder names the transaction (``ITI-08_Patient_
Identity_Feed`` is ITI-8, ``110122_ITI-2_..._Login`` is EventTypeCode 110122) and each ``mtNN`` file is
the message of one actor of that transaction (e.g. ITI-8 mt01: the Patient Identity Source's,
ITI TF-2a 3.8.5.1.1; mt02: the Cross-reference Manager's, 3.8.5.1.2).  A message conforms when it
passes the rules of at least one of them; otherwise the errors of the closest one are reported.

Each rule file is compiled once (``lxml.isoschematron.Schematron(..., validate_schema=False)``) on
first use and kept.  A few WUSTL rules are not XPath 1.0 (``count()`` of a boolean in ITI-18, 38
and 63): when the compiled rules fail at run time, that file is evaluated assert by assert and the
assert that cannot be evaluated is reported as a warning, not an error.

Running the rules costs ~80 us per file and message, the largest part of ingest.  The WUSTL rules
look at very little: the document's structure, whether values are empty, and the values of a few
attributes compared with literals (csd-code, codeSystemName, EventActionCode...).  `_Skeleton`
derives that attribute list from the rule files themselves and reduces a message to a key that
keeps exactly this (structure, literal-compared attribute values, emptiness of everything else);
two messages with the same key get the same verdict, so the verdict is cached by key.  Rule files
that use anything else (other functions, variables, a text compared with a literal) switch the
cache off, as do messages the key cannot describe faithfully (comments, CDATA, single-quoted
attributes, '>' inside an attribute value).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from pathlib import Path

from lxml import etree, isoschematron

from ihehub.atna.model import AuditXMLError, parse_xml

__all__ = ["ValidationResult", "Validator", "ValidatorError"]

log = logging.getLogger("ihehub.atna")

SCH_NS = "http://purl.oclc.org/dsdl/schematron"
SVRL_NS = "http://purl.oclc.org/dsdl/svrl"
_FOLDER_TX = re.compile(r"^([A-Za-z]+)-0*(\d+)")
_FOLDER_EVENT_TYPE = re.compile(r"^(\d{6})_")


class ValidatorError(Exception):
    """The schema or the rule folder cannot be used (missing, unreadable, not a schema)."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ValidationResult:
    """Whether a message conforms; ``errors`` explain why not, ``warnings`` never make it invalid."""

    valid: bool
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    rules: str | None = None  # the Schematron file that passed (or came closest), relative to the folder

    def text(self) -> str | None:
        """Errors and warnings as one text (stored with the message), None when there are none."""
        lines = [*self.errors, *(f"warning: {w}" for w in self.warnings)]
        return "\n".join(lines) if lines else None


def transaction_key(code: str) -> str:
    """``ITI-08`` -> ``ITI-8``; other codes unchanged."""
    m = _FOLDER_TX.match(code.strip())
    if m and m.end() == len(code.strip()):
        return f"{m.group(1).upper()}-{int(m.group(2))}"
    return code.strip()


class _AssertRules:
    """A Schematron file evaluated assert by assert with XPath 1.0 (the fallback; ISO Schematron
    section 6.5: a node is checked by the first rule of a pattern whose context it matches)."""

    def __init__(self, tree: etree._ElementTree) -> None:
        ns = {"s": SCH_NS}
        self.patterns: list[list[tuple[etree.XPath, list[tuple[str, str, str, etree.XPath | None]]]]] = []
        for pattern in tree.iterfind(".//s:pattern", ns):
            rules = []
            for rule in pattern.iterfind("s:rule", ns):
                checks = []
                for kind in ("assert", "report"):
                    for a in rule.iterfind(f"s:{kind}", ns):
                        test = a.get("test", "")
                        text = " ".join("".join(a.itertext()).split())
                        try:
                            xp: etree.XPath | None = etree.XPath(f"boolean({test})")
                        except etree.XPathSyntaxError:
                            xp = None
                        checks.append((kind, test, text, xp))
                rules.append((etree.XPath(rule.get("context", "/")), checks))
            self.patterns.append(rules)

    def run(self, doc: etree._Element) -> tuple[list[str], list[str]]:
        errors: list[str] = []
        warnings: list[str] = []
        for rules in self.patterns:
            seen: set[etree._Element] = set()
            for context, checks in rules:
                for node in context(doc):
                    if not isinstance(node, etree._Element) or node in seen:
                        continue
                    seen.add(node)
                    for kind, test, text, xp in checks:
                        if xp is None:
                            warnings.append(f"rule cannot be evaluated (not XPath 1.0): {test}")
                            continue
                        try:
                            fired = bool(xp(node))
                        except etree.XPathError as exc:
                            warnings.append(f"rule cannot be evaluated ({exc}): {test}")
                            continue
                        if (kind == "assert" and not fired) or (kind == "report" and fired):
                            errors.append(text or test)
        return errors, warnings


class _RuleFile:
    """One compiled Schematron file."""

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = label
        tree = _parse_file(path)
        self._tree = tree
        try:
            self.schematron: isoschematron.Schematron | None = isoschematron.Schematron(
                tree, validate_schema=False, store_report=True)
        except (etree.SchematronParseError, etree.XSLTParseError, etree.XSLTApplyError) as exc:
            log.warning("atna: %s does not compile as Schematron (%s); evaluating it assert by assert", label, exc)
            self.schematron = None
        self._fallback: _AssertRules | None = None

    def check(self, doc: etree._Element) -> tuple[list[str], list[str]]:
        if self.schematron is not None:
            try:
                if self.schematron.validate(doc):
                    return [], []
                return _svrl_errors(self.schematron.validation_report), []
            except etree.XSLTApplyError as exc:
                log.warning("atna: %s fails at run time (%s); evaluating it assert by assert from now on",
                            self.label, exc)
                self.schematron = None
        if self._fallback is None:
            self._fallback = _AssertRules(self._tree)
        return self._fallback.run(doc)


def _svrl_errors(report: etree._ElementTree | None) -> list[str]:
    if report is None:
        return ["Schematron validation failed"]
    out = []
    for fa in report.iter(f"{{{SVRL_NS}}}failed-assert", f"{{{SVRL_NS}}}successful-report"):
        text = " ".join("".join(fa.itertext()).split())
        out.append(text or fa.get("test", "rule failed"))
    return out or ["Schematron validation failed"]


def _parse_file(path: Path) -> etree._ElementTree:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValidatorError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return parse_xml(data).getroottree()
    except AuditXMLError as exc:
        raise ValidatorError(f"{path}: {exc}") from exc


_FUNC = re.compile(r"([A-Za-z_][\w.-]*)\s*\(")
_LITERAL = re.compile(r"'[^']*'|\"[^\"]*\"")
_TOKEN = re.compile(r"\s*(!=|<=|>=|=|<|>|\$|@[\w:.-]+|'[^']*'|\"[^\"]*\"|\d+(?:\.\d+)?|[\w:.*-]+|\S)")
_ALLOWED_FUNCTIONS = {"count", "not", "boolean", "true", "false"}
_COMPARISONS = {"=", "!=", "<", ">", "<=", ">="}


def _literal_attributes(expressions: list[str]) -> dict[str, set[str] | None] | None:
    """The attributes these XPath expressions compare with non-empty literals, and those literals
    (None: compared with a number, keep the value as is); None when the expressions use something
    a `_Skeleton` key would not preserve."""
    attrs: dict[str, set[str] | None] = {}
    for expr in expressions:
        if any(name not in _ALLOWED_FUNCTIONS for name in _FUNC.findall(_LITERAL.sub("''", expr))):
            return None
        tokens = _TOKEN.findall(expr)
        if "$" in tokens:
            return None
        for i, tok in enumerate(tokens):
            if tok not in _COMPARISONS:
                continue
            left = tokens[i - 1] if i > 0 else ""
            right = tokens[i + 1] if i + 1 < len(tokens) else ""
            for operand, other in ((left, right), (right, left)):
                if not _is_literal(other):
                    continue
                empty = other in ("''", '""')
                if operand.startswith("@"):
                    name = operand[1:]
                    if other[0].isdigit():
                        attrs[name] = None
                    elif not empty and attrs.get(name, set()) is not None:
                        attrs.setdefault(name, set()).add(other[1:-1])  # type: ignore[union-attr]
                elif operand == ")" or _is_literal(operand):
                    pass  # count(...) = n, boolean functions: structure and emptiness only
                elif not empty:
                    return None  # an element's text compared with a value
                break
            else:
                return None  # neither side is a literal: a comparison of two values
    return attrs


def _is_literal(token: str) -> bool:
    return bool(token) and (token[0] in "'\"" or token[0].isdigit())


class _Skeleton:
    """A message reduced to what the rule files can see (see the module doc).

    The parsed document is serialised again by libxml2, which writes every attribute in double
    quotes and escapes '<', '>', '&' and '"' inside values and '<', '>', '&' inside text; so in its
    output a '>' ... '<' run is a text and a '="' ... '"' run is an attribute value.  Every non-blank
    text and every non-empty value becomes "x"; appended are the values of the attributes the rules
    compare with literals, in document order, each kept when it is one of those literals (or may
    spell one with a character reference), else "x".  Comments, CDATA and processing instructions
    (which the serialisation keeps as they are) make the key None: such messages are not cached.
    """

    _TEXT = re.compile(rb">[^<]*[^<\s][^<]*<")
    _VALUE = re.compile(rb'="[^"]+"')

    def __init__(self, literal_attrs: dict[str, set[str] | None]) -> None:
        self._literals: dict[bytes, frozenset[bytes] | None] = {
            a.encode(): (frozenset(v.encode() for v in lits) if lits is not None else None)
            for a, lits in literal_attrs.items()
        }
        names = b"|".join(re.escape(a) for a in sorted(self._literals, key=len, reverse=True))
        self._literal_values = re.compile(rb' (' + names + rb'|xmlns(?::[^\s=]+)?)="([^"]*)"')

    def key(self, doc: etree._Element) -> bytes | None:
        data = etree.tostring(doc)
        if b"<!" in data or b"<?" in data:
            return None
        literals = self._literals
        kept = [value if (lits := literals.get(name)) is None or value in lits or b"&#" in value else b"x"
                for name, value in self._literal_values.findall(data)]
        masked = self._VALUE.sub(b'="x"', self._TEXT.sub(b">x<", data))
        return masked + b"\x00" + b"\x00".join(kept)


def _rule_expressions(path: Path) -> list[str]:
    tree = _parse_file(path)
    out = []
    for el in tree.iter(f"{{{SCH_NS}}}rule", f"{{{SCH_NS}}}assert", f"{{{SCH_NS}}}report"):
        out.append(el.get("context") or el.get("test") or "")
    unsupported = tree.find(f".//{{{SCH_NS}}}let") is not None or tree.find(f".//{{{SCH_NS}}}ns") is not None
    return [""] if unsupported else out


class Validator:
    """Validates audit messages against ``xsd_path`` (DICOM PS3.15 audit schema, e.g.
    ``dicom2017c.xsd``) and the Schematron rules under ``schematron_dir`` (None: schema only)."""

    def __init__(self, xsd_path: str | os.PathLike[str], schematron_dir: str | os.PathLike[str] | None = None,
                 *, cache_size: int = 4096) -> None:
        self.xsd_path = Path(xsd_path)
        try:
            self._schema = etree.XMLSchema(_parse_file(self.xsd_path))
        except etree.XMLSchemaParseError as exc:
            raise ValidatorError(f"{self.xsd_path} is not a usable XML schema: {exc}") from exc
        self.schematron_dir = Path(schematron_dir) if schematron_dir is not None else None
        self._index: dict[tuple[str, str], list[Path]] = {}
        if self.schematron_dir is not None:
            if not self.schematron_dir.is_dir():
                raise ValidatorError(f"the Schematron folder {self.schematron_dir} does not exist")
            self._index = _index_rules(self.schematron_dir)
        self._compiled: dict[Path, _RuleFile] = {}
        self._files: dict[tuple[str, str], tuple[Path, ...]] = {}
        self._last_pass: dict[tuple[str, str], Path] = {}
        self._lock = threading.Lock()
        self.cache_size = cache_size
        self._verdicts: dict[bytes, tuple[tuple[str, ...], tuple[str, ...], str]] = {}
        self._skeleton: _Skeleton | None = None
        if cache_size > 0 and self._index:
            self._skeleton = self._make_skeleton()
        self.cache_hits = 0

    def _make_skeleton(self) -> _Skeleton | None:
        expressions = [e for files in self._index.values() for path in files for e in _rule_expressions(path)]
        attrs = _literal_attributes(expressions) if "" not in expressions else None
        if attrs is None:
            log.info("atna: the Schematron rules use more than literal comparisons; verdicts are not cached")
            return None
        return _Skeleton(attrs)

    @property
    def rule_keys(self) -> list[tuple[str, str]]:
        """The (transaction or EventTypeCode, EventID) pairs that have rules."""
        return sorted(self._index)

    def rule_files(self, event_type: str | None, event_id: str) -> list[Path]:
        """The rule files of a transaction (or EventTypeCode) and EventID, in name order."""
        if not event_type:
            return []
        found = self._files.get((event_type, event_id))
        if found is None:
            found = tuple(self._index.get((transaction_key(event_type), event_id.strip()), ()))
            if len(self._files) < 4096:
                self._files[(event_type, event_id)] = found
        return list(found)

    def validate(self, doc: etree._Element | bytes) -> ValidationResult:
        """Schema, then the Schematron rules of the message's EventTypeCode(s) and EventID."""
        if isinstance(doc, bytes | bytearray):
            try:
                doc = parse_xml(bytes(doc))
            except AuditXMLError as exc:
                return ValidationResult(valid=False, errors=(str(exc),))
        with self._lock:
            return self._validate(doc)

    def _validate(self, doc: etree._Element) -> ValidationResult:
        schema = self._schema
        errors: list[str] = []
        if not schema.validate(doc):
            errors = [f"schema: line {e.line}: {e.message}" for e in schema.error_log]
        event_id, types_ = _event_codes(doc)
        files: list[Path] = []
        key: tuple[str, str] = ("", "")
        for t in types_:
            files = self.rule_files(t, event_id)
            if files:
                key = (transaction_key(t), event_id)
                break
        if not files:
            return ValidationResult(valid=not errors, errors=tuple(errors))
        cache_key = self._skeleton.key(doc) if self._skeleton is not None else None
        cached = self._verdicts.get(cache_key) if cache_key is not None else None
        if cached is None:
            cached = self._run_rules(doc, key, files)
            if cache_key is not None:
                if len(self._verdicts) >= self.cache_size:
                    self._verdicts.clear()
                self._verdicts[cache_key] = cached
        else:
            self.cache_hits += 1
        rule_errors, warnings, label = cached
        return ValidationResult(valid=not errors and not rule_errors, errors=(*errors, *rule_errors),
                                warnings=warnings, rules=label)

    def _run_rules(self, doc: etree._Element, key: tuple[str, str],
                   files: list[Path]) -> tuple[tuple[str, ...], tuple[str, ...], str]:
        """(errors, warnings, label of the file that passed or came closest)."""
        last = self._last_pass.get(key)
        if last is not None and last in files:  # the sender's actor is usually the same as last time
            files.remove(last)
            files.insert(0, last)
        tried: list[tuple[list[str], list[str], str]] = []
        for path in files:
            rule = self._rule(path)
            errs, warns = rule.check(doc)
            if not errs:
                self._last_pass[key] = path
                return (), tuple(warns), rule.label
            tried.append((errs, warns, rule.label))
        errs, warns, label = min(tried, key=lambda t: (len(t[0]), t[2]))  # ties: the first file by name
        return tuple(f"{label}: {e}" for e in errs), tuple(warns), label

    def _rule(self, path: Path) -> _RuleFile:
        rule = self._compiled.get(path)
        if rule is None:
            base = self.schematron_dir or path.parent
            rule = _RuleFile(path, str(path.relative_to(base)))
            self._compiled[path] = rule
        return rule


def _event_codes(doc: etree._Element) -> tuple[str, list[str]]:
    """(EventID code, EventTypeCode codes) of a message, tolerating the pre-2011 ``code`` spelling."""
    event_id, types_ = "", []
    for ev in doc:
        if isinstance(ev.tag, str) and ev.tag.rpartition("}")[2] == "EventIdentification":
            for c in ev:
                if not isinstance(c.tag, str):
                    continue
                name = c.tag.rpartition("}")[2]
                code = c.get("csd-code") or c.get("code") or ""
                if name == "EventID":
                    event_id = code
                elif name == "EventTypeCode":
                    types_.append(code)
            break
    return event_id, types_


def _index_rules(folder: Path) -> dict[tuple[str, str], list[Path]]:
    index: dict[tuple[str, str], list[Path]] = {}
    for tx_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        m = _FOLDER_EVENT_TYPE.match(tx_dir.name)
        if m:
            key = m.group(1)
        else:
            mt = _FOLDER_TX.match(tx_dir.name)
            if mt is None:
                log.warning("atna: ignoring %s: the folder name does not start with a transaction", tx_dir)
                continue
            key = f"{mt.group(1).upper()}-{int(mt.group(2))}"
        for ev_dir in sorted(p for p in tx_dir.iterdir() if p.is_dir()):
            files = sorted(ev_dir.glob("*.sch"))
            if files:
                index.setdefault((key, ev_dir.name), []).extend(files)
    return index
