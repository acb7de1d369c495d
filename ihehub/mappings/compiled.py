"""A compiled mapping: rules as closures, run once per message, with an optional trace.

Nothing is parsed per message except the message itself: `ihehub.mappings.loader` compiled every
path, expression, target, table and stylesheet.  The first rule that fails stops the message with
one `MappingError` naming the rule (file:line and text), the target field and the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lxml import etree
from pydicom.dataset import Dataset

from ihehub.mappings.codegen import hospital_text
from ihehub.mappings.dates import DateError
from ihehub.mappings.dicomwrite import finish_dicom, new_dicom_output
from ihehub.mappings.errors import EvalError, MappingError
from ihehub.mappings.hl7path import HL7Doc
from ihehub.mappings.hl7write import HL7Output, finish_hl7
from ihehub.mappings.lang import Ctx, Getter, is_empty, truthy
from ihehub.mappings.readers import InputSpec, parse_input, read_csv_rows
from ihehub.mappings.tables import CodeTable, UnmappedCode, UnmappedReport
from ihehub.mappings.writers import (
    OutputSpec,
    Setter,
    XmlOutput,
    finish_key_output,
    new_key_output,
    new_xml_output,
    serialize_xml,
)

CONTENT_TYPES = {"hl7": "application/hl7-v2", "xml": "application/xml", "json": "application/json",
                 "dict": "application/json", "dicom": "application/dicom"}


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Rule:
    """One compiled rule; ``var`` is set instead of ``set`` for a ``$variable`` target."""

    line: int
    text: str
    target: str
    get: Getter
    set: Setter | None
    var: str | None = None
    when: Getter | None = None
    required: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class TraceEntry:
    """Which rule wrote which field with which value (``skipped`` when its ``when`` was false)."""

    line: int
    rule: str
    target: str
    value: Any
    skipped: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class MappingResult:
    output: bytes | dict[str, Any]
    trace: tuple[TraceEntry, ...]
    version: str
    content_type: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Xslt:
    transform: etree.XSLT
    params: Mapping[str, Getter]
    file: str


_SKIP = object()
_NO_META: Mapping[str, str] = {}  # shared, never written


def _step(rule: Rule) -> tuple[Getter, Setter]:
    """The rule as one ``(get, put)`` pair: the plain case costs two calls, the others are wrapped once here."""
    get, put = rule.get, rule.set
    if rule.required:
        inner = get

        def get_required(c: Ctx) -> Any:
            value = inner(c)
            if is_empty(value):
                raise EvalError("required value is empty", value, code="101")
            return value

        get = get_required
    if rule.when is not None:
        when, then = rule.when, get
        get = lambda c: then(c) if truthy(when(c)) else _SKIP  # noqa: E731
    if put is None:
        name, value_of = rule.var, get

        def assign(c: Ctx) -> Any:
            value = value_of(c)
            if value is not _SKIP:
                c.vars[name] = value  # type: ignore[index]
            return _SKIP

        get = assign
        put = _ignore
    elif rule.when is not None:
        write = put

        def put_unless_skipped(out: Any, value: Any) -> None:
            if value is not _SKIP:
                write(out, value)

        put = put_unless_skipped
    return get, put


def _ignore(out: Any, value: Any) -> None:
    return None


class CompiledMapping:
    """One mapping file, compiled.  ``version`` is the content hash of the file and every file it uses
    (tables, stylesheet), so a stored output can say exactly which mapping produced it."""

    def __init__(
        self,
        *,
        name: str,
        file: str,
        version: str,
        input: InputSpec,
        output: OutputSpec,
        rules: Sequence[Rule],
        tables: Mapping[str, CodeTable],
        report: UnmappedReport,
        hospital: Getter | None = None,
        xslt: Xslt | None = None,
        hook: Callable[[Any, Any], Any] | None = None,
        dependencies: Sequence[str] = (),
        tests: Sequence[Mapping[str, Any]] = (),
        test_lines: Sequence[int] = (),
        fast: tuple[Callable[[Ctx, Any], None], Mapping[int, int]] | None = None,
    ) -> None:
        self.name = name
        self.file = file
        self.version = version
        self.input = input
        self.output = output
        self.rules = tuple(rules)
        self.tables = dict(tables)
        self.report = report
        self.hospital = hospital
        self.xslt = xslt
        self.hook = hook
        self.dependencies = tuple(dependencies)
        self.tests = tuple(tests)
        self.test_lines = tuple(test_lines)
        self.content_type = CONTENT_TYPES[output.kind]
        self._steps = tuple(_step(r) for r in self.rules)
        self._rule_of = {id(step[0]): r for step, r in zip(self._steps, self.rules, strict=True)}
        self._fast: Callable[[Ctx, Any], None] | None = fast[0] if fast is not None else None
        self._fast_lines: Mapping[int, int] = fast[1] if fast is not None else {}
        self._fast_hospital = bool(getattr(self._fast, "sets_hospital", False)) and xslt is None
        self._direct = (self._fast is not None and input.kind == "hl7" and output.kind in ("dict", "json")
                        and not output.copy and hook is None and xslt is None
                        and (hospital is None or self._fast_hospital))

    @property
    def generated_source(self) -> str | None:
        """The Python source generated for this mapping's fast path (for debugging), or None."""
        return getattr(self._fast, "source", None)

    def __repr__(self) -> str:
        kinds = f"{self.input.kind}->{self.output.kind}"
        return f"<CompiledMapping {self.name} {self.version} {kinds} {len(self.rules)} rules>"

    # -- running --------------------------------------------------------------------------

    def apply(self, data: Any, *, meta: Mapping[str, str] | None = None) -> bytes | dict[str, Any]:
        """Map one input (bytes, text, a dict, an lxml element or a bus `Message`); `MappingError` on failure."""
        if self._direct and type(data) is str:
            return self._run_direct(data, meta)
        return self._run(data, meta, None)

    def run(self, data: Any, *, meta: Mapping[str, str] | None = None) -> MappingResult:
        """Like `apply`, with a trace of which rule wrote which field."""
        trace: list[TraceEntry] = []
        output = self._run(data, meta, trace)
        return MappingResult(output, tuple(trace), self.version, self.content_type)

    def to_bytes(self, data: Any, *, meta: Mapping[str, str] | None = None) -> bytes:
        """Like `apply`, a dict output serialised as JSON."""
        out = self._run(data, meta, None)
        if isinstance(out, dict):
            return finish_key_output(dataclasses.replace(self.output, kind="json"), out)
        return out

    def __call__(self, message: Any) -> bytes:
        """A channel transformer: a bus `Message` in, the mapped bytes out (a dict output as JSON)."""
        meta = {
            "channel": getattr(message, "channel", "") or "",
            "control_id": getattr(message, "control_id", "") or "",
            "message_type": getattr(message, "message_type", "") or "",
            "source": getattr(message, "source", "") or "",
            "message_id": getattr(message, "id", "") or "",
        }
        return self.to_bytes(message, meta=meta)

    def map_rows(self, data: Any, *, meta: Mapping[str, str] | None = None) -> list[bytes | dict[str, Any]]:
        """CSV input: map every data row."""
        try:
            rows = read_csv_rows(self.input, data)
        except EvalError as exc:
            raise self._error(exc, None, None) from None
        return [self._run(row, meta, None) for row in rows]

    def unmapped(self) -> list[UnmappedCode]:
        """Codes seen that no table mapped (by table, hospital and code), since the mapping was first loaded."""
        return self.report.items()

    def _fast_error(self, exc: Exception) -> MappingError:
        """The `MappingError` of an exception from the generated function, naming its rule (or ``hospital``)."""
        index = self._failed_rule(exc)
        if index == -1:
            return self._error(exc, None, None, "hospital")
        return self._error(exc, None if index is None else self.rules[index], None)

    def _failed_rule(self, exc: BaseException) -> int | None:
        """The index of the rule whose generated code raised ``exc`` (from the traceback's line in
        ``<mapping>``); -1 for the ``hospital:`` expression."""
        tb, line = exc.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<mapping>":
                line = tb.tb_lineno
            tb = tb.tb_next
        return self._fast_lines.get(line) if line is not None else None

    def _error(self, exc: Exception, rule: Rule | None, value: Any, what: str = "") -> MappingError:
        if isinstance(exc, MappingError):
            return exc
        if isinstance(exc, EvalError):
            reason, code = exc.reason, exc.code
            value = exc.value if exc.value is not None else value
        elif isinstance(exc, DateError):  # raised by the date converters, which know no rules
            reason, code = str(exc), "102"
            value = exc.value if exc.value is not None else value
        else:
            reason, code = f"{type(exc).__name__}: {exc}", "207"
        line = rule.line if rule is not None else 0
        location = f"{self.file}:{line}" if line else self.file
        return MappingError(reason, mapping=self.name, location=location, rule=rule.text if rule else what,
                            target=rule.target if rule else "", value=value, code=code)

    def _run_direct(self, text: str, meta: Mapping[str, str] | None) -> Any:
        """`_run` for the common case: HL7 text in, a dict (or JSON) out, the generated function sets
        everything (hospital included), no hook, XSLT or copy of the input."""
        ctx = Ctx(None, self.tables, meta or _NO_META)
        ctx.doc = HL7Doc(text, ctx)
        out: dict[str, Any] = {}
        try:
            self._fast(ctx, out)  # type: ignore[misc]
        except Exception as exc:
            raise self._fast_error(exc) from None
        if self.output.kind == "dict":
            return out
        try:
            return finish_key_output(self.output, out)
        except Exception as exc:
            raise self._error(exc, None, None, "(writing the output)") from None

    def _run(self, data: Any, meta: Mapping[str, str] | None, trace: list[TraceEntry] | None) -> Any:
        if trace is None and self._direct and type(data) is str:
            return self._run_direct(data, meta)
        ctx = Ctx(None, self.tables, meta or {})
        try:
            ctx.doc = parse_input(self.input, data, ctx)
        except Exception as exc:
            raise self._error(exc, None, None, "(reading the input)") from None
        fast = self._fast if trace is None else None
        if self.hospital is not None and not (fast is not None and self._fast_hospital):
            try:
                h = self.hospital(ctx)
            except Exception as exc:
                raise self._error(exc, None, None, "hospital") from None
            ctx.hospital = hospital_text(h)
        out = self._start(ctx)
        if fast is not None:
            try:
                fast(ctx, out)
            except Exception as exc:
                raise self._fast_error(exc) from None
            try:
                return self._finish(ctx, out, trace)
            except Exception as exc:
                raise self._error(exc, None, None, "(writing the output)") from None
        if trace is None:
            get: Getter | None = None
            value: Any = None
            try:
                for get, put in self._steps:
                    value = None
                    value = get(ctx)
                    put(out, value)
            except Exception as exc:
                raise self._error(exc, self._rule_of.get(id(get)), value) from None
            try:
                return self._finish(ctx, out, trace)
            except Exception as exc:
                raise self._error(exc, None, None, "(writing the output)") from None
        rule: Rule | None = None
        try:
            for rule in self.rules:
                value = None
                if rule.when is not None and not truthy(rule.when(ctx)):
                    if trace is not None:
                        trace.append(TraceEntry(rule.line, rule.text, rule.target, None, True))
                    continue
                value = rule.get(ctx)
                if rule.required and is_empty(value):
                    raise EvalError("required value is empty", value, code="101")
                if rule.set is not None:
                    rule.set(out, value)
                else:
                    ctx.vars[rule.var] = value  # type: ignore[index]
                if trace is not None:
                    trace.append(TraceEntry(rule.line, rule.text, rule.target, value))
        except Exception as exc:
            raise self._error(exc, rule, value) from None
        try:
            return self._finish(ctx, out, trace)
        except Exception as exc:
            raise self._error(exc, None, None, "(writing the output)") from None

    def _start(self, ctx: Ctx) -> Any:
        kind = self.output.kind
        if self.xslt is not None:
            return self._transform(ctx)
        if kind in ("json", "dict"):
            return new_key_output(self.output, ctx.doc)
        if kind == "xml":
            return new_xml_output(self.output, ctx.doc)
        if kind == "dicom":
            return new_dicom_output(self.output, ctx.doc)
        return HL7Output(self.output, ctx.doc if isinstance(ctx.doc, HL7Doc) else None)

    def _transform(self, ctx: Ctx) -> XmlOutput:
        assert self.xslt is not None
        try:
            params = {k: etree.XSLT.strparam("" if (v := g(ctx)) is None else str(v))
                      for k, g in self.xslt.params.items()}
            result = self.xslt.transform(ctx.doc, **params)
        except etree.XSLTApplyError as exc:
            errors = "; ".join(str(e.message) for e in exc.error_log) if exc.error_log else str(exc)
            raise MappingError(f"XSLT failed: {errors}", mapping=self.name, location=self.xslt.file,
                               rule="xslt") from None
        root = result.getroot()
        if root is None:
            raise MappingError("the XSLT produced no XML element (xsl:output method text is not supported)",
                               mapping=self.name, location=self.xslt.file, rule="xslt")
        return XmlOutput(self.output.namespaces, root)

    def _finish(self, ctx: Ctx, out: Any, trace: list[TraceEntry] | None) -> Any:
        kind = self.output.kind
        if self.hook is not None:
            out = self._call_hook(ctx, out)
            if trace is not None:
                trace.append(TraceEntry(0, "hook", "(output)", None))
        if kind in ("json", "dict"):
            return finish_key_output(self.output, out)
        if kind == "xml":
            return serialize_xml(out.root, self.output)
        if kind == "dicom":
            return finish_dicom(out, self.output)
        return finish_hl7(out, self.output)

    def _call_hook(self, ctx: Ctx, out: Any) -> Any:
        assert self.hook is not None
        kind = self.output.kind
        given = out.root if kind == "xml" else out.text() if kind == "hl7" else out.ds if kind == "dicom" else out
        try:
            result = self.hook(ctx.doc, given)
        except Exception as exc:
            raise MappingError(f"hook raised {type(exc).__name__}: {exc}", mapping=self.name, location=self.file,
                               rule="hook") from None
        if result is None:
            result = given
        if kind == "xml":
            return XmlOutput(self.output.namespaces, result)
        if kind == "dicom":
            if not isinstance(result, Dataset):
                raise MappingError("hook must return a pydicom Dataset", mapping=self.name, rule="hook")
            out.ds = result
            return out
        if kind == "hl7":
            if not isinstance(result, str):
                raise MappingError("hook must return the HL7 message as text", mapping=self.name, rule="hook")
            return HL7Output(dataclasses.replace(self.output, copy=True, remove=()), HL7Doc(result))
        if not isinstance(result, dict):
            raise MappingError("hook must return a dict", mapping=self.name, rule="hook")
        return result
