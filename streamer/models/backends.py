"""Backends and precisions: :func:`create_model` is the one place a model is built.

``model.backend`` and ``model.quantize`` pick the class:

* ``torch`` — :class:`~streamer.models.hf.HFTextModel`; ``model.dtype`` float16/bfloat16 load
  half weights (on CUDA, and bfloat16 on CPUs that have it);
* ``torch`` + ``int8`` — :class:`TorchInt8Model`: dynamic int8 quantization of the encoder's
  linear layers (``torch.ao.quantization.quantize_dynamic``), CPU only;
* ``onnxruntime`` — :class:`OnnxRuntimeModel`: the model and its head (pooling, a
  sentence-transformers folder's Dense layers, normalisation) or softmax
  exported once with ``torch.onnx.export`` (dynamic batch and sequence axes), cached on disk,
  optionally int8-quantized by ``onnxruntime.quantization.quantize_dynamic``, run by an
  ``InferenceSession``;
* ``openvino`` — :class:`OpenVinoModel`: the same export compiled by OpenVINO for the CPU
  (float32, or bfloat16 with ``model.dtype: bfloat16``).

**int8 recipe.** Plain dynamic quantization (per-tensor activations, all linear layers) moves
MiniLM's embeddings far from float32 (mean cosine 0.94, worst row 0.86), because a few
activation channels are much larger than the rest and the GELU outputs are heavy-tailed. So:

1. weights are quantized per output channel;
2. the inputs of the quantized layers are *smoothed* (SmoothQuant): each input channel ``j``
   is divided by ``s_j = max|x_j|^0.7 / max|w_j|^0.3`` and the weight's column multiplied by
   it — exact in float, but it moves the outliers from the activations into the weights, where
   per-channel quantization absorbs them. ``max|x_j|`` comes from one pass over a small
   built-in corpus (:mod:`streamer.models.calibration`);
3. the FFN down-projections (input width = ``intermediate_size``, fed by GELU) and everything
   outside the encoder layers (pooler, classifier head) stay float32.

Measured on MiniLM (2-core CPU, 2,000 sentences): worst-row cosine to float32 0.994 (torch)
and 0.998 (onnxruntime), at 1.9x and 2.8x float32 torch's throughput offline (with
plain dynamic quantization: 0.86). ``bench`` reports each backend's agreement next to its speed.

The ONNX export is keyed by the model's fingerprint, task, head (pooling, Dense, normalisation,
prompt tokens skipped), quantize and max_length (and the export recipe), written to a temporary
directory and renamed into place, so replicas sharing a cache never read half a file and a
changed model re-exports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from streamer.config import ModelConfig
from streamer.models.hf import HFTextModel, TextModel

log = logging.getLogger(__name__)

EXPORT_RECIPE = "1"  # bump when the exported graph or the int8 recipe changes
SMOOTH_ALPHA = 0.7


def create_model(cfg: ModelConfig, *, threads: int | None = None) -> TextModel:
    """The model for ``cfg`` (not loaded yet: the worker calls ``load()`` and ``warmup()``).

    ``threads`` sets the intra-op threads of ONNX Runtime and OpenVINO (torch takes its own
    from ``runtime.torch_threads`` on the inference thread); default: torch's current count.
    """
    if cfg.backend == "torch":
        return TorchInt8Model(cfg) if cfg.quantize == "int8" else HFTextModel(cfg)
    if cfg.backend == "onnxruntime":
        return OnnxRuntimeModel(cfg, threads=threads)
    if cfg.backend == "openvino":
        return OpenVinoModel(cfg, threads=threads)
    if cfg.backend == "null":
        from streamer.tools.nullmodel import NullModel

        log.warning("model %s: backend null, outputs mean nothing (benchmarks only)", cfg.name)
        return NullModel.from_config(cfg)
    raise ValueError(f"unknown model.backend {cfg.backend!r}")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamer" / "onnx"


# -- int8 ---------------------------------------------------------------------------------------
@functools.cache
def _smoothed_linear_class() -> type:
    import torch

    class SmoothedLinear(torch.nn.Module):
        """``lin(x / s)`` with ``lin``'s weight columns multiplied by ``s``: the same output."""

        def __init__(self, lin: torch.nn.Linear, scale: torch.Tensor) -> None:
            super().__init__()
            self.register_buffer("inv_scale", (1.0 / scale).to(lin.weight.dtype))
            with torch.no_grad():
                lin.weight.mul_(scale.to(lin.weight.dtype))
            self.lin = lin

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x * self.inv_scale)

    return SmoothedLinear


