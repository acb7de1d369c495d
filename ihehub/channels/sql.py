"""``sql://`` connectors: poll an intermediate table (中间表) of a hospital database; insert rows.

URL: ``sql://`` followed by a SQLAlchemy database URL, e.g.
``sql://postgresql+psycopg://his:secret@10.1.1.5:5432/his`` or
``sql://mysql+pymysql://his:secret@10.1.1.6:3306/his?charset=utf8mb4``
(``postgresql://`` means psycopg 3; a relative SQLite path is under the hub home).

**Source.**  Every ``poll_interval`` seconds, in one database transaction::

    SELECT <columns> FROM <table> WHERE <status_column> = <new_value> [AND <where>]
     ORDER BY <order_by> LIMIT <batch_size> FOR UPDATE SKIP LOCKED

then for each row, in order: build a `Message` (the row as a JSON object, or the bytes of
``body_column``) and hand it to the hub, which commits it to its store; only then, for the rows the
hub decided on, ``UPDATE <table> SET <status_column> = <done_value> WHERE <key_column> = <key>``
(``error_value`` and the reason in ``error_column`` when the channel refused the message: ``AE``),
sent as one batch, and finally ``COMMIT``.
The rows stay locked while the hub takes them, so several hub nodes can poll one table and no
``processing`` state is needed; ``SKIP LOCKED`` (PostgreSQL 9.5, MySQL 8.0, MariaDB 10.6) lets
them pass each other.  When the hub cannot take a message (``AR``, store down) the rows marked so far
are committed and the rest wait for the next poll, in order.

Delivery is at least once: if the database fails between the hub's commit and ours, the row is
offered again.  The message's ``control_id`` is the row key, so a channel with ``dedup: true``
makes that exactly once.  A flag column works the same way (``status_column: processed``,
``new_value: 0``, ``done_value: 1``, ``error_value: 2``).

**Destination.**  One ``INSERT`` per message in its own transaction (an upsert with
``upsert_key``: PostgreSQL and SQLite ``ON CONFLICT DO UPDATE``, MySQL/MariaDB
``ON DUPLICATE KEY UPDATE``).  The database being unreachable is a retryable `DeliveryError`; a row
the database refuses (constraint, wrong type) is not retried.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import decimal
import json
import logging
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    NoSuchTableError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ihehub.bus.message import Message
from ihehub.channels.base import ConnectorError, ConnectorSpec, DeliveryError, Inbound, Response
from ihehub.channels.options import check_options, union_schema
from ihehub.channels.polling import PollingSource
from ihehub.channels.registry import ConnectorContext, did_you_mean
from ihehub.channels.sniff import Labels, codec_name, label, parse_content_type

log = logging.getLogger(__name__)

_VALUE = {"type": ["string", "integer", "boolean"]}
_NAME = {"type": "string", "minLength": 1}

SOURCE_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["table"],
    "properties": {
        "table": {**_NAME, "description": "the table to poll; schema.table for another schema"},
        "key_column": {**_NAME, "default": "id", "description": "unique key of a row; the message's control id"},
        "status_column": {**_NAME, "default": "status"},
        "new_value": {**_VALUE, "default": "new", "description": "status of rows waiting for the hub"},
        "done_value": {**_VALUE, "default": "done"},
        "error_value": {**_VALUE, "default": "error"},
        "error_column": {**_NAME, "description": "gets the reason when a row is marked error"},
        "processed_at_column": {**_NAME, "description": "gets the database's CURRENT_TIMESTAMP when marked"},
        "message_id_column": {**_NAME, "description": "gets the hub's message id when marked"},
        "message_type_column": {**_NAME, "description": "its value becomes the message type (JSON bodies)"},
        "columns": {"type": "array", "items": _NAME, "minItems": 1, "uniqueItems": True},
        "where": {**_NAME, "description": "an extra SQL condition, e.g. \"msg_type = 'ADT'\""},
        "query": {**_NAME, "description": "a SELECT of your own instead of columns, where and order_by "
                                          "(:new_value and :batch_size are bound); it must return key_column"},
        "order_by": {"type": "array", "items": _NAME, "minItems": 1},
        "batch_size": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 50},
        "poll_interval": {"type": "number", "exclusiveMinimum": 0, "default": 5.0},
        "body_column": {**_NAME, "description": "the message is this column (e.g. an HL7 message), not the row"},
        "charset": {**_NAME, "description": "charset of body_column (and of binary columns in JSON rows)"},
        "content_type": _NAME,
        "error_max_length": {"type": "integer", "minimum": 16, "default": 255,
                             "description": "the reason is cut to this (and to the column's own length)"},
    },
}
FIELDS = ("body", "message_id", "control_id", "message_type", "received_at", "channel", "charset",
          "content_type", "correlation_id", "source")
DESTINATION_OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["table"],
    "properties": {
        "table": _NAME,
        "columns": {
            "type": "object",
            "minProperties": 1,
            "description": "column -> " + ", ".join(FIELDS) + ", header:NAME or json:KEY (json:/a/b pointer)",
            "additionalProperties": {"type": "string", "pattern": "^(" + "|".join(FIELDS) + "|header:.+|json:.+)$"},
        },
        "upsert_key": {"type": "array", "items": _NAME, "minItems": 1, "uniqueItems": True},
    },
}


def database_url(url: str) -> str:
    """The SQLAlchemy URL inside ``sql://<dialect[+driver]>://...``."""
    if not url.lower().startswith("sql://"):
        raise ConnectorError(f"{url!r} is not a sql:// URL")
    inner = url[len("sql://"):]
    try:
        sa.make_url(inner)
    except Exception:
        raise ConnectorError(
            f"{redact(url)!r}: after sql:// comes a SQLAlchemy URL, e.g. "
            "sql://postgresql+psycopg://user:password@host:5432/db or sql://mysql+pymysql://user@host/db"
        ) from None
    return inner


