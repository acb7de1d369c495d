"""``ihehub xds publish`` — publish imaging manifests (XDS-I.b RAD-68) from the command line.

Works on the home's database and data folder directly (like ``ihehub empi``), so it runs with or without
``ihehub serve``; the study must be in the image manager's index.  With a PIX/PDQ channel in the home, the
study's patient is named by the EMPI's enterprise identifier, as the running hub does.
"""

from __future__ import annotations

import json
from typing import Any

import click

from ihehub.cli.common import config, fail


def _source() -> tuple[Any, Any]:
    from ihehub.actors.xds import build_xds_service
    from ihehub.actors.xds_imaging import ImagingDocumentSource, ImagingSettings
    from ihehub.bus import schema
    from ihehub.bus.db import make_engine

    cfg = config()
    x = cfg.actors.xds
    if not x.enabled or not x.imaging or not x.imaging.get("enabled"):
        fail(f"XDS-I.b is not configured in {cfg.home}/ihehub.yaml: set actors.xds.imaging "
             "(enabled: true and source_id; see docs/xds.md)", 2)
    engine = make_engine(cfg.database, home=cfg.home)
    try:
        schema.upgrade(engine)
    except Exception as exc:
        fail(f"cannot open the database {cfg.database}: {exc}")
    services: dict[str, Any] = {}
    from ihehub.actors.hl7v2 import EMPI_ACTORS
    from ihehub.config import ConfigError, load_channels

    try:
        if any(c.actor in EMPI_ACTORS for c in load_channels(cfg.home, hub=cfg)):
            from ihehub.cli.empi import open_empi

            services["empi"] = open_empi()
    except ConfigError as exc:
        fail(f"configuration errors in {cfg.home}:\n{exc}", 2)
    services["xds"] = build_xds_service(cfg, engine, services)
    source = ImagingDocumentSource(engine=engine, dicom_root=cfg.data_dir / "dicom", xds=services["xds"],
                                   settings=ImagingSettings.from_mapping(x.imaging, ae_title=cfg.actors.dicom.ae_title),
                                   services=services)
    return source, engine


@click.group()
def xds() -> None:
    """XDS.b / XDS-I.b: publish imaging manifests."""


@xds.command("publish")
@click.option("--study", "studies", multiple=True, required=True, metavar="UID",
              help="Study Instance UID (repeat for several studies).")
@click.option("--json", "as_json", is_flag=True)
def publish(studies: tuple[str, ...], as_json: bool) -> None:
    """Build each study's KOS manifest and provide it to the repository (RAD-68); a study published before
    gets a new manifest that replaces the old one.  Exit status 1 when any study failed."""
    from ihehub.actors.xds_imaging import PublishError

    source, engine = _source()
    failed = 0
    results: list[dict[str, Any]] = []
    try:
        for study in studies:
            try:
                p = source.publish(study)
            except PublishError as exc:
                failed += 1
                results.append({"study_uid": study, "error": str(exc)})
                continue
            if p.errors:
                failed += 1
            results.append({"study_uid": study, "status": p.status.rsplit(":", 1)[-1],
                            "document_unique_id": p.document_unique_id, "patient_id": p.patient_id,
                            "instances": p.instances, "errors": [f"{e.code}: {e.context}" for e in p.errors]})
    finally:
        engine.dispose()
    if as_json:
        click.echo(json.dumps(results, ensure_ascii=False))
    else:
        for r in results:
            if "error" in r:
                click.secho(f"{r['study_uid']}: {r['error']}", fg="red", err=True)
            elif r["errors"]:
                click.secho(f"{r['study_uid']}: {r['status']}: {'; '.join(r['errors'])}", fg="red", err=True)
            else:
                click.echo(f"{r['study_uid']}: {r['status']}: manifest {r['document_unique_id']} "
                           f"({r['instances']} instances) for patient {r['patient_id']}")
    if failed:
        raise SystemExit(1)
