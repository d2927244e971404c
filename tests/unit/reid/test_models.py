"""Contract and behaviour tests for ``stages.reid.models`` (all with random weights, on CPU)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stages.reid.models import MODELS, ReidOutput, available_models, build_model
from stages.reid.models.drsta import RELEASED_EPSILON, diversity_regularizer
from stages.reid.models.sta import inter_frame_regularizer, spatial_attention

REPO = Path(__file__).resolve().parents[3]
ALL_MODELS = sorted(MODELS)
ORDER_INVARIANT = ["drsta", "part_pool", "sta", "temporal_pool"]
# Small inputs: 128×64 gives 8×4 maps (output stride 16), enough rows for every default part count.
SMALL = (3, 128, 64)


def _calibrate_batchnorm(backbone: torch.nn.Module) -> None:
    """Give a randomly initialised backbone realistic batch-norm statistics.

    With the default running statistics (mean 0, variance 1) a random MobileNetV2 in eval mode
    shrinks activations to ~1e-9 and every clip looks the same; one pass over random images in train
    mode (cumulative averaging) fixes the scale, as training or ImageNet weights would.
    """
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    was_training = backbone.training
    backbone.train()
    with torch.no_grad():
        backbone(torch.randn(8, *SMALL, generator=torch.Generator().manual_seed(0)))
    for bn in norms:
        bn.momentum = 0.1
    backbone.train(was_training)


def _build(name: str, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, pretrained=False, **kwargs)
    _calibrate_batchnorm(model.backbone)
    return model


def _clips(
    batch: int, frames: int, shape: tuple[int, int, int] = SMALL, seed: int = 1
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, *shape, generator=generator)


def _grad_mass(module: torch.nn.Module) -> float:
    return float(sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None))


def _randomise_va(model: torch.nn.Module) -> None:
    with torch.no_grad():
        model.att_out.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------- registry


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid names") as info:
        build_model("nope")
    for name in ALL_MODELS:
        assert name in str(info.value)


def test_registry_names_match_contract() -> None:
    assert set(available_models()) == {
        "sta", "drsta", "siamese_sgru", "conv_attention", "rcn", "temporal_pool", "part_pool"
    }  # fmt: skip


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import sys, stages.reid.models as m; m.available_models(); print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", ALL_MODELS)
def test_acceptance_forward_backward_256x128(name: str) -> None:
    model = _build(name)
    x = _clips(2, 4, (3, 256, 128))
    out = model.forward_train(x)
    assert isinstance(out, ReidOutput)
    assert out.features.dtype == torch.float32
    assert tuple(out.features.shape) == (2, model.embedding_dim)
    assert out.regularizer.dim() == 0
    (out.features.square().mean() + out.regularizer).backward()
    assert _grad_mass(model.backbone) > 0, "no gradient reached the backbone"
    model.eval()
    with torch.no_grad():
        emb = model(x)
    assert emb.dtype == torch.float32
    assert tuple(emb.shape) == (2, model.embedding_dim)
    assert torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    assert len(model.mean) == len(model.std) == 3


@pytest.mark.parametrize("name", ALL_MODELS)
def test_config_rebuilds_the_model(name: str) -> None:
    model = _build(name)
    json.dumps(model.config)  # JSON-serialisable
    assert {"backbone", "pretrained", "last_stride"} <= set(model.config)
    rebuilt = build_model(name, **model.config)
    assert rebuilt.config == model.config
    assert rebuilt.embedding_dim == model.embedding_dim
    rebuilt.load_state_dict(model.state_dict())  # same architecture, strict
    model.eval()
    rebuilt.eval()
    x = _clips(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_state_dict_without_neck_loads_with_an_untrained_neck(caplog: pytest.LogCaptureFixture) -> None:
    model = _build("temporal_pool").eval()
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("neck.")}  # a pre-neck checkpoint
    rebuilt = build_model("temporal_pool", pretrained=False).eval()
    with caplog.at_level("WARNING"):
        rebuilt.load_state_dict(old)  # strict
    assert "no BN-neck" in caplog.text
    x = _clips(2, 2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), F.normalize(model.forward_train(x).features, dim=1), atol=1e-5, rtol=0)
    partial = dict(model.state_dict())
    del partial["neck.weight"]  # a damaged state dict is still an error
    with pytest.raises(RuntimeError, match="neck.weight"):
        rebuilt.load_state_dict(partial)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, 3, 64, 32),  # 4-D: a batch of images, not clips
        torch.zeros(2, 2, 1, 64, 32),  # one channel
        torch.zeros(2, 2, 3, 64, 32, dtype=torch.uint8),  # raw pixels
    ],
    ids=["4d", "gray", "uint8"],
)
def test_rejects_malformed_input(name: str, bad: torch.Tensor) -> None:
    model = _build(name).eval()
    with pytest.raises(ValueError, match="x must be"):
        model(bad)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_clips_are_embedded_independently(name: str) -> None:
    """Eval embeddings of a clip do not depend on the other clips of the batch."""
    model = _build(name).eval()
    x = _clips(3, 3)
    with torch.no_grad():
        full = model(x)
        alone = model(x[1:2])
    torch.testing.assert_close(full[1:2], alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(full[0], full[1], atol=1e-3)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_single_frame_clips(name: str) -> None:
    model = _build(name)
    out = model.forward_train(_clips(2, 1))
    assert tuple(out.features.shape) == (2, model.embedding_dim)
    assert torch.isfinite(out.regularizer)
    if name == "sta":  # no second frame to compare with; DRSTA's diversity is per frame
        assert out.regularizer.item() == 0.0
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(_clips(2, 1))).all()


@pytest.mark.parametrize("name", ORDER_INVARIANT)
def test_set_models_ignore_frame_order(name: str) -> None:
    model = _build(name).eval()
    x = _clips(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, [2, 0, 3, 1]]), model(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["conv_attention", "rcn", "siamese_sgru"])
def test_recurrent_models_depend_on_frame_order(name: str) -> None:
    model = _build(name).eval()
    if name == "conv_attention":  # V_a starts at zero (uniform attention): give it trained-like weights
        _randomise_va(model)
    x = _clips(2, 4)
    with torch.no_grad():
        assert not torch.allclose(model(x[:, [2, 0, 3, 1]]), model(x), atol=1e-6)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("sta", {"num_parts": 0}),
        ("sta", {"reg_weight": -1.0}),
        ("sta", {"embedding_dim": 0}),
        ("part_pool", {"num_parts": 2.5}),
        ("drsta", {"num_models": 0}),
        ("conv_attention", {"kernel_size": 2}),
        ("rcn", {"cell": "lstm"}),
        ("rcn", {"cell": "gru"}),  # the old vector-GRU variant is gone: convgru is Wu et al.'s
        ("rcn", {"dropout": 1.0}),
        ("rcn", {"flow": "lucas_kanade"}),
        ("conv_attention", {"steps": 0}),
        ("drsta", {"region_dim": 0}),
        ("siamese_sgru", {"hidden_size": -3}),
        ("temporal_pool", {"backbone": "vgg16"}),
        ("temporal_pool", {"last_stride": 4}),
    ],
)
def test_invalid_arguments(name: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        build_model(name, pretrained=False, **kwargs)


def test_too_few_rows_for_parts_raises() -> None:
    model = _build("sta", num_parts=8).eval()
    with pytest.raises(ValueError, match="num_parts=8"):
        model(_clips(1, 2, (3, 64, 32)))  # 4 rows


# ----------------------------------------------------------------------------- baselines


def test_pooling_baselines_match_their_definition() -> None:
    x = _clips(2, 3)
    tp = _build("temporal_pool").eval()
    pp = _build("part_pool", num_parts=4).eval()
    with torch.no_grad():
        f = tp.frame_features(x)  # [B, T, C, 8, 4]
        expected_tp = f.mean(dim=(1, 3, 4))
        torch.testing.assert_close(tp.forward_train(x).features, expected_tp)
        f = pp.frame_features(x)
        stripes = [f[:, :, :, 2 * k : 2 * k + 2].mean(dim=(1, 3, 4)) for k in range(4)]
        torch.testing.assert_close(pp.forward_train(x).features, torch.cat(stripes, dim=1))
    assert pp.embedding_dim == 4 * tp.embedding_dim


# ----------------------------------------------------------------------------- STA


def _sta_reference(f: torch.Tensor, num_parts: int) -> torch.Tensor:
    """Loop implementation of STA's Eqs. (S1)–(S6) without FC, for one clip ``f [T, C, h, w]``."""
    energy = f.pow(2).sum(dim=1)  # [T, h, w]: squared norms (Eq. 1)
    g = energy / energy.sum(dim=(1, 2), keepdim=True)
    rows_per_part = f.shape[2] // num_parts
    f1_parts, f2_parts = [], []
    for k in range(num_parts):
        rows = slice(k * rows_per_part, (k + 1) * rows_per_part)
        s = g[:, rows].sum(dim=(1, 2))  # [T]
        score = s / s.sum()
        best = int(score.argmax())
        f1_parts.append(f[best, :, rows])
        f2_parts.append((score[:, None, None, None] * f[:, :, rows]).sum(dim=0))
    f1 = torch.cat(f1_parts, dim=1)
    f2 = torch.cat(f2_parts, dim=1)
    return torch.cat([f1.mean(dim=(1, 2)), f2.mean(dim=(1, 2))])


