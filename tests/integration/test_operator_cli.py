"""``reidstream query …`` mirrors the operator API, and ``reidstream report`` renders a store, against a
real Redis (in-process through typer's runner, one subprocess for the exit code of a real run)."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from stages import query
from tests.conftest import ROOT, run_cli
from tests.integration.test_operator_api import _small

DEMO = str(ROOT / "configs" / "demo.yaml")


@pytest.fixture
def cli(store):
    port = store.r.connection_pool.connection_kwargs["port"]
    env = {"REIDSTREAM__STORE__URL": f"redis://127.0.0.1:{port}/0", "REIDSTREAM__STORE__NAMESPACE": store.ns}
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [*args, "--config", DEMO], env=env, catch_exceptions=False)

    invoke.env = env
    return invoke


def _error_lines(result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]


def test_query_commands_answer_like_the_api(store, cli):
    gids, _ = _small(store)
    x, y = gids["X"], gids["Y"]
    page = cli("query", "identities", "--format", "json", "--limit", "2", "--page", "2")
    assert page.exit_code == 0, page.stderr
    assert json.loads(page.stdout) == query.identities(store, offset=2, limit=2)["items"]
    assert "page 2 of 2 (3 identities)" in page.stderr
    filtered = cli("query", "identities", "--format", "json", "--camera", "lobby", "--since", "2", "--until", "5")
    assert [i["global_id"] for i in json.loads(filtered.stdout)] == [y]
    assert json.loads(cli("query", "identities", "--format", "json", "--min-cameras", "2").stdout)[0]["global_id"] == x
    timeline = cli("query", "timeline", x, "--format", "json")
    assert json.loads(timeline.stdout) == query.timeline(store, x, 0, 1000)
    table = cli("query", "timeline", x)
    assert table.exit_code == 0 and "x2" in table.stdout and "timeline of" in table.stdout
    sightings = cli("query", "sightings", "left", "--since", "5", "--format", "json")
    assert [s["tracklet_id"] for s in json.loads(sightings.stdout)["items"]] == ["x3", "z1"]
    crops = cli("query", "crops", x, "--format", "json")
    assert list(json.loads(crops.stdout)["cameras"]) == ["left"]
    found = cli("query", "search", "--tracklet", "x1", "--k", "2", "--format", "json")
    assert found.exit_code == 0, found.stderr
    assert [r["global_id"] for r in json.loads(found.stdout)["results"]][0] == x
    assert len(json.loads(found.stdout)["results"]) == 2
    links = cli("query", "links", "--format", "json", "--limit", "4", "--page", "2")
    assert [lk["tracklet_id"] for lk in json.loads(links.stdout)] == \
        [lk["tracklet_id"] for lk in query.links(store, offset=4, limit=4)["items"]]


def test_table_output_of_every_command(store, cli, tmp_path):
    gids, _ = _small(store)
    x = gids["X"]
    for args, needle in ((("query", "identities", "--limit", "2"), "page 1 of 2"),
                         (("query", "sightings", "left"), "x3"),
                         (("query", "crops", x, "--save-dir", str(tmp_path / "crops")), "wrote 2 crop(s)"),
                         (("query", "search", "--tracklet", "x1"), "identities most like x1 (cosine)"),
                         (("query", "merge", x, "--from", gids["Z"], "--operator", "dan"), "merged 1 tracklet(s)"),
                         (("query", "constraints",), "must"),
                         (("query", "links", "--limit", "2"), "next: --page 2")):
        result = cli(*args)
        assert result.exit_code == 0, (args, result.stderr)
        assert needle in result.stdout + result.stderr, (args, result.stdout)
    assert (tmp_path / "crops" / "left" / "x1.jpg").read_bytes().startswith(b"\xff\xd8")


def test_merge_split_and_constraints_commands(store, cli):
    gids, _ = _small(store)
    x, y, z = gids["X"], gids["Y"], gids["Z"]
    merged = cli("query", "merge", x, "--from", y, "--operator", "carol", "--reason", "same bag", "--format", "json")
    assert merged.exit_code == 0, merged.stderr
    assert json.loads(merged.stdout)["moved"] == ["y1", "y2"] and store.link("y2").global_id == x
    split = cli("query", "split", x, "--tracklet", "y2", "--operator", "carol")
    assert split.exit_code == 0, split.stderr
    new = store.link("y2").global_id
    assert new not in (x, y, z) and f"into {new}" in split.stdout
    (m, s) = store.audit()
    assert (m["kind"], m["operator"], m["note"], s["kind"], s["into"]) == ("merge", "carol", "same bag", "split", [new])
    rows = json.loads(cli("query", "constraints", "--format", "json").stdout)
    # b of the cannot-link: what is left of X, by start
    assert [(r["kind"], r["b"]) for r in rows] == [("must", ["y1", "y2"]), ("cannot", ["x1", "y1", "x2", "x3"])]


@pytest.mark.parametrize("args, needle", [
    (("query", "timeline", "G999999"), "is unknown"),
    (("query", "crops", "G999999"), "is unknown"),
    (("query", "sightings", "nowhere"), "no sightings"),
    (("query", "sightings", "left", "--since", "9", "--until", "1"), "after"),
    (("query", "search"), "--crop"),
    (("query", "search", "--tracklet", "nope"), "not linked"),
    (("query", "search", "--tracklet", "x1", "--k", "0"), "--k"),
    (("query", "merge", "@X", "--from", "@X", "--operator", "o"), "itself"),
    (("query", "merge", "@X", "--from", "G999999", "--operator", "o"), "unknown"),
    (("query", "split", "@X", "--tracklet", "y1", "--operator", "o"), "not members"),
    (("query", "identities", "--since", "9", "--until", "1"), "after"),
])
def test_bad_input_is_one_error_line(store, cli, args, needle):
    gids, _ = _small(store)
    result = cli(*[gids["X"] if a == "@X" else a for a in args])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = _error_lines(result)
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_search_command_with_crops_file_errors(store, cli, tmp_path):
    _small(store)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    result = cli("query", "search", "--crop", str(bad))
    assert result.exit_code == 1 and "not a decodable image" in _error_lines(result)[0]
    missing = cli("query", "search", "--crop", str(tmp_path / "missing.jpg"))
    assert missing.exit_code == 1 and len(_error_lines(missing)) == 1


class _Sections(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sections, self.timelines, self.bars = [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "section" and "identity" in classes:
            self.sections.append(a["data-global-id"])
        elif "timeline" in classes:
            self.timelines.append(a["data-global-id"])
        elif "bar" in classes:
            self.bars += 1


def test_report_command_renders_the_store_with_limits(store, cli, tmp_path):
    gids, _ = _small(store)
    out = tmp_path / "r" / "report.html"
    result = cli("report", "--output", str(out), "--limit", "2", "--max-tracklets", "2")
    assert result.exit_code == 0, result.stderr
    page = out.read_text()
    parsed = _Sections()
    parsed.feed(page)
    assert sorted(parsed.sections) == sorted([gids["Y"], gids["Z"]])  # the 2 most recently first seen
    assert sorted(parsed.timelines) == sorted(parsed.sections) and parsed.bars == 3  # y1, y2, z1
    assert "the 2 with the most recent first sighting of 3" in page
    everything = tmp_path / "all.html"
    assert cli("report", "--output", str(everything), "--max-tracklets", "2").exit_code == 0
    full = everything.read_text()
    assert "3 tracklets (2 shown)" in full and "Showing all identities" in full
    # a real process, as an operator runs it
    proc = run_cli("report", "--output", str(tmp_path / "p.html"), "--config", DEMO, env=cli.env, timeout=60)
    assert proc.returncode == 0 and (tmp_path / "p.html").stat().st_size > 1000, proc.stderr
