"""``ihehub empi import|dedupe|train|review`` — the master patient index from the command line.

The EMPI is the one the home's PIX Manager / PDQ Supplier channel configures (its ``actor.options``:
``domains``, ``enterprise``, ``empi`` matching settings); these commands open the same database as
``ihehub serve`` and may run while it runs (every change is its own transaction).
"""

from __future__ import annotations

import csv
import datetime as dt
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ihehub.cli.common import config, fail

# CSV column -> what it fills; ``name`` is a whole name (a Chinese one is split into family and given).
COLUMNS = ("pid", "name", "family", "given", "middle", "birth_date", "sex", "phone", "national_id", "line1",
           "city", "district", "state", "postcode", "country", "mother_maiden_name", "department")


def open_empi() -> Any:
    """The EMPI of the home's first pix-manager / pdq-supplier channel, set up with that channel's domains."""
    from ihehub.actors.hl7v2 import EMPI_ACTORS, ActorOptions, empi_config
    from ihehub.bus import schema
    from ihehub.bus.db import make_engine
    from ihehub.config import ConfigError, load_channels
    from ihehub.empi import Empi

    cfg = config()
    try:
        chans = load_channels(cfg.home, hub=cfg)
    except ConfigError as exc:
        fail(f"configuration errors in {cfg.home}:\n{exc}", 2)
    ch = next((c for c in chans if c.actor in EMPI_ACTORS), None)
    if ch is None:
        fail(f"no channel in {cfg.home}/channels has actor pix-manager or pdq-supplier: there is no EMPI to "
             "work on (see docs/empi.md)", 2)
    try:
        options = ActorOptions.parse(str(ch.actor), ch.actor_options)
        settings = empi_config(ch.actor_options)
    except Exception as exc:
        fail(f"channel {ch.name}: {exc}", 2)
    engine = make_engine(cfg.database, home=cfg.home)
    try:
        schema.upgrade(engine)
    except Exception as exc:
        fail(f"cannot open the database {cfg.database}: {exc}")
    empi = Empi(engine, settings)
    empi.setup()
    for d in options.domains:
        empi.add_domain(d.namespace, universal_id=d.universal_id, universal_id_type=d.universal_id_type or "ISO",
                        type=d.type, description=d.description)
    return empi


def count_rows(path: Path, encoding: str) -> int:
    """Lines of the file (the progress bar's length), reading it once in 1 MiB pieces; `click.UsageError` when
    it cannot be read or decoded as ``encoding`` (before anything is imported, not half-way)."""
    import codecs

    try:
        decoder = codecs.getincrementaldecoder(encoding)()
        lines = 0
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
                lines += chunk.count(b"\n")  # never a byte inside a UTF-8 or GB18030 character
            decoder.decode(b"", final=True)
    except (OSError, UnicodeDecodeError, LookupError) as exc:
        raise click.UsageError(f"{path}: cannot read as {encoding}: {exc}") from None
    return max(lines - 1, 0)  # less the header