def int8_layer_names(model: Any) -> list[str]:
    """The linear layers the int8 recipe quantizes (see the module docstring)."""
    import torch

    intermediate = getattr(model.config, "intermediate_size", None)
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if ".layer." not in f".{name}." and ".layers." not in f".{name}.":
            continue  # pooler, classifier head: small and sensitive
        if intermediate is not None and mod.in_features == intermediate:
            continue  # FFN down-projection, fed by GELU: heavy-tailed inputs
        names.append(name)
    return names


def smooth_for_int8(model: Any, names: list[str], run_calibration: Any) -> list[str]:
    """Rescale the inputs of ``names`` (SmoothQuant); returns the inner layers' new names."""
    import torch

    amax: dict[str, Any] = {}
    hooks = []
    for name in names:
        mod = model.get_submodule(name)

        def hook(_mod: Any, inputs: tuple[Any, ...], _out: Any, name: str = name) -> None:
            x = inputs[0].detach().float()
            m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0)
            amax[name] = torch.maximum(amax[name], m) if name in amax else m

        hooks.append(mod.register_forward_hook(hook))
    try:
        run_calibration()
    finally:
        for h in hooks:
            h.remove()
    inner = []
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, attr)
        w = lin.weight.detach().abs().amax(dim=0).float().clamp(min=1e-5)
        a = amax[name].clamp(min=1e-5)
        scale = (a**SMOOTH_ALPHA / w ** (1 - SMOOTH_ALPHA)).clamp(min=1e-5)
        setattr(parent, attr, _smoothed_linear_class()(lin, scale))
        inner.append(f"{name}.lin")
    return inner


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao's deprecation notices and the exporter's chatter are not news to operators."""
    names = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    # onnxruntime.quantization logs each tensor it skips on the root logger itself; a filter
    # on the root logger sees only those records, not the ones propagated from other loggers.
    root_filter = _BelowError()
    logging.getLogger().addFilter(root_filter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.getLogger().removeFilter(root_filter)
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _calibration_batches(model: HFTextModel, rows: int = 16) -> list[list[list[int]]]:
    from streamer.models.calibration import CALIBRATION_TEXTS

    encs = model.tokenize(list(CALIBRATION_TEXTS))
    ids = [e.ids for e in encs]
    return [ids[i : i + rows] for i in range(0, len(ids), rows)]


class TorchInt8Model(HFTextModel):
    """Dynamic int8 on the CPU (smoothed, per-channel; see the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.device == "auto":  # int8 kernels are CPU kernels
            cfg = cfg.model_copy(update={"device": "cpu"})
        super().__init__(cfg)

    def load(self) -> None:
        super().load()
        import torch

        if self.device != "cpu":
            raise RuntimeError("model.quantize int8 runs on the CPU; set model.device: cpu")
        t = time.perf_counter()
        with _quiet():
            names = int8_layer_names(self._model)
            batches = _calibration_batches(self)
            inner = smooth_for_int8(self._model, names, lambda: [self.forward(b) for b in batches])
            qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
            self._model = torch.ao.quantization.quantize_dynamic(
                self._model, dict.fromkeys(inner, qconfig), dtype=torch.qint8
            )
        self.timings.phases["quantize"] = time.perf_counter() - t
        self.dtype = "int8"
        self.info = dataclasses.replace(self.info, dtype="int8")
        log.info("model %s: %d linear layers quantized to int8", self.cfg.ref, len(inner))


# -- ONNX export ----------------------------------------------------------------------------------
def _export_module(model: Any, cfg: ModelConfig, token_type_ids: bool, head: Any) -> Any:
    """The model plus what HFTextModel.forward does after it, as one exportable module.

    ``head`` is HFTextModel's own embedding head (sentence-transformers pooling, Dense layers,
    normalisation), so the export computes exactly what the torch backend does.
    """
    import torch

    class Exported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.head = head

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids:
                kwargs["token_type_ids"] = torch.zeros_like(input_ids)
            out = self.model(**kwargs)
            if cfg.task == "text-classification":
                return torch.softmax(out.logits.float(), dim=-1)
            return self.head(out.last_hidden_state, attention_mask)

    return Exported().eval()


class _ExportedModel(HFTextModel):
    """Loads with torch (tokenizer, checks, fingerprint), then serves an ONNX export."""

    runtime_name = ""

    def __init__(self, cfg: ModelConfig, *, threads: int | None = None) -> None:
        self.requested = cfg
        # The export is made from float32 weights on the CPU, whatever runs it afterwards.
        super().__init__(cfg.model_copy(update={"device": "cpu", "dtype": "float32"}))
        self.threads = threads
        self.exported = False  # True when this load wrote the export (False: from the cache)
        self.onnx_path: Path | None = None

    def _threads(self) -> int:
        if self.threads:
            return self.threads
        import torch

        return torch.get_num_threads()

    def cache_key(self) -> str:
        cfg = self.requested
        import torch

        parts = (
            self.info.fingerprint,
            cfg.task,
            self.head.describe(self.prompt_tokens) if self.head is not None else "",
            cfg.quantize,
            str(self.max_length),
            EXPORT_RECIPE,
            torch.__version__,
        )
        digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.name)
        return f"{safe}-{cfg.quantize}-{self.max_length}-{digest}"

    def _export(self) -> Path:
        """The cached export for this model (written now if it is not there)."""
        cache = Path(self.requested.onnx_cache_dir or default_cache_dir())
        final = cache / self.cache_key()
        path = final / "model.onnx"
        if path.is_file():
            log.info("model %s: ONNX export from the cache %s", self.cfg.ref, path)
            return path
        cache.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=cache))
        try:
            self._write_export(tmp)
            try:
                os.rename(tmp, final)  # atomic: a reader sees all of it or nothing
            except OSError:
                if not path.is_file():  # not a replica that won the race: a real error
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.exported = True
        self.timings.phases["export"] = time.perf_counter() - t
        log.info(
            "model %s: exported to %s in %.1fs", self.cfg.ref, path, self.timings.phases["export"]
        )
        return path

    def _write_export(self, out: Path) -> None:
        import torch

        model = self._model
        int8 = self.requested.quantize == "int8"
        with _quiet():
            if int8:
                batches = _calibration_batches(self)
                smooth_for_int8(
                    model, int8_layer_names(model), lambda: [self.forward(b) for b in batches]
                )
            module = _export_module(model, self.cfg, self._accepts_token_type_ids, self._head)
            ids = torch.full((2, 8), self._pad_id + 1, dtype=torch.long)
            mask = torch.ones_like(ids)
            dyn = torch.export.Dim.DYNAMIC
            fp32 = out / ("model.fp32.onnx" if int8 else "model.onnx")
            big = getattr(self, "memory_bytes", 0) > 1_500_000_000  # protobuf's 2 GB limit
            torch.onnx.export(
                module,
                (ids, mask),
                str(fp32),
                input_names=["input_ids", "attention_mask"],
                output_names=["output"],
                dynamic_shapes={"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}},
                dynamo=True,
                external_data=big,
                verbose=False,
            )
            if int8:
                self._quantize_onnx(fp32, out / "model.onnx", big)
                for f in out.iterdir():
                    if f.name.startswith("model.fp32.onnx"):
                        f.unlink()

    def _quantize_onnx(self, src: Path, dst: Path, big: bool) -> None:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        graph = onnx.load(str(src), load_external_data=False).graph
        shapes = {i.name: list(i.dims) for i in graph.initializer}
        intermediate = getattr(self._model.config, "intermediate_size", None)
        # FFN down-projections stay float32, as in TorchInt8Model: a MatMul whose constant
        # weight has intermediate_size rows.
        exclude = [
            n.name
            for n in graph.node
            if n.op_type == "MatMul"
            and len(n.input) > 1
            and shapes.get(n.input[1], [0])[0] == intermediate
        ]
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul"],  # 2-D Gemm (pooler, classifier) stays float32
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            use_external_data_format=big,
            extra_options={"MatMulConstBOnly": True},  # not the attention products
        )

    def load(self) -> None:
        super().load()
        self.onnx_path = self._export()
        self._model = None  # the torch weights are not needed any more
        t = time.perf_counter()
        self._open(self.onnx_path)
        self.timings.phases["runtime"] = time.perf_counter() - t
        precision = "int8" if self.requested.quantize == "int8" else self._precision()
        self.dtype = precision
        self.info = dataclasses.replace(self.info, device=self.device, dtype=precision)
        log.info(
            "model %s: %s on %s, %s, %d threads",
            self.cfg.ref,
            self.runtime_name,
            self.device,
            precision,
            self._threads(),
        )

    def _precision(self) -> str:
        return "float32"

    def _open(self, path: Path) -> None:
        raise NotImplementedError

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def forward(self, batch: list[list[int]]) -> Any:
        if self._model is not None:  # during export (calibration): the torch model
            return super().forward(batch)
        ids, mask = self.pad(batch)
        return self._run(ids, mask)[: len(batch)]  # padded rows (model.row_buckets) dropped


