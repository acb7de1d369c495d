"""What every EMPI operation needs inside its transaction: settings, profile, domains, and shared steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Connection, Row, select

from ihehub.empi import store
from ihehub.empi import tables as t
from ihehub.empi.config import EmpiConfig
from ihehub.empi.errors import InvalidData, SubsumedPatient, UnknownDomain, UnknownPatient
from ihehub.empi.model import HD, Domain, DomainType, EventType, Identifier, PatientEvent
from ihehub.empi.scoring import Profile


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Ctx:
    config: EmpiConfig
    profile: Profile
    domains: Mapping[int, Domain]

    @property
    def enterprise(self) -> Domain:
        for d in self.domains.values():
            if d.type is DomainType.ENTERPRISE and d.namespace == self.config.enterprise_namespace:
                return d
        raise UnknownDomain(self.config.enterprise_namespace, field="empi.enterprise_namespace")

    def domain(self, key: str | HD, *, field: str = "identifier.domain") -> Domain:
        """The domain named by namespace or universal id (or an HD with either; both must agree)."""
        if isinstance(key, HD):
            by_ns = self._find(key.namespace) if key.namespace else None
            by_uid = self._find(key.universal_id) if key.universal_id else None
            if by_ns and by_uid and by_ns.id != by_uid.id:
                raise InvalidData(f"assigning authority {key.namespace}&{key.universal_id} names two different "
                                  "domains", field=field)
            found = by_ns or by_uid
            if found is None:
                raise UnknownDomain(key.namespace or key.universal_id or "", field=field)
            return found
        if not key or not key.strip():
            raise UnknownDomain("", field=field)
        found = self._find(key.strip())
        if found is None:
            raise UnknownDomain(key, field=field)
        return found

    def _find(self, key: str) -> Domain | None:
        for d in self.domains.values():
            if key == d.namespace or (d.universal_id and key == d.universal_id):
                return d
        return None

    def ident(self, row: Any) -> Identifier:
        return Identifier(value=row.pid, domain=self.domains[row.domain_id].namespace)

    # -- shared steps -------------------------------------------------------------------------

    def identifiers(self, conn: Connection, patient_id: int, epid: str) -> tuple[Identifier, ...]:
        """A patient's cross-reference: its enterprise id first, then every active source identifier."""
        return self.cross_reference(epid, store.patient_records(conn, patient_id))

    def cross_reference(self, epid: str, rows: Iterable[Any]) -> tuple[Identifier, ...]:
        """The enterprise id, then the identifiers of ``rows`` (a patient's active records: ``pid`` and
        ``domain_id``) sorted by domain and value."""
        ids = sorted((self.ident(r) for r in rows), key=lambda i: (i.domain, i.value))
        return (Identifier(value=epid, domain=self.enterprise.namespace), *ids)

    def epid(self, conn: Connection, patient_id: int) -> str:
        row = store.patient_row(conn, id=patient_id)
        if row is None:
            raise UnknownPatient(str(patient_id), self.enterprise.namespace)
        return str(row.epid)

    def new_patient(self, conn: Connection, at: float) -> tuple[int, str]:
        return store.insert_patient(conn, self.config.epid_prefix, self.config.epid_width, at)

    def retire_if_empty(self, conn: Connection, patient_id: int, at: float, by: str,
                        events: list[PatientEvent]) -> bool:
        """A patient left with no active record is retired (kept, never deleted) and a DELETED event told."""
        if store.patient_records(conn, patient_id):
            return False
        row = store.patient_row(conn, id=patient_id)
        if row is None or row.status != "active":
            return False
        store.set_patient(conn, patient_id, at, status="retired")
        events.append(store.add_event(conn, type=EventType.DELETED, patient=row.epid, identifiers=(), at=at,
                                      detail={"reason": "no record left", "by": by}))
        return True

    def resolve_record(self, conn: Connection, ident: Identifier, *, field: str = "identifier",
                       active: bool = True) -> tuple[Domain, Row[Any]]:
        """The source record of ``ident``; `SubsumedPatient` if an A40 merged it away."""
        dom = self.domain(ident.domain, field=f"{field}.domain")
        if dom.type is DomainType.ENTERPRISE:
            raise InvalidData(f"{ident.value!r} is an enterprise id, a source record identifier is needed",
                              field=f"{field}.domain")
        row = store.record_row(conn, dom.id, ident.value) if ident.value else None
        if row is None:
            raise UnknownPatient(ident.value, dom.namespace, field=f"{field}.value")
        if active and row.status == "merged":
            survivor = store.record_by_id(conn, row.merged_into)
            raise SubsumedPatient(ident.value, dom.namespace,
                                  (survivor.pid, self.domains[survivor.domain_id].namespace) if survivor else ("", ""),
                                  field=f"{field}.value")
        if active and row.status != "active":
            raise UnknownPatient(ident.value, dom.namespace, field=f"{field}.value",
                                 message=f"patient {ident.value!r} in domain {dom.namespace!r} was deleted")
        return dom, row

    def resolve_patient(self, conn: Connection, ident: Identifier, *, field: str = "identifier") -> Row[Any]:
        """The active enterprise patient of an enterprise id or of a source record identifier."""
        dom = self.domain(ident.domain, field=f"{field}.domain")
        if dom.type is not DomainType.ENTERPRISE:
            _, rec = self.resolve_record(conn, ident, field=field)
            row = store.patient_row(conn, id=rec.patient_id)
        else:
            row = store.patient_row(conn, epid=ident.value)
        if row is None or row.status == "retired":
            raise UnknownPatient(ident.value, dom.namespace, field=f"{field}.value")
        if row.status == "merged":
            survivor = store.patient_row(conn, id=row.merged_into)
            raise SubsumedPatient(ident.value, dom.namespace, (survivor.epid if survivor else "", dom.namespace),
                                  field=f"{field}.value")
        return row


def load_estimated(conn: Connection, profile: str = "fellegi-sunter") -> dict[str, Any] | None:
    import json

    row = conn.execute(select(t.parameters.c.params).where(t.parameters.c.profile == profile)
                       .order_by(t.parameters.c.id.desc()).limit(1)).first()
    return json.loads(row[0]) if row else None
