"""``reidstream mine | train | evaluate | export | adapt``: the re-id model workflow on the command line.

:func:`register` adds the five commands to the main typer app (``pipeline/cli.py``). Importing this
module imports neither torch nor any stage: every command imports its work lazily.

* ``mine``: run ingest + detection + tracking over the config's cameras and write tracklet folders
  (:mod:`stages.reid.training.mine`), the ``tracklets:DIR`` data set.
* ``train``: train a network with identity + batch-hard triplet losses (:mod:`stages.reid.training.trainer`).
* ``evaluate``: CMC / mAP of a checkpoint (or an untrained network) on a data set's query / gallery,
  mean over the 10 splits of iLIDS-VID / PRID-2011 (:mod:`stages.reid.training.evaluate`).
* ``export``: a checkpoint to ONNX (:func:`stages.reid.engines.export_onnx`).

Option precedence of ``train`` and ``evaluate``: explicit command-line options, then the
``--config`` file's ``reid.model`` section, then the checkpoint (``--resume`` / ``--checkpoint``),
then built-in defaults. A checkpoint whose network, T or input size disagrees with what the options
or config ask for is refused with one ``error:`` line (exit 1). Expected failures print one
``error:`` line and exit non-zero (2 for a config error, 1 otherwise).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from pipeline.cli_common import err, out, run_reporting

log = logging.getLogger("reidstream")

__all__ = ["register"]


class ExportFormat(str, Enum):
    onnx = "onnx"


class Schedule(str, Enum):
    step = "step"
    cosine = "cosine"


class EvalSampling(str, Enum):
    all = "all"
    evenly = "evenly"


class TrainSampling(str, Enum):
    restricted = "restricted"
    random = "random"
    evenly = "evenly"


# --------------------------------------------------------------------------------------------------
# shared helpers
# ValueError and friends from the data-set loaders and trainer describe bad user input here
_REID_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileExistsError, FloatingPointError)


def _run(fn: Callable[[], Any]) -> Any:
    """Call ``fn``; turn expected failures into one ``error:`` line and an exit code."""
    return run_reporting(fn, _REID_INPUT_ERRORS)


def _setup_logging() -> None:
    """Log through rich on stderr (so lines print above progress bars); level ``REIDSTREAM_LOG_LEVEL``."""
    from rich.logging import RichHandler

    level = os.environ.get("REIDSTREAM_LOG_LEVEL", "INFO")
    handler = RichHandler(console=err, show_path=False, rich_tracebacks=False, markup=False)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("ultralytics", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """An event set by the first SIGINT/SIGTERM (the second one interrupts); handlers restored after."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        err.print(f"received {signal.Signals(signum).name}: finishing the current camera (again to abort)")
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=err, transient=False)


def _parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["num_parts=2", "embedding_dim=null"]`` → ``{"num_parts": 2, "embedding_dim": None}`` (YAML values)."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option must look like key=value, got {pair!r}")
        options[key.strip()] = yaml.safe_load(value)
    return options