def test_sta_spatial_attention_uses_squared_norms_hand_computed() -> None:
    """Eq. (1): g(i, j) = ‖f(i, j)‖² / Σ ‖f‖², on a 2-channel 2×2 map worked out by hand."""
    f = torch.tensor([[[3.0, 0.0], [1.0, 0.0]],  # channel 0
                      [[4.0, 0.0], [0.0, 2.0]]])  # channel 1 -> squared norms 25, 0 / 1, 4; sum 30
    expected = torch.tensor([[25.0, 0.0], [1.0, 4.0]]) / 30.0
    torch.testing.assert_close(spatial_attention(f), expected)
    # the plain norm would give 5/8, 0 / 1/8, 2/8: the squared norm sharpens the map
    assert spatial_attention(f)[0, 0] > 5 / 8
    torch.testing.assert_close(spatial_attention(torch.zeros(2, 2, 2)), torch.zeros(2, 2))  # no NaN


def test_sta_fc_is_on_by_default() -> None:
    model = _build("sta")
    assert model.embedding_dim == 1024
    assert isinstance(model.head.proj[0], torch.nn.Linear) and isinstance(model.head.proj[1], torch.nn.BatchNorm1d)


def test_sta_matches_loop_reference() -> None:
    model = _build("sta", num_parts=4, embedding_dim=None).eval()
    x = _clips(2, 5)
    with torch.no_grad():
        f = model.frame_features(x)
        got = model.forward_train(x).features
        expected = torch.stack([_sta_reference(f[b], 4) for b in range(2)])
    assert model.embedding_dim == 2 * model.backbone.out_channels
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_sta_scores_are_l1_normalised_across_frames() -> None:
    model = _build("sta", num_parts=4, embedding_dim=None).eval()
    with torch.no_grad():
        g, scores, masks = model.attention_scores(model.frame_features(_clips(2, 5)))
    torch.testing.assert_close(g.sum(dim=(2, 3)), torch.ones(2, 5))
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(2, 4))
    assert tuple(masks.shape) == (4, g.shape[2])


