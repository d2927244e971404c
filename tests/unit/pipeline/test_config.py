"""Config loading: defaults merged into cameras, env overrides, errors naming file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, parse_config, resolve_asset

ROOT = Path(__file__).resolve().parents[3]

BASE = """\
version: 1
defaults:
  detector:
    imgsz: 416
    conf: 0.4
cameras:
  - name: left
    source: a.avi
    roi: [0, 0, 10, 10]
  - name: right
    source: b.avi
    detector:
      conf: 0.6
"""


def test_demo_config_loads():
    cfg = load_config(ROOT / "configs" / "demo.yaml", environ={})
    assert [c.name for c in cfg.cameras] == ["left", "right"]
    assert cfg.cameras[0].roi == (0, 0, 384, 576)
    assert cfg.reid.model.type == "part_pool"  # the zero-shot default (docs/IDENTITIES.md)
    assert cfg.matcher.reassociation.enabled


def test_defaults_merge_key_by_key_and_camera_wins():
    cfg = parse_config(BASE, "x.yaml", environ={})
    left, right = cfg.cameras
    assert (left.detector.imgsz, left.detector.conf) == (416, 0.4)
    assert (right.detector.imgsz, right.detector.conf) == (416, 0.6)  # imgsz from defaults, conf its own
    assert right.detector.weights == left.detector.weights  # untouched keys keep model defaults


def test_env_overrides_nested_keys():
    env = {"REIDSTREAM__MATCHER__THRESHOLD": "0.9", "REIDSTREAM__DEFAULTS__MAX_FRAMES": "12",
           "REIDSTREAM__BUS__BOOTSTRAP_SERVERS": "kafka:9092", "OTHER": "ignored"}
    cfg = parse_config(BASE, "x.yaml", environ=env)
    assert cfg.matcher.threshold == 0.9
    assert cfg.bus.bootstrap_servers == "kafka:9092"
    assert [c.max_frames for c in cfg.cameras] == [12, 12]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (BASE.replace("    conf: 0.4\n", "    conf: 0.4\n    confidence: 1\n"), ["x.yaml:6:", "confidence", "unknown key"]),
        (BASE.replace("roi: [0, 0, 10, 10]", "roi: [0, 0, -1, 10]"), ["x.yaml:9:", "cameras.0.roi"]),
        (BASE.replace("conf: 0.6", "conf: high"), ["x.yaml:13:", "cameras.1.detector.conf"]),
        (BASE.replace("    source: b.avi\n", ""), ["cameras.1.source", "required"]),
        ("matcher:\n  threshold: 2\n", ["x.yaml:2:", "matcher.threshold"]),
        ("matcher:\n  index:\n    search_threads: -1\n", ["x.yaml:3:", "matcher.index.search_threads"]),
        ("matcher:\n  index:\n    hot_max: 0\n", ["x.yaml:3:", "matcher.index.hot_max"]),
        ("bus: [1, 2\n", ["x.yaml", "invalid YAML"]),
        ("- 1\n- 2\n", ["x.yaml:1:", "mapping"]),
        (BASE + "  - name: left\n    source: c.avi\n", ["unique", "left"]),
    ],
)
def test_invalid_config_names_file_line_and_key(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.yaml", environ={})
    for part in expected:
        assert part in str(info.value)


def test_a_matcher_may_search_on_its_own_thread():
    cfg = parse_config("matcher:\n  index:\n    search_threads: 0\n", "x.yaml", environ={})
    assert cfg.matcher.index.search_threads == 0  # 0 is a setting (no search thread), not "unset"


def test_the_hot_tier_cap_reaches_the_matcher():
    from stages.matcher.matcher import CrossCameraMatcher

    cfg = parse_config("matcher:\n  index:\n    hot_max: 512\n", "x.yaml", environ={})
    assert cfg.matcher.index.hot_max == 512
    assert CrossCameraMatcher.from_config(cfg, store=object()).gallery.settings.hot_max == 512  # type: ignore[arg-type]


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_camera_lists_names():
    cfg = parse_config(BASE, "x.yaml", environ={})
    with pytest.raises(ConfigError, match=r"\['left', 'right'\]"):
        cfg.camera("middle")


def test_metrics_ports_per_camera():
    cfg = parse_config(BASE.replace("    source: b.avi\n", "    source: b.avi\n    metrics_port: 9999\n"), "x", environ={})
    assert cfg.camera_metrics_port("left") == cfg.metrics.camera_base_port
    assert cfg.camera_metrics_port("right") == 9999


def test_config_is_frozen():
    cfg = parse_config(BASE, "x.yaml", environ={})
    with pytest.raises(Exception):
        cfg.matcher.threshold = 0.1  # type: ignore[misc]


def test_resolve_asset_from_installed_package_and_errors(tmp_path):
    path = resolve_asset("package://fall_detection/models/best.pt")
    assert path.is_file() and path.stat().st_size > 1_000_000
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_asset("package://no_such_pkg_xyz/a.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_asset(str(tmp_path / "missing.pt"))


ZONED = """\
version: 1
cameras:
  - {name: gate, source: a.avi}
  - {name: lobby, source: b.avi}
  - {name: dock, source: c.avi}
zones:
  - name: north
    cameras: [gate, lobby]
  - name: south
    cameras: [dock]
"""


def test_zones_map_cameras_and_default_the_rest():
    cfg = parse_config(ZONED, "z.yaml", environ={})
    assert [cfg.zone_of(c) for c in ("gate", "lobby", "dock", "unlisted")] == ["north", "north", "south", "default"]
    assert cfg.camera_zones() == {"gate": "north", "lobby": "north", "dock": "south"}
    assert parse_config(BASE, "x.yaml", environ={}).zone_of("left") == "default"  # no zones: one zone


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (ZONED.replace("cameras: [dock]", "cameras: [dock, gate]"),
         ["z.yaml:10:", "zones.1.cameras.1:", "'gate' is in two zones", "'north' (zones.0.cameras.0)"]),
        (ZONED.replace("cameras: [dock]", "cameras: [dokc]"),
         ["z.yaml:10:", "zones.1.cameras.0:", "unknown camera 'dokc'", "'gate', 'lobby', 'dock'"]),
        (ZONED.replace("name: south", "name: north"), ["z.yaml:9:", "zones.1.name:", "declared twice"]),
        (ZONED.replace("name: south", "name: 'so:uth'"), ["z.yaml:9:", "zones.1.name:", "pattern"]),
        (ZONED + "matcher:\n  topology:\n    - {a: gate, b: dock, min_transit_s: 0, max_transit_s: 5}\n",
         ["z.yaml:13:", "matcher.topology.0:", "different zones"]),
    ],
)
def test_invalid_zones_name_file_line_and_key(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "z.yaml", environ={})
    for part in expected:
        assert part in str(info.value), str(info.value)