def _dataset_options(data: str, holdout: float | None, data_seed: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if holdout is not None:
        options["holdout_fraction"] = holdout
    if data_seed is not None:
        options["seed"] = data_seed
    if options and data.partition(":")[0].strip().lower() != "tracklets":
        raise ValueError("--holdout and --data-seed apply to 'tracklets:DIR' data sets only")
    return options


def _first(*values: Any) -> Any:
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


# --------------------------------------------------------------------------------------------------
# mine
class _MineProgress:
    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.task: Any = None

    def start_camera(self, camera: str, total_frames: int | None) -> None:
        self.task = self.progress.add_task(f"mine {camera}", total=total_frames, info="0 tracklets")

    def frame(self, camera: str, frames: int, tracklets: int) -> None:
        self.progress.update(self.task, completed=frames, info=f"{tracklets} tracklets")

    def end_camera(self, result: Any) -> None:
        self.progress.update(self.task, total=result.frames, completed=result.frames,
                             info=f"{result.tracklets} tracklets")


def mine_command(
    output: Path = typer.Option(..., "--output", "-o", help="Directory of the tracklet folders (created)."),
    config: Path = typer.Option(Path("configs/demo.yaml"), "--config", "-c", help="Pipeline YAML config."),
    camera: list[str] | None = typer.Option(None, "--camera", help="Camera to mine (repeat; default: all)."),
    max_frames: int | None = typer.Option(None, "--max-frames", min=1, help="Source frames per camera at most."),
    crops: int | None = typer.Option(None, "--crops", min=1, max=64,
                                     help="Crops kept per tracklet (default: the config's tracklets.crops)."),
    append: bool = typer.Option(False, "--append", help="Add to a directory that already holds tracklets."),
) -> None:
    """Mine tracklets (detection + tracking, no Kafka) into DIR/<tracklet_id>/ for training."""
    from pipeline.config import load_config

    _setup_logging()
    cfg = _run(lambda: load_config(config))
    from stages.reid.training.mine import mine

    with _stop_on_signals() as stop, _progress() as progress:
        summary = _run(lambda: mine(cfg, output, cameras=camera or None, max_frames=max_frames, crops=crops,
                                    append=append, progress=_MineProgress(progress), stop=stop))
    out.print(f"mined tracklets in {output}", highlight=False)
    table = Table()
    for col in ("camera", "frames", "detections", "tracklets", "skipped", "crops", "seconds"):
        table.add_column(col, justify="left" if col == "camera" else "right")
    for c in summary.cameras:
        table.add_row(c.camera, str(c.frames), str(c.detections), str(c.tracklets), str(c.skipped), str(c.crops),
                      f"{c.seconds:.1f}")
    table.add_row("total", str(sum(c.frames for c in summary.cameras)),
                  str(sum(c.detections for c in summary.cameras)), str(summary.tracklets),
                  str(sum(c.skipped for c in summary.cameras)), str(summary.crops), f"{summary.seconds:.1f}")
    out.print(table)
    out.print(f"{summary.tracklets} tracklets written; use them as --data tracklets:{output}", highlight=False)


# --------------------------------------------------------------------------------------------------
# train
class _TrainProgress:
    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.task: Any = None

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"epoch {epoch}/{epochs}", total=steps, info="")

    def step(self, epoch: int, step: int, stats: dict[str, float]) -> None:
        self.progress.update(self.task, completed=step,
                             info=f"loss {stats['loss']:.3f} (id {stats['id_loss']:.3f}, "
                                  f"tri {stats['triplet_loss']:.3f}) acc {stats['accuracy']:.2f}")

    def evaluating(self, epoch: int, clips: int) -> None:
        self.progress.update(self.task, info=f"evaluating {clips} query/gallery tracklets")

    def end_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        metrics = record.get("metrics") or {}
        text = f"epoch {epoch}: loss {record.get('loss', float('nan')):.4f} in {record['seconds']:.0f} s"
        if metrics:
            text += f", mAP {metrics['mAP']:.1%}, rank-1 {metrics['rank1']:.1%}"
        self.progress.console.print(text, highlight=False)


