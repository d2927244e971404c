"""Pipeline benchmark: prints one JSON object.

Measures, on this machine and over the same frames of each configured camera:

* ``cameras.<name>.worker_fps``: frames/s of the camera worker. That is ingest (OpenCV decode + ROI),
  Ultralytics YOLO + tracker, tracklet cutting (crop, resize, JPEG) and record encoding, publishing to
  a real Kafka broker.
* ``cameras.<name>.plain_track_fps``: frames/s of plain Ultralytics ``model.track`` on the same
  (pre-decoded) ROI frames with the same weights, size, classes and tracker; ``ratio`` is the first
  over the second (target >= 0.9).
* ``reid``: tracklets/s of the configured re-id network and engine on the tracklets the workers cut,
  in batches of ``reid.batch.max_tracklets``.
* ``e2e``: the whole pipeline as ``reidstream demo`` runs it (separate processes, Kafka, Redis). The
  latency is wall-clock seconds from a tracklet being closed by its worker to its link being stored in
  Redis (p50, p95).

Both detector runs use one torch thread, as each camera process of the demo does; the run order is
plain, worker, plain, worker and the best of each pair is kept, so warm-up and caches favour neither.

Usage: ``python bench/pipeline.py [--config configs/demo.yaml] [--frames 200] [--start 0] [--skip-e2e]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _plain_track_fps(cam, frames: list[np.ndarray]) -> float:
    from ultralytics import YOLO

    from pipeline.config import resolve_asset

    model = YOLO(str(resolve_asset(cam.detector.weights)), task="detect")
    model.track(frames[0], persist=True, tracker=f"{cam.tracker.type}.yaml", classes=cam.detector.classes,
                conf=cam.detector.conf, iou=cam.detector.iou, imgsz=cam.detector.imgsz, verbose=False)  # warm-up
    model.predictor.trackers[0].reset()
    t = time.perf_counter()
    for f in frames:
        model.track(f, persist=True, tracker=f"{cam.tracker.type}.yaml", classes=cam.detector.classes,
                    conf=cam.detector.conf, iou=cam.detector.iou, imgsz=cam.detector.imgsz, verbose=False)
    return len(frames) / (time.perf_counter() - t)


def _worker_fps(cam, bus, records: list, warm_frame: np.ndarray) -> float:
    from pipeline.bus import make_producer
    from pipeline.messages import decode
    from stages.camera import CameraWorker
    from stages.ingest import Frame

    producer = make_producer(bus, "bench")
    sent = []

    def publish(topic: str, key: str, value: bytes, _tracklet_id: str = "") -> None:
        producer.send(topic, key=key.encode("utf-8"), value=value)
        sent.append(value)

    worker = CameraWorker(cam, bus.topics.tracklets, publish)
    worker.setup()
    worker.detector.process(Frame(cam.name, 0, 0.0, warm_frame, (0, 0), (1, 1)))  # warm-up, same settings
    worker.detector.model.predictor.trackers[0].reset()
    t = time.perf_counter()
    summary = worker.process()
    producer.flush()
    seconds = time.perf_counter() - t
    worker.close()
    producer.close()
    records[:] = [decode(v) for v in sent]
    return summary.frames / seconds


def _read_frames(cam) -> list[np.ndarray]:
    from stages.ingest import VideoSource

    src = VideoSource.from_config(cam)
    src.setup()
    frames = [f.image for f in src]
    src.close()
    return frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--frames", type=int, default=200, help="Frames per camera.")
    ap.add_argument("--start", type=int, default=0, help="First frame of each camera.")
    ap.add_argument("--skip-e2e", action="store_true", help="Skip the end-to-end latency run.")
    ap.add_argument("--e2e-frames", type=int, default=400, help="Frames per camera of the end-to-end run.")
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch

    from pipeline import services
    from pipeline.bus import ensure_topics
    from pipeline.config import load_config
    from stages.detect_track import configure_ultralytics

    configure_ultralytics(ROOT / ".reidstream")
    torch.set_num_threads(1)
    data_dir = Path(tempfile.mkdtemp(prefix="reidstream-bench-"))
    kport, rport = services.free_port(), services.free_port()
    u = uuid.uuid4().hex[:8]
    overrides = {
        "REIDSTREAM__BUS__BOOTSTRAP_SERVERS": f"127.0.0.1:{kport}", "REIDSTREAM__STORE__URL": f"redis://127.0.0.1:{rport}/0",
        "REIDSTREAM__STORE__NAMESPACE": f"bench-{u}", "REIDSTREAM__SERVICES__DATA_DIR": str(data_dir),
        "REIDSTREAM__SERVICES__KAFKA_PORT": str(kport), "REIDSTREAM__SERVICES__REDIS_PORT": str(rport),
        "REIDSTREAM__METRICS__CAMERA_BASE_PORT": "0", "REIDSTREAM__METRICS__REID_PORT": "0",
        "REIDSTREAM__METRICS__MATCHER_PORT": "0", "REIDSTREAM__DEFAULTS__START_FRAME": str(args.start),
        "REIDSTREAM__DEFAULTS__MAX_FRAMES": str(args.frames),
    }
    os.environ.update(overrides)
    cfg = load_config(args.config)
    services.up(data_dir, kport, rport)
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads_per_detector": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "config": args.config, "frames_per_camera": args.frames, "start_frame": args.start, "cameras": {},
    }
    try:
        ensure_topics(cfg.bus)
        all_records: list = []
        for cam in cfg.cameras:
            frames = _read_frames(cam)
            records: list = []
            plain = [_plain_track_fps(cam, frames)]
            worker = [_worker_fps(cam, cfg.bus, records, frames[0])]
            plain.append(_plain_track_fps(cam, frames))
            worker.append(_worker_fps(cam, cfg.bus, records, frames[0]))
            all_records.extend(records)
            result["cameras"][cam.name] = {
                "frames": len(frames), "worker_fps": round(max(worker), 3), "plain_track_fps": round(max(plain), 3),
                "ratio": round(max(worker) / max(plain), 3), "tracklets": len(records),
                "runs": {"worker_fps": [round(w, 3) for w in worker], "plain_track_fps": [round(p, 3) for p in plain]},
            }

        from stages.reid.stage import ReidStage

        torch.set_num_threads(os.cpu_count() or 1)
        stage = ReidStage.from_config(cfg)
        stage.setup()
        if all_records:
            stage.embed(all_records[: cfg.reid.batch.max_tracklets])  # warm-up
            t = time.perf_counter()
            stage.embed(all_records)
            dt = time.perf_counter() - t
            result["reid"] = {"model": stage.model_name, "engine": cfg.reid.engine.type,
                              "tracklets": len(all_records), "batch": cfg.reid.batch.max_tracklets,
                              "torch_threads": torch.get_num_threads(),
                              "tracklets_per_s": round(len(all_records) / dt, 3),
                              "crops_per_s": round(len(all_records) * cfg.reid.model.seq_len / dt, 2)}
        stage.close()

        if not args.skip_e2e:
            from pipeline.demo import run_demo
            from pipeline.store import IdentityStore

            os.environ["REIDSTREAM__DEFAULTS__MAX_FRAMES"] = str(args.e2e_frames)
            os.environ["REIDSTREAM__BUS__TOPICS__TRACKLETS"] = f"tracklets-e2e-{u}"
            os.environ["REIDSTREAM__BUS__TOPICS__EMBEDDINGS"] = f"embeddings-e2e-{u}"
            cfg = load_config(args.config)
            out = data_dir / "demo"
            t = time.perf_counter()
            demo = run_demo(cfg, Path(args.config), out, fresh=True)
            wall = time.perf_counter() - t
            store = IdentityStore.from_config(cfg.store)
            ids = {lk["tracklet_id"] for lk in demo["links"]}
            lat = np.array([lk.linked_wall_s - lk.closed_wall_s for lk in store.links() if lk.tracklet_id in ids])
            store.close()
            result["e2e"] = {
                "frames_per_camera": args.e2e_frames, "wall_s": round(wall, 1), "tracklets": int(len(lat)),
                "identities": len(demo["identities"]), "cross_camera_identities": demo["cross_camera"],
                "worker_fps": {k: round(v["fps"], 3) for k, v in demo["cameras"].items()},
                "tracklet_close_to_link_s": {"p50": round(float(np.percentile(lat, 50)), 3),
                                             "p95": round(float(np.percentile(lat, 95)), 3),
                                             "max": round(float(lat.max()), 3)} if len(lat) else None,
            }
    finally:
        services.down(data_dir)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
