"""The hub's XDS.b Document Registry + Repository service (``hub.services["xds"]``) built from ``actors.xds``.

The affinity domain's patient identity source is the hub's EMPI (ITI TF-2b 3.42.4.1.3: a registry
refuses a patient id it has not received from the Patient Identity Feed with XDSUnknownPatientId).  With
``patient_check: empi`` a patient id (CX ``value^^^&oid&ISO``) is known when the EMPI resolves it to an
active patient: a source record in that domain (by universal id, else namespace id) or an enterprise id in
the enterprise domain (what XDS-I.b publishes with); a record merged away is unknown.  ``none`` accepts every
id; unset means "empi" when the hub runs an EMPI (a PIX/PDQ channel), else "none" — decided at each
submission, since the EMPI is started with its channels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from ihehub.config.model import HubConfig
from ihehub.xds.service import XdsService

__all__ = ["build_xds_service", "cx_identifier", "patient_check"]

log = logging.getLogger("ihehub.actors.xds")


def cx_identifier(cx: str) -> tuple[str, str] | None:
    """``(CX-1 value, domain)`` of an XDS patient id (ITI TF-3 4.2.3.1.3), domain the universal id (CX-4.2)
    or else the namespace id (CX-4.1); None when it is not of that form."""
    parts = cx.split("^")
    if len(parts) < 4 or not parts[0]:
        return None
    hd = parts[3].split("&")
    domain = (hd[1] if len(hd) > 1 and hd[1] else hd[0]).strip()
    return (parts[0], domain) if domain else None


def patient_check(services: Mapping[str, Any], mode: str | None) -> Callable[[str], bool] | None:
    """The registry's ``patient_known`` for ``mode`` ("empi" | "none" | None: EMPI if one runs)."""
    if mode == "none":
        return None

    def known(cx: str) -> bool:
        empi = services.get("empi")
        if empi is None:
            if mode == "empi":
                log.warning("xds: patient_check is 'empi' but no EMPI runs: %s is unknown", cx)
                return False
            return True
        from ihehub.empi.errors import EmpiError
        from ihehub.empi.model import Identifier

        ident = cx_identifier(cx)
        if ident is None:
            return False
        try:  # a source record, or the enterprise id itself; a record merged away is SubsumedPatient: unknown
            empi.patient(Identifier(value=ident[0], domain=ident[1]))
        except EmpiError:
            return False
        return True

    return known


def build_xds_service(cfg: HubConfig, engine: Any, services: Mapping[str, Any]) -> XdsService:
    x = cfg.actors.xds
    return XdsService(engine, cfg.data_dir, repository_unique_id=x.repository_unique_id,
                      home_community_id=x.home_community_id, max_results=x.max_results,
                      patient_known=patient_check(services, x.patient_check), registry_url=x.registry_url,
                      registry_verify=_verify(cfg) if x.registry_url else True)


def _verify(cfg: HubConfig) -> Any:
    """TLS to an external registry: the hub's client certificate and CA when configured (ITI TF-2a 3.19)."""
    tls = cfg.tls
    if tls.cert.is_file() and tls.key.is_file():
        from ihehub.tls import client_ssl_context

        return client_ssl_context(tls.ca if tls.ca.is_file() else None, tls.cert, tls.key)
    return True