def test_sta_regulariser_zero_for_equal_frames_positive_otherwise() -> None:
    model = _build("sta", reg_weight=2.0).train()
    frame = _clips(2, 1)
    same = model.forward_train(frame.expand(2, 4, *SMALL).contiguous()).regularizer
    assert same.item() == pytest.approx(0.0, abs=1e-7)
    different = model.forward_train(_clips(2, 4)).regularizer
    assert different.item() > 0
    model.zero_grad()
    different.backward()
    assert _grad_mass(model.backbone) > 0, "regulariser gradient did not reach the backbone"
    model.eval()
    assert float(model.forward_train(_clips(2, 4)).regularizer) == 0.0


def test_inter_frame_regulariser_is_frobenius_norm_of_difference() -> None:
    g = torch.rand(3, 4, 8, 4, requires_grad=True)
    first, second = torch.tensor([0, 1, 3]), torch.tensor([2, 1, 0])
    reg = inter_frame_regularizer(g, first, second)
    expected = torch.stack(
        [(g[b, first[b]] - g[b, second[b]]).pow(2).sum().sqrt() for b in range(3)]
    )
    torch.testing.assert_close(reg, expected.mean())
    reg.backward()
    assert torch.isfinite(g.grad).all()  # the clip with equal frames has a finite (zero) gradient
    assert g.grad[1].abs().sum() == 0


