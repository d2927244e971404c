"""Stores filled through the store's own write path (``record_link``), for the operator API tests."""

from __future__ import annotations

import numpy as np

from pipeline.store import IdentityStore, Link

D = 16


def unit(seed: int, d: int = D) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=d).astype(np.float32)
    return v / np.linalg.norm(v)


def near(base: np.ndarray, seed: int, scale: float = 0.1) -> np.ndarray:
    v = base + np.random.default_rng(seed).normal(scale=scale, size=base.shape).astype(np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


def crop_jpeg(bgr: tuple[int, int, int], seed: int = 0, size: tuple[int, int] = (128, 64)) -> bytes:
    """A ``size`` (H, W) BGR 'person crop': a coloured body on a grey background, JPEG-encoded."""
    import cv2

    h, w = size
    image = np.full((h, w, 3), 90, np.uint8)
    top = h // 16 + seed % 5
    cv2.rectangle(image, (w // 6, top), (w - w // 6, h - h // 16), bgr, thickness=-1)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def seed_store(store: IdentityStore, plan: dict[str, list[tuple[str, str, float, float]]],
               vectors: dict[str, np.ndarray], thumbnails: dict[str, bytes] | None = None) -> dict[str, str]:
    """Write ``plan`` (name → [(tracklet id, camera, start_s, end_s)]) as the matcher would: one
    global id per name from ``next_global_id``, tracklets linked in start order, the first one
    founding the identity (score None), the others joining with score 0.9.

    Returns:
        name → global id.
    """
    thumbnails = {} if thumbnails is None else thumbnails
    gids = {}
    for name, rows in plan.items():
        gid = store.next_global_id()
        gids[name] = gid
        cams: set[str] = set()
        first = last = None
        for i, (tid, cam, start, end) in enumerate(sorted(rows, key=lambda r: (r[2], r[0]))):
            cams.add(cam)
            first = start if first is None else min(first, start)
            last = end if last is None else max(last, end)
            link = Link(tid, cam, i + 1, gid, None if i == 0 else 0.9, start, end, [int(start * 10), int(end * 10)],
                        [[0.0, 0.0, 10.0, 20.0], [1.0, 0.0, 11.0, 20.0]], 1.7e9, 1.7e9 + 1)
            if not store.record_link(link, vectors[tid], cams, first, last, thumbnails.get(tid)):
                raise RuntimeError(f"{tid} was linked already")
    return gids
