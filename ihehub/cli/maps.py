"""``ihehub map test|check`` — try and lint mapping files without running a channel."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ihehub.cli.common import fail, home


@click.group("map")
def map_() -> None:
    """Mapping files (docs/mappings.md): test one on an input, check them all."""


@map_.command("test")
@click.argument("mapping", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("input_file", metavar="INPUT", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--no-trace", is_flag=True, help="Print only the output.")
def test(mapping: Path, input_file: Path, no_trace: bool) -> None:
    """Run MAPPING on INPUT; print the output and which rule wrote which field."""
    from ihehub.config import ConfigError
    from ihehub.mappings import MappingError, format_trace, test_mapping
    from ihehub.mappings.dicompath import looks_like_dicom
    from ihehub.mappings.dicomwrite import dump_dicom
    from ihehub.mappings.testing import decode_hl7

    try:
        output, trace = test_mapping(mapping, input_file.read_bytes())
    except (MappingError, ConfigError) as exc:
        fail(str(exc))
    if isinstance(output, dict | list):
        click.echo(json.dumps(output, indent=2, ensure_ascii=False, default=str))
    elif isinstance(output, bytes) and output.startswith(b"MSH"):
        click.echo(decode_hl7(output).replace("\r", "\n"))
    elif isinstance(output, bytes) and looks_like_dicom(output):  # a dump, not the binary
        click.echo(dump_dicom(output))
    elif isinstance(output, bytes):
        click.echo(output.decode("utf-8", errors="replace"))
    else:
        click.echo(str(output))
    if not no_trace:
        click.echo("\n# trace")
        click.echo(format_trace(trace))


@map_.command("check")
@click.argument("mappings", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--no-tests", is_flag=True, help="Do not run the files' tests: blocks.")
def check(mappings: tuple[Path, ...], no_tests: bool) -> None:
    """Report unknown paths, functions and code tables (file:line), and failing tests: blocks.

    Default: every mappings/*.yaml of the home.  Exit status 1 when anything is wrong."""
    from ihehub.mappings import check_mapping

    files = list(mappings) or sorted((home() / "mappings").glob("*.yaml"))
    if not files:
        fail(f"no mapping files given and none in {home() / 'mappings'}")
    bad = 0
    for f in files:
        problems = check_mapping(f, run_tests=not no_tests)
        for p in problems:
            click.secho(str(p), fg="red", err=True)
        bad += bool(problems)
    if bad:
        raise SystemExit(1)
    click.echo(f"ok: {len(files)} mapping file(s)")
