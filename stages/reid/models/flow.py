"""Optical-flow input channels for RCN (McLaughlin et al., CVPR 2016, feed colour + optical flow).

The flow of frame ``t`` is the dense flow from crop ``t`` to crop ``t + 1`` of the clip (the last
frame repeats the flow of the one before; a one-frame clip gets zeros), computed with OpenCV on the
grey-level crops at the network input size, in pixels, and divided by :data:`FLOW_SCALE`. Two
methods: ``"farneback"`` (Farnebäck, SCIA 2003; ``cv2.calcOpticalFlowFarneback``) and ``"dis"``
(dense inverse search, Kroeger et al., ECCV 2016; ``cv2.DISOpticalFlow``, preset "fast").

The two channels ``(dx, dy)`` follow the three normalised RGB channels, giving 5-channel frames
``float32 [T, 5, H, W]`` (:func:`append_flow`). This module imports OpenCV and NumPy only.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["FLOW_METHODS", "FLOW_SCALE", "FlowMethod", "append_flow", "clip_flow"]

FlowMethod = Literal["farneback", "dis"]
FLOW_METHODS: tuple[str, ...] = ("farneback", "dis")
FLOW_SCALE = 10.0
"""Pixels of displacement per unit of the flow channels (walking people move a few pixels a crop)."""


def check_flow_method(method: str | None) -> str | None:
    """Return ``method`` if it is None or one of :data:`FLOW_METHODS`.

    Raises:
        ValueError: Otherwise, listing the valid names.
    """
    if method is not None and method not in FLOW_METHODS:
        raise ValueError(f"flow must be None or one of {', '.join(FLOW_METHODS)}, got {method!r}")
    return method


def _pair_flow(prev: np.ndarray, nxt: np.ndarray, method: str, dis: object | None) -> np.ndarray:
    import cv2

    if method == "farneback":
        return cv2.calcOpticalFlowFarneback(prev, nxt, None, pyr_scale=0.5, levels=3, winsize=15,
                                            iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
    return dis.calc(prev, nxt, None)  # type: ignore[union-attr]


def clip_flow(frames_bgr: np.ndarray | list[np.ndarray], method: str = "farneback") -> np.ndarray:
    """Dense optical flow between consecutive crops of a clip.

    Args:
        frames_bgr: ``uint8 [T, H, W, 3]`` crops (BGR, OpenCV order), in time order, all the same size.
        method: ``"farneback"`` or ``"dis"``.

    Returns:
        ``float32 [T, 2, H, W]``: ``(dx, dy)`` of frame ``t`` → ``t + 1`` in pixels / :data:`FLOW_SCALE`
        (x to the right, y down); the last frame repeats frame ``T - 2``'s flow, one frame gives zeros.

    Raises:
        ValueError: Unknown method, or frames that are not ``uint8 [H, W, 3]`` of one size.
    """
    import cv2

    check_flow_method(method)
    frames = [np.asarray(f) for f in frames_bgr]
    if not frames or any(f.dtype != np.uint8 or f.ndim != 3 or f.shape != frames[0].shape or f.shape[2] != 3
                         for f in frames):
        raise ValueError("frames_bgr must be one or more uint8 [H, W, 3] BGR crops of the same size")
    h, w = frames[0].shape[:2]
    out = np.zeros((len(frames), 2, h, w), np.float32)
    if len(frames) < 2:
        return out
    grey = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in frames]
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST) if method == "dis" else None
    for t in range(len(frames) - 1):
        out[t] = _pair_flow(grey[t], grey[t + 1], method, dis).transpose(2, 0, 1) / FLOW_SCALE
    out[-1] = out[-2]
    return out


def append_flow(clip: np.ndarray, frames_bgr: np.ndarray | list[np.ndarray], method: str = "farneback") -> np.ndarray:
    """Append the two flow channels to a normalised RGB clip.

    Args:
        clip: ``float32 [T, 3, H, W]`` normalised RGB clip.
        frames_bgr: The same ``T`` crops as ``uint8 [T, H, W, 3]`` BGR, resized to ``H × W``.
        method: ``"farneback"`` or ``"dis"``.

    Returns:
        ``float32 [T, 5, H, W]``: RGB, then flow ``dx``, ``dy`` (see :func:`clip_flow`).

    Raises:
        ValueError: Shapes that disagree, or an unknown method.
    """
    flow = clip_flow(frames_bgr, method)
    if clip.ndim != 4 or clip.shape[1] != 3 or clip.shape[0] != flow.shape[0] or clip.shape[2:] != flow.shape[2:]:
        raise ValueError(f"clip {clip.shape} must be [T, 3, H, W] matching the crops' flow {flow.shape}")
    return np.concatenate([clip.astype(np.float32, copy=False), flow], axis=1)
