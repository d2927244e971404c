"""Association over a fixed set of tracklets: calibration (``reidstream calibrate``) and pseudo-labels.

A :class:`TrackletSet` holds what the matcher's window holds (camera, times, embedding per tracklet),
read either from the identity store (the site's linked tracklets) or from mined tracklet folders
(``reidstream mine``) embedded with the configured re-id model. :func:`calibrate_set` runs the
label-free calibration of :mod:`stages.matcher.calibration` on it, :func:`cluster_set` the
constrained average linkage (the pseudo-identities of ``reidstream adapt``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from pipeline.config import Config
from stages.matcher.association import Rules, associate, cannot_link, cross_camera_mask, score_vectors
from stages.matcher.calibration import Calibration, calibrate

log = logging.getLogger(__name__)

__all__ = ["TrackletSet", "calibrate_set", "cluster_set", "default_calibration_path", "embed_folders", "from_store"]


@dataclasses.dataclass(frozen=True)
class TrackletSet:
    """Tracklets to associate, sorted by (start, id) so results do not depend on input order.

    Attributes:
        ids: ``[N]`` tracklet ids.
        cameras: ``[N]`` camera ids.
        starts: ``float64 [N]`` first sighting, stream seconds.
        ends: ``float64 [N]`` last sighting, stream seconds.
        embeddings: ``float32 [N, D]``.
    """

    ids: tuple[str, ...]
    cameras: tuple[str, ...]
    starts: np.ndarray
    ends: np.ndarray
    embeddings: np.ndarray

    @classmethod
    def build(cls, ids, cameras, starts, ends, embeddings) -> TrackletSet:
        """Sort and validate.

        Raises:
            ValueError: Lengths differ or embeddings are not ``[N, D]``.
        """
        emb = np.asarray(embeddings, np.float32)
        n = len(ids)
        if emb.ndim != 2 or emb.shape[0] != n or not len(cameras) == len(starts) == len(ends) == n:
            raise ValueError(f"{n} ids, {len(cameras)} cameras, {len(starts)} starts, {len(ends)} ends and "
                             f"embeddings of shape {emb.shape} do not describe the same tracklets")
        order = np.lexsort((np.asarray(ids), np.asarray(starts, np.float64))) if n else np.zeros(0, int)
        return cls(tuple(ids[i] for i in order), tuple(cameras[i] for i in order),
                   np.asarray(starts, np.float64)[order], np.asarray(ends, np.float64)[order], emb[order])

    def __len__(self) -> int:
        return len(self.ids)

    def without(self, ids: set[str]) -> TrackletSet:
        """This set less the tracklets in ``ids``."""
        if not ids:
            return self
        keep = [i for i, t in enumerate(self.ids) if t not in ids]
        return TrackletSet(tuple(self.ids[i] for i in keep), tuple(self.cameras[i] for i in keep),
                           self.starts[keep], self.ends[keep], self.embeddings[keep])


def from_store(cfg: Config, zone: str | None = None) -> TrackletSet:
    """The linked tracklets of the configured namespace in one zone (the matcher's window rules).

    Args:
        cfg: The config (store, matcher window, zones).
        zone: A zone of ``cfg.zones``, or None / ``default`` for the cameras in no zone.

    Raises:
        StoreError: Redis is unreachable.
        ValueError: ``zone`` is not a zone of the config.
    """
    from pipeline.config import DEFAULT_ZONE
    from pipeline.store import IdentityStore

    zone = zone or DEFAULT_ZONE
    known = sorted({DEFAULT_ZONE, *(z.name for z in cfg.zones)})
    if zone not in known:
        raise ValueError(f"zone {zone!r} is not in the config's zones (known: {', '.join(known)})")
    store = IdentityStore.from_config(cfg.store)
    store.check()
    try:
        entries = store.for_zone(zone).load_window(None, cfg.matcher.reassociation.max_tracklets)
    finally:
        store.close()
    if entries:
        newest = max(e.end_s for e in entries)
        entries = [e for e in entries if e.end_s >= newest - cfg.matcher.reassociation.window_s]
    return TrackletSet.build([e.tracklet_id for e in entries], [e.camera for e in entries],
                             [e.start_s for e in entries], [e.end_s for e in entries],
                             np.stack([e.embedding for e in entries]) if entries else np.zeros((0, 1), np.float32))


def embed_folders(cfg: Config, root: str | Path, batch: int = 8) -> TrackletSet:
    """Embed mined tracklet folders (``ROOT/<tracklet_id>/meta.json`` + crops) with the configured
    re-id model, as the re-id stage would (same crop sampling and preprocessing).

    Raises:
        FileNotFoundError: ``root`` holds no tracklet folder.
        CheckpointError, WeightsUnavailableError: The model cannot be loaded.
    """
    import torch

    from stages.reid.stage import load_model, preprocess

    root = Path(root)
    folders = sorted(p for p in root.iterdir() if (p / "meta.json").is_file()) if root.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"{root}: no tracklet folders (ROOT/<tracklet_id>/meta.json); run `reidstream mine`")
    model, desc = load_model(cfg.reid)
    m = cfg.reid.model
    metas, embs = [], []
    items = []
    for f in folders:
        meta = json.loads((f / "meta.json").read_text())
        crops = [(f / f"{i:03d}.jpg").read_bytes() for i in range(len(meta["frames"]))]
        items.append((meta, crops))
    with torch.no_grad():
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            x = np.stack([preprocess(c, m.seq_len, (m.input_height, m.input_width), model.mean, model.std)
                          for _, c in chunk])
            embs.append(model(torch.from_numpy(x)).numpy())
            metas.extend(meta for meta, _ in chunk)
    log.info("embedded %d tracklets of %s with %s", len(metas), root, desc)
    return TrackletSet.build([mt["tracklet_id"] for mt in metas], [mt["camera"] for mt in metas],
                             [mt["timestamps_s"][0] for mt in metas], [mt["timestamps_s"][-1] for mt in metas],
                             np.concatenate(embs))


def calibrate_set(cfg: Config, ts: TrackletSet, source: str = "") -> Calibration:
    """Label-free calibration of the matcher's threshold on ``ts`` with the config's matcher rules.

    Raises:
        CalibrationError: Too little evidence (see :func:`stages.matcher.calibration.calibrate`).
    """
    rules = Rules.from_config(cfg.matcher)
    cams = list(ts.cameras)
    z, _ = score_vectors(ts.embeddings, rules)
    cannot = cannot_link(cams, ts.starts, ts.ends, rules.max_overlap_s, rules.reentry, rules.topology)
    return calibrate((z @ z.T).astype(np.float64), cannot, cross_camera_mask(cams), source=source,
                     cameras=len(set(cams)), min_negatives=min(cfg.matcher.reassociation.min_negatives, 10))


def cluster_set(cfg: Config, ts: TrackletSet, threshold: float) -> np.ndarray:
    """Identities of ``ts`` by the re-association's rules (appearance, cannot-links, learned hand-off
    gaps): ``int64 [N]`` cluster labels in ``ts`` order."""
    return associate(list(ts.cameras), ts.starts, ts.ends, ts.embeddings, Rules.from_config(cfg.matcher),
                     threshold).labels


def default_calibration_path(cfg: Config, zone: str | None = None) -> Path:
    """Beside the model's checkpoint when there is one, else under ``services.data_dir``; a zone other
    than ``default`` adds ``.<zone>`` to the name."""
    suffix = f".{zone}" if zone and zone != "default" else ""
    ckpt = cfg.reid.model.checkpoint
    if ckpt is not None:
        return Path(ckpt).with_name(Path(ckpt).stem + suffix + ".calibration.json")
    return Path(cfg.services.data_dir) / "calibration" / f"{cfg.store.namespace}{suffix}.json"