def connect(url: str, home: str) -> sa.Engine:
    """An engine for someone else's database: ``postgresql://`` means psycopg 3, a relative SQLite path
    is under the hub home, and nothing about the database is changed (unlike the hub's own store,
    which sets SQLite to WAL: that would change the journal mode of the hospital's file)."""
    u = sa.make_url(url)
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    if u.drivername.startswith("sqlite") and u.database and u.database != ":memory:" \
            and not os.path.isabs(u.database):
        u = u.set(database=os.path.join(home, u.database))
    return sa.create_engine(u, pool_pre_ping=True)


def redact(url: str) -> str:
    """The URL with its password hidden (URLs end up in errors and the channel status)."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable URL>"


def _split_table(name: str) -> tuple[str | None, str]:
    schema, _, table = name.rpartition(".")
    return schema or None, table


def _reflect(conn: sa.Connection, name: str, shown: str) -> sa.Table:
    schema, table = _split_table(name)
    try:
        return sa.Table(table, sa.MetaData(), schema=schema, autoload_with=conn)
    except NoSuchTableError:
        raise ConnectorError(f"table {name!r} does not exist in {shown}") from None


def _column(table: sa.Table, name: str, what: str) -> sa.Column[Any]:
    if name not in table.c:
        known = list(table.c.keys())
        raise ConnectorError(f"{what}: table {table.fullname!r} has no column {name!r}"
                             f"{did_you_mean(name, known)}; columns: {', '.join(known)}")
    column: sa.Column[Any] = table.c[name]
    return column


def _is_binary(column: sa.Column[Any]) -> bool:
    return isinstance(column.type, sa.types._Binary)


def _describe_db_error(exc: BaseException, shown: str) -> str:
    if isinstance(exc, DBAPIError):
        detail = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        if _unreachable(exc):
            return f"database {shown} unavailable: {detail}"
        return f"database {shown}: {type(exc.orig).__name__}: {detail}"
    if isinstance(exc, SQLAlchemyError):
        return f"database {shown}: {type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, ConnectorError) else str(exc)


# MySQL/MariaDB server errors that say "try again later" (too many connections, shutdown, lock wait,
# deadlock, killed, network, access): the drivers raise OperationalError for these but also for errors in
# the statement (1364 "field has no default"), so MySQL is told apart by its error number; >= 2000 are the
# client library's own (2003 cannot connect, 2006 gone away, 2013 lost connection).
MYSQL_TRANSIENT = frozenset({1040, 1044, 1045, 1049, 1053, 1158, 1159, 1160, 1161, 1205, 1213, 1927})


def _unreachable(exc: BaseException) -> bool:
    """The database is down or the connection broke (retry later), rather than the statement is wrong."""
    if isinstance(exc, DisconnectionError | PoolTimeout):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    args = getattr(exc.orig, "args", ())
    if args and isinstance(args[0], int) and not isinstance(args[0], bool):  # a MySQL error number
        return args[0] in MYSQL_TRANSIENT or args[0] >= 2000
    return isinstance(exc, OperationalError | InterfaceError)


def _jsonable(value: Any, charset: str | None) -> Any:
    """JSON for a column value: ISO 8601 times, decimals as strings, binary decoded or in base64."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        if charset:
            return data.decode(charset, errors="replace")
        return base64.b64encode(data).decode("ascii")
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return str(value)


