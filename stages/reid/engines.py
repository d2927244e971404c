"""Inference backends of the re-id stage: PyTorch, ONNX Runtime and TensorRT.

Every engine has ``setup()``, ``infer(clips) -> embeddings`` and ``close()``:

* input ``numpy.float32 [B, T, 3, H, W]`` — RGB, scaled to [0, 1] and normalised with the model's
  mean/std (see :func:`stages.reid.stage.preprocess`);
* output ``numpy.float32 [B, D]``, L2-normalised rows.

The engine is chosen by ``reid.engine.type`` and its library imported only then:

* ``torch`` runs the ``nn.Module`` (CUDA when available and ``device: auto``);
* ``onnx`` exports the module once to ONNX (opset 17, dynamic batch) and runs it with ONNX Runtime
  (CUDA execution provider first when present);
* ``tensorrt`` builds a serialized engine from that ONNX file with the TensorRT 10 API (explicit batch,
  one optimisation profile over the batch size, optional FP16), caches it next to the ONNX file, and
  runs it with ``execute_async_v3`` on torch-allocated CUDA buffers. Tensor names are read from the
  engine, never hard-coded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

INPUT_NAME = "clips"
OUTPUT_NAME = "embeddings"


class EngineError(RuntimeError):
    """An inference backend is unavailable or failed to build/load."""


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; other values pass through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchEngine:
    """Run a ``ReidModel`` with PyTorch.

    Args:
        model: The network (eval mode is set here).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        fp16: Autocast to float16 on CUDA.
        threads: CPU intra-op threads (0 keeps torch's default).
    """

    def __init__(self, model: Any, device: str = "auto", fp16: bool = False, threads: int = 0) -> None:
        self.model = model
        self.device = device
        self.fp16 = fp16
        self.threads = threads

    def setup(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self.device = resolve_device(self.device)
        self.model = self.model.to(self.device).eval()
        log.info("torch engine on %s", self.device)

    def infer(self, clips: np.ndarray) -> np.ndarray:
        """Embed ``clips`` ``float32 [B, T, 3, H, W]`` (RGB, normalised) → ``float32 [B, D]``, L2-normalised."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(clips, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            if self.fp16 and self.device.startswith("cuda"):
                with torch.autocast("cuda", dtype=torch.float16):
                    y = self.model(x)
            else:
                y = self.model(x)
        return y.float().cpu().numpy()

    def close(self) -> None:
        self.model = None


def export_onnx(model: Any, path: Path, seq_len: int, input_size: tuple[int, int], opset: int = 17) -> Path:
    """Export ``model`` to ONNX with a dynamic batch axis.

    Input ``clips`` is ``float32 [B, T, 3, H, W]`` with T and H, W fixed; output ``embeddings`` is
    ``float32 [B, D]``.

    Raises:
        EngineError: The export failed.
    """
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu").eval()
    dummy = torch.zeros(1, seq_len, int(getattr(model, "input_channels", 3)), *input_size)
    tmp = path.with_suffix(".tmp.onnx")
    try:
        torch.onnx.export(model, (dummy,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=opset, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - exporter raises many types
        raise EngineError(f"ONNX export to {path} failed: {type(exc).__name__}: {exc}") from None
    tmp.replace(path)
    log.info("exported ONNX model to %s", path)
    return path


def model_fingerprint(model: Any, seq_len: int, input_size: tuple[int, int]) -> str:
    """A short hash of the model's weights, config and input shape (names cached exports)."""
    h = hashlib.sha1()
    h.update(json.dumps({"config": getattr(model, "config", {}), "T": seq_len, "size": list(input_size)},
                        sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class OnnxEngine:
    """Run the network with ONNX Runtime.

    Args:
        model: The network, exported to ``path`` when that file does not exist (or ``path`` is None:
            to ``cache_dir/<fingerprint>.onnx``).
        seq_len: T.
        input_size: ``(height, width)``.
        path: ONNX file to use/create.
        device: ``auto`` (CUDA provider first when available), ``cpu`` or ``cuda``.
        threads: Intra-op threads (0: library default).
        cache_dir: Where exports are cached.

    Raises:
        EngineError: onnxruntime is missing, or export/loading failed.
    """

    def __init__(self, model: Any, seq_len: int, input_size: tuple[int, int], path: Path | None = None,
                 device: str = "auto", threads: int = 0, cache_dir: Path = Path(".reidstream/engines")) -> None:
        self.model = model
        self.seq_len = seq_len
        self.input_size = input_size
        self.path = path
        self.device = device
        self.threads = threads
        self.cache_dir = cache_dir
        self.session = None

    def setup(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise EngineError("engine type 'onnx' needs onnxruntime (pip install onnxruntime)") from None
        path = self.path or self.cache_dir / f"{model_fingerprint(self.model, self.seq_len, self.input_size)}.onnx"
        if not Path(path).exists():
            export_onnx(self.model, Path(path), self.seq_len, self.input_size)
        providers = ["CPUExecutionProvider"]
        if self.device in ("auto", "cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"ONNX Runtime cannot load {path}: {exc}") from None
        self.path = Path(path)
        log.info("onnx engine %s with %s", path, self.session.get_providers())

    def infer(self, clips: np.ndarray) -> np.ndarray:
        """Embed ``clips`` ``float32 [B, T, 3, H, W]`` (RGB, normalised) → ``float32 [B, D]``, L2-normalised.

        Raises:
            EngineError: Called before :meth:`setup`.
        """
        if self.session is None:
            raise EngineError("setup() must be called before infer()")
        (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(clips, dtype=np.float32)})
        return out

    def close(self) -> None:
        self.session = None


class TensorRTEngine:
    """Run the network with TensorRT 10 (written against its documented Python API).

    The ONNX export (see :class:`OnnxEngine`) is parsed into an explicit-batch network; one
    optimisation profile covers batch sizes 1…``max_batch``; FP16 is enabled when asked and supported.
    The serialized engine is cached as ``<onnx>.b{max_batch}{-fp16}.plan`` and reused.

    Raises:
        EngineError: TensorRT or CUDA is unavailable, parsing or building failed.
    """

    def __init__(self, model: Any, seq_len: int, input_size: tuple[int, int], max_batch: int,
                 path: Path | None = None, fp16: bool = False, cache_dir: Path = Path(".reidstream/engines"),
                 workspace_mb: int = 1024) -> None:
        self.onnx = OnnxEngine(model, seq_len, input_size, None, "cpu", 0, cache_dir)
        self.seq_len = seq_len
        self.input_size = input_size
        self.max_batch = max_batch
        self.path = path
        self.fp16 = fp16
        self.workspace_mb = workspace_mb
        self.engine = self.context = None
        self.input_name = self.output_name = ""

    def _build(self, trt: Any, onnx_path: Path, plan: Path) -> bytes:
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_mb << 20)
        if self.fp16:
            if not builder.platform_has_fast_fp16:
                log.warning("TensorRT: this GPU has no fast FP16; building FP32")
            else:
                config.set_flag(trt.BuilderFlag.FP16)
        name = network.get_input(0).name
        c = int(network.get_input(0).shape[2])  # static in the ONNX graph: 3 (RGB) or 5 (RGB + flow)
        h, w = self.input_size
        profile = builder.create_optimization_profile()
        profile.set_shape(name, (1, self.seq_len, c, h, w), (max(1, self.max_batch // 2), self.seq_len, c, h, w),
                          (self.max_batch, self.seq_len, c, h, w))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise EngineError(f"TensorRT failed to build an engine from {onnx_path}")
        data = bytes(serialized)
        plan.write_bytes(data)
        log.info("TensorRT engine built: %s", plan)
        return data

    def setup(self) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise EngineError("engine type 'tensorrt' needs the TensorRT 10 Python package (NVIDIA tensorrt) "
                              "and a CUDA GPU; use engine type 'onnx' or 'torch' instead") from None
        import torch

        if not torch.cuda.is_available():
            raise EngineError("engine type 'tensorrt' needs a CUDA GPU")
        self.onnx.setup()
        onnx_path = self.onnx.path
        self.onnx.close()
        plan = self.path or onnx_path.with_suffix(f".b{self.max_batch}{'-fp16' if self.fp16 else ''}.plan")
        data = plan.read_bytes() if Path(plan).exists() else self._build(trt, onnx_path, Path(plan))
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineError(f"TensorRT cannot deserialize {plan}")
        self.context = self.engine.create_execution_context()
        for i in range(self.engine.num_io_tensors):
            tname = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT:
                self.input_name = tname
            else:
                self.output_name = tname
        self._trt = trt

    def infer(self, clips: np.ndarray) -> np.ndarray:
        """Embed ``clips`` ``float32 [B, T, 3, H, W]`` (RGB, normalised) → ``float32 [B, D]``, L2-normalised. Runs in chunks of ``max_batch``.

        Raises:
            EngineError: Called before :meth:`setup`, or execution failed.
        """
        import torch

        if self.context is None:
            raise EngineError("setup() must be called before infer()")
        outs = []
        for start in range(0, len(clips), self.max_batch):
            chunk = torch.from_numpy(np.ascontiguousarray(clips[start:start + self.max_batch], np.float32)).cuda()
            self.context.set_input_shape(self.input_name, tuple(chunk.shape))
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            out = torch.empty(out_shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(self.input_name, chunk.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            stream = torch.cuda.current_stream()
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise EngineError("TensorRT execute_async_v3 failed")
            stream.synchronize()
            outs.append(out.cpu().numpy())
        return np.concatenate(outs, axis=0)

    def close(self) -> None:
        self.context = self.engine = None


def build_engine(engine_cfg: Any, model: Any, seq_len: int, input_size: tuple[int, int], max_batch: int) -> Any:
    """Construct the engine named by ``engine_cfg.type`` (``torch``, ``onnx``, ``tensorrt``).

    Raises:
        EngineError: Unknown type.
    """
    if engine_cfg.type == "torch":
        return TorchEngine(model, engine_cfg.device, engine_cfg.fp16, engine_cfg.threads)
    if engine_cfg.type == "onnx":
        return OnnxEngine(model, seq_len, input_size, engine_cfg.path, engine_cfg.device, engine_cfg.threads)
    if engine_cfg.type == "tensorrt":
        return TensorRTEngine(model, seq_len, input_size, max_batch, engine_cfg.path, engine_cfg.fp16)
    raise EngineError(f"unknown engine type {engine_cfg.type!r}; valid: torch, onnx, tensorrt")
