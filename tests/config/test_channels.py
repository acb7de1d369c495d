"""Loading channels into frozen dataclasses: names, filters, retry policies from delivery:."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ihehub.bus.retry import RetryPolicy
from ihehub.channels.registry import ConnectorContext, Registry
from ihehub.config import ChannelConfig, DestinationConfig, HubConfig, load_channels

Write = Callable[[str, str], Path]
NO_ENV: dict[str, str] = {}


def test_a_full_channel(tmp_path: Path, registry: Registry, write: Write) -> None:
    write(
        "ihehub.yaml",
        "delivery: {max_attempts: 3, initial_backoff: 0.5, max_backoff: 10, multiplier: 3, jitter: 0}\n",
    )
    path = write(
        "channels/adt-inbound.yaml",
        """\
        name: adt-inbound
        description: ADT feed from the HIS
        enabled: true
        source:
          url: fake://0.0.0.0:2575
          options: {max_frame_bytes: 1048576, encoding: gb18030}
        filter: 'MSH-9.1 == "ADT"'
        transformer: mypkg.maps:adt_to_ris
        fifo: true
        dedup: true
        destinations:
          - name: ris
            url: fake://127.0.0.1:9000/adt
            options: {tls: {verify: false}}
            filter: ['MSH-9.2 in ["A01", "A08"]', 'PID-3 != ""']
            retry: {max_attempts: 20}
          - name: archive
            url: fake://archive
        """,
    )
    (channel,) = load_channels(tmp_path, registry, environ=NO_ENV)
    defaults = RetryPolicy(max_attempts=3, initial_backoff=0.5, max_backoff=10.0, multiplier=3.0, jitter=0.0)
    assert channel == ChannelConfig(
        name="adt-inbound",
        description="ADT feed from the HIS",
        enabled=True,
        source=channel.source,
        filter=('MSH-9.1 == "ADT"',),
        transformer="mypkg.maps:adt_to_ris",
        fifo=True,
        dedup=True,
        destinations=(
            DestinationConfig(
                name="ris",
                url="fake://127.0.0.1:9000/adt",
                options={"tls": {"verify": False}},
                filter=('MSH-9.2 in ["A01", "A08"]', 'PID-3 != ""'),
                retry=RetryPolicy(
                    max_attempts=20, initial_backoff=0.5, max_backoff=10.0, multiplier=3.0, jitter=0.0
                ),
            ),
            DestinationConfig(name="archive", url="fake://archive", retry=defaults),
        ),
        file=path,
    )
    assert channel.source.url == "fake://0.0.0.0:2575" and channel.source.scheme == "fake"
    assert channel.source.options == {"max_frame_bytes": 1048576, "encoding": "gb18030"}
    assert type(channel.source.options["max_frame_bytes"]) is int


def test_defaults_names_and_file_selection(tmp_path: Path, registry: Registry, write: Write) -> None:
    write("channels/orm_in.yml", "source: {url: 'FAKE://in', options: null}\ndestinations: null\n")
    write("channels/off.yaml", "enabled: false\nsource: {url: 'fake://off'}\n")
    write("channels/.#off.yaml", "editor lock file: [ not yaml\n")
    write("channels/README.md", "not a channel\n")
    off, orm = load_channels(tmp_path, registry, environ=NO_ENV)
    assert (off.name, off.enabled) == ("off", False)
    assert orm.name == "orm_in" and orm.source.scheme == "fake"
    assert (orm.source.options, orm.destinations, orm.filter, orm.transformer) == ({}, (), (), None)
    assert (orm.fifo, orm.dedup, orm.description, orm.enabled) == (False, False, "", True)


def test_no_channels_folder_means_no_channels(tmp_path: Path, registry: Registry) -> None:
    assert load_channels(tmp_path, registry, environ=NO_ENV) == []


def test_hub_given_by_the_caller_supplies_the_retry_defaults(
    tmp_path: Path, registry: Registry, write: Write
) -> None:
    write("ihehub.yaml", "log_level: not-even-checked-here\n")
    write("channels/a.yaml", "source: {url: 'fake://a'}\ndestinations: [{name: d, url: 'fake://b'}]\n")
    hub = HubConfig(home=tmp_path)
    (channel,) = load_channels(tmp_path, registry, hub=hub, environ=NO_ENV)
    assert channel.destinations[0].retry == hub.delivery.retry == RetryPolicy()


def test_loaded_channels_build_connectors(tmp_path: Path, registry: Registry, write: Write) -> None:
    write("channels/a.yaml", "source: {url: 'fake://a', options: {encoding: utf-8}}\n")
    (channel,) = load_channels(tmp_path, registry, environ=NO_ENV)
    source = registry.build_source(
        name=channel.name,
        url=channel.source.url,
        options=channel.source.options,
        context=ConnectorContext(home=str(tmp_path)),
    )
    assert source.name == "a"
