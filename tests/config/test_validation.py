"""Every kind of configuration mistake gets a problem at its file:line with a useful message."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ihehub.channels.registry import Registry
from ihehub.config import ConfigError, Problem, load_channels, load_home, validate_home

Write = Callable[[str, str], Path]
NO_ENV: dict[str, str] = {}


def problems_of(home: Path, registry: Registry, environ: dict[str, str] | None = None) -> list[str]:
    return [str(p) for p in validate_home(home, registry, environ=NO_ENV if environ is None else environ)]


def test_unknown_key_points_at_the_key_and_suggests_the_known_one(
    tmp_path: Path, registry: Registry, write: Write
) -> None:
    write(
        "channels/adt.yaml",
        """\
        # ADT feed
        name: adt
        description: ADT feed from the HIS
        enabled: true
        source:
            url: fake://in
            optoins: {}
        """,
    )
    assert problems_of(tmp_path, registry) == [
        "channels/adt.yaml:7:5: source.optoins: unknown key 'optoins' (did you mean 'options'?)"
    ]


def test_unknown_key_without_a_close_match_lists_the_known_keys(
    tmp_path: Path, registry: Registry, write: Write
) -> None:
    write("channels/a.yaml", "source: {url: 'fake://in', zzz: 1}\n")
    (problem,) = problems_of(tmp_path, registry)
    assert problem == "channels/a.yaml:1:28: source.zzz: unknown key 'zzz'; expected one of: url, options"


def test_a_typo_of_a_required_key_is_reported_once(tmp_path: Path, registry: Registry, write: Write) -> None:
    write("channels/a.yaml", "sorce:\n  url: fake://in\n")
    assert problems_of(tmp_path, registry) == [
        "channels/a.yaml:1:1: sorce: unknown key 'sorce' (did you mean 'source'?)"
    ]


def test_yaml_syntax_error_has_the_parser_position(tmp_path: Path, registry: Registry, write: Write) -> None:
    write(
        "channels/a.yaml",
        """\
        source:
          url: fake://in
          options: {max_frame_bytes: 10
        destinations: []
        """,
    )
    (problem,) = validate_home(tmp_path, registry, environ=NO_ENV)
    assert (problem.file, problem.line) == ("channels/a.yaml", 4)
    assert problem.message.startswith("YAML syntax error: ")
    assert "flow mapping" in problem.message


def test_tab_indentation_is_a_syntax_error(tmp_path: Path, registry: Registry, write: Write) -> None:
    write("channels/a.yaml", "source:\n\turl: fake://in\n")
    (problem,) = validate_home(tmp_path, registry, environ=NO_ENV)
    assert problem.line == 2 and "YAML syntax error" in problem.message


def test_duplicate_keys_are_all_reported(tmp_path: Path, registry: Registry, write: Write) -> None:
    write(
        "channels/a.yaml",
        """\
        enabled: true
        source:
          url: fake://in
          url: fake://other
        enabled: false
        """,
    )
    assert problems_of(tmp_path, registry) == [
        "channels/a.yaml:4:3: source.url: duplicate key 'url' (first given on line 3)",
        "channels/a.yaml:5:1: enabled: duplicate key 'enabled' (first given on line 1)",
    ]


def test_wrong_types(tmp_path: Path, registry: Registry, write: Write) -> None:
    write(
        "channels/a.yaml",
        """\
        enabled: yes
        source:
          url: fake://in
          options:
            max_frame_bytes: lots
            tls: {verify: 1}
        destinations: {name: x}
        """,
    )
    assert problems_of(tmp_path, registry) == [
        "channels/a.yaml:1:10: enabled: wrong type: expected boolean (true or false), got string 'yes'"
        " (YAML 1.2: write true or false)",
        "channels/a.yaml:5:22: source.options.max_frame_bytes: wrong type: expected integer,"
        " got string 'lots'",
        "channels/a.yaml:6:19: source.options.tls.verify: wrong type: expected boolean (true or false),"
        " got integer 1",
        "channels/a.yaml:7:15: destinations: wrong type: expected list or null, got mapping",
    ]


def test_missing_required_keys_point_at_the_mapping_that_lacks_them(
    tmp_path: Path, registry: Registry, write: Write
) -> None:
    write(
        "channels/a.yaml",
        """\
        source:
          options: {}
        destinations:
          - name: ris
        """,
    )
    assert problems_of(tmp_path, registry) == [
        "channels/a.yaml:1:1: source.url: missing required key 'url'",
        "channels/a.yaml:4:5: destinations[0].url: missing required key 'url'",
    ]
    write("channels/a.yaml", "description: nothing else\n")
    assert problems_of(tmp_path, registry) == ["channels/a.yaml:1:1: source: missing required key 'source'"]


def test_empty_file_and_non_mapping(tmp_path: Path, registry: Registry, write: Write) -> None:
    write("channels/empty.yaml", "# nothing yet\n")
    write("channels/list.yaml", "- source: {url: 'fake://in'}\n")
    assert problems_of(tmp_path, registry) == [
        "channels/empty.yaml:1:1: source: missing required key 'source'",
        "channels/list.yaml:1:1: expected a mapping with source:, destinations: and the other channel keys",
    ]


def test_enum_violations_suggest_the_closest_value(tmp_path: Path, registry: Registry, write: Write) -> None:
    write("ihehub.yaml", "log_level: debg\n")
    write("channels/a.yaml", "source:\n  url: fake://in\n  options: {encoding: utf8}\n")
    assert problems_of(tmp_path, registry) == [
        "ihehub.yaml:1:12: log_level: 'debg' is not one of 'debug', 'info', 'warning', 'error', 'critical'"
        " (did you mean 'debug'?)",
        "channels/a.yaml:3:23: source.options.encoding: 'utf8' is not one of 'utf-8', 'gb18030', 'latin-1'"
        " (did you mean 'utf-8'?)",
    ]


def test_bad_url_schemes(tmp_path: Path, registry: Registry, write: Write) -> None:
    write(
        "channels/a.yaml",
        """\
        source:
          url: 0.0.0.0:2575
        destinations:
          - name: one
            url: htp://ris/adt
          - name: two
            url: fake://ris:99999/adt
        """,
    )
    assert problems_of(tmp_path, registry) == [
        "channels/a.yaml:2:8: source.url: '0.0.0.0:2575' is not a connector URL: write scheme://...,"
        " e.g. mllp://0.0.0.0:2575 (or file:relative/folder)",
        "channels/a.yaml:5:10: destinations[0].url: unknown connector scheme 'htp://' (did you mean 'http'?);"
        " known: fake://, http://, listen://, mllp://",
        "channels/a.yaml:7:10: destinations[1].url: bad port in 'fake://ris:99999/adt':"
        " Port out of range 0-65535",
    ]


def test_connector_roles_and_unloadable_connectors(tmp_path: Path, write: Write) -> None:
    registry = Registry(
        {
            "fake": "tests.config.fake_connector",
            "listen": "tests.config.fake_listener",
            "gone": "tests.config.nope",
        }
    )
    write(
        "channels/a.yaml",
        """\
        source: {url: 'gone://x'}
        destinations:
          - {name: d, url: 'listen://y'}
        """,
    )
    assert problems_of(tmp_path, registry) == [
        "channels/a.yaml:1:15: source.url: the gone:// connector cannot be loaded:"
        " ModuleNotFoundError: No module named 'tests.config.nope'",
        "channels/a.yaml:3:20: destinations[0].url: listen:// cannot be used as a destination",
    ]


def test_options_of_the_connector_are_checked_with_its_schema(
    tmp_path: Path, registry: Registry, write: Write
) -> None:
    write(
        "channels/a.yaml",
        """\
        source:
          url: fake://in
          options:
            max_frame_byte: 0
        destinations:
          - name: d
            url: fake://out
            options:
              max_frame_bytes: 0
              tls: {verfy: true}
        """,
    )
    assert problems_of(tmp_path, registry) == [
        "channels/a.yaml:4:5: source.options.max_frame_byte: unknown key 'max_frame_byte'"
        " (did you mean 'max_frame_bytes'?)",
        "channels/a.yaml:9:24: destinations[0].options.max_frame_bytes: 0 is less than the minimum 1",
        "channels/a.yaml:10:13: destinations[0].options.tls.verfy: unknown key 'verfy'"
        " (did you mean 'verify'?)",
    ]


def test_duplicate_channel_names_across_files(tmp_path: Path, registry: Registry, write: Write) -> None:
    write("channels/adt.yaml", "source: {url: 'fake://a'}\n")
    write("channels/b.yaml", "# same name as adt.yaml\nname: adt\nsource: {url: 'fake://b'}\n")
    assert problems_of(tmp_path, registry) == [
        "channels/b.yaml:2:7: name: duplicate channel name 'adt' (also channels/adt.yaml:1)"
    ]
    with pytest.raises(ConfigError, match="duplicate channel name"):
        load_channels(tmp_path, registry, environ=NO_ENV)


def test_names_of_channels_and_destinations(tmp_path: Path, registry: Registry, write: Write) -> None:
    write("channels/ADT Feed.yaml", "source: {url: 'fake://a'}\n")
    write(
        "channels/b.yaml",
        """\
        name: B
        source: {url: 'fake://b'}
        destinations:
          - {name: ris, url: 'fake://1'}
          - {name: ris, url: 'fake://2'}
        """,
    )
    assert problems_of(tmp_path, registry) == [
        "channels/ADT Feed.yaml:1:1: the file name 'ADT Feed' is not a valid channel name"
        " (lower-case letters, digits, '-', '_'): rename the file or add a name: key",
        "channels/b.yaml:1:7: name: 'B' is not a valid name: use lower-case letters, digits, '-' and '_',"
        " starting with a letter or digit (at most 64)",
        "channels/b.yaml:5:12: destinations[1].name: duplicate destination name 'ris' (also destinations[0])",
    ]


def test_retry_override_must_keep_backoff_ordered(tmp_path: Path, registry: Registry, write: Write) -> None:
    write("ihehub.yaml", "delivery: {initial_backoff: 5}\n")
    write(
        "channels/a.yaml",
        """\
        source: {url: 'fake://a'}
        destinations:
          - name: d
            url: fake://b
            retry: {max_backoff: 2, jitter: 1.5}
        """,
    )
    assert problems_of(tmp_path, registry) == [
        "channels/a.yaml:5:12: destinations[0].retry: max_backoff 2.0 is less than initial_backoff 5.0",
        "channels/a.yaml:5:37: destinations[0].retry.jitter: 1.5 is more than the maximum 1",
    ]


def test_hub_file_problems(tmp_path: Path, registry: Registry, write: Write) -> None:
    write(
        "ihehub.yaml",
        """\
        nodeid: x
        http:
          port: "8080"
        broker: redis://localhost
        actors:
          dicom: {ae_title: "A_TITLE_LONGER_THAN_16"}
        delivery:
          initial_backoff: 10
          max_backoff: 1
        store: {max_batch: 0}
        retention: {body_days: -1}
        """,
    )
    problems = problems_of(tmp_path, registry)
    assert problems == [
        "ihehub.yaml:1:1: nodeid: unknown key 'nodeid' (did you mean 'node_id'?)",
        "ihehub.yaml:3:9: http.port: wrong type: expected integer, got string '8080'",
        "ihehub.yaml:4:9: broker: 'redis://localhost' is not a supported broker URL:"
        " use null (embedded) or amqp://guest:guest@127.0.0.1:5672//",
        "ihehub.yaml:6:21: actors.dicom.ae_title: 'A_TITLE_LONGER_THAN_16' is not a valid AE title:"
        " 1 to 16 printable ASCII characters, no backslash, not starting with a space",
        "ihehub.yaml:9:16: delivery.max_backoff: max_backoff 1.0 is less than initial_backoff 10.0",
        "ihehub.yaml:10:20: store.max_batch: 0 is less than the minimum 1",
        "ihehub.yaml:11:24: retention.body_days: -1 is less than the minimum 0",
    ]
    with pytest.raises(ConfigError) as caught:
        load_home(tmp_path, environ=NO_ENV)
    assert str(caught.value).splitlines() == problems


def test_every_problem_of_every_file_is_reported(tmp_path: Path, registry: Registry, write: Write) -> None:
    write("ihehub.yaml", "log_level: loud\n")
    write("channels/a.yaml", "source: {url: 'fake://a', optons: {}}\nfifo: 1\n")
    write("channels/b.yaml", "source: [\n")
    write("channels/c.yaml", "source: {url: 'mlp://0.0.0.0:2575'}\ndedup: true\ndedup: false\n")
    write("channels/ok.yaml", "source: {url: 'fake://ok'}\n")
    write("channels/notes.txt", "not a channel: ignored\n")
    problems = validate_home(tmp_path, registry, environ=NO_ENV)
    assert [(p.file, p.line) for p in problems] == [
        ("ihehub.yaml", 1),
        ("channels/a.yaml", 1),
        ("channels/a.yaml", 2),
        ("channels/b.yaml", 2),
        ("channels/c.yaml", 1),
        ("channels/c.yaml", 3),
    ]
    with pytest.raises(ConfigError) as caught:
        load_channels(tmp_path, registry, environ=NO_ENV)
    assert len(caught.value.problems) == len(problems)


def test_file_that_is_not_utf8(tmp_path: Path, registry: Registry) -> None:
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "gbk.yaml").write_bytes(
        "description: 影像\nsource: {url: 'fake://a'}\n".encode("gbk")
    )
    (problem,) = validate_home(tmp_path, registry, environ=NO_ENV)
    # GBK 影 (D3 B0) happens to be a valid UTF-8 sequence; 像 (CF F1) is not, so column 15.
    assert (problem.line, problem.column) == (1, 15)
    assert "is not valid UTF-8" in problem.message


def test_utf8_with_chinese_text_and_bom_is_fine(tmp_path: Path, registry: Registry) -> None:
    (tmp_path / "channels").mkdir()
    text = "description: 放射科 ADT 接口\nsource: {url: 'fake://a'}\n"
    (tmp_path / "channels" / "ris.yaml").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    (channel,) = load_channels(tmp_path, registry, environ=NO_ENV)
    assert channel.description == "放射科 ADT 接口"


def test_environment_references(tmp_path: Path, registry: Registry, write: Write) -> None:
    write(
        "channels/a.yaml",
        """\
        description: "costs $$5, literal $${HOME}"
        source: {url: 'fake://${IN_HOST:-0.0.0.0}:${IN_PORT}'}
        destinations:
          - name: d
            url: fake://out
            options: {tls: {ca: '${RIS_CA}'}}
        """,
    )
    assert problems_of(tmp_path, registry) == [
        "channels/a.yaml:2:15: source.url: environment variable IN_PORT is not set"
        " (write ${IN_PORT:-default} to give a default)",
        "channels/a.yaml:6:25: destinations[0].options.tls.ca: environment variable RIS_CA is not set"
        " (write ${RIS_CA:-default} to give a default)",
    ]
    environ = {"IN_PORT": "2575", "RIS_CA": "/etc/ris-ca.pem"}
    (channel,) = load_channels(tmp_path, registry, environ=environ)
    assert channel.description == "costs $$5, literal ${HOME}"
    assert channel.source.url == "fake://0.0.0.0:2575"
    assert channel.destinations[0].options == {"tls": {"ca": "/etc/ris-ca.pem"}}


def test_problem_rendering() -> None:
    assert str(Problem(file="a.yaml", message="m")) == "a.yaml: m"
    assert str(Problem(file="a.yaml", line=3, path="x.y", message="m")) == "a.yaml:3: x.y: m"
    assert str(Problem(file="a.yaml", line=3, column=2, path="x", message="m")) == "a.yaml:3:2: x: m"
    error = ConfigError([Problem(file="a", message="one"), Problem(file="b", message="two")])
    assert str(error) == "a: one\nb: two"


def test_filter_expressions_are_parsed_at_load(tmp_path: Path, registry: Registry, write: Write) -> None:
    write(
        "channels/a.yaml",
        """\
        source: {url: 'fake://a'}
        filter:
          - 'MSH-9.1 == "ADT"'
          - 'MSH-9.2 = "A01"'
        destinations:
          - {name: d, url: 'fake://b', filter: 'MSH-9.1 == ADT'}
        """,
    )
    problems = validate_home(tmp_path, registry, environ=NO_ENV)
    assert [(p.line, p.path) for p in problems] == [(4, "filter[1]"), (6, "destinations[0].filter")]
    assert "column 9" in problems[0].message
    assert problems[1].message.startswith("bad filter expression 'MSH-9.1 == ADT': ")
