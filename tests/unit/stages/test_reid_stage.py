"""Re-id stage: preprocessing contract, batching, engines and checkpoint checks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.config import EngineConfig
from pipeline.messages import EmbeddingRecord, decode
from stages.reid.stage import ReidStage, preprocess
from tests.unit.pipeline.test_messages import make_tracklet

torch = pytest.importorskip("torch")


def jpeg(bgr) -> bytes:
    img = np.zeros((64, 32, 3), np.uint8)
    img[:] = bgr
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()


def test_preprocess_is_rgb_normalised_and_resized():
    crops = [jpeg((0, 0, 255)), jpeg((255, 0, 0))]  # BGR: red, then blue
    x = preprocess(crops, 4, (32, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert x.shape == (4, 3, 32, 16) and x.dtype == np.float32
    assert x[0, 0].mean() == pytest.approx(1.0, abs=0.03)   # red → R channel (index 0) high
    assert x[0, 2].mean() == pytest.approx(-1.0, abs=0.03)
    assert x[3, 2].mean() == pytest.approx(1.0, abs=0.03)   # blue → B channel (index 2) high


def test_preprocess_picks_crops_evenly_like_evaluation():
    crops = [jpeg((0, 0, i * 30)) for i in range(8)]  # red level encodes the crop index
    x = preprocess(crops, 4, (32, 16), mean=(0, 0, 0), std=(1, 1, 1))
    picked = np.rint(x[:, 0].mean(axis=(1, 2)) * 255 / 30).astype(int).tolist()
    assert picked == [0, 2, 5, 7]


def test_preprocess_rejects_garbage():
    with pytest.raises(ValueError, match="decodable"):
        preprocess([b"nope"], 2, (32, 16), (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="num_frames"):
        preprocess([], 2, (32, 16), (0, 0, 0), (1, 1, 1))


class FakeEngine:
    def __init__(self):
        self.batches = []

    def setup(self):
        pass

    def infer(self, clips):
        self.batches.append(clips.shape)
        v = clips.reshape(len(clips), -1)[:, :3].astype(np.float32) + 2.0
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def close(self):
        pass


def test_stage_batches_and_publishes_one_embedding_per_tracklet():
    engine = FakeEngine()
    stage = ReidStage(engine, "fake", 4, (32, 16), (0.5,) * 3, (0.5,) * 3, "emb", max_batch=2)
    recs = [make_tracklet(tracklet_id=f"t{i}", crops_jpeg=[jpeg((i * 40, 0, 0))] * 2) for i in range(5)]
    outs = stage.process(recs)
    assert [b[0] for b in engine.batches] == [2, 2, 1]
    assert engine.batches[0][1:] == (4, 3, 32, 16)
    assert [o.topic for o in outs] == ["emb"] * 5 and [o.key for o in outs] == ["default"] * 5
    embs = [decode(o.value, EmbeddingRecord) for o in outs]
    assert [e.tracklet_id for e in embs] == [f"t{i}" for i in range(5)]
    assert all(abs(np.linalg.norm(e.vector) - 1) < 1e-5 for e in embs)
    assert embs[0].thumbnail_jpeg == recs[0].crops_jpeg[1]


def test_embeddings_are_keyed_by_the_cameras_zone():
    """One zone → one Kafka key → one partition: the matcher owning it sees the whole zone."""
    stage = ReidStage(FakeEngine(), "fake", 2, (32, 16), (0.5,) * 3, (0.5,) * 3, "emb",
                      zones={"gate": "north", "lobby": "north", "dock": "south"})
    recs = [make_tracklet(tracklet_id=f"t{i}", camera=cam, crops_jpeg=[jpeg((i * 40, 0, 0))] * 2)
            for i, cam in enumerate(["gate", "dock", "lobby", "elsewhere"])]
    assert [o.key for o in stage.process(recs)] == ["north", "south", "north", "default"]


@pytest.fixture(scope="module")
def small_sta():
    from stages.reid.models import build_model

    torch.manual_seed(0)
    return build_model("sta", backbone="mobilenet_v2", pretrained=False, num_parts=2).eval()


def test_torch_and_onnx_engines_agree(small_sta, tmp_path):
    from stages.reid.engines import build_engine

    clips = np.random.default_rng(0).normal(size=(3, 4, 3, 64, 32)).astype(np.float32)
    t = build_engine(EngineConfig(type="torch", device="cpu"), small_sta, 4, (64, 32), 8)
    o = build_engine(EngineConfig(type="onnx", device="cpu", path=tmp_path / "m.onnx"), small_sta, 4, (64, 32), 8)
    t.setup()
    o.setup()
    a, b = t.infer(clips), o.infer(clips)
    assert a.shape == b.shape == (3, small_sta.embedding_dim)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert (tmp_path / "m.onnx").exists()
    assert o.infer(clips[:1]).shape == (1, small_sta.embedding_dim)  # dynamic batch


def test_tensorrt_engine_without_tensorrt_says_so(small_sta):
    from stages.reid.engines import EngineError, TensorRTEngine

    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(EngineError, match="TensorRT"):
            TensorRTEngine(small_sta, 4, (64, 32), 4).setup()
    else:  # pragma: no cover - only where TensorRT exists
        pytest.skip("TensorRT installed: covered by the gpu-marked test")


@pytest.mark.tensorrt
def test_tensorrt_matches_torch(small_sta):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (NVIDIA wheels need its download site)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from stages.reid.engines import TensorRTEngine, TorchEngine

    clips = np.random.default_rng(1).normal(size=(2, 4, 3, 64, 32)).astype(np.float32)
    trt_engine = TensorRTEngine(small_sta, 4, (64, 32), 4)
    trt_engine.setup()
    ref = TorchEngine(small_sta, "cuda")
    ref.setup()
    np.testing.assert_allclose(trt_engine.infer(clips), ref.infer(clips), atol=1e-3)


def test_checkpoint_round_trip_and_mismatch_errors(small_sta, tmp_path):
    from stages.reid.checkpoint import CheckpointError, load_for_inference, save_checkpoint

    path = save_checkpoint(tmp_path / "c.pt", "sta", small_sta, 4, (64, 32), dataset="unit")
    model, ckpt = load_for_inference(path, "sta", 4, (64, 32))
    x = torch.randn(1, 4, 3, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), small_sta(x))
    assert ckpt["dataset"] == "unit"
    with pytest.raises(CheckpointError, match="T=4 in the checkpoint vs seq_len=8 in the config"):
        load_for_inference(path, "sta", 8, (64, 32))
    with pytest.raises(CheckpointError, match="input size"):
        load_for_inference(path, "sta", 4, (256, 128))
    with pytest.raises(CheckpointError, match="network 'sta' in the checkpoint vs 'rcn' in the config"):
        load_for_inference(path, "rcn", 4, (64, 32))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_for_inference(tmp_path / "junk.pt")


def test_serving_path_does_not_import_the_training_side():
    import subprocess
    import sys

    code = ("import sys, stages.reid.stage, stages.reid.engines, stages.reid.checkpoint, stages.reid.clips; "
            "print(sorted(m for m in sys.modules if m.startswith('stages.reid.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