class OnnxRuntimeModel(_ExportedModel):
    """ONNX Runtime: CPU, or CUDA when onnxruntime-gpu's CUDAExecutionProvider is there."""

    runtime_name = "onnxruntime"

    def _open(self, path: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeError(
                "model.backend onnxruntime needs onnxruntime: pip install 'streamer[onnx]'"
            ) from exc
        providers = ["CPUExecutionProvider"]
        self.device = "cpu"
        if self.requested.device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(
                    "model.device cuda with backend onnxruntime needs onnxruntime-gpu "
                    "(CUDAExecutionProvider); use backend torch for CUDA"
                )
            providers.insert(0, "CUDAExecutionProvider")
            self.device = "cuda"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle pool threads would spin on the cores the tokenizer and serialiser need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(path), opts, providers=providers)

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0]


class OpenVinoModel(_ExportedModel):
    """OpenVINO on the CPU, from the same ONNX export (no optimum-intel needed)."""

    runtime_name = "openvino"

    def __init__(self, cfg: ModelConfig, *, threads: int | None = None) -> None:
        if cfg.quantize == "int8":
            raise RuntimeError(
                "model.backend openvino with quantize int8 is not supported (OpenVINO runs "
                "ONNX Runtime's int8 graph slowly); use backend onnxruntime or torch for int8"
            )
        super().__init__(cfg, threads=threads)

    def _precision(self) -> str:
        return "bfloat16" if self.requested.dtype == "bfloat16" else "float32"

    def _open(self, path: Path) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise RuntimeError(
                "model.backend openvino needs openvino: pip install 'streamer[openvino]'"
            ) from exc
        self.device = "cpu"
        compiled = ov.Core().compile_model(
            str(path),
            "CPU",
            {
                "INFERENCE_NUM_THREADS": self._threads(),
                "PERFORMANCE_HINT": "LATENCY",
                # OpenVINO would otherwise run bf16 on CPUs that have it, silently.
                "INFERENCE_PRECISION_HINT": "bf16" if self._precision() == "bfloat16" else "f32",
            },
        )
        self._request = compiled.create_infer_request()

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = self._request.infer({"input_ids": ids, "attention_mask": mask})
        return np.array(out[0], dtype=np.float32)  # a copy: the request reuses its buffer
