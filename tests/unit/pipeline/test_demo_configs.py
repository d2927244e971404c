"""``configs/demo-3cams.yaml`` is ``configs/demo.yaml`` with three vertical virtual cameras."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[3]


def test_three_camera_demo_differs_from_the_demo_only_in_cameras_and_namespace() -> None:
    two = load_config(ROOT / "configs" / "demo.yaml", environ={})
    three = load_config(ROOT / "configs" / "demo-3cams.yaml", environ={})
    assert [c.name for c in three.cameras] == ["left", "middle", "right"]
    assert [tuple(c.roi) for c in three.cameras] == [(0, 0, 256, 576), (256, 0, 256, 576), (512, 0, 256, 576)]
    assert three.store.namespace == "demo3" != two.store.namespace
    assert three.metrics == two.metrics
    for a, b in zip(two.cameras, three.cameras):
        assert a.model_dump(exclude={"name", "roi"}) == b.model_dump(exclude={"name", "roi"})
    for section in ("bus", "services", "defaults", "reid", "matcher"):
        assert getattr(three, section) == getattr(two, section), section
    assert three.store.url == two.store.url
