"""Training (losses, schedule, steps, checkpoints, resume) and the standard evaluation, on tiny fake data.

Networks use a randomly initialised MobileNetV2 (``pretrained=False``), clips of T = 4 frames of
64 x 32 pixels, so every test runs in seconds on two CPU cores.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.reid.checkpoint import CheckpointError, read_checkpoint
from stages.reid.training.datasets import load_dataset
from stages.reid.training.evaluate import extract_embeddings, run_evaluation, write_report
from stages.reid.models import build_model
from stages.reid.training.trainer import (
    EpochSchedule,
    TrainConfig,
    Trainer,
    TrainingHead,
    batch_hard_triplet_loss,
    default_lr_steps,
    default_warmup_epochs,
    siamese_forward,
)

try:  # works both as a package module and as a rootdir-inserted module
    from .fixtures import MinedTracklet, write_ilidsvid, write_mined
except ImportError:
    from fixtures import MinedTracklet, write_ilidsvid, write_mined  # type: ignore[no-redef]

T = 4
SIZE = (64, 32)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mined(tmp_path_factory) -> Path:
    """12 unlabelled tracklets of 6 frames on two cameras (each its own pseudo-identity)."""
    root = tmp_path_factory.mktemp("mined")
    tracklets = tuple(MinedTracklet(f"cam{i % 2}-t{i:02d}", f"cam{i % 2}", 6) for i in range(12))
    return write_mined(root, tracklets)


def config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="sta", data=f"tracklets:{data}", output_dir=out, epochs=2, pretrained=False, seq_len=T,
                input_size=SIZE, p=4, k=2, augment=False, device="cpu", max_steps_per_epoch=1,
                dataset_options={"holdout_fraction": 0.34, "seed": 0}, eval_batch_size=8, seed=0)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------------------------------ losses


def test_batch_hard_triplet_loss_hand_computed():
    # 1-D features: pid 0 at 0 and 1, pid 1 at 3 and 5. Hardest positive / negative per anchor:
    # a=0: 1 / 3 -> [0.3 + 1 - 3]+ = 0; a=1: 1 / 2 -> 0; a=3: 2 / 2 -> 0.3; a=5: 2 / 4 -> 0.
    f = torch.tensor([[0.0], [1.0], [3.0], [5.0]], requires_grad=True)
    pids = torch.tensor([0, 0, 1, 1])
    stats = batch_hard_triplet_loss(f, pids, margin=0.3)
    assert stats.loss.item() == pytest.approx(0.075)
    assert stats.active == pytest.approx(0.25)
    assert stats.positive == pytest.approx(1.5) and stats.negative == pytest.approx(2.75)
    stats.loss.backward()
    # only anchor 3 (index 2) is active: d/dx [D(2,3) - D(2,1)] = -1 - (+1) at x_2 = 3
    assert f.grad[:, 0].tolist() == pytest.approx([0.0, 0.25 * 1.0, 0.25 * -2.0, 0.25 * 1.0])

    soft = batch_hard_triplet_loss(f, pids, margin=None)
    gaps = torch.tensor([1 - 3, 1 - 2, 2 - 2, 2 - 4], dtype=torch.float32)
    assert soft.loss.item() == pytest.approx(F.softplus(gaps).mean().item(), rel=1e-5)


def test_batch_hard_triplet_loss_without_valid_anchor_is_zero_with_graph():
    f = torch.randn(3, 5, requires_grad=True)
    stats = batch_hard_triplet_loss(f, torch.tensor([0, 1, 2]))  # K = 1: no positives
    assert stats.loss.item() == 0.0
    stats.loss.backward()
    assert torch.equal(f.grad, torch.zeros_like(f))
    with pytest.raises(ValueError, match="pids"):
        batch_hard_triplet_loss(f, torch.tensor([0, 1]))


def test_training_head_classifier_and_verification_map():
    head = TrainingHead(6, 3)
    assert head.classifier.bias is None and not hasattr(head, "neck")  # the neck lives in the model
    assert head(torch.randn(4, 6)).shape == (4, 3)
    assert head.verification_logits(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([0.0, 5.0])


def test_retrieval_uses_the_features_after_the_bn_neck():
    """forward(x) = normalize(neck(f)) (Luo et al.'s inference feature), with the neck's shift frozen at 0."""
    torch.manual_seed(0)
    model = build_model("temporal_pool", pretrained=False)
    assert not model.neck.bias.requires_grad
    with torch.no_grad():  # a trained neck: per-channel statistics and scale
        model.neck.running_mean.uniform_(-1, 1)
        model.neck.running_var.uniform_(0.2, 3)
        model.neck.weight.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 2, 3, *SIZE)
    with torch.no_grad():
        f = model.forward_train(x).features
        bn = (f - model.neck.running_mean) / torch.sqrt(model.neck.running_var + model.neck.eps) * model.neck.weight
        torch.testing.assert_close(model(x), F.normalize(bn, dim=1))
        assert not torch.allclose(model(x), F.normalize(f, dim=1), atol=1e-3)


def test_train_step_classifies_the_model_neck_output(mined, tmp_path):
    trainer = Trainer(config(mined, tmp_path / "run", model="temporal_pool"))
    clips, pids, _ = next(iter(trainer.loader))
    before = trainer.model.neck.running_mean.clone()
    trainer.train_step(clips, pids)
    assert not torch.equal(trainer.model.neck.running_mean, before)  # the classifier's input is model.neck
    assert trainer.model.neck.weight.grad is not None and trainer.model.neck.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("model", "options"),
    [("drsta", {"num_models": 3, "attention_dim": 16}), ("conv_attention", {"hidden_channels": 8, "steps": 2}),
     ("rcn", {"cell": "convgru", "hidden_size": 8}), ("rcn", {"flow": "dis", "hidden_size": 8})],
    ids=["drsta", "conv_attention", "rcn-convgru", "rcn-flow"],
)
def test_fixed_networks_train_a_step(mined, tmp_path, model, options):
    trainer = Trainer(config(mined, tmp_path / "run", model=model, model_options=options))
    clips, pids, _ = next(iter(trainer.loader))
    assert clips.shape[2] == trainer.model.input_channels  # flow channels come from the data set
    stats = trainer.train_step(clips, pids)
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0
    if model == "drsta":
        assert stats["regularizer"] > 0  # the released-form diversity term is in the loss


def test_default_warmup_is_ten_epochs_at_most_a_quarter_of_the_run(mined, tmp_path):
    assert [default_warmup_epochs(e) for e in (1, 8, 40, 60, 120)] == [0, 2, 10, 10, 10]
    trainer = Trainer(config(mined, tmp_path / "run", model="temporal_pool", epochs=8))
    assert trainer.schedule.warmup_epochs == 2
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * trainer.cfg.lr)
    explicit = Trainer(config(mined, tmp_path / "run2", model="temporal_pool", epochs=8, warmup_epochs=0))
    assert explicit.schedule.warmup_epochs == 0


def test_epoch_schedule_step_cosine_and_warmup():
    step = EpochSchedule("step", epochs=8, warmup_epochs=2, lr_steps=(4, 6), gamma=0.1)
    assert [round(step(i), 6) for i in range(8)] == [0.1, 0.55, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    cosine = EpochSchedule("cosine", epochs=4, warmup_epochs=0, lr_steps=(), gamma=0.1)
    assert cosine(0) == pytest.approx(1.0) and cosine(2) == pytest.approx(0.505) and cosine(4) == pytest.approx(0.01)
    assert default_lr_steps(60) == (30, 45) and default_lr_steps(1) == ()


@pytest.mark.parametrize(
    ("field", "value"),
    [("epochs", 0), ("p", 0), ("seq_len", -1), ("lr", 0.0), ("label_smoothing", 1.0), ("triplet_margin", -0.1),
     ("sampling", "all"), ("scheduler", "linear"), ("input_size", (64,)), ("eval_sampling", "random")],
)
def test_train_config_rejects_bad_values(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        config(tmp_path, tmp_path / "out", **{field: value})


# ------------------------------------------------------------------------------------------ training


def test_train_steps_lower_the_loss(mined, tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(config(mined, tmp_path / "run", lr=1e-3))
    clips, pids, _ = next(iter(trainer.loader))
    assert clips.shape == (8, T, 3, *SIZE) and len(set(pids.tolist())) == 4
    losses = [trainer.train_step(clips, pids) for _ in range(6)]
    first, last = losses[0], losses[-1]
    assert all(math.isfinite(s["loss"]) for s in losses)
    assert last["loss"] < first["loss"]
    assert first["regularizer"] > 0  # STA's inter-frame regulariser is part of the loss
    assert first["loss"] == pytest.approx(first["id_loss"] + first["triplet_loss"] + first["regularizer"], rel=1e-5)


def test_fit_writes_checkpoints_history_and_curves_then_resume_continues(mined, tmp_path):
    out = tmp_path / "run"
    result = Trainer(config(mined, out)).fit()
    assert result.epochs_run == [1, 2]
    for name in ("last.pt", "best.pt", "history.json", "loss.png", "metrics.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    history = json.loads((out / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2] and len(history["steps"]) == 2
    metrics = history["epochs"][-1]["metrics"]
    assert 0.0 <= metrics["mAP"] <= 1.0 and 0.0 <= metrics["rank1"] <= 1.0

    last = read_checkpoint(out / "last.pt")
    assert last["model"] == "sta" and last["seq_len"] == T and last["input_size"] == list(SIZE)
    assert last["epoch"] == 2 and last["num_classes"] == 8
    assert last["dataset"] == {"spec": f"tracklets:{mined}", "split": None,
                               "options": {"holdout_fraction": 0.34, "seed": 0}}
    assert set(last["extra"]) >= {"classifier", "history", "best_mAP", "train_config"}

    resumed = Trainer(config(mined, out, epochs=3, resume=out / "last.pt"))
    assert resumed.start_epoch == 3
    assert resumed.scheduler.last_epoch == 2
    # the schedule is this run's (3 epochs), not the checkpoint's (2)
    assert resumed.scheduler.lr_lambdas[0] is resumed.schedule and resumed.schedule.epochs == 3
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(3.5e-4 * resumed.schedule(2))
    state = resumed.optimizer.state_dict()["state"]
    saved = last["optimizer"]["state"]
    assert state.keys() == saved.keys() and all(int(state[i]["step"]) == 2 for i in state)
    assert all(torch.equal(state[i]["exp_avg"], saved[i]["exp_avg"]) for i in state)
    model_state = resumed.model.state_dict()
    assert all(torch.equal(model_state[k], v) for k, v in last["state_dict"].items())

    again = resumed.fit()
    assert again.epochs_run == [3]
    assert read_checkpoint(out / "last.pt")["epoch"] == 3
    assert [e["epoch"] for e in json.loads((out / "history.json").read_text())["epochs"]] == [1, 2, 3]


def test_resume_refuses_a_checkpoint_of_another_shape(mined, tmp_path):
    out = tmp_path / "run"
    Trainer(config(mined, out, epochs=1, eval_every=0)).fit()
    assert not (out / "best.pt").exists()  # never evaluated: no best checkpoint
    with pytest.raises(CheckpointError, match="T=4 but the run says seq_len=2"):
        Trainer(config(mined, out, seq_len=2, resume=out / "last.pt"))
    with pytest.raises(CheckpointError, match="network 'sta'"):
        Trainer(config(mined, out, model="temporal_pool", resume=out / "last.pt"))


def test_trainer_needs_p_identities(mined, tmp_path):
    with pytest.raises(ValueError, match="fewer than p=20"):
        Trainer(config(mined, tmp_path / "run", p=20))


def test_siamese_sgru_pair_loss_reuses_the_embedding(mined, tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(config(mined, tmp_path / "run", model="siamese_sgru",
                             model_options={"num_regions": 4, "hidden_size": 32}))
    assert trainer.pair_loss
    clips, pids, _ = next(iter(trainer.loader))
    model = trainer.model.eval()
    with torch.no_grad():
        features, similarity, target = siamese_forward(model, clips, pids)
        assert torch.allclose(features, model.forward_train(clips).features, atol=1e-5)
        # each clip gets one positive (another clip of its pid) and one negative partner
        assert target.tolist() == [1.0] * 8 + [0.0] * 8 and similarity.shape == (16,)
        assert float(similarity.abs().max()) <= 1.0 + 1e-6
    stats = trainer.train_step(clips, pids)
    assert math.isfinite(stats["verification_loss"]) and stats["verification_loss"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_precision_step_and_checkpoint(mined, tmp_path):
    trainer = Trainer(config(mined, tmp_path / "run", device="cuda", amp=True, epochs=1))
    assert trainer.use_amp and trainer.scaler.is_enabled()
    clips, pids, _ = next(iter(trainer.loader))
    stats = trainer.train_step(clips, pids)
    assert math.isfinite(stats["loss"])
    result = trainer.fit()
    ckpt = read_checkpoint(result.last_checkpoint)
    assert ckpt["extra"]["scaler"] is not None
    assert all(v.device.type == "cpu" for v in ckpt["state_dict"].values())  # read back on the CPU


# ---------------------------------------------------------------------------------------- evaluation


def test_all_frames_embedding_is_the_mean_of_chunk_embeddings(mined):
    ds = load_dataset(f"tracklets:{mined}", holdout_fraction=0.0)
    items = ds.train[:3]  # 6 frames each: chunks [0..3] and [4, 5, 5, 5]
    model = build_model("temporal_pool", pretrained=False).eval()
    one = extract_embeddings(model, items, T, SIZE, batch_size=1)
    many = extract_embeddings(model, items, T, SIZE, batch_size=16)
    np.testing.assert_allclose(one.features, many.features, atol=1e-5)
    from stages.reid.training.sampling import TrackletDataset

    chunks = TrackletDataset(items[:1], T, "all", SIZE, model.mean, model.std, chunked=True)[0][0]
    assert chunks.shape == (2, T, 3, *SIZE)
    with torch.no_grad():
        expected = F.normalize(model(chunks).mean(dim=0), dim=0).numpy()
    np.testing.assert_allclose(one.features[0], expected, atol=1e-5)
    assert np.allclose(np.linalg.norm(one.features, axis=1), 1.0, atol=1e-5)
    evenly = extract_embeddings(model, items, T, SIZE, sampling="evenly")
    assert evenly.features.shape == one.features.shape
    assert one.pids.tolist() == [item.pid for item in items]


def test_evaluate_checkpoint_writes_metrics_and_cmc(mined, tmp_path):
    out = tmp_path / "run"
    Trainer(config(mined, out, epochs=1, eval_every=0)).fit()
    report = run_evaluation(f"tracklets:{mined}", checkpoint=out / "last.pt", device="cpu", batch_size=4)
    assert report.settings["dataset_options"] == {"holdout_fraction": 0.34, "seed": 0}  # the checkpoint's own
    assert report.settings["seq_len"] == T and report.settings["input_size"] == list(SIZE)
    written = write_report(report, tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {p.name for p in written} == {"metrics.json", "cmc.png"}
    assert 0.0 <= metrics["metrics"]["rank1"] <= 1.0 and 0.0 <= metrics["metrics"]["mAP"] <= 1.0
    assert metrics["metrics"]["num_queries"] == 4 and len(metrics["metrics"]["cmc"]) == 20
    assert (tmp_path / "eval" / "cmc.png").read_bytes()[:8] == PNG_MAGIC

    reranked = run_evaluation(f"tracklets:{mined}", checkpoint=out / "last.pt", device="cpu", rerank=True)
    assert 0.0 <= reranked.result.mAP <= 1.0

    with pytest.raises(CheckpointError, match="T=4 in the checkpoint vs seq_len=8 in the options"):
        run_evaluation(f"tracklets:{mined}", checkpoint=out / "last.pt", seq_len=8)


def test_evaluate_split_dataset_averages_all_splits(tmp_path):
    info = write_ilidsvid(tmp_path / "ilids")
    torch.manual_seed(0)  # the same untrained weights for both evaluations
    report = run_evaluation(f"ilidsvid:{info.root}", model="temporal_pool", pretrained=False, seq_len=T,
                            input_size=SIZE, device="cpu")
    assert report.result.num_splits == 10 and sorted(report.splits) == list(range(10))
    assert report.result.mAP == pytest.approx(np.mean([r.mAP for r in report.splits.values()]))
    assert report.result.mAP_std is not None
    torch.manual_seed(0)
    one = run_evaluation(f"ilidsvid:{info.root}", model="temporal_pool", pretrained=False, seq_len=T,
                         input_size=SIZE, device="cpu", split="3")
    assert one.result.num_splits == 1 and list(one.splits) == [3]
    assert one.result.mAP == pytest.approx(report.splits[3].mAP, abs=1e-6)
    with pytest.raises(ValueError, match="no splits"):
        run_evaluation("tracklets:/nowhere", model="temporal_pool", split="1")


# ------------------------------------------------------------------------------ pairwise re-ranking


def test_pair_rerank_reorders_only_the_top_k_hand_computed():
    from stages.reid.training.evaluate import pair_rerank

    # one query, 4 gallery items; embedding order 2, 0, 3, 1. The scorer returns the first region value of
    # the candidate: item 0 -> 0.9, item 2 -> -0.5, so within the top 2 item 0 moves ahead of item 2.
    dist = np.array([[0.4, 3.0, 0.1, 1.0]], np.float32)
    query = [np.zeros((2, 1, 1), np.float32)]
    gallery = [np.full((2, 1, 1), v, np.float32) for v in (0.9, 0.0, -0.5, 0.7)]
    calls = []

    def score(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return b[:, 0, 0, 0]

    out = pair_rerank(dist, query, gallery, score, k=2)
    assert np.argsort(out[0], kind="stable").tolist() == [0, 2, 3, 1]
    np.testing.assert_allclose(out[0], [-1.9, 3.0, -0.5, 1.0], rtol=1e-6)  # candidates: -1 - s
    assert calls == [((2, 2, 1, 1), (2, 2, 1, 1))]  # the k candidates scored in one batch
    assert np.array_equal(pair_rerank(dist, query, gallery, score, k=10)[0] <= 0, [True] * 4)  # k capped at G
    with pytest.raises(ValueError, match="k must be"):
        pair_rerank(dist, query, gallery, score, k=0)
    with pytest.raises(ValueError, match="region arrays"):
        pair_rerank(dist, query, gallery[:3], score, k=1)


def test_evaluate_model_with_sgru_pair_rerank(mined):
    from stages.reid.training.evaluate import evaluate_model

    ds = load_dataset(f"tracklets:{mined}", holdout_fraction=0.5, seed=0)
    torch.manual_seed(0)
    model = build_model("siamese_sgru", pretrained=False, num_regions=4, hidden_size=16).eval()
    q = extract_embeddings(model, ds.query, T, SIZE, with_regions=True)
    plain = extract_embeddings(model, ds.query, T, SIZE)
    np.testing.assert_allclose(q.features, plain.features, atol=1e-5)  # same embedding from one backbone pass
    assert q.regions is not None and len(q.regions) == len(ds.query)
    assert all(r.shape[1:] == (4, 16) and r.shape[0] % T == 0 for r in q.regions)
    base = evaluate_model(model, ds.query, ds.gallery, T, SIZE)
    reranked = evaluate_model(model, ds.query, ds.gallery, T, SIZE, pair_k=3)
    assert 0 <= reranked.mAP <= 1 and reranked.num_queries == base.num_queries
    with pytest.raises(ValueError, match="pair score"):
        evaluate_model(build_model("temporal_pool", pretrained=False), ds.query, ds.gallery, T, SIZE, pair_k=3)
