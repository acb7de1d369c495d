"""The ``ihehub`` command line.  Every command has ``--help``; the home folder comes from
``--home`` or ``$IHEHUB_HOME`` (default ``./var``)."""

from __future__ import annotations

import click

from ihehub import __version__
from ihehub.cli.admin import channels, db, tls, token
from ihehub.cli.audit import audit
from ihehub.cli.common import home_option
from ihehub.cli.empi import empi
from ihehub.cli.empi_events import events as empi_events
from ihehub.cli.empi_events import resend as empi_resend
from ihehub.cli.maps import map_
from ihehub.cli.messages import messages
from ihehub.cli.send import send
from ihehub.cli.serve import init, serve, worker
from ihehub.cli.xds import xds


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="ihehub")
@home_option
def main() -> None:
    """ihehub — integration engine for hospital imaging.

    \b
    Quick start:
      ihehub serve                      start every listener (writes a default home on first start)
      ihehub channels list              channels, their state and counts
      ihehub messages list --channel hl7-inbound
      ihehub send mllp://127.0.0.1:2575 adt.hl7   send HL7 v2 over MLLP, print the ACK
      ihehub token create --role admin  a bearer token for the HTTP API on :8080
    """


for command in (serve, worker, init, channels, messages, send, map_, audit, empi, xds, token, db, tls):
    main.add_command(command)
for command in (empi_events, empi_resend):  # ihehub empi events | resend (patient-event deliveries)
    empi.add_command(command)

__all__ = ["main"]