def read_records(path: Path, encoding: str, lines: list[int] | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, `PatientRecord`) of each CSV row, read as they are consumed (a million-row file is
    never held in memory); ``lines`` gets each row's line number.  A bad header raises `click.UsageError`."""
    from ihehub.empi.chinese import chinese_name, has_hanzi
    from ihehub.empi.model import Address, PatientRecord, PersonName

    with path.open(encoding=encoding, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip().lstrip("\ufeff") for h in reader.fieldnames or ()]
        reader.fieldnames = header
        unknown = [h for h in header if h not in COLUMNS]
        if "pid" not in header or unknown:
            extra = f"; unknown columns {unknown}" if unknown else ""
            raise click.UsageError(f"{path}: the header needs 'pid'{extra}; columns are {', '.join(COLUMNS)}")
        for row in reader:
            line = reader.line_num
            if lines is not None:
                lines.append(line)
            get = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            family, given = get.get("family", ""), get.get("given", "")
            if get.get("name") and not family:
                whole = get["name"]
                if has_hanzi(whole):
                    cn = chinese_name(whole)
                    family, given = cn.family, cn.given
                else:
                    family, _, given = whole.partition(" ")
            birth = get.get("birth_date", "").replace("-", "").replace("/", "")
            yield line, PatientRecord(
                pid=get["pid"],
                names=(PersonName(family=family, given=given, middle=get.get("middle", "")),)
                if family or given else (),
                birth_date=birth or None, sex=get.get("sex") or None,
                phones=tuple(p.strip() for p in get.get("phone", "").split(";") if p.strip()),
                addresses=(Address(line1=get.get("line1", ""), city=get.get("city", ""),
                                   district=get.get("district", ""), state=get.get("state", ""),
                                   postcode=get.get("postcode", ""), country=get.get("country", "")),)
                if any(get.get(k) for k in ("line1", "city", "district", "state", "postcode", "country")) else (),
                national_id=get.get("national_id") or None, mother_maiden_name=get.get("mother_maiden_name") or None,
                department=get.get("department") or None)


def _progress(length: int, label: str) -> Any:
    """A progress bar on stderr (stdout stays the report, for scripts)."""
    return click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True)


@click.group()
def empi() -> None:
    """Bulk import, batch de-duplication, matcher training and the review queue of the EMPI."""


@empi.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--domain", "-d", required=True, help="Identifier domain (namespace or OID) of the file's pid column.")
@click.option("--encoding", default="utf-8", show_default=True, help="File encoding, e.g. gb18030.")
@click.option("--no-match", is_flag=True,
              help="Bulk load without matching (each new record its own patient); match later with "
                   "`ihehub empi dedupe`.")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Records per transaction [default: 500; 5000 with --no-match].")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes normalising records for --no-match [default: the CPUs, for 20,000 records or more].")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def import_(file: Path, domain: str, encoding: str, no_match: bool, batch: int | None, workers: int | None,
            as_json: bool) -> None:
    """Load patients from a CSV file (header: pid, name or family/given, birth_date, sex, phone, national_id,
    line1, city, postcode, ...).  A bad record is reported with its line and field; the others go in.
    Without --no-match every record is matched as an ITI-8 feed is (tens of records a second); with it the
    file is bulk loaded (thousands a second: COPY on PostgreSQL) and `ihehub empi dedupe` matches afterwards.
    Exit status 1 when any record failed."""
    import os

    from ihehub.empi import EmpiError, bulk_load, import_records

    total = count_rows(file, encoding)
    lines: list[int] = []
    rows = read_records(file, encoding, lines)
    first = next(rows, None)  # the header is checked before the database is opened
    records = (r for _, r in itertools.chain((first,) if first else (), rows))
    api = open_empi()
    try:
        with _progress(total, f"importing {file.name}") as bar:
            if no_match:
                procs = workers or ((os.cpu_count() or 1) if total >= 20000 else 1)
                report = bulk_load(api, domain, records, chunk_size=batch or 5000, workers=procs,
                                   progress=bar.update)
            else:
                report = import_records(api, domain, records, batch_size=batch or 500, progress=bar.update)
    except EmpiError as exc:
        fail(f"{exc.field or 'import'}: {exc.message}", 2)
    finally:
        api.engine.dispose()
    if as_json:
        click.echo(json.dumps({"total": report.total, "outcomes": dict(report.outcomes), "events": report.events,
                               "seconds": round(report.seconds, 3),
                               "errors": [{"line": lines[e.index] if e.index < len(lines) else None, "pid": e.pid,
                                           "field": e.field, "code": e.code, "message": e.message}
                                          for e in report.errors]}, ensure_ascii=False))
    else:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(report.outcomes.items())) or "nothing"
        click.echo(f"{report.total} records in {report.seconds:.1f} s ({outcomes}); {report.events} patient events")
        for e in report.errors[:50]:
            line = lines[e.index] if e.index < len(lines) else "?"
            click.secho(f"line {line}: pid {e.pid}: {e.field or '-'}: {e.message} (HL7 {e.code})", fg="red", err=True)
        if len(report.errors) > 50:
            click.secho(f"... and {len(report.errors) - 50} more errors (use --json for all)", fg="red", err=True)
    if report.errors:
        raise SystemExit(1)


