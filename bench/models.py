"""Re-id network benchmark: prints one JSON object per network (JSON Lines on stdout).

For each network, built with the given backbone (random weights: costs do not depend on them), in
eval mode:

* ``parameters``: number of parameters (backbone and BN-neck included);
* ``embedding_dim``: size of the embedding;
* ``gflops_per_tracklet``: FLOPs of one forward pass on one clip ``[1, T, C, H, W]`` divided by 1e9,
  counted by :class:`torch.utils.flop_counter.FlopCounterMode`. That counter counts **2 FLOPs per
  multiply-accumulate** (FLOPs = 2 x MACs) and only the matrix products and convolutions
  (``mm``, ``addmm``, ``bmm``, ``convolution``, attention; ``nn.GRU`` runs as ``addmm`` on the CPU and
  is counted); element-wise ops, normalisation, pooling and non-linearities are not counted;
* ``cpu_tracklets_per_s``: clips per second at batch ``--batch`` (default 4) under
  ``torch.inference_mode``, after one warm-up batch, median over ``--repeats`` timed batches;
  ``cpu_ms_per_batch``: that median, milliseconds;
* with ``--cuda``: ``cuda_fp16_tracklets_per_s`` / ``cuda_fp16_ms_per_batch`` the same on the GPU under
  float16 autocast at batch ``--cuda-batch`` (synchronised timing), and ``cuda_fp32_tracklets_per_s``;
* ``siamese_sgru`` also gets ``pair_gflops``, ``pair_ms_per_pair`` / ``pairs_per_s``: the cost of one pair score
  (:meth:`~stages.reid.models.siamese_sgru.SiameseSGRU.pair_score`) over cached region features
  ``[T, R, d]``, scored ``--pairs`` at a time (the re-ranking of one query's top k), CPU (and CUDA);
* ``rcn+flow-*`` rows add ``flow_ms_per_tracklet``: the OpenCV optical flow of one clip's ``T`` crops
  (the preprocessing cost; the network cost is that of 5-channel frames).

Usage: ``python bench/models.py [--models sta drsta ...] [--backbone mobilenet_v2] [--repeats 3]
[--threads N] [--batch 4] [--seq-len 8] [--height 256] [--width 128] [--pairs 10] [--cuda]``
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

DEFAULT_MODELS = ("sta", "drsta", "siamese_sgru", "conv_attention", "rcn", "rcn+convgru", "rcn+flow-farneback",
                  "rcn+flow-dis", "temporal_pool", "part_pool")
VARIANTS = {"rcn+convgru": ("rcn", {"cell": "convgru"}), "rcn+flow-farneback": ("rcn", {"flow": "farneback"}),
            "rcn+flow-dis": ("rcn", {"flow": "dis"})}


def _median_seconds(fn, repeats: int, sync=None) -> float:
    fn()  # warm-up
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _flow_ms(method: str, seq_len: int, size: tuple[int, int], repeats: int) -> float:
    import numpy as np

    from stages.reid.models.flow import clip_flow

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
    frames = [np.roll(base, 2 * i, axis=1) for i in range(seq_len)]
    return _median_seconds(lambda: clip_flow(frames, method), repeats) * 1e3


def bench_model(name: str, backbone: str, seq_len: int, size: tuple[int, int], batch: int, repeats: int,
                pairs: int = 10, cuda: bool = False, cuda_batch: int = 32) -> dict:
    """Measure one network (a registry name or a ``VARIANTS`` key); see the module docstring for the fields."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stages.reid.models import build_model

    torch.manual_seed(0)
    registry_name, options = VARIANTS.get(name, (name, {}))
    model = build_model(registry_name, backbone=backbone, pretrained=False, **options).eval()
    channels = int(model.input_channels)
    one = torch.randn(1, seq_len, channels, *size)
    result: dict = {"name": name, "model": registry_name, "options": options, "backbone": backbone}
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            model(one)
        flops = counter.get_total_flops()
        x = torch.randn(batch, seq_len, channels, *size)
        median = _median_seconds(lambda: model(x), repeats)
        result.update(
            parameters=sum(p.numel() for p in model.parameters()),
            embedding_dim=int(model.embedding_dim),
            seq_len=seq_len,
            input_size=list(size),
            input_channels=channels,
            gflops_per_tracklet=round(flops / 1e9, 3),
            flops_convention="FLOPs = 2 x MACs (torch.utils.flop_counter; conv and matmul ops only)",
            batch=batch,
            cpu_ms_per_batch=round(median * 1e3, 1),
            cpu_tracklets_per_s=round(batch / median, 2),
            repeats=repeats,
            threads=torch.get_num_threads(),
        )
        pair_inputs = None
        if hasattr(model, "pair_score"):
            v = model.regions(torch.randn(2, seq_len, 3, *size))  # [2, T, R, d] cached per tracklet
            a, b = v[:1].expand(pairs, -1, -1, -1).contiguous(), v[1:].expand(pairs, -1, -1, -1).contiguous()
            pair_inputs = (a, b)
            sec = _median_seconds(lambda: model.pair_score(a, b), max(repeats, 5))
            pair_counter = FlopCounterMode(display=False)
            with pair_counter:
                model.pair_score(a[:1], b[:1])
            result.update(pairs_per_call=pairs, region_features_shape=list(v.shape[1:]),
                          pair_gflops=round(pair_counter.get_total_flops() / 1e9, 4),
                          pair_ms_per_pair=round(sec * 1e3 / pairs, 3), pairs_per_s=round(pairs / sec, 1))
        if options.get("flow"):
            result["flow_ms_per_tracklet"] = round(_flow_ms(options["flow"], seq_len, size, max(repeats, 5)), 2)
        if cuda and torch.cuda.is_available():
            gpu = model.cuda()
            xc = torch.randn(cuda_batch, seq_len, channels, *size, device="cuda")
            sync = torch.cuda.synchronize
            fp32 = _median_seconds(lambda: gpu(xc), max(repeats, 5), sync)
            with torch.autocast("cuda", dtype=torch.float16):
                fp16 = _median_seconds(lambda: gpu(xc), max(repeats, 5), sync)
                if pair_inputs is not None:
                    ac, bc = pair_inputs[0].cuda(), pair_inputs[1].cuda()
                    psec = _median_seconds(lambda: gpu.pair_score(ac, bc), max(repeats, 5), sync)
                    result.update(cuda_fp16_pair_ms_per_pair=round(psec * 1e3 / pairs, 3))
            result.update(cuda_batch=cuda_batch, cuda_fp32_tracklets_per_s=round(cuda_batch / fp32, 1),
                          cuda_fp16_ms_per_batch=round(fp16 * 1e3, 2),
                          cuda_fp16_tracklets_per_s=round(cuda_batch / fp16, 1),
                          cuda_device=torch.cuda.get_device_name())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help=f"Registry names to measure (or variants: {', '.join(VARIANTS)}).")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--repeats", type=int, default=3, help="Timed batches per network (median kept).")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default).")
    parser.add_argument("--batch", type=int, default=4, help="Clips per timed batch.")
    parser.add_argument("--seq-len", type=int, default=8, help="T, frames per clip.")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=10, help="Pairs per pair-score call (siamese_sgru).")
    parser.add_argument("--cuda", action="store_true", help="Also time on CUDA (FP32 and FP16 autocast).")
    parser.add_argument("--cuda-batch", type=int, default=32, help="Clips per timed CUDA batch.")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch < 1 or args.seq_len < 1 or args.threads < 0 or args.pairs < 1:
        parser.error("--repeats, --batch, --seq-len and --pairs must be >= 1 and --threads >= 0")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(),
                      "cuda": torch.cuda.get_device_name() if args.cuda and torch.cuda.is_available() else None}),
          flush=True)
    for name in args.models:
        result = bench_model(name, args.backbone, args.seq_len, (args.height, args.width), args.batch, args.repeats,
                             args.pairs, args.cuda, args.cuda_batch)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