# --------------------------------------------------------------------------- source


@dataclasses.dataclass(frozen=True, slots=True)
class _Verdict:
    status: str  # "done" or "error"
    reason: str | None = None
    message_id: str | None = None


class SQLSource(PollingSource):
    """Poll a table for rows in ``new_value`` status; each row is one message (see the module docstring)."""

    kind = "sql source"

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        where = f"sql source {name!r}"
        check_options(options, SOURCE_OPTIONS_SCHEMA, where)
        super().__init__(name=name, url=url, poll_interval=float(options.get("poll_interval", 5.0)),
                         context=context)
        self.db_url = database_url(url)
        self.shown = redact(self.db_url)
        self.home = context.home
        self.table_name: str = options["table"]
        self.key_column: str = options.get("key_column", "id")
        self.status_column: str = options.get("status_column", "status")
        self.new_value = options.get("new_value", "new")
        self.done_value = options.get("done_value", "done")
        self.error_value = options.get("error_value", "error")
        if len({repr(v) for v in (self.new_value, self.done_value, self.error_value)}) < 3:
            raise ConnectorError(f"{where}: new_value, done_value and error_value must differ")
        self.error_column: str | None = options.get("error_column")
        self.processed_at_column: str | None = options.get("processed_at_column")
        self.message_id_column: str | None = options.get("message_id_column")
        self.message_type_column: str | None = options.get("message_type_column")
        self.columns: list[str] | None = options.get("columns")
        self.where: str | None = options.get("where")
        self.query: str | None = options.get("query")
        if self.query and {"columns", "where", "order_by"} & set(options):
            raise ConnectorError(f"{where}: options.query replaces columns, where and order_by: use one or the other")
        self.order_by: list[str] = list(options.get("order_by") or [self.key_column])
        self.batch_size = int(options.get("batch_size", 50))
        self.body_column: str | None = options.get("body_column")
        self.error_max_length = int(options.get("error_max_length", 255))
        media, params = parse_content_type(options.get("content_type"))
        self.content_type = media
        label = options.get("charset") or params.get("charset")
        self.charset = codec_name(label) if label else None
        if label and self.charset is None:
            raise ConnectorError(f"{where}: unknown charset {label!r}")
        self._engine: sa.Engine | None = None
        self._table: sa.Table | None = None
        self._claim: sa.Executable | None = None

    async def start(self, inbound: Inbound) -> None:
        self._engine = connect(self.db_url, self.home)  # connects on the first poll
        await super().start(inbound)
        log.info("channel %s: polling %s table %s every %ss", self.name, self.shown, self.table_name,
                 self.poll_interval)

    async def _close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.dispose)

    def _describe(self, exc: BaseException) -> str:
        return _describe_db_error(exc, self.shown)

    # -- the claim statement, built once from the table's reflected columns

    def _prepare(self, conn: sa.Connection) -> tuple[sa.Table, sa.Executable]:
        if self._table is not None and self._claim is not None:
            return self._table, self._claim
        table = _reflect(conn, self.table_name, self.shown)
        what = f"options of {self.kind} {self.name!r}"
        marked = [self.key_column, self.status_column,
                  *(c for c in (self.error_column, self.processed_at_column, self.message_id_column) if c)]
        for name in marked:
            _column(table, name, what)
        claim: sa.Executable
        if self.query:  # the rows' other columns are checked on the first row it returns
            claim = sa.text(self.query)
        else:
            selected = [*self.order_by, *(self.columns or []),
                        *(c for c in (self.message_type_column, self.body_column) if c)]
            for name in selected:
                _column(table, name, what)
            wanted = list(self.columns or table.c.keys())
            for extra in (self.key_column, self.body_column, self.message_type_column):
                if extra and extra not in wanted:
                    wanted.append(extra)
            select = sa.select(*(table.c[c] for c in wanted)).where(table.c[self.status_column] == self.new_value)
            if self.where:
                select = select.where(sa.text(self.where))
            select = select.order_by(*(table.c[c] for c in self.order_by)).limit(self.batch_size)
            claim = select.with_for_update(skip_locked=True)  # ignored by SQLite (one writer at a time anyway)
        self._table, self._claim = table, claim
        return table, claim

    def _fetch(self, conn: sa.Connection) -> list[dict[str, Any]]:
        _table, claim = self._prepare(conn)
        params = {"new_value": self.new_value, "batch_size": self.batch_size} if self.query else None
        rows = [dict(row) for row in conn.execute(claim, params).mappings()]
        if rows and self.query:
            for name in (self.key_column, self.body_column, self.message_type_column):
                if name and name not in rows[0]:
                    raise ConnectorError(f"options.query of {self.kind} {self.name!r} returns no column {name!r}; "
                                         f"it returns: {', '.join(rows[0])}")
        return rows

    async def _poll(self, inbound: Inbound) -> int:
        engine = self._engine
        if engine is None:
            raise ConnectorError(f"sql source {self.name!r} is not started")
        conn = await asyncio.to_thread(engine.connect)
        try:
            rows = await asyncio.to_thread(self._fetch, conn)
            marks: list[tuple[Any, _Verdict]] = []
            for row in rows:
                if self.stopping:
                    break
                verdict = await self._offer(row, inbound)
                if verdict is None:
                    break
                marks.append((row[self.key_column], verdict))
            if marks:
                await asyncio.to_thread(self._mark, conn, marks)
            await asyncio.to_thread(conn.commit)
        finally:
            try:
                await asyncio.to_thread(conn.close)  # rolls back what was not committed
            except SQLAlchemyError as exc:  # the connection broke: the error that broke it is raised
                log.debug("channel %s: closing a broken connection: %s", self.name, exc)
        self.more = len(marks) == self.batch_size
        return len(marks)

    async def _offer(self, row: Mapping[str, Any], inbound: Inbound) -> _Verdict | None:
        """Hand one row to the hub: a verdict to write back, or None to stop here and retry later."""
        key = row[self.key_column]
        try:
            message = self._message(row)
        except ValueError as exc:
            log.warning("channel %s: row %s=%r of %s marked error: %s", self.name, self.key_column, key,
                        self.table_name, exc)
            return _Verdict("error", str(exc))
        try:
            outcome = await inbound(message)
        except Exception:
            log.warning("channel %s: the hub failed on row %r of %s; it stays for the next poll", self.name,
                        key, self.table_name, exc_info=True)
            return None
        if outcome.accepted:
            return _Verdict("done", None, outcome.message_id or message.id)
        if outcome.code.upper() in ("AE", "CE"):
            log.warning("channel %s: row %r of %s refused: %s", self.name, key, self.table_name, outcome.error)
            return _Verdict("error", outcome.error or "refused by the hub", outcome.message_id or message.id)
        log.warning("channel %s: row %r of %s not taken (%s: %s); it stays for the next poll", self.name, key,
                    self.table_name, outcome.code, outcome.error)
        return None

    def _message(self, row: Mapping[str, Any]) -> Message:
        """The row as a message; `ValueError` says why a row cannot be one (marked error, not retried)."""
        key = row[self.key_column]
        if key is None:
            raise ValueError(f"key column {self.key_column!r} is NULL")
        message_type = None
        if self.message_type_column and row.get(self.message_type_column) is not None:
            message_type = str(row[self.message_type_column])
        if self.body_column:
            raw = self._body(row.get(self.body_column))
            labels = label(raw, content_type=self.content_type, charset=self.charset, message_type=message_type)
        else:
            data = {str(k): v for k, v in row.items()}
            raw = json.dumps(data, ensure_ascii=False, default=lambda v: _jsonable(v, self.charset)).encode()
            labels = Labels(content_type=self.content_type or "application/json", charset="utf-8", control_id=None,
                            message_type=message_type)
        return Message(
            channel=self.name,
            raw=raw,
            content_type=labels.content_type,
            charset=labels.charset,  # for HL7 v2: MSH-18 when set, else the charset option
            headers={"sql.table": self.table_name, "sql.key": str(key)},
            control_id=str(key),  # not MSH-10: the row key is what makes a second offer a duplicate
            message_type=labels.message_type,
            source=f"{self.table_name}/{key}",
        )

    def _body(self, value: Any) -> bytes:
        if value is None:
            raise ValueError(f"body column {self.body_column!r} is NULL")
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        text = value if isinstance(value, str) else str(value)
        codec = self.charset or "utf-8"
        try:
            return text.encode(codec)
        except UnicodeEncodeError as exc:
            raise ValueError(f"body column {self.body_column!r} cannot be written in {codec}: {exc}") from None

    def _mark(self, conn: sa.Connection, marks: Sequence[tuple[Any, _Verdict]]) -> None:
        """One UPDATE per row, sent as one batch (executemany), inside the claim's transaction."""
        table = self._table
        if table is None:
            raise ConnectorError(f"sql source {self.name!r}: the table was not read")
        values: dict[str, Any] = {self.status_column: sa.bindparam("ihehub_status")}
        width = self.error_max_length
        if self.error_column:
            values[self.error_column] = sa.bindparam("ihehub_error")
            width = min(getattr(table.c[self.error_column].type, "length", None) or width, width)
        if self.processed_at_column:
            values[self.processed_at_column] = sa.func.current_timestamp()
        if self.message_id_column:
            values[self.message_id_column] = sa.bindparam("ihehub_message_id")
        statement = sa.update(table).where(table.c[self.key_column] == sa.bindparam("ihehub_key")).values(values)
        params = [
            {"ihehub_key": key,
             "ihehub_status": self.done_value if verdict.status == "done" else self.error_value,
             "ihehub_error": verdict.reason[:width] if verdict.reason else None,
             "ihehub_message_id": verdict.message_id}
            for key, verdict in marks
        ]
        conn.execute(statement, params)