def train_command(
    data: str = typer.Option(..., "--data", help="Data set spec: mars:/path, ilidsvid:/path, prid2011:/path, "
                             "duke:/path, tracklets:/path."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory of checkpoints, history and plots."),
    epochs: int = typer.Option(60, "--epochs", min=1, help="Total epochs (a resumed run continues up to it)."),
    model: str | None = typer.Option(None, "--model", help="Network (default: the config's, else sta)."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Pipeline config whose reid.model gives the "
                                       "network, backbone, T, input size and options."),
    backbone: str | None = typer.Option(None, "--backbone", help="mobilenet_v2, efficientnet_lite0, resnet50."),
    pretrained: bool | None = typer.Option(None, "--pretrained/--no-pretrained", help="ImageNet backbone weights."),
    option: list[str] | None = typer.Option(None, "--option", "-O", help="Model option key=value (repeat)."),
    seq_len: int | None = typer.Option(None, "--seq-len", min=1, help="T, frames per clip (default 8)."),
    height: int | None = typer.Option(None, "--height", min=16, help="Input height, pixels (default 256)."),
    width: int | None = typer.Option(None, "--width", min=8, help="Input width, pixels (default 128)."),
    p: int = typer.Option(8, "--p", min=1, help="Identities per batch."),
    k: int = typer.Option(4, "--k", min=1, help="Tracklets per identity."),
    lr: float = typer.Option(3.5e-4, "--lr", min=0.0, help="Adam learning rate."),
    weight_decay: float = typer.Option(5e-4, "--weight-decay", min=0.0),
    scheduler: Schedule = typer.Option(Schedule.step, "--scheduler", help="Per-epoch learning-rate schedule."),
    warmup: int | None = typer.Option(None, "--warmup", min=0,
                                      help="Linear warm-up epochs from 10 % of --lr (default: 10, at most epochs/4)."),
    margin: float | None = typer.Option(0.3, "--margin", min=0.0, help="Triplet margin."),
    soft_margin: bool = typer.Option(False, "--soft-margin", help="Soft-margin triplet loss (ignores --margin)."),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing", min=0.0, max=0.99),
    verification_weight: float = typer.Option(1.0, "--verification-weight", min=0.0,
                                              help="Pair verification loss weight (siamese_sgru)."),
    sampling: TrainSampling = typer.Option(TrainSampling.restricted, "--sampling", help="Training clip sampling."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Flip, colour jitter, random erasing."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue from this checkpoint (last.pt)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="Mixed precision (CUDA only)."),
    workers: int = typer.Option(2, "--workers", min=0, help="DataLoader worker processes."),
    max_steps_per_epoch: int | None = typer.Option(None, "--max-steps-per-epoch", min=1),
    eval_every: int = typer.Option(1, "--eval-every", min=0, help="Evaluate every N epochs (0: never)."),
    eval_sampling: EvalSampling = typer.Option(EvalSampling.all, "--eval-sampling"),
    split: int | None = typer.Option(None, "--split", min=0, help="Split of iLIDS-VID / PRID-2011 (default 0)."),
    holdout: float | None = typer.Option(None, "--holdout", min=0.0, max=1.0,
                                         help="tracklets: fraction of identities held out (default 0.2)."),
    data_seed: int | None = typer.Option(None, "--data-seed", help="tracklets: seed of the held-out draw."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, augmentation and sampling."),
) -> None:
    """Train a re-id network (softmax identity + batch-hard triplet + the model's regulariser)."""
    _setup_logging()

    def build() -> Any:
        from pipeline.config import load_config
        from stages.reid.training.trainer import TrainConfig

        ckpt_model: dict[str, Any] = {}
        if resume is not None:
            from stages.reid.checkpoint import read_checkpoint

            ckpt = read_checkpoint(resume)
            ckpt_model = {"type": ckpt["model"], "backbone": ckpt["config"].get("backbone"),
                          "seq_len": ckpt["seq_len"], "size": tuple(ckpt["input_size"])}
        file_model: dict[str, Any] = {}
        options: dict[str, Any] = {}
        if config is not None:
            m = load_config(config).reid.model
            file_model = {"type": m.type, "backbone": m.backbone, "pretrained": m.pretrained, "seq_len": m.seq_len,
                          "size": (m.input_height, m.input_width)}
            options = dict(m.options)
        options.update(_parse_options(option))
        ckpt_size = ckpt_model.get("size") or (None, None)
        file_size = file_model.get("size") or (None, None)
        return TrainConfig(
            model=_first(model, file_model.get("type"), ckpt_model.get("type"), "sta"),
            data=data,
            output_dir=output,
            epochs=epochs,
            backbone=_first(backbone, file_model.get("backbone"), ckpt_model.get("backbone"), "mobilenet_v2"),
            pretrained=_first(pretrained, file_model.get("pretrained"), True),
            model_options=options,
            seq_len=_first(seq_len, file_model.get("seq_len"), ckpt_model.get("seq_len"), 8),
            input_size=(_first(height, file_size[0], ckpt_size[0], 256),
                        _first(width, file_size[1], ckpt_size[1], 128)),
            sampling=sampling.value, augment=augment, p=p, k=k, lr=lr, weight_decay=weight_decay,
            scheduler=scheduler.value, warmup_epochs=warmup, label_smoothing=label_smoothing,
            triplet_margin=None if soft_margin else margin, verification_weight=verification_weight, amp=amp,
            device=device, num_workers=workers, max_steps_per_epoch=max_steps_per_epoch, eval_every=eval_every,
            eval_sampling=eval_sampling.value, split=split, dataset_options=_dataset_options(data, holdout, data_seed),
            seed=seed, resume=resume,
        )

    cfg = _run(build)
    from stages.reid.training.trainer import Trainer

    with _progress() as progress:
        trainer = _run(lambda: Trainer(cfg, _TrainProgress(progress)))
        result = _run(trainer.fit)
    out.print(f"{cfg.model} on {cfg.data}", highlight=False)
    table = Table()
    for col in ("epoch", "loss", "id", "triplet", "reg", "acc", "mAP", "rank-1", "s"):
        table.add_column(col, justify="right")
    for e in result.history["epochs"]:
        m = e.get("metrics") or {}
        table.add_row(str(e["epoch"]), f"{e.get('loss', float('nan')):.4f}", f"{e.get('id_loss', float('nan')):.4f}",
                      f"{e.get('triplet_loss', float('nan')):.4f}", f"{e.get('regularizer', 0.0):.4f}",
                      f"{e.get('accuracy', float('nan')):.2f}", f"{m['mAP']:.1%}" if m else "-",
                      f"{m['rank1']:.1%}" if m else "-", f"{e.get('seconds', 0.0):.0f}")
    out.print(table)
    out.print(f"last checkpoint {result.last_checkpoint}" + (f", best {result.best_checkpoint}"
                                                              if result.best_checkpoint else ""), highlight=False)
    out.print(f"history {result.output_dir / 'history.json'}, curves {result.output_dir / 'loss.png'}",
              highlight=False)


# --------------------------------------------------------------------------------------------------
# evaluate
def evaluate_command(
    data: str = typer.Option(..., "--data", help="Data set spec (name:/path)."),
    checkpoint: str | None = typer.Option(None, "--checkpoint", help="Checkpoint; may contain {split} (one "
                                          "network per split). Without it: the untrained --model."),
    config: Path | None = typer.Option(None, "--config", "-c", help="Pipeline config: reid.model gives the "
                                       "expected network, T, input size (and the checkpoint when not given)."),
    model: str | None = typer.Option(None, "--model", help="Expected network / untrained network to build."),
    backbone: str | None = typer.Option(None, "--backbone", help="Backbone of an untrained network."),
    pretrained: bool | None = typer.Option(None, "--pretrained/--no-pretrained", help="Untrained network: ImageNet "
                                           "weights."),
    option: list[str] | None = typer.Option(None, "--option", "-O", help="Untrained network option key=value."),
    seq_len: int | None = typer.Option(None, "--seq-len", min=1, help="Expected T (checked against the checkpoint)."),
    height: int | None = typer.Option(None, "--height", min=16, help="Expected input height, pixels."),
    width: int | None = typer.Option(None, "--width", min=8, help="Expected input width, pixels."),
    split: str | None = typer.Option(None, "--split", help="Split index, or 'all' (default for iLIDS-VID, PRID)."),
    rerank: bool = typer.Option(False, "--rerank", help="k-reciprocal re-ranking (Zhong et al. 2017)."),
    pair_rerank: int = typer.Option(0, "--pair-rerank", min=0, metavar="K",
                                    help="Re-rank each query's top K by the pair score (siamese_sgru; 0: off)."),
    sampling: EvalSampling = typer.Option(EvalSampling.all, "--sampling", help="all: chunks of T, mean; evenly: "
                                          "one clip of T evenly spaced frames."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Clips per forward pass."),
    device: str = typer.Option("auto", "--device"),
    workers: int = typer.Option(2, "--workers", min=0),
    holdout: float | None = typer.Option(None, "--holdout", min=0.0, max=1.0, help="tracklets: held-out fraction "
                                         "(default: the checkpoint's, else 0.2)."),
    data_seed: int | None = typer.Option(None, "--data-seed", help="tracklets: seed of the held-out draw."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write metrics.json and cmc.png here."),
) -> None:
    """CMC Rank-1/5/10/20 and mAP of a checkpoint on a data set's query / gallery."""
    _setup_logging()

    def run() -> Any:
        from pipeline.config import load_config
        from stages.reid.training.evaluate import run_evaluation

        m = load_config(config).reid.model if config is not None else None
        ckpt = _first(checkpoint, None if m is None or m.checkpoint is None else str(m.checkpoint))
        options = dict(m.options) if m is not None else {}
        options.update(_parse_options(option))
        h = _first(height, m and m.input_height)
        w = _first(width, m and m.input_width)
        if (h is None) != (w is None):
            raise ValueError("give both --height and --width (or neither)")
        return run_evaluation(
            data, checkpoint=ckpt, model=_first(model, m and m.type), backbone=_first(backbone, m and m.backbone,
                                                                                    "mobilenet_v2"),
            pretrained=_first(pretrained, m and m.pretrained, True), model_options=options,
            seq_len=_first(seq_len, m and m.seq_len), input_size=None if h is None else (h, w), split=split,
            rerank=rerank, pair_k=pair_rerank, sampling=sampling.value, batch_size=batch_size, device=device,
            num_workers=workers,
            dataset_options=_dataset_options(data, holdout, data_seed), progress=on_progress,
        )

    with _progress() as progress:
        tasks: dict[str, Any] = {}

        def on_progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = progress.add_task(f"embed {label}", total=total, info="")
            progress.update(tasks[label], completed=done, total=total)  # restarts for each split's new items

        report = _run(run)
    r = report.result
    s = report.settings
    title = f"{s['model']} on {s['data']}" + (f" (mean of {r.num_splits} splits)" if r.num_splits > 1 else "")
    out.print(title, highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    if r.num_splits > 1:
        table.add_column("std", justify="right")
    rows = [("mAP", r.mAP, r.mAP_std)] + [
        (f"Rank-{k}", r.rank(k), None if r.cmc_std is None else float(r.cmc_std[k - 1])) for k in (1, 5, 10, 20)
    ]
    for name, value, std in rows:
        table.add_row(name, f"{value:.1%}", *([f"{std:.1%}"] if r.num_splits > 1 else []))
    out.print(table)
    out.print(f"{r.num_queries} queries ({r.num_skipped} without a match skipped), gallery {s['num_gallery']}, "
              f"T={s['seq_len']}, input {s['input_size'][0]}x{s['input_size'][1]}, sampling {s['sampling']}"
              f"{', re-ranked' if s['rerank'] else ''}"
              f"{f', top {pair_rerank} by pair score' if pair_rerank else ''}, {s['seconds']:.1f} s", highlight=False)
    for warning in report.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", highlight=False, soft_wrap=True)
    if output is not None:
        from stages.reid.training.evaluate import write_report

        paths = _run(lambda: write_report(report, output))
        out.print("wrote " + ", ".join(str(p) for p in paths), highlight=False)


# --------------------------------------------------------------------------------------------------
# export
def export_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Checkpoint written by `reidstream train`."),
    output: Path = typer.Option(..., "--output", "-o", help="File to write (.onnx)."),
    fmt: ExportFormat = typer.Option(ExportFormat.onnx, "--format", help="Export format."),
    opset: int = typer.Option(17, "--opset", min=11, help="ONNX opset."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare ONNX Runtime with torch on a random clip."),
) -> None:
    """Export a checkpoint's network (input clips [B, T, 3, H, W], dynamic B) to ONNX."""
    _setup_logging()

    def run() -> tuple[Path, dict[str, Any], float | None]:
        import numpy as np

        from stages.reid.checkpoint import load_for_inference
        from stages.reid.engines import INPUT_NAME, export_onnx

        model, ckpt = load_for_inference(checkpoint)
        size = (int(ckpt["input_size"][0]), int(ckpt["input_size"][1]))
        path = export_onnx(model, output, int(ckpt["seq_len"]), size, opset=opset)
        diff = None
        if verify:
            import onnxruntime as ort
            import torch

            x = np.random.default_rng(0).standard_normal((2, int(ckpt["seq_len"]), 3, *size)).astype(np.float32)
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = session.run(None, {INPUT_NAME: x})[0]
            with torch.inference_mode():
                want = model(torch.from_numpy(x)).numpy()
            diff = float(np.abs(got - want).max())
        return path, ckpt, diff

    path, ckpt, diff = _run(run)
    out.print(f"wrote {path} ({ckpt['model']}, T={ckpt['seq_len']}, input {ckpt['input_size'][0]}x"
              f"{ckpt['input_size'][1]}, dynamic batch)", highlight=False)
    if diff is not None:
        out.print(f"ONNX Runtime vs torch: max |difference| {diff:.2e}", highlight=False)


# --------------------------------------------------------------------------------------------------
# adapt
def adapt_command(
    config: Path = typer.Option(Path("configs/demo.yaml"), "--config", "-c", help="Pipeline YAML config (cameras, "
                                "the zero-shot model of round 0, the matcher rules)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory of the rounds, model.pt and its calibration."),
    tracklets: Path | None = typer.Option(None, "--tracklets", help="Mined tracklet folders (default: mine the "
                                          "configured cameras into OUTPUT/mined)."),
    model: str = typer.Option("sta", "--model", help="Seed network to adapt."),
    rounds: int = typer.Option(2, "--rounds", min=1, help="Cluster-then-train rounds."),
    epochs: int = typer.Option(6, "--epochs", min=1, help="Training epochs per round."),
    seq_len: int = typer.Option(4, "--seq-len", min=1, help="T of the adapted network."),
    height: int = typer.Option(128, "--height", min=16, help="Input height of the adapted network, pixels."),
    width: int = typer.Option(64, "--width", min=8, help="Input width of the adapted network, pixels."),
    max_steps_per_epoch: int | None = typer.Option(40, "--max-steps-per-epoch", min=1, help="Batches per epoch at most."),
    option: list[str] | None = typer.Option(None, "--option", "-O", help="Model option key=value (repeat)."),
    holdout: float = typer.Option(0.0, "--holdout", min=0.0, max=0.99, help="Keep this fraction of the tracklets "
                                  "out (the split `evaluate --data tracklets:DIR --holdout F` scores)."),
) -> None:
    """Adapt a seed network to your cameras without labels: mine, pseudo-identities by the matcher's
    constrained clustering, train, repeat; writes OUTPUT/model.pt and OUTPUT/model.calibration.json."""
    _setup_logging()
    from pipeline.config import load_config
    from stages.reid.training.adapt import AdaptConfig, adapt, pipeline_overrides

    cfg = _run(lambda: load_config(config))
    acfg = _run(lambda: AdaptConfig(output_dir=output, tracklets=tracklets, model=model, rounds=rounds, epochs=epochs,
                                    seq_len=seq_len, input_size=(height, width),
                                    max_steps_per_epoch=max_steps_per_epoch, model_options=_parse_options(option),
                                    holdout=holdout))
    with _progress() as progress:
        result = _run(lambda: adapt(cfg, acfg, _TrainProgress(progress)))
    table = Table("round", "pseudo-identities", "tracklets used", "threshold")
    for r in result.rounds:
        table.add_row(str(r["round"]), str(r["pseudo_identities"]), f"{r['tracklets_used']}/{r['tracklets']}",
                      f"{r['threshold']:.3f}")
    out.print(table)
    out.print(f"wrote {result.checkpoint}" + (f" and {result.calibration}" if result.calibration else
                                              " (no calibration: too few cannot-links)") + "; serve with:",
              highlight=False)
    for k, v in pipeline_overrides(result, acfg).items():
        out.print(f"  {k}={v}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``mine``, ``train``, ``evaluate``, ``export`` and ``adapt`` to ``app``.

    Example:
        >>> import typer
        >>> app = typer.Typer()
        >>> register(app)
    """
    app.command("mine")(mine_command)
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("export")(export_command)
    app.command("adapt")(adapt_command)
