"""A set of mappings that follows its files: a changed mapping (or table, or stylesheet) is recompiled,
checked (including its ``tests:`` block) and only then replaces the running one.

No thread watches the disk: `MappingSet.get` looks at the files' size and modification time at most
once per ``interval`` seconds, so a busy channel pays one dictionary lookup per message and an idle
hub nothing.  A broken edit leaves the previous version running; `MappingSet.problems` says why.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ihehub.config.errors import ConfigError, Problem
from ihehub.mappings.compiled import CompiledMapping
from ihehub.mappings.loader import compile_mapping
from ihehub.mappings.tables import UnmappedCode, UnmappedReport
from ihehub.mappings.testing import run_mapping_tests

log = logging.getLogger("ihehub.mappings")

Stamp = tuple[int, int] | None


def _stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


@dataclasses.dataclass
class _Entry:
    path: Path
    display: str
    report: UnmappedReport
    mapping: CompiledMapping | None = None
    stamps: dict[str, Stamp] = dataclasses.field(default_factory=dict)
    checked_at: float = 0.0
    problems: list[Problem] = dataclasses.field(default_factory=list)


class MappingSet:
    """Compiled mappings by file name, relative to ``base`` (the hub's home folder)."""

    def __init__(
        self,
        base: str | Path = ".",
        *,
        interval: float = 1.0,
        run_tests: bool = True,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.base = Path(base)
        self.interval = interval
        self.run_tests = run_tests
        self.clock = clock
        self.environ = environ
        self._entries: dict[Path, _Entry] = {}
        self._lock = threading.Lock()

    def _key(self, ref: str | Path) -> tuple[Path, str]:
        p = Path(ref)
        full = p if p.is_absolute() else self.base / p
        return full.resolve(), str(ref)

    def get(self, ref: str | Path) -> CompiledMapping:
        """The current mapping for ``ref``; the first load raises `ConfigError` with every problem."""
        key, display = self._key(ref)
        entry = self._entries.get(key)
        if entry is not None and entry.mapping is not None and self.clock() - entry.checked_at < self.interval:
            return entry.mapping
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry(key, display, UnmappedReport())
            self._refresh(entry)
            if entry.mapping is None:
                raise ConfigError(entry.problems)
            return entry.mapping

    def load(self, ref: str | Path) -> CompiledMapping:
        """Load now (at channel start); same as `get`."""
        return self.get(ref)

    def refresh(self) -> None:
        """Check every loaded mapping's files now, whatever the interval."""
        with self._lock:
            for entry in self._entries.values():
                self._refresh(entry, force=True)

    def problems(self, ref: str | Path) -> list[Problem]:
        """Why the last change to ``ref`` was not taken (empty when the running version is current)."""
        entry = self._entries.get(self._key(ref)[0])
        return list(entry.problems) if entry else []

    def unmapped(self, ref: str | Path) -> list[UnmappedCode]:
        entry = self._entries.get(self._key(ref)[0])
        return entry.report.items() if entry else []

    def transformer(self, ref: str | Path) -> Callable[[Any], Any]:
        """A channel transformer that always uses the current version of ``ref``.

        Given a bus message it returns the message with the mapped body and two headers, ``mapping`` (the
        file) and ``mapping_version`` (its content hash), which the store keeps with the message: the browser
        shows which version of which mapping produced each output.  Anything else gets the bytes."""
        self.get(ref)
        display = self._key(ref)[1]

        def transform(message: Any) -> Any:
            mapping = self.get(ref)
            out = mapping(message)
            evolve = getattr(message, "evolve", None)
            if evolve is None:
                return out
            headers = {**dict(getattr(message, "headers", None) or {}), "mapping": display,
                       "mapping_version": mapping.version}
            return evolve(raw=out, headers=headers)

        return transform

    def _refresh(self, entry: _Entry, *, force: bool = False) -> None:
        now = self.clock()
        if entry.mapping is not None and not force and now - entry.checked_at < self.interval:
            return
        entry.checked_at = now
        if entry.mapping is not None and all(_stamp(f) == s for f, s in entry.stamps.items()):
            return
        paths = entry.mapping.dependencies if entry.mapping is not None else (str(entry.path),)
        before = {f: _stamp(f) for f in paths}
        mapping, problems = compile_mapping(entry.path, display=entry.display, report=entry.report,
                                            environ=self.environ)
        if mapping is not None and self.run_tests and mapping.tests:
            problems = [
                Problem(file=mapping.file, line=o.line, path=f"tests[{i}]", message=f"test {o.name!r} failed: {f}")
                for i, o in enumerate(run_mapping_tests(mapping, entry.path.parent)) for f in o.failures
            ]
            if problems:
                mapping = None
        if mapping is None:
            # Remember what we looked at, so the same broken files are not recompiled every interval.
            if entry.mapping is not None:
                entry.stamps = {**before, **{f: _stamp(f) for f in entry.mapping.dependencies}}
                log.warning("mapping %s: change not applied, version %s keeps running:\n%s", entry.display,
                            entry.mapping.version, "\n".join(str(p) for p in problems))
            entry.problems = problems
            return
        stamps = {f: before[f] if f in before else _stamp(f) for f in mapping.dependencies}
        if entry.mapping is not None and mapping.version == entry.mapping.version:
            entry.stamps = stamps
            entry.problems = []
            return
        if entry.mapping is not None:
            log.info("mapping %s reloaded: version %s -> %s", entry.display, entry.mapping.version, mapping.version)
        entry.mapping = mapping
        entry.stamps = stamps
        entry.problems = []