def test_sta_with_fc_head() -> None:
    model = _build("sta", embedding_dim=64)
    out = model.forward_train(_clips(2, 3))
    assert model.embedding_dim == 64 == out.features.shape[1]


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [(name, {}) for name in ALL_MODELS] + [("rcn", {"cell": "convgru"}), ("rcn", {"flow": "dis"})],
    ids=[*ALL_MODELS, "rcn-convgru", "rcn-flow"],
)
def test_models_export_to_onnx_with_dynamic_batch(name: str, kwargs: dict[str, object]) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = build_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # a trained-like neck, so that the exported graph must carry it
        model.neck.running_mean.uniform_(-0.1, 0.1)
        model.neck.running_var.uniform_(0.5, 2.0)
    channels = model.input_channels
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (_clips(2, 3, (channels, 128, 64)),),
        buffer,
        dynamo=False,
        opset_version=17,
        input_names=["clips"],
        output_names=["embeddings"],
        dynamic_axes={"clips": {0: "batch"}, "embeddings": {0: "batch"}},
    )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    x = _clips(3, 3, (channels, 128, 64), seed=7)  # a batch size other than the traced one
    got = session.run(None, {"clips": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == expected.shape == (3, model.embedding_dim)
    assert abs(got - expected).max() < 1e-4


# ----------------------------------------------------------------------------- DRSTA


def test_diversity_regulariser_released_form_hand_computed() -> None:
    """R = sqrt(sum over frames of ||Q Q^T - I||_F^2 + 1e-5), Q = sqrt(attention) (released code)."""
    # frame 1: two maps over 2 locations, s1 = (1, 0), s2 = (1/2, 1/2):
    #   Q Q^T off-diagonal = sqrt(1 * 1/2) + 0 = 1/sqrt(2); ||Q Q^T - I||^2 = 2 * 1/2 = 1
    # frame 2: identical maps (1/2, 1/2): off-diagonal 1, ||.||^2 = 2
    attention = torch.tensor([[[1.0, 0.0], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]])
    expected = (1.0 + 2.0 + RELEASED_EPSILON) ** 0.5
    assert float(diversity_regularizer(attention)) == pytest.approx(expected, rel=1e-5)
    # one square root over the whole batch, not a mean of per-frame values
    assert float(diversity_regularizer(attention)) != pytest.approx(((1.0**0.5) + (2.0**0.5)) / 2, rel=1e-3)


def test_diversity_regulariser_extremes() -> None:
    k, locations, frames = 4, 32, 5
    disjoint = torch.zeros(frames, k, locations)
    for i in range(k):
        disjoint[:, i, i * 8 : (i + 1) * 8] = 1 / 8
    identical = torch.full((frames, k, locations), 1 / locations)
    overlap = 0.5 * disjoint + 0.5 * identical
    low = float(diversity_regularizer(disjoint))
    high = float(diversity_regularizer(identical))
    mid = float(diversity_regularizer(overlap))
    assert low == pytest.approx(RELEASED_EPSILON**0.5, rel=1e-3)
    assert high == pytest.approx((frames * k * (k - 1)) ** 0.5, rel=1e-4)
    assert low < mid < high


def test_drsta_starting_magnitude() -> None:
    """At initialisation the released-form regulariser is bounded by sqrt(N K (K-1)) for N = B*T frames
    and its gradient per attention logit is small: it does not swamp the identity loss (CE ~ log #ids)."""
    k, b, t = 6, 4, 4
    model = _build("drsta", num_models=k).train()
    x = _clips(b, t, (3, 256, 128))
    out = model.forward_train(x)
    bound = (b * t * k * (k - 1) + RELEASED_EPSILON) ** 0.5
    assert 0 < out.regularizer.item() <= bound + 1e-4
    f = model.frame_features(x).detach()
    logits = model.spatial(f.flatten(0, 1)).detach().requires_grad_(True)
    s = logits.reshape(b, t, k, -1).softmax(dim=-1)
    diversity_regularizer(s).backward()
    # d sqrt(S)/dS = 1 / (2 sqrt(S)): per-frame gradients shrink with the batch, unlike the summed form
    assert logits.grad.abs().max().item() < 1.0


def test_drsta_region_features_are_projected_and_normalised() -> None:
    model = _build("drsta", num_models=3, attention_dim=32, region_dim=16).train()
    assert model.config["last_stride"] == 2  # the released code's 8x4 maps on 256x128 crops
    x = _clips(2, 3, (3, 256, 128))
    f = model.frame_features(x)
    assert tuple(f.shape[3:]) == (8, 4)
    with torch.no_grad():
        s = model.spatial_attention(f)
        regions = model.region_features(f, s)
        manual = torch.einsum("btkl,btcl->btkc", s, f.flatten(3)) @ model.region_fc.weight.T + model.region_fc.bias
    assert tuple(regions.shape) == (2, 3, 3, 16)
    torch.testing.assert_close(regions, F.normalize(manual, dim=-1))
    torch.testing.assert_close(regions.norm(dim=-1), torch.ones(2, 3, 3))
    assert model.embedding_dim == 3 * 16


def test_drsta_attention_and_regulariser_gradient() -> None:
    model = _build("drsta", num_models=3, attention_dim=32, reg_weight=0.5, last_stride=1).train()
    x = _clips(2, 3)
    with torch.no_grad():
        s = model.spatial_attention(model.frame_features(x))
    assert tuple(s.shape) == (2, 3, 3, 8 * 4)
    torch.testing.assert_close(s.sum(dim=-1), torch.ones(2, 3, 3))
    out = model.forward_train(x)
    assert 0 < out.regularizer.item() <= 0.5 * (2 * 3 * 3 * 2 + RELEASED_EPSILON) ** 0.5 + 1e-4
    out.regularizer.backward()
    assert _grad_mass(model.spatial) > 0
    model.eval()
    assert model.forward_train(x).regularizer.item() == 0.0


# ----------------------------------------------------------------------------- Siamese SGRU


def test_siamese_similarity_bounded_symmetric_differentiable() -> None:
    model = _build("siamese_sgru", hidden_size=32)
    a, b = _clips(2, 3, seed=1), _clips(2, 4, seed=2)  # different sequence lengths
    sim = model.similarity(a, b)
    assert sim.dtype == torch.float32 and tuple(sim.shape) == (2,)
    assert ((sim >= -1 - 1e-6) & (sim <= 1 + 1e-6)).all()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.similarity(a, b), model.similarity(b, a))
    model.train()
    model.zero_grad()
    sim.sum().backward()
    assert _grad_mass(model.spatial_attention) > 0
    assert _grad_mass(model.temporal_attention) > 0
    assert _grad_mass(model.backbone) > 0


def test_siamese_attention_is_pair_conditioned() -> None:
    model = _build("siamese_sgru", hidden_size=32).eval()
    a, b = _clips(2, 3, seed=1), _clips(2, 3, seed=2)
    with torch.no_grad():
        alone = model.forward_train(a).features
        paired, _ = model.embed_pair(a, b)
        self_paired, _ = model.embed_pair(a, a)
    assert not torch.allclose(alone, paired, atol=1e-6)
    torch.testing.assert_close(self_paired, alone)


def test_siamese_rejects_mismatched_batches() -> None:
    model = _build("siamese_sgru", hidden_size=32)
    with pytest.raises(ValueError, match="same number of clips"):
        model.similarity(_clips(2, 3), _clips(3, 3))
    with pytest.raises(ValueError, match="b must be"):
        model.similarity(_clips(2, 3), torch.zeros(2, 3, 64, 32))


def _sgru_reference(model: torch.nn.Module, v: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """Loop implementation of Eqs. (W3)-(W5) for one clip ``v [T, R, d]`` given a context ``ctx [d]``."""
    sa, ta = model.spatial_attention, model.temporal_attention
    frames = []
    for t in range(v.shape[0]):
        e = torch.stack([sa.score.weight[0] @ torch.tanh(sa.item(v[t, i]) + sa.context.weight @ ctx)
                         for i in range(v.shape[1])])
        alpha = e.softmax(dim=0)
        h = torch.zeros(v.shape[2])
        for i in range(v.shape[1]):
            rho = torch.sigmoid(model.reset_gate(torch.cat([v[t, i], h])))
            cand = torch.tanh(model.candidate_input(v[t, i]) + rho * (model.candidate_state.weight @ h))
            h = alpha[i] * cand + (1 - alpha[i]) * h
        frames.append(h)
    outputs, _ = model.temporal_gru(torch.stack(frames)[None])
    o = outputs[0]
    e = torch.stack([ta.score.weight[0] @ torch.tanh(ta.item(o[t]) + ta.context.weight @ ctx) for t in range(len(o))])
    return (e.softmax(dim=0)[:, None] * o).sum(dim=0)


def test_sgru_pair_score_matches_reference_and_is_symmetric() -> None:
    """(W6) sim(A, B) = cos(z_{A|c_B}, z_{B|c_A}) on cached region features; symmetric in A and B."""
    model = _build("siamese_sgru", num_regions=3, hidden_size=4).eval()
    generator = torch.Generator().manual_seed(5)
    va = torch.randn(2, 2, 3, 4, generator=generator)  # [N, T_a, R, d]
    vb = torch.randn(2, 3, 3, 4, generator=generator)  # T_b != T_a
    with torch.no_grad():
        got = model.pair_score(va, vb)
        expected = torch.stack([
            F.cosine_similarity(_sgru_reference(model, va[n], vb[n].mean(dim=(0, 1))),
                                _sgru_reference(model, vb[n], va[n].mean(dim=(0, 1))), dim=0)
            for n in range(2)
        ])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.pair_score(vb, va), got)
        # a clip paired with itself is conditioned on its own context: its score is exactly 1
        torch.testing.assert_close(model.pair_score(va, va), torch.ones(2))


def test_sgru_pair_score_equals_similarity_of_clips() -> None:
    model = _build("siamese_sgru", hidden_size=32).eval()
    a, b = _clips(2, 3, seed=1), _clips(2, 4, seed=2)
    with torch.no_grad():
        emb_a, va = model.embed_with_regions(a)
        _, vb = model.embed_with_regions(b)
        torch.testing.assert_close(emb_a, model(a))  # the cached regions come with the served embedding
        assert tuple(va.shape) == (2, 3, model.num_regions, 32)
        torch.testing.assert_close(model.pair_score(va, vb), model.similarity(a, b))


@pytest.mark.parametrize(
    ("shape_a", "shape_b", "match"),
    [((2, 3, 6, 32), (3, 3, 6, 32), "same number"), ((2, 3, 5, 32), (2, 3, 6, 32), "feats_a must be"),
     ((2, 3, 6, 32), (2, 6, 32), "feats_b must be")],
)
def test_sgru_pair_score_rejects_bad_shapes(shape_a: tuple, shape_b: tuple, match: str) -> None:
    model = _build("siamese_sgru", hidden_size=32).eval()
    with pytest.raises(ValueError, match=match):
        model.pair_score(torch.zeros(shape_a), torch.zeros(shape_b))


# ----------------------------------------------------------------------------- conv attention


def test_conv_attention_va_is_3x3_zero_initialised_uniform_attention() -> None:
    model = _build("conv_attention", hidden_channels=16).eval()
    assert tuple(model.att_out.weight.shape[2:]) == (3, 3)
    assert model.att_out.weight.abs().sum() == 0
    with torch.no_grad():
        maps = model.attention_maps(_clips(1, 2))
    torch.testing.assert_close(maps, torch.full_like(maps, 1 / maps.shape[-1]))


def test_conv_attention_refinement_steps_hand_computed() -> None:
    """S steps on the same map, Eqs. (C2)-(C4), with gate weights 0 and biases (b_i, b_f, b_o, b_g):
    C_s = σ(b_f) C_{s-1} + σ(b_i) tanh(b_g), H_s = σ(b_o) tanh(C_s), from (H_0, C_0)."""
    model = _build("conv_attention", hidden_channels=2, steps=3).eval()
    bias = torch.tensor([0.5, 0.5, 1.0, 1.0, -0.5, -0.5, 0.25, 0.25])  # i, f, o, g for 2 channels
    with torch.no_grad():
        model.gates.weight.zero_()
        model.gates.bias.copy_(bias)
        xt = torch.rand(1, 2, 3, 2)
        cell0 = torch.full((1, 2, 3, 2), 0.3)
        state, cell, att = model.refine(xt, torch.zeros_like(xt), cell0)
    si, sf, so, g = torch.sigmoid(torch.tensor(0.5)), torch.sigmoid(torch.tensor(1.0)), \
        torch.sigmoid(torch.tensor(-0.5)), torch.tanh(torch.tensor(0.25))
    c = torch.tensor(0.3)
    for _ in range(3):
        c = sf * c + si * g
    torch.testing.assert_close(cell, torch.full_like(cell, float(c)))
    torch.testing.assert_close(state, torch.full_like(state, float(so * torch.tanh(c))))
    assert tuple(att.shape) == (1, model.num_filters, 6)


def test_conv_attention_descriptor_keeps_the_hidden_state() -> None:
    model = _build("conv_attention", hidden_channels=16, steps=2).eval()
    c = model.backbone.out_channels
    assert model.embedding_dim == 16 + model.num_filters * c
    x = _clips(1, 2)
    with torch.no_grad():
        f = model.frame_features(x)
        reduced = model.reduce(f.flatten(0, 1))
        h, cell = torch.zeros_like(reduced[:1]), torch.zeros_like(reduced[:1])
        rows = []
        for t in range(2):
            h, cell, att = model.refine(reduced[t : t + 1], h, cell)
            pooled = torch.einsum("bml,bcl->bmc", att, f[:, t].flatten(2)).flatten(1)
            rows.append(torch.cat([h.mean(dim=(2, 3)), pooled], dim=1))
        expected = torch.stack(rows, dim=1).mean(dim=1)
        torch.testing.assert_close(model.forward_train(x).features, expected)


@pytest.mark.parametrize("num_filters", [1, 3])
def test_conv_attention_filters_and_recurrence(num_filters: int) -> None:
    model = _build("conv_attention", num_filters=num_filters, hidden_channels=16).eval()
    _randomise_va(model)
    x = _clips(1, 3)
    changed_first = x.clone()
    changed_first[:, 0] = _clips(1, 1, seed=9)[:, 0]
    changed_last = x.clone()
    changed_last[:, 2] = _clips(1, 1, seed=9)[:, 0]
    with torch.no_grad():
        maps = model.attention_maps(x)
        maps_first = model.attention_maps(changed_first)
        maps_last = model.attention_maps(changed_last)
    assert tuple(maps.shape) == (1, 3, num_filters, 8 * 4)
    torch.testing.assert_close(maps.sum(dim=-1), torch.ones(1, 3, num_filters))
    # the hidden state carries earlier frames into the attention of later frames ...
    assert not torch.allclose(maps[:, 1], maps_first[:, 1], atol=1e-7)
    # ... and never the other way round
    torch.testing.assert_close(maps[:, :2], maps_last[:, :2])


# ----------------------------------------------------------------------------- RCN


@pytest.mark.parametrize("cell", ["rnn", "convgru"])
def test_rcn_cells(cell: str) -> None:
    model = _build("rcn", cell=cell, hidden_size=16)
    out = model.forward_train(_clips(2, 3))
    assert tuple(out.features.shape) == (2, 16) and model.embedding_dim == 16
    out.features.sum().backward()
    assert _grad_mass(model.backbone) > 0


def test_rcn_rnn_pools_preactivations() -> None:
    """With ``cell="rnn"`` the pooled outputs are ``o_t = W_i a_t + W_s tanh(o_{t-1})`` (Eq. R2)."""
    model = _build("rcn", cell="rnn", hidden_size=8).eval()
    x = _clips(1, 3)
    with torch.no_grad():
        a = model.frame_fc(model.frame_features(x).mean(dim=(3, 4)))[0]
        r = torch.zeros(8)
        outputs = []
        for t in range(3):
            o = model.input_proj(a[t]) + model.state_proj(r)
            r = torch.tanh(o)
            outputs.append(o)
        expected = torch.stack(outputs).mean(dim=0, keepdim=True)
        torch.testing.assert_close(model.forward_train(x).features, expected)
        torch.testing.assert_close(model(x), F.normalize(expected, dim=1))


def test_rcn_dropout_on_input_and_recurrent_path() -> None:
    model = _build("rcn", hidden_size=8)
    assert model.config["dropout"] == 0.6  # the released code's rate
    assert model.input_dropout.p == model.state_dropout.p == 0.6
    x = _clips(2, 3)
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        first = model.forward_train(x).features
        second = model.forward_train(x).features
    assert not torch.allclose(first, second)  # fresh masks in training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_train(x).features, model.forward_train(x).features)
    # dropout 0 in training equals eval (only the backbone's batch norm differs: freeze it)
    plain = _build("rcn", hidden_size=8, dropout=0.0)
    plain.train()
    plain.backbone.eval()
    with torch.no_grad():
        trained_mode = plain.forward_train(x).features
        plain.eval()
        torch.testing.assert_close(plain.forward_train(x).features, trained_mode)


def test_rcn_convgru_hand_computed_equations() -> None:
    """(R2') z, q, H~ and H on the maps, checked against a direct evaluation on one clip."""
    model = _build("rcn", cell="convgru", hidden_size=4, dropout=0.0).eval()
    x = _clips(1, 2)
    with torch.no_grad():
        f = model.frame_features(x)[0]  # [T, C, h, w]
        e = 4
        h = torch.zeros(1, e, *f.shape[2:])
        outs = []
        for t in range(2):
            w = F.conv2d(f[t : t + 1], model.gates_input.weight, model.gates_input.bias)
            u = F.conv2d(h, model.gates_state.weight, padding=1)
            z = torch.sigmoid(w[:, :e] + u[:, :e])
            q = torch.sigmoid(w[:, e : 2 * e] + u[:, e:])
            cand = torch.tanh(w[:, 2 * e :] + F.conv2d(q * h, model.candidate_state.weight, padding=1))
            h = (1 - z) * h + z * cand
            outs.append(h.mean(dim=(2, 3)))
        torch.testing.assert_close(model.forward_train(x).features, torch.stack(outs).mean(dim=0))


def test_rcn_flow_channels_widen_the_first_convolution() -> None:
    rgb = _build("rcn", hidden_size=8)
    flow = build_model("rcn", pretrained=False, hidden_size=8, flow="farneback")
    first = next(m for m in flow.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert flow.input_channels == 5 and first.in_channels == 5
    assert first.weight[:, 3:].abs().sum() == 0  # flow weights start at zero
    rgb_state = rgb.state_dict()
    wide_key = next(k for k, v in flow.state_dict().items() if v.dim() == 4 and v.shape[1] == 5)
    with torch.no_grad():
        first.weight[:, :3] = rgb_state.pop(wide_key)
    flow.load_state_dict(rgb_state, strict=False)  # everything but the widened first conv
    x = _clips(2, 3)
    x5 = torch.cat([x, torch.randn(2, 3, 2, *SMALL[1:])], dim=2)
    rgb.eval()
    flow.eval()
    with torch.no_grad():
        torch.testing.assert_close(flow(x5), rgb(x))  # zero flow weights: same embedding as RGB
    with pytest.raises(ValueError, match=r"\[B, T, 5, H, W\]"):
        flow(x)
    flow.train()
    flow.forward_train(x5).features.sum().backward()
    assert first.weight.grad[:, 3:].abs().sum() > 0  # and they are learnt
