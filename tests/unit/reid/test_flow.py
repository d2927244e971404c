"""Optical-flow channels for RCN (``stages.reid.models.flow``) on synthetic crops."""

from __future__ import annotations

import numpy as np
import pytest

from stages.reid.models.flow import FLOW_SCALE, append_flow, clip_flow


def _textured(h: int = 64, w: int = 32, seed: int = 0) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (h // 4, w // 4, 3), dtype=np.uint8)
    return cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)  # smooth texture that flow can track


def _shifted(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    return np.roll(np.roll(image, dy, axis=0), dx, axis=1)


@pytest.mark.parametrize("method", ["farneback", "dis"])
def test_flow_recovers_a_known_shift(method: str) -> None:
    base = _textured()
    frames = [base, _shifted(base, 2, 1), _shifted(base, 4, 2)]
    flow = clip_flow(frames, method)
    assert flow.dtype == np.float32 and flow.shape == (3, 2, 64, 32)
    inner = flow[:, :, 16:48, 8:24]  # away from the wrapped borders
    assert np.median(inner[0, 0]) * FLOW_SCALE == pytest.approx(2.0, abs=0.5)
    assert np.median(inner[0, 1]) * FLOW_SCALE == pytest.approx(1.0, abs=0.5)
    np.testing.assert_array_equal(flow[2], flow[1])  # the last frame repeats the previous flow


def test_flow_of_static_and_single_frames_is_zero() -> None:
    base = _textured()
    still = np.abs(clip_flow([base, base.copy()], "farneback")) * FLOW_SCALE  # pixels
    assert np.median(still) < 0.01 and still.max() < 0.5
    np.testing.assert_array_equal(clip_flow([base], "dis"), np.zeros((1, 2, 64, 32), np.float32))


def test_append_flow_builds_five_channels() -> None:
    base = _textured()
    frames = [base, _shifted(base, 1, 0)]
    clip = np.random.default_rng(1).standard_normal((2, 3, 64, 32)).astype(np.float32)
    out = append_flow(clip, frames, "dis")
    assert out.shape == (2, 5, 64, 32) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:, :3], clip)
    with pytest.raises(ValueError, match="matching"):
        append_flow(clip[:1], frames, "dis")


@pytest.mark.parametrize("bad", [[], [np.zeros((4, 4), np.uint8)], [np.zeros((4, 4, 3), np.float32)]])
def test_flow_rejects_bad_frames(bad: list) -> None:
    with pytest.raises(ValueError, match="uint8"):
        clip_flow(bad)


def test_flow_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="farneback, dis"):
        clip_flow([_textured()], "horn_schunck")


def test_dataset_appends_flow_channels(tmp_path) -> None:
    import cv2

    from stages.reid.training.datasets import TrackletItem
    from stages.reid.training.sampling import TrackletDataset

    base = _textured()
    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), _shifted(base, 2 * i, 0))  # moves 2 px right per frame
        paths.append(str(path))
    item = TrackletItem(paths=tuple(paths), pid=1, camid=0, tracklet_id="t")
    plain, _, _ = TrackletDataset([item], 4, "evenly", (64, 32))[0]
    clip, _, _ = TrackletDataset([item], 4, "evenly", (64, 32), flow="farneback")[0]
    assert tuple(clip.shape) == (4, 5, 64, 32)
    torch_close = (clip[:, :3] - plain).abs().max().item()
    assert torch_close == 0.0
    assert float(clip[0, 3, 16:48, 8:24].median()) * FLOW_SCALE == pytest.approx(2.0, abs=0.5)
    with pytest.raises(ValueError, match="flow"):
        TrackletDataset([item], 4, "evenly", (64, 32), flow="sparse")


def test_serving_preprocess_flow_is_optional(tmp_path) -> None:
    import cv2

    from stages.reid.stage import preprocess

    base = _textured()
    crops = [cv2.imencode(".png", _shifted(base, 0, i))[1].tobytes() for i in range(3)]  # 1 px down per crop
    rgb = preprocess(crops, 3, (64, 32), (0, 0, 0), (1, 1, 1))
    assert rgb.shape == (3, 3, 64, 32)  # default: unchanged contract
    five = preprocess(crops, 3, (64, 32), (0, 0, 0), (1, 1, 1), flow="dis")
    assert five.shape == (3, 5, 64, 32)
    np.testing.assert_array_equal(five[:, :3], rgb)
    assert np.median(five[0, 4, 16:48, 8:24]) * FLOW_SCALE == pytest.approx(1.0, abs=0.5)
