"""The Grafana dashboard and Prometheus configs of ``deploy/`` against a real Prometheus.

A ``prometheus_client`` server (``pipeline.metrics.serve``) exposes the real reidstream metrics, driven
by a background thread as a two-camera deployment would (cameras ``left`` and ``right``). A real
Prometheus scrapes it every second; then every panel query of ``deploy/grafana/reidstream-dashboard.json``
is run through ``/api/v1/query`` with Grafana's variables substituted, and must succeed and return
finite data carrying the labels its legend uses. ``promtool`` checks ``prometheus.yml`` and
``alerts.yml`` and unit-tests every alert on synthetic series.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram

from pipeline import metrics as m

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD_PATH = DEPLOY / "grafana" / "reidstream-dashboard.json"
PROM_CONFIG_PATH = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_PATH = DEPLOY / "prometheus" / "alerts.yml"
PROVISIONING = DEPLOY / "grafana" / "provisioning"

CAMERAS = ("left", "right")
# Grafana would make $__rate_interval 4 x the 1 s scrape interval here; 15 s spans ~15 samples once the
# fixture has waited for 4 scrapes, so rate() is defined for every series without waiting 15 s.
RATE_INTERVAL = "15s"
# Every Grafana variable a panel may use, and what it becomes here. `camera` takes each of its forms.
_CAMERA_FORMS = {"all": ".*", "multi": "(left|right)", "single": "left"}
_STATIC_VARIABLES = {
    "__rate_interval": RATE_INTERVAL,
    "__interval": "1s",
    "__range": "5m",
    "__range_s": "300",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_dashboard() -> dict:
    return json.loads(DASHBOARD_PATH.read_text(encoding="utf-8"))


def _iter_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        yield from _iter_panels(panel.get("panels", []))  # collapsed rows hold their panels


def _query_panels(dashboard: dict) -> list[dict]:
    return [p for p in _iter_panels(dashboard["panels"]) if p.get("type") != "row"]


def _substitute(expr: str, camera: str) -> str:
    """Replace Grafana variables as Grafana would; an unknown variable fails the test."""
    values = dict(_STATIC_VARIABLES, camera=camera)

    def replace(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            pytest.fail(f"unknown Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def _panel_targets() -> list[pytest.param]:
    params = []
    for panel in _query_panels(_load_dashboard()):
        for target in panel.get("targets", []):
            params.append(pytest.param(panel, target, id=f"{panel['id']}-{panel['title']}-{target['refId']}"))
    return params


# ------------------------------------------------------------------------------------------------
# the live stack: metrics server + driver thread + Prometheus


def _drive_metrics(stop: threading.Event, tick_s: float = 0.2) -> None:
    """Increment every reidstream metric as a 2-camera deployment at ~10 fps would, until ``stop``."""
    rng = random.Random(1234)
    identities = 0
    lag = [("reid", "tracklets", str(p)) for p in range(4)] + [("matcher", "embeddings", "0")]
    for camera in CAMERAS:  # create every labelled child up front, so each series exists from the first scrape
        m.SOURCE_UP.labels("ingest", camera).set(1)
        m.RECONNECTS.labels("ingest", camera)
        m.DROPPED.labels("ingest", camera, "queue_full")
        m.UNDELIVERED.labels("camera", camera)
        m.SOURCE_INCOMPLETE.labels("ingest", camera)
    m.DEAD_LETTERS.labels("reid", "decode_error")
    m.REJECTED.labels("reid", "oversized")
    tick = 0
    while not stop.is_set():
        for camera in CAMERAS:
            m.FRAMES.labels("ingest", camera).inc(2)
            m.STAGE_LATENCY.labels("ingest", camera).observe(rng.uniform(0.001, 0.004))
            m.DETECTIONS.labels("detect_track", camera).inc(rng.randint(4, 12))
            m.STAGE_LATENCY.labels("detect_track", camera).observe(rng.uniform(0.06, 0.22))
            m.TRACKLETS.labels("tracklets", camera, "published").inc()
            m.TRACKLETS.labels("tracklets", camera, "too_short").inc(rng.randint(0, 1))
            m.STAGE_LATENCY.labels("tracklets", camera).observe(rng.uniform(0.0005, 0.002))
            m.EMBEDDINGS.labels("reid", camera).inc()
            m.STAGE_LATENCY.labels("reid", camera).observe(rng.uniform(0.02, 0.08))
            kind = "founded" if rng.random() < 0.3 else "joined"
            identities += kind == "founded"
            m.LINKS.labels("matcher", camera, kind).inc()
            m.LINKS.labels("matcher", camera, "joined" if kind == "founded" else "founded")  # both kinds exist
            m.STAGE_LATENCY.labels("matcher", camera).observe(rng.uniform(0.001, 0.01))
            m.TRACKLET_LINK_LATENCY.labels(camera).observe(rng.uniform(0.3, 4.0))
            if tick % 7 == 0:
                m.RECONNECTS.labels("ingest", camera).inc()
                m.DROPPED.labels("ingest", camera, "queue_full").inc(rng.randint(1, 3))
        m.REID_BATCH_SIZE.labels("reid").observe(rng.choice((1, 2, 2, 4, 4, 8)))
        for key in lag:  # small, bounded lag: a healthy deployment (alerts must stay quiet)
            m.CONSUMER_LAG.labels(*key).set(rng.randint(0, 20))
        m.IDENTITIES.labels("matcher", "default").set(identities)
        m.HOT_IDENTITIES.labels("matcher", "default").set(min(identities, 4096))
        m.MATCH_THRESHOLD.labels("matcher", "default").set(rng.uniform(0.1, 0.3))
        m.REASSOCIATIONS.labels("matcher").inc()
        m.REASSOCIATION_SECONDS.labels("matcher").observe(rng.uniform(0.05, 0.5))
        m.IDENTITY_CHANGES.labels("matcher", "merge").inc(rng.randint(0, 2))
        m.IDENTITY_CHANGES.labels("matcher", "split").inc(rng.randint(0, 1))
        if tick % 10 == 0:
            m.DEAD_LETTERS.labels("reid", "decode_error").inc()
            m.REJECTED.labels("reid", "oversized").inc()
        tick += 1
        stop.wait(tick_s)


@pytest.fixture(scope="module")
def live_prometheus(prometheus_server):
    """Prometheus scraping a driven reidstream metrics endpoint, with enough samples for rate()."""
    from prometheus_client.metrics import MetricWrapperBase

    # The metrics live in the process-wide registry: start from no series, so what earlier tests in
    # this session left (e.g. a closed test camera's source_up = 0) cannot fire the alerts checked here.
    for metric in vars(m).values():
        if isinstance(metric, MetricWrapperBase):
            metric.clear()
    stop = threading.Event()
    driver = threading.Thread(target=_drive_metrics, args=(stop,), name="metrics-driver", daemon=True)
    port = m.serve(_free_port())
    driver.start()
    try:
        prom = prometheus_server([f"127.0.0.1:{port}"], job="reidstream-test", rule_files=[ALERTS_PATH])
        prom.wait_for("up == 1", timeout_s=30)
        # rate() over RATE_INTERVAL needs >= 2 samples of every series; wait for 4 scrapes.
        prom.wait_for(f"min(count_over_time(up[{RATE_INTERVAL}])) >= 4", timeout_s=30)
        yield prom
    finally:
        stop.set()
        driver.join(timeout=5)


# ------------------------------------------------------------------------------------------------
# dashboard structure (no Prometheus needed)


def test_dashboard_structure():
    dashboard = _load_dashboard()
    assert dashboard["schemaVersion"] >= 38
    assert {i["name"] for i in dashboard["__inputs"] if i["pluginId"] == "prometheus"} == {"DS_PROMETHEUS"}
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    camera = variables["camera"]
    camera_query = camera["query"]["query"] if isinstance(camera["query"], dict) else camera["query"]
    assert camera_query == "label_values(reidstream_frames_total, camera)"
    assert camera["datasource"]["uid"] == "${DS_PROMETHEUS}"
    assert camera["includeAll"] and camera["multi"] and camera["allValue"] == ".*"

    panels = _query_panels(dashboard)
    every = list(_iter_panels(dashboard["panels"]))
    assert len({p["id"] for p in every}) == len(every), "panel ids must be unique"
    boxes = []
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        targets = panel["targets"]
        assert targets and all(t["expr"].strip() for t in targets), panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in targets), panel["title"]
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, panel["title"]
        boxes.append((g["x"], g["y"], g["x"] + g["w"], g["y"] + g["h"], panel["title"]))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, f"panels {a[4]!r} and {b[4]!r} overlap"


def test_dashboard_uses_every_reidstream_metric():
    exprs = " ".join(t["expr"] for p in _query_panels(_load_dashboard()) for t in p["targets"])
    names = {
        metric.describe()[0].name
        for metric in vars(m).values()
        if isinstance(metric, Counter | Gauge | Histogram)
    }
    assert len(names) == 22
    unused = sorted(n for n in names if not re.search(rf"\b{n}(_total|_bucket|_sum|_count)?\b", exprs))
    assert not unused, f"metrics without a panel: {unused}"


def test_grafana_provisioning_matches_prometheus_config():
    prom_config = yaml.safe_load(PROM_CONFIG_PATH.read_text())
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "reidstream.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"].startswith("http")
    assert datasource["jsonData"]["timeInterval"] == prom_config["global"]["scrape_interval"] == "5s"
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "reidstream.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_prometheus_config_scrapes_default_ports():
    from pipeline.config import MetricsConfig

    defaults = MetricsConfig()
    config = yaml.safe_load(PROM_CONFIG_PATH.read_text())
    jobs = {j["job_name"]: [t for sc in j["static_configs"] for t in sc["targets"]] for j in config["scrape_configs"]}
    assert jobs["reidstream-camera"] == [
        f"127.0.0.1:{defaults.camera_base_port}",
        f"127.0.0.1:{defaults.camera_base_port + 1}",
    ]
    assert jobs["reidstream-reid"] == [f"127.0.0.1:{defaults.reid_port}"]
    assert jobs["reidstream-matcher"] == [f"127.0.0.1:{defaults.matcher_port}"]
    assert config["rule_files"] == ["alerts.yml"]


# ------------------------------------------------------------------------------------------------
# every panel query against the real Prometheus


@pytest.mark.parametrize(("panel", "target"), _panel_targets())
def test_panel_query_returns_data(live_prometheus, panel, target):
    legend_labels = re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", ""))
    exprs = {form: _substitute(target["expr"], camera) for form, camera in _CAMERA_FORMS.items()}
    for form, expr in exprs.items():
        if form != "all" and expr == exprs["all"]:
            continue  # the query does not use $camera
        result = live_prometheus.query(expr)  # raises on status != success (bad PromQL)
        assert result, f"{panel['title']} {target['refId']} ({form}) returned no data: {expr}"
        values = [float(sample["value"][1]) for sample in result]
        assert any(math.isfinite(v) for v in values), f"{panel['title']} ({form}): only NaN/Inf {values}: {expr}"
        for sample in result:
            missing = [name for name in legend_labels if not sample["metric"].get(name)]
            assert not missing, f"{panel['title']}: legend labels {missing} absent from {sample['metric']}: {expr}"
            if form == "single" and "camera" in sample["metric"]:
                assert sample["metric"]["camera"] == "left", f"$camera filter ignored: {expr}"


def test_camera_variable_lists_cameras(live_prometheus):
    camera = {v["name"]: v for v in _load_dashboard()["templating"]["list"]}["camera"]
    query = camera["query"]["query"] if isinstance(camera["query"], dict) else camera["query"]
    metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()
    values = live_prometheus.api(f"label/{label}/values", **{"match[]": metric})
    assert set(CAMERAS) <= set(values)


def test_alert_rules_evaluate_against_live_metrics(live_prometheus):
    expected = {r["alert"] for g in yaml.safe_load(ALERTS_PATH.read_text())["groups"] for r in g["rules"]}

    deadline = time.monotonic() + 15
    while True:  # rules are evaluated every second; "unknown" until their first evaluation
        rules = [r for g in live_prometheus.api("rules")["groups"] for r in g["rules"]]
        if all(r["health"] != "unknown" for r in rules) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert {r["name"] for r in rules} == expected
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # The driven deployment is healthy: nothing fires or is pending (source up, links flowing, ...)
    # except dead letters, which the driver produces on purpose.
    active = {a["labels"]["alertname"] for a in live_prometheus.api("alerts")["alerts"]}
    assert active <= {"ReidstreamDeadLettersIncreasing"}, active


# ------------------------------------------------------------------------------------------------
# promtool


@pytest.fixture(scope="module")
def promtool():
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    return binary


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def test_promtool_check_config(promtool):
    result = _run(promtool, "check", "config", str(PROM_CONFIG_PATH))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_check_rules(promtool):
    result = _run(promtool, "check", "rules", str(ALERTS_PATH))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout + result.stderr


def _alert(name, labels, summary, description):
    return {
        "exp_labels": labels | {"severity": _severity(name)},
        "exp_annotations": {"summary": summary, "description": description},
    }


def _severity(name: str) -> str:
    for group in yaml.safe_load(ALERTS_PATH.read_text())["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == name:
                return rule["labels"]["severity"]
    raise KeyError(name)


_FIRING_SERIES = [
    {"series": 'up{job="reidstream-reid",instance="127.0.0.1:9401"}', "values": "1 1 0 0 0"},
    {"series": 'up{job="prometheus",instance="127.0.0.1:9090"}', "values": "0 0 0 0 0"},
    {"series": 'reidstream_source_up{job="reidstream-camera",instance="h:9410",stage="ingest",camera="left"}',
     "values": "1 1 0 0 0"},
    {"series": 'reidstream_source_up{job="reidstream-camera",instance="h:9411",stage="ingest",camera="right"}',
     "values": "1 1 1 1 1"},
    {"series": 'reidstream_consumer_lag_messages{stage="reid",topic="tracklets",partition="0"}', "values": "0+40x20"},
    {"series": 'reidstream_consumer_lag_messages{stage="reid",topic="tracklets",partition="1"}', "values": "0+40x20"},
    # large but shrinking: catching up, must not fire
    {"series": 'reidstream_consumer_lag_messages{stage="matcher",topic="embeddings",partition="0"}',
     "values": "5000-100x20"},
    {"series": 'reidstream_dead_letters_total{stage="reid",reason="decode_error"}', "values": "0 0 0 3 3 3"},
    {"series": 'reidstream_dead_letters_total{stage="matcher",reason="bad_record"}', "values": "0x5"},
    {"series": 'reidstream_undelivered_total{stage="camera",camera="left"}', "values": "0 0 0 2 2 2"},
    {"series": 'reidstream_undelivered_total{stage="camera",camera="right"}', "values": "0x5"},
    {"series": 'reidstream_tracklets_total{stage="tracklets",camera="left",outcome="published"}', "values": "0+60x20"},
    {"series": 'reidstream_tracklet_link_latency_seconds_bucket{camera="left",le="60"}', "values": "0x20"},
    {"series": 'reidstream_tracklet_link_latency_seconds_bucket{camera="left",le="120"}', "values": "0+10x20"},
    {"series": 'reidstream_tracklet_link_latency_seconds_bucket{camera="left",le="+Inf"}', "values": "0+10x20"},
    {"series": 'reidstream_tracklet_link_latency_seconds_bucket{camera="right",le="1"}', "values": "0+10x20"},
    {"series": 'reidstream_tracklet_link_latency_seconds_bucket{camera="right",le="+Inf"}', "values": "0+10x20"},
]

_HEALTHY_SERIES = [
    {"series": 'up{job="reidstream-matcher",instance="127.0.0.1:9402"}', "values": "1x20"},
    {"series": 'reidstream_source_up{job="reidstream-camera",instance="h:9410",stage="ingest",camera="left"}',
     "values": "1x20"},
    {"series": 'reidstream_tracklets_total{stage="tracklets",camera="left",outcome="published"}', "values": "0+60x20"},
    {"series": 'reidstream_links_total{stage="matcher",camera="left",kind="joined"}', "values": "0+50x20"},
    {"series": 'reidstream_consumer_lag_messages{stage="reid",topic="tracklets",partition="0"}', "values": "3x20"},
    {"series": 'reidstream_dead_letters_total{stage="reid",reason="decode_error"}', "values": "2x20"},
    {"series": 'reidstream_undelivered_total{stage="camera",camera="left"}', "values": "0x20"},
]


def test_promtool_alert_unit_tests(promtool, tmp_path):
    """Each alert fires on a synthetic failure (with rendered annotations) and stays quiet when healthy."""
    firing = [
        ("4m", "ReidstreamTargetDown", [_alert(
            "ReidstreamTargetDown", {"job": "reidstream-reid", "instance": "127.0.0.1:9401"},
            "reidstream reidstream-reid at 127.0.0.1:9401 is down",
            "Prometheus has not been able to scrape 127.0.0.1:9401 (job reidstream-reid) for more than a minute: "
            "the process is not running or its metrics port is unreachable.")]),
        ("4m", "ReidstreamCameraSourceDown", [_alert(
            "ReidstreamCameraSourceDown", {"job": "reidstream-camera", "instance": "h:9410", "camera": "left"},
            "camera left delivers no frames",
            'reidstream_source_up{camera="left"} has been 0 for more than a minute on h:9410: '
            "the video source is unreachable or ended.")]),
        ("15m", "ReidstreamConsumerLagGrowing", [_alert(
            "ReidstreamConsumerLagGrowing", {"stage": "reid", "topic": "tracklets"},
            "reid falls behind on topic tracklets",
            "Consumer lag of stage reid on tracklets is 1.2k messages and has kept growing for 10 minutes: add re-id "
            "workers (partitions permitting), use a faster backend, or reduce the camera load.")]),
        ("5m", "ReidstreamDeadLettersIncreasing", [_alert(
            "ReidstreamDeadLettersIncreasing", {"stage": "reid", "reason": "decode_error"},
            "reid dead-lettered messages (decode_error)",
            "About 3 messages went to the dead-letter topic from stage reid with reason decode_error in the last "
            "10 minutes; they are not re-identified. Inspect the dead-letter topic and the stage's logs.")]),
        ("5m", "ReidstreamTrackletsUndelivered", [_alert(
            "ReidstreamTrackletsUndelivered", {"camera": "left"},
            "camera left lost tracklets to the broker",
            "About 2 tracklets of camera left were not acknowledged by the Kafka broker after every retry in the "
            "last 10 minutes. Check the broker (a restart of the in-memory Tansu loses its topics) and the camera's "
            "log.")]),
        ("15m", "ReidstreamNoLinks", [_alert(
            "ReidstreamNoLinks", {},
            "tracklets are published but no links are stored",
            "Camera workers published tracklets over the last 15 minutes but the matcher stored no link: check the "
            "re-id and matcher processes, their consumer lag and Redis.")]),
        ("15m", "ReidstreamTrackletLinkLatencyHigh", [_alert(
            "ReidstreamTrackletLinkLatencyHigh", {"camera": "left"},
            "p95 tracklet-to-link latency of camera left above 60 s",
            "95% of the tracklets of camera left take up to 1m 57s from being closed to being linked (threshold 60 s) "
            "for 10 minutes.")]),
    ]
    names = {r["alert"] for g in yaml.safe_load(ALERTS_PATH.read_text())["groups"] for r in g["rules"]}
    assert {name for _, name, _ in firing} == names, "every alert needs a firing case"
    tests = {
        "rule_files": [str(ALERTS_PATH)],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": _FIRING_SERIES,
             "alert_rule_test": [{"eval_time": t, "alertname": n, "exp_alerts": exp} for t, n, exp in firing]},
            {"interval": "1m", "input_series": _HEALTHY_SERIES,
             "alert_rule_test": [{"eval_time": "15m", "alertname": n, "exp_alerts": []} for n in sorted(names)]},
        ],
    }
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = _run(promtool, "test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
