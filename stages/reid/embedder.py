"""Embed a handful of crops as one tracklet, with the re-id stage's model, engine and preprocessing.

Search by example (``POST /search`` with uploaded crops, ``reidstream query search --crop``) turns an
operator's crops into the same kind of embedding the re-id stage publishes for a tracklet: the crops,
in the order given, are sampled to T with :func:`stages.reid.stage.preprocess` and run through the
configured network (:func:`stages.reid.stage.load_model`, :func:`stages.reid.engines.build_engine`).

Importing this module imports neither torch nor OpenCV; :meth:`CropEmbedder.setup` does.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from pipeline.config import ReidConfig

__all__ = ["CropEmbedder"]


class CropEmbedder:
    """One embedding from several crops of one person.

    Args:
        engine: An engine from :mod:`stages.reid.engines` (``setup/infer/close``).
        model_name: Description of the network (e.g. ``part_pool/mobilenet_v2``).
        seq_len: T, crops per clip.
        input_size: ``(height, width)`` pixels of the network input.
        mean: RGB normalisation mean ([0, 1] scale).
        std: RGB normalisation std.
        flow: Optical-flow channels of the network (RCN), or None.

    Example:
        >>> embedder = CropEmbedder.from_config(cfg.reid)  # doctest: +SKIP
        >>> embedder.setup()  # doctest: +SKIP
        >>> vec = embedder.embed([jpeg_a, jpeg_b])  # float32 [D], unit norm  # doctest: +SKIP
    """

    def __init__(self, engine: Any, model_name: str, seq_len: int, input_size: tuple[int, int],
                 mean: tuple[float, ...], std: tuple[float, ...], flow: str | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.seq_len = seq_len
        self.input_size = input_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.flow = flow
        self._lock = threading.Lock()  # one forward pass at a time (API requests run in threads)

    @classmethod
    def from_config(cls, cfg: ReidConfig) -> CropEmbedder:
        """The re-id stage's network and engine for ``cfg`` (``reid`` section of the config).

        Raises:
            CheckpointError, WeightsUnavailableError, EngineError, ValueError: As the re-id stage.
        """
        from stages.reid.engines import build_engine
        from stages.reid.stage import load_model

        model, name = load_model(cfg)
        size = (cfg.model.input_height, cfg.model.input_width)
        engine = build_engine(cfg.engine, model, cfg.model.seq_len, size, 1)
        return cls(engine, name, cfg.model.seq_len, size, model.mean, model.std,
                   flow=getattr(model, "config", {}).get("flow"))

    def setup(self) -> None:
        """Load the engine.

        Raises:
            EngineError: The engine cannot be built.
        """
        self.engine.setup()

    def embed(self, crops: list[bytes]) -> np.ndarray:
        """The embedding of ``crops`` taken as one tracklet.

        Args:
            crops: Encoded images (JPEG or PNG, decoded by OpenCV as BGR), in time order; at least one.

        Returns:
            ``float32 [D]``, L2-normalised.

        Raises:
            ValueError: No crops, a crop is not a decodable image, or the network returned a zero or
                non-finite embedding.
        """
        from stages.reid.stage import preprocess

        if not crops:
            raise ValueError("no crops to embed")
        clip = preprocess(list(crops), self.seq_len, self.input_size, self.mean, self.std, self.flow)
        with self._lock:
            vec = np.asarray(self.engine.infer(clip[None]), np.float64)[0]
        norm = float(np.linalg.norm(vec))
        if not np.all(np.isfinite(vec)) or norm == 0.0:
            raise ValueError("the re-id network returned a zero or non-finite embedding")
        return (vec / norm).astype(np.float32)

    def close(self) -> None:
        self.engine.close()
