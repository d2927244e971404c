"""Re-id checkpoints: a trained network plus everything needed to use it correctly.

A checkpoint is a ``torch.save`` dict with keys ``format`` (``"reidstream.checkpoint.v1"``),
``model`` (registry name), ``config`` (constructor kwargs), ``seq_len`` (T), ``input_size``
(``[height, width]`` pixels), ``state_dict``, and optional ``dataset``, ``epoch``, ``metrics``,
``optimizer``, ``scheduler``, ``num_classes``, ``extra`` (training state such as the classifier).

:func:`load_for_inference` checks a checkpoint against the stage config and refuses a mismatch of
network, T or input size instead of silently reshaping inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHECKPOINT_FORMAT = "reidstream.checkpoint.v1"


class CheckpointError(ValueError):
    """A checkpoint is unreadable, not ours, or disagrees with the config."""


def save_checkpoint(path: str | Path, model_name: str, model: Any, seq_len: int, input_size: tuple[int, int],
                    **extra: Any) -> Path:
    """Write ``model`` (a ``ReidModel``) and its metadata to ``path`` (parents created).

    Args:
        path: Destination ``.pt`` file.
        model_name: Registry name (``sta``…).
        model: The network; its ``config`` attribute must rebuild it.
        seq_len: T the model was trained with.
        input_size: ``(height, width)`` pixels.
        **extra: Other keys stored as-is (``dataset``, ``epoch``, ``metrics``, ``optimizer``…).

    Returns:
        The path written.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "model": model_name, "config": dict(model.config),
               "seq_len": int(seq_len), "input_size": [int(input_size[0]), int(input_size[1])],
               "state_dict": model.state_dict(), **extra}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on CPU.

    Raises:
        CheckpointError: Missing file, not a torch file, or not a reidstream checkpoint.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a reidstream checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return ckpt


def load_for_inference(path: str | Path, model_name: str | None = None, seq_len: int | None = None,
                       input_size: tuple[int, int] | None = None,
                       source: str = "the config") -> tuple[Any, dict[str, Any]]:
    """Rebuild the network of a checkpoint, in eval mode, after checking it matches the config.

    Args:
        path: Checkpoint file.
        model_name: Network the config expects (None: accept any).
        seq_len: T the config expects (None: accept any).
        input_size: ``(height, width)`` the config expects (None: accept any).
        source: Who asks for those values, for the error message (``"the config"``,
            ``"the command line"``).

    Returns:
        ``(model, checkpoint_dict)``.

    Raises:
        CheckpointError: The file is not a checkpoint, or its network, T or input size differ from
            the expected ones (the message names both values).
    """
    from stages.reid.models import build_model

    ckpt = read_checkpoint(path)
    problems = []
    if model_name is not None and ckpt["model"] != model_name:
        problems.append(f"network {ckpt['model']!r} in the checkpoint vs {model_name!r} in {source}")
    if seq_len is not None and ckpt["seq_len"] != seq_len:
        problems.append(f"T={ckpt['seq_len']} in the checkpoint vs seq_len={seq_len} in {source}")
    if input_size is not None and list(ckpt["input_size"]) != list(input_size):
        problems.append(f"input size {ckpt['input_size']} in the checkpoint vs {list(input_size)} in {source}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint disagrees with {source}: " + "; ".join(problems))
    config = dict(ckpt["config"])
    config["pretrained"] = False  # the state dict carries the weights
    model = build_model(ckpt["model"], **config)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: state dict does not fit {ckpt['model']}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval(), ckpt
