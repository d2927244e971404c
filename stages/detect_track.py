"""Detect and track people: Ultralytics YOLO with an Ultralytics ByteTrack / BoT-SORT tracker.

Each camera owns its detector-tracker (one per worker process), so track ids of different cameras
never interfere. Ultralytics runs offline: ``YOLO_OFFLINE=1``, ``YOLO_AUTOINSTALL=0`` and a
project-local ``YOLO_CONFIG_DIR`` are set before it is imported, and weights are local files only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from pipeline.config import CameraConfig, resolve_asset
from stages.ingest import Frame

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class TrackedDetections:
    """People found and tracked in one frame.

    Attributes:
        boxes: ``float32 [N, 4]`` ``[x1, y1, x2, y2]`` in **source-video** pixels.
        roi_boxes: ``float32 [N, 4]`` the same boxes in the frame's (ROI) pixels.
        track_ids: ``int64 [N]`` tracker ids (unique within the camera's session).
        scores: ``float32 [N]`` detection confidences in [0, 1].
        classes: ``int64 [N]`` detector class indices.
    """

    boxes: np.ndarray
    roi_boxes: np.ndarray
    track_ids: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.track_ids)
        for name in ("boxes", "roi_boxes"):
            arr = getattr(self, name)
            if arr.shape != (n, 4):
                raise ValueError(f"TrackedDetections.{name} must be [{n}, 4], got {arr.shape}")
        if self.scores.shape != (n,) or self.classes.shape != (n,):
            raise ValueError("TrackedDetections.scores/classes must be [N]")

    def __len__(self) -> int:
        return len(self.track_ids)

    @classmethod
    def empty(cls) -> TrackedDetections:
        z4 = np.zeros((0, 4), np.float32)
        return cls(z4, z4.copy(), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))


def configure_ultralytics(data_dir: Path = Path(".reidstream")) -> None:
    """Set Ultralytics' offline environment (call before importing ultralytics).

    Sets ``YOLO_OFFLINE=1``, ``YOLO_AUTOINSTALL=0`` and ``YOLO_CONFIG_DIR`` under ``data_dir`` unless
    already set, and places a local font where its plotting would otherwise download one.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    cfg_dir = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str((data_dir / "ultralytics").resolve())))
    font = cfg_dir / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        try:
            import matplotlib

            src = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
            font.parent.mkdir(parents=True, exist_ok=True)
            if src.is_file():
                font.write_bytes(src.read_bytes())
        except (ImportError, OSError):
            log.debug("no local font for Ultralytics plotting")


class UltralyticsDetectorTracker:
    """Person detection and tracking for one camera.

    Args:
        camera: Camera id.
        weights: Local weights path or ``package://`` reference (see :func:`pipeline.config.resolve_asset`).
        classes: Detector classes that are people.
        conf: Minimum confidence.
        iou: NMS IoU threshold.
        imgsz: Inference size, pixels.
        device: Torch device string.
        half: FP16 inference.
        tracker: ``bytetrack`` or ``botsort``.
        tracker_config: Path of a tracker YAML (None: the packaged default for ``tracker``).

    Raises:
        FileNotFoundError: From :meth:`setup`, when the weights do not exist.
    """

    def __init__(self, camera: str, weights: str, classes: list[int], conf: float = 0.3, iou: float = 0.7,
                 imgsz: int = 640, device: str = "cpu", half: bool = False, tracker: str = "bytetrack",
                 tracker_config: str | None = None) -> None:
        self.camera = camera
        self.weights = weights
        self.classes = list(classes)
        self.conf = conf
        self.iou = iou
        self.imgsz = imgsz
        self.device = device
        self.half = half
        self.tracker = tracker_config or f"{tracker}.yaml"
        self.model = None

    @classmethod
    def from_config(cls, cam: CameraConfig) -> UltralyticsDetectorTracker:
        d, t = cam.detector, cam.tracker
        return cls(cam.name, d.weights, d.classes, d.conf, d.iou, d.imgsz, d.device, d.half, t.type, t.config)

    def setup(self) -> None:
        configure_ultralytics()
        from ultralytics import YOLO

        path = resolve_asset(self.weights)
        self.model = YOLO(str(path), task="detect")
        names = getattr(self.model, "names", {})
        log.info("camera %s: detector %s classes %s (people: %s), tracker %s", self.camera, path.name, names,
                 self.classes, self.tracker, extra={"camera": self.camera})

    def process(self, frame: Frame) -> TrackedDetections:
        """Detect and track people in ``frame`` (frames must come in order).

        Returns:
            The tracked detections; detections the tracker has not confirmed (no id) are left out.
        """
        if self.model is None:
            raise RuntimeError("setup() must be called before process()")
        extra = {"half": True} if self.half else {}  # passing half=False makes Ultralytics warn every frame
        result = self.model.track(frame.image, persist=True, tracker=self.tracker, classes=self.classes,
                                  conf=self.conf, iou=self.iou, imgsz=self.imgsz, device=self.device,
                                  verbose=False, **extra)[0]
        boxes = result.boxes
        if boxes is None or boxes.id is None or len(boxes) == 0:
            return TrackedDetections.empty()
        roi = boxes.xyxy.cpu().numpy().astype(np.float32)
        ids = boxes.id.cpu().numpy().astype(np.int64)
        shifted = roi + np.array([frame.offset[0], frame.offset[1]] * 2, np.float32)
        return TrackedDetections(shifted, roi, ids, boxes.conf.cpu().numpy().astype(np.float32),
                                 boxes.cls.cpu().numpy().astype(np.int64))

    def close(self) -> None:
        self.model = None
