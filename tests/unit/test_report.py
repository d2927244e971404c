"""Unit tests of :mod:`pipeline.report` (pure HTML generation, no browser)."""

from __future__ import annotations

import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.report import write_report

# Smallest valid JPEG header prefix is enough: the report only sniffs the magic and base64-encodes it.
_FAKE_JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16 + b"\xff\xd9"


def _identity(gid, cameras, tracklets, first, last):
    return {
        "global_id": gid,
        "cameras": sorted(cameras),
        "tracklets": list(tracklets),
        "first_seen_s": first,
        "last_seen_s": last,
        "n_tracklets": len(tracklets),
    }


def _link(tid, camera, gid, score, start, end):
    return {
        "tracklet_id": tid,
        "camera": camera,
        "track_id": 1,
        "global_id": gid,
        "score": score,
        "start_s": start,
        "end_s": end,
        "frames": [0, 1],
        "boxes": [[0.0, 0.0, 10.0, 20.0], [1.0, 1.0, 11.0, 21.0]],
    }


class _Collector(HTMLParser):
    """Collects start tags with their attributes, and the document's text."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path):
    parser = _Collector()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def test_identity_id_with_script_is_escaped(tmp_path):
    evil = '<script>alert("x")</script>'
    identities = [_identity(evil, ["left"], ["t<1>"], 1.0, 2.0)]
    links = [_link("t<1>", "cam&<b>", evil, None, 1.0, 2.0)]
    out = write_report(tmp_path / "r.html", identities, links, {}, title="<i>title</i>")
    page = out.read_text(encoding="utf-8")

    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<b>" not in page and "cam&amp;&lt;b&gt;" in page
    assert "<i>" not in page and "&lt;i&gt;title&lt;/i&gt;" in page
    parsed = _parse(out)
    # The parsed attribute round-trips to the original text, i.e. it was escaped, not truncated.
    sections = [a for t, a in parsed.tags if t == "section"]
    assert [s["data-global-id"] for s in sections] == [evil]
    assert not any(t == "script" for t, _ in parsed.tags)


def test_order_rows_captions_and_summary(tmp_path):
    identities = [
        _identity("g-late-single", ["left"], ["l1"], 50.0, 55.0),
        _identity("g-early-single", ["right"], ["r9"], 2.0, 3.0),
        _identity("g-two-cams", ["left", "right"], ["l2", "r1", "l3"], 10.0, 40.0),
    ]
    links = [
        _link("l1", "left", "g-late-single", None, 50.0, 55.0),
        _link("r9", "right", "g-early-single", None, 2.0, 3.0),
        _link("l3", "left", "g-two-cams", 0.91234, 30.0, 40.0),
        _link("l2", "left", "g-two-cams", None, 10.0, 12.5),
        _link("r1", "right", "g-two-cams", 0.8, 20.0, 25.0),
    ]
    out = write_report(tmp_path / "sub" / "r.html", identities, links, {"l2": _FAKE_JPEG})
    parsed = _parse(out)

    sections = [a["data-global-id"] for t, a in parsed.tags if t == "section"]
    assert sections == ["g-two-cams", "g-early-single", "g-late-single"]
    rows = [a["data-camera"] for t, a in parsed.tags if t == "div" and "camera-row" in a.get("class", "")]
    assert rows == ["left", "right", "right", "left"]
    figures = [a["data-tracklet-id"] for t, a in parsed.tags if t == "figure"]
    assert figures == ["l2", "l3", "r1", "r9", "l1"]  # within a row: by start_s

    text = "".join(parsed.text)
    assert "30.0–40.0 s" in text and "score 0.912" in text and "founded" in text
    assert "3 tracklets" in text
    page = out.read_text(encoding="utf-8")
    assert re.search(r'id="n-identities">3<', page)
    assert re.search(r'id="n-tracklets">5<', page)
    assert re.search(r'id="n-multi-camera">1<', page)

    imgs = [a["src"] for t, a in parsed.tags if t == "img"]
    assert len(imgs) == 1 and imgs[0].startswith("data:image/jpeg;base64,/9j/")
    assert page.count('class="placeholder"') == 4  # the four tracklets without a thumbnail


def test_no_external_urls(tmp_path):
    identities = [_identity("g1", ["left"], ["a"], 0.0, 1.0)]
    links = [_link("a", "left", "g1", None, 0.0, 1.0)]
    page = write_report(tmp_path / "r.html", identities, links, {"a": _FAKE_JPEG}).read_text(encoding="utf-8")
    assert not re.search(r"(?:https?:)?//", page.replace("data:image/jpeg;base64,", ""))
    assert "<link" not in page and "@import" not in page


def test_non_image_thumbnail_gets_placeholder(tmp_path):
    identities = [_identity("g1", ["left"], ["a"], 0.0, 1.0)]
    links = [_link("a", "left", "g1", None, 0.0, 1.0)]
    page = write_report(tmp_path / "r.html", identities, links, {"a": b"GIF89a..."}).read_text(encoding="utf-8")
    assert "<img" not in page and 'class="placeholder"' in page


@pytest.mark.parametrize(
    ("identities", "links", "match"),
    [
        ([{"cameras": [], "tracklets": [], "first_seen_s": 0, "last_seen_s": 0}], [], "identities\\[0\\].*global_id"),
        ([_identity("g", ["a"], ["t"], 0, 1)], [{"tracklet_id": "t"}], "links\\[0\\].*camera"),
        ([_identity("g", ["a"], ["t"], "soon", 1)], [], "first_seen_s"),
        ([_identity("g", ["a"], [], 0, 1), _identity("g", ["b"], [], 0, 1)], [], "duplicate"),
    ],
)
def test_invalid_input_raises_value_error(tmp_path, identities, links, match):
    with pytest.raises(ValueError, match=match):
        write_report(tmp_path / "r.html", identities, links, {})


def test_import_does_not_import_torch_or_cv2():
    code = "import sys, pipeline.report; print(sorted(m for m in ('torch', 'cv2') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, check=True, timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.stdout.strip() == "[]"
