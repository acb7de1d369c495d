"""``ihehub empi import|dedupe|train|review`` against a temporary home with a PIX Manager channel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ihehub.cli import main
from ihehub.config import init_home
from tests.actors.support import OPTIONS
from tests.conftest import free_port


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    init_home(h)
    monkeypatch.setenv("IHEHUB_HOME", str(h))
    (h / "channels" / "pix.yaml").write_text(
        f'source: {{url: "mllp://127.0.0.1:{free_port()}"}}\n'
        f"actor: {{name: pix-manager, options: {json.dumps(OPTIONS)}}}\n", encoding="utf-8")
    return h


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_import_dedupe_review_accept(home: Path, tmp_path: Path) -> None:
    a = tmp_path / "hospa.csv"
    a.write_text("pid,name,birth_date,sex,phone,city\n"
                 "A1,王伟,1980-01-01,M,13800000001,北京\n"
                 "A2,李娜,1990-09-09,F,,上海\n"
                 "A3,单雄信,1975-05-05,M,,\n"
                 "A4,张三,1980-13-45,M,,\n",  # impossible date: reported, the others go in
                 encoding="utf-8")
    r = run("empi", "import", str(a), "--domain", "HOSPA", "--json")
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    assert report["total"] == 4 and sum(report["outcomes"].values()) == 3
    (err,) = report["errors"]
    assert err["line"] == 5 and err["pid"] == "A4" and err["field"]

    # GB18030 file of another hospital, loaded without matching, then batch-matched by dedupe
    b = tmp_path / "hospb.csv"
    b.write_bytes("pid,family,given,birth_date,sex\nB1,王,伟,19800315,M\nB2,李,娜,19900909,F\n".encode("gb18030"))
    r = run("empi", "import", str(b), "-d", "HOSPB", "--encoding", "gb18030", "--no-match")
    assert r.exit_code == 0, r.output
    assert "2 records" in r.stdout
    r = run("empi", "dedupe", "--workers", "2")
    assert r.exit_code == 0 and "review items opened" in r.stdout, r.output

    r = run("empi", "review", "--json")
    items = json.loads(r.stdout)
    pairs = {(i["record"]["value"], i["candidate"]["value"]) for i in items} | {
        (i["candidate"]["value"], i["record"]["value"]) for i in items}
    assert ("B1", "A1") in pairs, items
    item = next(i for i in items if {"B1", "A1"} == {i["record"]["value"], i["candidate"]["value"]})
    r = run("empi", "review")
    assert f"#{item['id']}" in r.stdout and "score" in r.stdout
    r = run("empi", "review", "--accept", str(item["id"]), "--by", "dr-wang")
    assert r.exit_code == 0 and r.stdout.startswith("accepted"), r.output
    r = run("empi", "review", "--accept", str(item["id"]))
    assert r.exit_code == 1 and "review item" in r.output
    r = run("empi", "review", "--state", "accepted", "--json")
    assert [i["decided_by"] for i in json.loads(r.stdout)] == ["dr-wang"]

    r = run("empi", "train", "--sample", "50", "--random-pairs", "200")
    assert r.exit_code == 0 and "trained on" in r.stdout, r.output


def test_bad_files_and_homes_get_clear_errors(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("id,name\n1,x\n", encoding="utf-8")
    r = run("empi", "import", str(bad), "-d", "HOSPA")
    assert r.exit_code == 2 and "pid" in r.output
    gb = tmp_path / "gb.csv"
    gb.write_bytes("pid,name\nA1,王伟\n".encode("gb18030"))
    r = run("empi", "import", str(gb), "-d", "HOSPA")  # read as UTF-8: refused, not garbled
    assert r.exit_code == 2 and "utf-8" in r.output
    ok = tmp_path / "ok.csv"
    ok.write_text("pid,name\nA1,WANG WEI\n", encoding="utf-8")
    r = run("empi", "import", str(ok), "-d", "NOWHERE")
    assert r.exit_code == 2 and "NOWHERE" in r.output
    (home / "channels" / "pix.yaml").unlink()
    r = run("empi", "dedupe")
    assert r.exit_code == 2 and "pix-manager" in r.output


def test_import_streams_the_file_and_refuses_an_undecodable_one_before_loading(home: Path, tmp_path: Path) -> None:
    """A BOM-headed UTF-8 file is read row by row (line numbers in errors stay right); a file with a bad byte
    near its end is refused before any record goes in, not half-way."""
    rows = "".join(f"C{i},陈{'伟芳娜敏静'[i % 5]}{i},1980-01-{1 + i % 28:02d},M\n" for i in range(3000))
    broken = tmp_path / "broken.csv"
    broken.write_bytes("\ufeffpid,name,birth_date,sex\n".encode() + rows.encode() + b"C9,\xff\xfe,1980-01-01,M\n")
    r = run("empi", "import", str(broken), "-d", "HOSPA", "--no-match")
    assert r.exit_code == 2 and "cannot read as utf-8" in r.output
    good = tmp_path / "good.csv"
    good.write_text("\ufeffpid,name,birth_date,sex\n" + rows + "C9,陈九,1980-02-30,M\n", encoding="utf-8")
    r = run("empi", "import", str(good), "-d", "HOSPA", "--no-match", "--json")
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    assert report["total"] == 3001 and sum(report["outcomes"].values()) == 3000  # none was loaded before
    assert report["outcomes"] == {"new": 3000}  # not "updated": the refused file loaded nothing
    (err,) = report["errors"]
    assert (err["line"], err["pid"], err["field"]) == (3002, "C9", "birth_date")