# --------------------------------------------------------------------------- destination


def _json_value(data: Any, key: str) -> Any:
    """``json:name`` (a top-level key) or ``json:/a/0/b`` (an RFC 6901 JSON pointer); None when absent."""
    if not key.startswith("/"):
        return data.get(key) if isinstance(data, dict) else None
    node = data
    for part in key[1:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


class SQLDestination:
    """Insert (or upsert) one row per message into a table, in one transaction each."""

    def __init__(self, *, name: str, url: str, options: Mapping[str, Any], context: ConnectorContext) -> None:
        check_options(options, DESTINATION_OPTIONS_SCHEMA, f"sql destination {name!r}")
        self.name = name
        self.url = url
        self.db_url = database_url(url)
        self.shown = redact(self.db_url)
        self.home = context.home
        self.table_name: str = options["table"]
        self.columns: dict[str, str] | None = dict(options["columns"]) if options.get("columns") else None
        self.upsert_key: list[str] = list(options.get("upsert_key") or [])
        self._engine: sa.Engine | None = None
        self._table: sa.Table | None = None
        self._lock = threading.Lock()

    def _ready(self) -> tuple[sa.Engine, sa.Table]:
        with self._lock:
            if self._engine is None:
                self._engine = connect(self.db_url, self.home)
            if self._table is None:
                with self._engine.connect() as conn:
                    table = _reflect(conn, self.table_name, self.shown)
                what = f"sql destination {self.name!r}"
                for column in [*(self.columns or {}), *self.upsert_key]:
                    _column(table, column, what)
                dialect = self._engine.dialect.name
                if self.upsert_key and dialect not in ("postgresql", "sqlite", "mysql", "mariadb"):
                    raise ConnectorError(f"{what}: upsert_key is not supported on {dialect}")
                self._table = table
            return self._engine, self._table

    def row(self, message: Message, table: sa.Table) -> dict[str, Any]:
        """The column values for ``message``; `DeliveryError` (not retryable) when they cannot be made."""
        data: Any = None
        columns = self.columns
        needs_json = columns is None or any(v.startswith("json:") for v in columns.values())
        if needs_json:
            try:
                data = json.loads(message.text())
            except ValueError as exc:
                raise DeliveryError(f"{self.name}: the message body is not JSON ({exc})", retryable=False) from None
        if columns is None:
            if not isinstance(data, dict):
                raise DeliveryError(f"{self.name}: without options.columns the body must be a JSON object",
                                    retryable=False)
            unknown = [k for k in data if k not in table.c]
            if unknown:
                raise DeliveryError(f"{self.name}: table {self.table_name!r} has no column {unknown[0]!r} "
                                    f"(a key of the JSON body); map keys with options.columns", retryable=False)
            return {k: self._plain(v, table.c[k]) for k, v in data.items()}
        return {column: self._value(message, data, spec, table.c[column]) for column, spec in columns.items()}

    @staticmethod
    def _plain(value: Any, column: sa.Column[Any]) -> Any:
        """A JSON value for ``column``: objects and arrays as JSON text, unless the column is JSON itself."""
        if isinstance(value, dict | list) and not isinstance(column.type, sa.JSON):
            return json.dumps(value, ensure_ascii=False)
        return value

    def _value(self, message: Message, data: Any, spec: str, column: sa.Column[Any]) -> Any:
        if spec.startswith("json:"):
            return self._plain(_json_value(data, spec[len("json:"):]), column)
        if spec.startswith("header:"):
            return message.headers.get(spec[len("header:"):])
        if spec == "body":
            return message.raw if _is_binary(column) else message.text()
        value: Any = getattr(message, spec)
        return value

    def _statement(self, engine: sa.Engine, table: sa.Table, row: dict[str, Any]) -> Any:
        if not self.upsert_key:
            return sa.insert(table).values(row)
        missing = [k for k in self.upsert_key if k not in row]
        if missing:
            raise DeliveryError(f"{self.name}: upsert_key column {missing[0]!r} has no value", retryable=False)
        updates = [c for c in row if c not in self.upsert_key]
        if engine.dialect.name in ("mysql", "mariadb"):
            from sqlalchemy.dialects.mysql import insert as mysql_insert

            mysql_stmt = mysql_insert(table).values(row)
            first = self.upsert_key[0]  # a no-op assignment when every column is a key
            assignments = {c: mysql_stmt.inserted[c] for c in updates} or {first: table.c[first]}
            return mysql_stmt.on_duplicate_key_update(assignments)
        if engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            pg_stmt = pg_insert(table).values(row)
            if not updates:
                return pg_stmt.on_conflict_do_nothing(index_elements=self.upsert_key)
            return pg_stmt.on_conflict_do_update(index_elements=self.upsert_key,
                                                 set_={c: pg_stmt.excluded[c] for c in updates})
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        lite_stmt = sqlite_insert(table).values(row)
        if not updates:
            return lite_stmt.on_conflict_do_nothing(index_elements=self.upsert_key)
        return lite_stmt.on_conflict_do_update(index_elements=self.upsert_key,
                                               set_={c: lite_stmt.excluded[c] for c in updates})

    def _insert(self, message: Message) -> Sequence[Any] | None:
        engine, table = self._ready()
        row = self.row(message, table)
        statement = self._statement(engine, table, row)
        with engine.begin() as conn:
            result = conn.execute(statement)
        return None if self.upsert_key else result.inserted_primary_key

    async def send(self, message: Message) -> Response:
        try:
            key = await asyncio.to_thread(self._insert, message)
        except DeliveryError:
            raise
        except ConnectorError as exc:
            raise DeliveryError(f"{self.name}: {exc}", retryable=False) from exc
        except SQLAlchemyError as exc:
            if _unreachable(exc):
                with self._lock:
                    self._table = None  # read again when it is back: the table may have changed meanwhile
            raise DeliveryError(f"{self.name}: {_describe_db_error(exc, self.shown)}",
                                retryable=_unreachable(exc)) from exc
        body = json.dumps([v if isinstance(v, int | str) else _jsonable(v, None) for v in key]).encode() if key else b""
        return Response(ok=True, status="upserted" if self.upsert_key else "inserted", body=body)

    async def close(self) -> None:
        with self._lock:
            engine, self._engine, self._table = self._engine, None, None
        if engine is not None:
            await asyncio.to_thread(engine.dispose)


SPEC = ConnectorSpec(
    schemes=("sql",),
    description="Poll an intermediate table for new rows (source); insert or upsert a row per message",
    source="ihehub.channels.sql:SQLSource",
    destination="ihehub.channels.sql:SQLDestination",
    options_schema=union_schema(SOURCE_OPTIONS_SCHEMA, DESTINATION_OPTIONS_SCHEMA),
    example="""\
source:
  url: sql://postgresql+psycopg://hub:${HIS_DB_PASSWORD}@10.1.1.5:5432/his
  options:
    table: hl7_out
    key_column: id
    status_column: status          # new -> done / error
    error_column: error_text
    body_column: message           # an HL7 v2 message, stored in GB18030
    charset: gb18030
    batch_size: 50
    poll_interval: 2
dedup: true                        # the row key is the control id: a row offered twice is stored once
destinations:
  - name: ris-table
    url: sql://mysql+pymysql://hub@10.1.1.6/ris?charset=utf8mb4
    options:
      table: adt_in
      columns: {control_id: control_id, message_type: message_type, body: body, received_at: received_at}
""",
)
