"""Re-id network benchmark: prints one JSON object per network (JSON Lines on stdout).

For each network, built with the given backbone (random weights: costs do not depend on them), in
eval mode on the CPU:

* ``parameters``: number of parameters (backbone included);
* ``embedding_dim``: size of the embedding;
* ``gflops_per_tracklet``: FLOPs of one forward pass on one clip ``[1, T, 3, H, W]`` divided by 1e9,
  counted by :class:`torch.utils.flop_counter.FlopCounterMode`. That counter counts **2 FLOPs per
  multiply-accumulate** (FLOPs = 2 x MACs) and only the matrix products and convolutions
  (``mm``, ``addmm``, ``bmm``, ``convolution``, attention; ``nn.GRU`` runs as ``addmm`` on the CPU and
  is counted); element-wise ops, normalisation, pooling and non-linearities are not counted;
* ``cpu_tracklets_per_s``: clips per second at batch ``--batch`` (default 4) under
  ``torch.inference_mode``, after one warm-up batch, median over ``--repeats`` timed batches;
  ``cpu_ms_per_batch``: that median, milliseconds.

Usage: ``python bench/models.py [--models sta drsta ...] [--backbone mobilenet_v2] [--repeats 3]
[--threads N] [--batch 4] [--seq-len 8] [--height 256] [--width 128]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_MODELS = ("sta", "drsta", "siamese_sgru", "conv_attention", "rcn", "temporal_pool", "part_pool")


def bench_model(name: str, backbone: str, seq_len: int, size: tuple[int, int], batch: int, repeats: int) -> dict:
    """Measure one network; see the module docstring for the fields."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stages.reid.models import build_model

    torch.manual_seed(0)
    model = build_model(name, backbone=backbone, pretrained=False).eval()
    one = torch.randn(1, seq_len, 3, *size)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model(one)
        flops = counter.get_total_flops()
        x = torch.randn(batch, seq_len, 3, *size)
        model(x)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "name": name,
        "backbone": backbone,
        "parameters": sum(p.numel() for p in model.parameters()),
        "embedding_dim": int(model.embedding_dim),
        "seq_len": seq_len,
        "input_size": list(size),
        "gflops_per_tracklet": round(flops / 1e9, 3),
        "flops_convention": "FLOPs = 2 x MACs (torch.utils.flop_counter; conv and matmul ops only)",
        "batch": batch,
        "cpu_ms_per_batch": round(median * 1e3, 1),
        "cpu_tracklets_per_s": round(batch / median, 2),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="Registry names to measure.")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--repeats", type=int, default=3, help="Timed batches per network (median kept).")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    parser.add_argument("--batch", type=int, default=4, help="Clips per timed batch.")
    parser.add_argument("--seq-len", type=int, default=8, help="T, frames per clip.")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch < 1 or args.seq_len < 1 or args.threads < 0:
        parser.error("--repeats, --batch and --seq-len must be >= 1 and --threads >= 0")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": torch.get_num_threads()}), flush=True)
    for name in args.models:
        result = bench_model(name, args.backbone, args.seq_len, (args.height, args.width), args.batch, args.repeats)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
