"""Helpers shared by the sql:// tests: the machine's PostgreSQL and MariaDB, scratch tables, a GB18030 ADT."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pymysql
import pytest

MARIADB = "mysql+pymysql://root@127.0.0.1:3306/test?charset=utf8mb4"

# HL7 v2.5 ADT^A01 in GB18030; MSH-18 is empty, so only the source's charset option says how to read it.
GB_HL7 = ("MSH|^~\\&|HIS|H1|HUB|H0|20261127101010||ADT^A01^ADT_A01|HIS-0001|P|2.5\r"
          "PID|1||P001^^^H1||张三^^^^^^L||19800101|M\r").encode("gb18030")


class Status:
    """Collects what the source reports for the channel status (``ConnectorContext.on_source_status``)."""

    def __init__(self) -> None:
        self.reports: list[tuple[str, str | None]] = []

    def __call__(self, channel: str, error: str | None) -> None:
        self.reports.append((channel, error))


def pg_exec(url: str, *statements: str, params: Any = None) -> list[Any]:
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    rows: list[Any] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for sql in statements:
            cur = conn.execute(sql, params)
            if cur.description:
                rows = cur.fetchall()
    return rows


def maria_exec(*statements: str, params: Any = None) -> list[Any]:
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", database="test", charset="utf8mb4",
                           autocommit=True)
    rows: list[Any] = []
    try:
        with conn.cursor() as cur:
            for sql in statements:
                cur.execute(sql, params)
                rows = list(cur.fetchall())
    finally:
        conn.close()
    return rows


@contextlib.contextmanager
def maria_scratch_table() -> Iterator[str]:
    """A table name of this test's own in MariaDB's ``test`` database, dropped after."""
    try:
        maria_exec("SELECT 1")
    except pymysql.MySQLError as exc:
        pytest.fail(f"MariaDB is not running on 127.0.0.1:3306 (root, database test): {exc}")
    name = f"ihehub_t_{secrets.token_hex(4)}"
    try:
        yield name
    finally:
        maria_exec(f"DROP TABLE IF EXISTS {name}")
