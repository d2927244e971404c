"""``reidstream adapt``: pseudo-identities from the matcher's clustering, training, the outputs the
pipeline loads, on tiny synthetic tracklet folders (random-initialised network, one short epoch)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import parse_config
from stages.reid.training.datasets.tracklets import write_tracklet_folder

torch = pytest.importorskip("torch")

COLOURS = [(0, 0, 230), (0, 230, 0), (230, 0, 0), (0, 230, 230), (230, 230, 0), (230, 0, 230)]


def _site(root, rng):
    """Six people, each seen on camera a then camera b; people 0-2 and 3-5 are in view together
    (cannot-links)."""
    for p, colour in enumerate(COLOURS):
        for c, cam in enumerate("ab"):
            t0 = (p // 3) * 30.0 + c * 12.0 + p * 0.5
            crops = [np.clip(np.array(colour, float) + rng.normal(0, 8, (32, 16, 3)), 0, 255).astype(np.uint8)
                     for _ in range(4)]
            write_tracklet_folder(root, f"{cam}-{p}", cam, p, [int(10 * (t0 + i)) for i in range(4)],
                                  [t0 + i for i in range(4)], [[0, 0, 16, 32]] * 4, crops)


def test_adapt_writes_a_checkpoint_and_calibration_the_pipeline_loads(tmp_path):
    from stages.reid.stage import load_model
    from stages.reid.training.adapt import AdaptConfig, adapt

    _site(tmp_path / "mined", np.random.default_rng(0))
    cfg = parse_config("""
reid: {model: {type: temporal_pool, pretrained: false, seq_len: 2, input_height: 32, input_width: 16}}
matcher: {max_overlap_s: 0.5, threshold: 0.5}
""")
    acfg = AdaptConfig(output_dir=tmp_path / "out", tracklets=tmp_path / "mined", model="temporal_pool",
                       rounds=2, epochs=1, seq_len=2, input_size=(32, 16), p=2, k=2, max_steps_per_epoch=2,
                       model_options={"pretrained": False})
    result = adapt(cfg, acfg)
    assert result.checkpoint.is_file() and result.calibration.is_file()
    assert len(result.rounds) == 2 and all(r["pseudo_identities"] >= 2 for r in result.rounds)
    # pseudo-labelled folders carry the cluster as pid and link the original crops
    data = tmp_path / "out" / "round0" / "data"
    metas = [json.loads((d / "meta.json").read_text()) for d in sorted(data.iterdir())]
    assert metas and all("pid" in m for m in metas)
    assert (data / metas[0]["tracklet_id"] / "000.jpg").is_symlink()
    overrides = json.loads((tmp_path / "out" / "overrides.json").read_text())
    assert overrides["REIDSTREAM__REID__MODEL__CHECKPOINT"] == str(result.checkpoint)
    served = parse_config("reid: {model: {type: temporal_pool, pretrained: false}}", environ=overrides)
    model, desc = load_model(served.reid)   # the checkpoint fits the served config (T, size, network)
    assert "temporal_pool" in desc and served.matcher.calibration == result.calibration


def test_adapt_config_is_validated(tmp_path):
    from stages.reid.training.adapt import AdaptConfig

    with pytest.raises(ValueError, match="min_cluster"):
        AdaptConfig(output_dir=tmp_path, min_cluster=1)
    with pytest.raises(ValueError, match="rounds"):
        AdaptConfig(output_dir=tmp_path, rounds=0)
    with pytest.raises(ValueError, match="holdout"):
        AdaptConfig(output_dir=tmp_path, holdout=1.0)


def test_held_out_tracklets_are_neither_clustered_nor_trained_on(tmp_path):
    from stages.reid.training.adapt import AdaptConfig, _held_out
    from stages.reid.training.datasets.tracklets import load_tracklets

    _site(tmp_path / "mined", np.random.default_rng(1))
    acfg = AdaptConfig(output_dir=tmp_path / "out", tracklets=tmp_path / "mined", holdout=0.25)
    held = _held_out(tmp_path / "mined", acfg)
    ds = load_tracklets(tmp_path / "mined", holdout_fraction=0.25, seed=0)
    assert held and held == {p.split("/")[-2] for item in (*ds.query, *ds.gallery) for p in item.paths[:1]}
    assert not held & {p.split("/")[-2] for item in ds.train for p in item.paths[:1]}