@empi.command("dedupe")
@click.option("--batch", default=500, show_default=True, help="Records per batch.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes reading and scoring batches (each with its own database connection).")
def dedupe(batch: int, workers: int) -> None:
    """Score every active record against its blocking candidates; pairs of different patients at or above
    the review threshold go to the review queue (`ihehub empi review`)."""
    from ihehub.empi import dedupe as run

    api = open_empi()
    try:
        total = api.record_count()
        with _progress(total, "matching") as bar:
            report = run(api, batch_size=batch, by="cli-dedupe", progress=bar.update, workers=workers)
    finally:
        api.engine.dispose()
    click.echo(f"{report.records} records, {report.pairs} candidate pairs scored, {report.reviews} review items "
               f"opened in {report.seconds:.1f} s")


@empi.command("train")
@click.option("--sample", default=5000, show_default=True, help="Records paired with their candidates for EM.")
@click.option("--random-pairs", default=20000, show_default=True, help="Random pairs for the u probabilities.")
def train(sample: int, random_pairs: int) -> None:
    """Estimate the Fellegi–Sunter m/u parameters from the index (EM) and use them from now on."""
    from ihehub.empi import train as run

    api = open_empi()
    try:
        report = run(api, sample=sample, random_pairs=random_pairs)
    finally:
        api.engine.dispose()
    click.echo(f"trained on {report.records} records / {report.pairs} pairs in {report.seconds:.1f} s")


@empi.command("review")
@click.option("--state", type=click.Choice(["open", "accepted", "rejected", "obsolete"]), default="open",
              show_default=True)
@click.option("--limit", "-n", default=50, show_default=True)
@click.option("--accept", "accept_id", type=int, metavar="ID", help="Accept review item ID (join the patients).")
@click.option("--reject", "reject_id", type=int, metavar="ID", help="Reject review item ID (keep them apart).")
@click.option("--by", default=None, help="Who decides (default: the login name).")
@click.option("--json", "as_json", is_flag=True)
def review(state: str, limit: int, accept_id: int | None, reject_id: int | None, by: str | None,
           as_json: bool) -> None:
    """List the review queue with each pair's score and per-field explanation; --accept / --reject decide."""
    import getpass

    from ihehub.empi import EmpiError

    api = open_empi()
    who = by or getpass.getuser()
    try:
        if accept_id is not None or reject_id is not None:
            if accept_id is not None and reject_id is not None:
                fail("give --accept or --reject, not both", 2)
            try:
                res = api.accept(accept_id, by=who) if accept_id is not None else api.reject(reject_id, by=who)
            except EmpiError as exc:
                fail(f"review item {accept_id or reject_id}: {exc.message}")
            click.echo(f"{'accepted' if accept_id is not None else 'rejected'}: patient {res.patient or '-'}; "
                       f"{len(res.events)} patient events")
            return
        items = api.review_queue(state=state, limit=limit)
    finally:
        api.engine.dispose()
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps([asdict(i) for i in items], ensure_ascii=False, default=str))
        return
    if not items:
        click.echo(f"no {state} review items")
        return
    for i in items:
        when = dt.datetime.fromtimestamp(i.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M")
        click.echo(f"#{i.id}  {i.record.domain}|{i.record.value}  ~  {i.candidate.domain}|{i.candidate.value}  "
                   f"(patient {i.patient})  score {i.score:.2f}  {when}  {i.reason}")
        click.echo("      " + "  ".join(f"{f.field}:{f.level}{f.weight:+.1f}" for f in i.fields))
