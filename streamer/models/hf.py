"""The model interface: load, tokenize, forward, postprocess, warm-up (after Infinity).

:class:`HFTextModel` serves a local Hugging Face directory, offline. Tokenization uses the Rust
backend's ``encode_batch`` without padding (padding happens once per batch, vectorised, into
preallocated buffers, in :meth:`HFTextModel.pad`), so token counts are known before batching.

For feature extraction the encoder's output goes through a small head
(:mod:`streamer.models.sbert`): the pooling, Dense layers and normalisation that a
sentence-transformers folder declares in ``modules.json`` (else ``model.pooling`` and
``model.normalize``), on the device, inside the same CUDA graphs and ONNX exports as the encoder.

On CUDA batches are padded to a small ladder of shapes (:mod:`streamer.models.shapes`), every
shape is warmed before the consumer joins, and each is replayed as a CUDA graph: a small encoder
is bound by kernel launches there, and each new shape costs tens of milliseconds the first time.
On the CPU shapes stay exact (a new shape costs nothing there, padding costs compute), and
a batch's rows run in groups of similar length (:func:`~streamer.models.shapes.length_groups`).

Everything here is synchronous and runs on the worker threads of :mod:`streamer.models.worker`,
never on the event loop.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from streamer.config import ModelConfig
from streamer.models import mlflow_registry as mlflow_models
from streamer.models.checks import (
    ModelCheckError,
    ModelFiles,
    check_compat,
    check_weights_format,
    custom_code,
    raise_on_errors,
    scan,
    verify_pins,
)
from streamer.models.sbert import (
    Head,
    Pipeline,
    build_head,
    check_dense_weights,
    lowercasing,
    prompt_token_count,
    read_pipeline,
    resolve,
    warn_override,
)
from streamer.models.shapes import (
    CUDA_WIDTH_MULTIPLE,
    GraphRunner,
    Shape,
    ShapeLadder,
    default_row_buckets,
    min_cosine,
)
from streamer.stream.records import ModelInfo

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Encoded:
    ids: list[int]
    truncated: bool


@dataclass
class LoadTimings:
    """Seconds per cold-start phase."""

    phases: dict[str, float] = field(default_factory=dict)

    def total(self) -> float:
        return sum(self.phases.values())


class TextModel(Protocol):
    info: ModelInfo
    max_length: int
    timings: LoadTimings

    def tokenize(self, texts: list[str]) -> list[Encoded]: ...
    def forward(self, batch: list[list[int]]) -> Any: ...
    def postprocess(self, outputs: Any, n: int) -> list[dict[str, Any]]: ...
    def warmup(self, max_batch_size: int, max_batch_tokens: int) -> float: ...


def _check_room(files: ModelFiles, device: str, ref: str) -> None:
    """Fail clearly, before loading, when the device cannot hold the weights."""
    import psutil

    need = sum(p.stat().st_size for p in files.weights)
    if device == "cuda":
        import torch

        free = torch.cuda.mem_get_info()[0]
        where = "free GPU memory"
    else:
        free = psutil.virtual_memory().available
        where = "available memory"
    if need > free:
        raise ModelCheckError(
            f"model {ref} needs about {need / 2**20:.0f} MiB but only {free / 2**20:.0f} MiB of "
            f"{where} is left (other models loaded?): give the instance more memory, load "
            "fewer models, or use a smaller dtype"
        )


def _custom_code_error(path: Path, ref: str) -> ModelCheckError | None:
    """The clear error when transformers cannot build a model without its own Python code."""
    auto_map = custom_code(path)
    if not auto_map:
        return None
    return ModelCheckError(
        f"model {ref} at {path} can only be built by the custom code its config.json names "
        f"(auto_map: {', '.join(sorted(set(auto_map.values())))}), which streamer never "
        "executes: use a model whose architecture transformers ships, or convert it to one"
    )


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is visible; use auto or cpu")
    return requested


def resolve_dtype(requested: str, device: str) -> str:
    if requested == "auto":
        return "float16" if device == "cuda" else "float32"
    return requested


GRAPH_WARM_RUNS = 3  # eager runs of a shape on the capture stream before its capture
GRAPH_MIN_COSINE = 0.9999  # a replay must agree this well with eager, or the shape runs eagerly


class GraphMismatchError(RuntimeError):
    """A captured graph's output differs from the eager forward's on the same inputs."""


@dataclass
class CudaGraph:
    """One captured forward for one shape: static device inputs and output, pinned host copy.

    Replays run on the calling thread's current stream; forward is synchronous, so the pinned
    input buffers are not rewritten while their copies are in flight.
    """

    torch: Any
    graph: Any
    ids: Any
    mask: Any
    out: Any
    host: Any

    def __call__(self, ids: Any, mask: Any, n: int) -> np.ndarray:
        self.ids.copy_(ids, non_blocking=True)
        self.mask.copy_(mask, non_blocking=True)
        self.graph.replay()
        self.host.copy_(self.out, non_blocking=True)
        self.torch.cuda.current_stream().synchronize()
        return self.host[:n].numpy().copy()  # the next replay rewrites the host buffer


class HFTextModel:
    """A transformers encoder for feature extraction (pooled embeddings) or classification."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.timings = LoadTimings()
        self.max_length = cfg.max_length
        self._labels: dict[int, str] = {}
        self._accepts_token_type_ids = False
        self._buffers: tuple[Any, Any] | None = None
        self._views: tuple[Any, Any] = (None, None)
        self._model: Any = None
        self.sbert: Pipeline | None = None  # the folder's sentence-transformers pipeline
        self.head: Head | None = None  # what runs after the encoder (feature extraction)
        self._head: Any = None  # ... as a torch module on the device
        self._prefix = ""  # prepended to every text (model.prompt / prompt_name)
        self.prompt_tokens = 0  # tokens the prefix adds (pooling skips them: include_prompt)
        self.embedding_dim: int | None = None
        # Exact shapes until load() knows the device (and warmup() the batch size).
        self._ladder_device = "cpu"
        self.ladder = ShapeLadder(cfg.max_length, cfg.width_multiple or 1)
        self.graphs: GraphRunner | None = None  # CUDA graphs per shape, after warm-up
        self.warm_shapes = 0  # shapes the last warm-up ran (and captured, with graphs)
        self._graph_pool: Any = None
        self._capture_stream: Any = None

    # -- load ---------------------------------------------------------------------------------
    def load(self) -> None:
        cfg = self.cfg
        if cfg.path is None:
            raise RuntimeError("model.path is not set")
        path = Path(cfg.path)
        if mlflow_models.is_registry_uri(cfg.path):
            t = time.perf_counter()
            path = mlflow_models.resolve(str(cfg.path))
            self.timings.phases["download"] = time.perf_counter() - t
        self.path = path
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        # Hash and check the pins before anything is loaded: a drifted file never serves.
        t = time.perf_counter()
        self.files: ModelFiles = scan(path)
        verify_pins(self.files, cfg.pins, cfg.ref)
        # Pickle weights can run code when unpickled: refused unless model.allow_pickle.
        self.weights_format = check_weights_format(path, cfg.allow_pickle, cfg.ref)
        # A sentence-transformers folder's own pooling/Dense/Normalize (its Dense weights under
        # the same pickle policy), resolved against the keys now: a bad prompt fails fast.
        if cfg.task == "feature-extraction":
            self.sbert = read_pipeline(path, cfg.ref)
            check_dense_weights(self.sbert, cfg.allow_pickle, cfg.ref)
            self.head = resolve(cfg, self.sbert)
            self._prefix = self.head.prompt
        else:
            if (path / "modules.json").is_file():
                log.info("model %s: text-classification ignores modules.json", cfg.ref)
            self._prefix = cfg.prompt or ""
        self.timings.phases["fingerprint"] = time.perf_counter() - t

        t = time.perf_counter()
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        self.timings.phases["framework"] = time.perf_counter() - t

        t = time.perf_counter()
        # Never run code shipped with the files (config.json's auto_map): built-in classes only.
        try:
            tok = transformers.AutoTokenizer.from_pretrained(
                path, local_files_only=True, trust_remote_code=False
            )
        except ValueError as exc:
            if (err := _custom_code_error(path, cfg.ref)) is None:
                raise
            raise err from exc
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise ModelCheckError(f"{path}: no fast tokenizer (tokenizer.json) found")
        self.timings.phases["tokenizer"] = time.perf_counter() - t

        t = time.perf_counter()
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        _check_room(self.files, self.device, cfg.ref)
        torch_dtype = getattr(torch, self.dtype)
        auto = (
            transformers.AutoModelForSequenceClassification
            if cfg.task == "text-classification"
            else transformers.AutoModel
        )
        try:
            model = auto.from_pretrained(
                path,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=None if cfg.allow_pickle else True,  # None: safetensors first
                dtype=torch_dtype,
            )
        except ValueError as exc:
            if (err := _custom_code_error(path, cfg.ref)) is None:
                raise
            raise err from exc
        model.eval()
        self.timings.phases["weights"] = time.perf_counter() - t

        checked = cfg
        if self.head is not None:  # the pooling actually served (the folder's or the key's)
            pooling = "cls" if "cls" in self.head.pooling else self.head.pooling[0]
            checked = cfg.model_copy(update={"pooling": pooling})
        self.findings = check_compat(tok, model, checked)
        for f in self.findings:
            if f.level == "warning":
                log.warning("model %s: %s: %s", cfg.ref, f.check, f.message)
        raise_on_errors(self.findings, cfg.ref, path)

        t = time.perf_counter()
        model.to(self.device)
        self.timings.phases["device"] = time.perf_counter() - t
        self.memory_bytes = sum(
            t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
        )
        fp = self.files.fingerprint

        mcfg = model.config
        limits = [cfg.max_length]
        max_pos = getattr(mcfg, "max_position_embeddings", None)
        if max_pos:
            # RoBERTa-style models reserve positions for the padding offset.
            limits.append(max_pos - (2 if mcfg.model_type in {"roberta", "xlm-roberta"} else 0))
        folder_max = self.sbert.max_seq_length if self.sbert else None
        explicit = "max_length" in cfg.model_fields_set
        if folder_max is None:
            if tok.model_max_length and tok.model_max_length < 1_000_000:
                limits.append(tok.model_max_length)
        elif not explicit:
            # sentence-transformers truncates at max_seq_length instead of the tokenizer's limit.
            limits.append(folder_max)
        self.max_length = min(limits)
        if explicit and folder_max is not None and self.max_length > folder_max:
            where = "sentence_bert_config.json max_seq_length"
            warn_override(cfg.ref, "model.max_length", folder_max, self.max_length, where)
        if self.max_length < cfg.max_length:
            # Unset on a sentence-transformers folder: its own limit is the intended one.
            quiet = not explicit and self.sbert is not None
            log.log(
                logging.INFO if quiet else logging.WARNING,
                "model.max_length=%d is above what %s supports; using %d",
                cfg.max_length,
                path,
                self.max_length,
            )
        backend = copy.deepcopy(backend)
        backend.no_padding()
        backend.enable_truncation(self.max_length)
        if self.head is not None:
            if self.head.do_lower_case:
                backend = lowercasing(backend)
            self.prompt_tokens = prompt_token_count(backend, self.head.prompt)
            hidden_size = getattr(mcfg, "hidden_size", None) or (
                model.get_input_embeddings().embedding_dim
            )
            module, self.embedding_dim = build_head(
                self.head,
                hidden_size=int(hidden_size),
                prompt_length=self.prompt_tokens,
                allow_pickle=cfg.allow_pickle,
                ref=cfg.ref,
                pipeline=self.sbert,
            )
            self._head = module.to(self.device)
        self._backend = backend
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self._accepts_token_type_ids = "token_type_ids" in tok.model_input_names
        if cfg.task == "text-classification":
            self._labels = {int(k): v for k, v in (mcfg.id2label or {}).items()}
        self._torch = torch
        self._model = model
        # The device as loaded decides the default shapes: an exported runtime that moves to
        # CUDA afterwards (ONNX Runtime) keeps exact shapes unless the keys say otherwise.
        self._ladder_device = self.device
        self.ladder = self.build_ladder()
        self.info = ModelInfo(
            name=cfg.name,
            version=cfg.version,
            fingerprint=fp,
            task=cfg.task,
            device=self.device,
            dtype=self.dtype,
        )

    # -- stages -------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> list[Encoded]:
        if self._prefix:
            texts = [self._prefix + t for t in texts]
        encs = self._backend.encode_batch(texts)
        return [Encoded(e.ids, bool(e.overflowing)) for e in encs]

    def build_ladder(self, max_batch_size: int | None = None) -> ShapeLadder:
        """The shapes batches are padded to, from the keys or the device's defaults.

        Default row buckets need the batch size, which only warm-up is told; until then a
        CUDA model pads widths only.
        """
        cfg = self.cfg
        cuda = self._ladder_device == "cuda"
        multiple = cfg.width_multiple or (CUDA_WIDTH_MULTIPLE if cuda else 1)
        if cfg.row_buckets is not None:
            buckets = tuple(cfg.row_buckets)
        elif cuda and max_batch_size:
            buckets = default_row_buckets(max_batch_size)
        else:
            buckets = ()
        return ShapeLadder(self.max_length, multiple, buckets)

    def _host_views(self, rows: int, width: int) -> tuple[Any, Any]:
        """``(rows, width)`` views of the preallocated int64 buffers, grown when too small."""
        size = rows * width
        if self._buffers is None or self._buffers[0].numel() < size:
            torch = self._torch
            capacity = max(size, 2 * self._buffers[0].numel() if self._buffers else 0)
            pin = self.device == "cuda" and torch.cuda.is_available()
            self._buffers = tuple(  # type: ignore[assignment]
                torch.empty(capacity, dtype=torch.int64, pin_memory=pin) for _ in range(2)
            )
        assert self._buffers is not None
        ids_t, mask_t = (b[:size].view(rows, width) for b in self._buffers)
        return ids_t, mask_t

    def pad(self, batch: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Pad rows into preallocated buffers (pinned on CUDA): no allocation per batch.

        The batch is padded to its ladder shape ``(R, W) >= (rows, longest row)``; rows past
        ``len(batch)`` are dummies that attend to one pad token (no row is fully masked). The
        buffers grow to the largest batch seen; each batch gets a contiguous ``(R, W)`` view of
        them, valid until the next call (forward is synchronous, so the device copy is done by
        then). Vectorised: a Python loop per row cost more than the copy itself.
        """
        if not batch:
            raise ValueError("cannot pad an empty batch")
        n = len(batch)
        lengths = np.fromiter(map(len, batch), dtype=np.int64, count=n)
        rows, width = self.ladder.padded_shape(n, int(lengths.max()))
        ids_t, mask_t = self._host_views(rows, width)
        ids, mask = ids_t.numpy(), mask_t.numpy()
        valid = np.arange(width) < lengths[:, None]
        flat = np.fromiter(
            itertools.chain.from_iterable(batch), dtype=np.int64, count=int(lengths.sum())
        )
        ids.fill(self._pad_id)
        ids[:n][valid] = flat  # row-major: row i's tokens fill its first len(row i) slots
        mask[:n] = valid
        if rows > n:
            mask[n:] = 0
            mask[n:, 0] = 1
        self._views = (ids_t, mask_t)
        return ids, mask

    def _compute(self, input_ids: Any, attention: Any) -> Any:
        """Model + head (pooling, Dense, normalisation) or softmax on device tensors: float32.

        Nothing in here waits for the device, so the same code is captured into CUDA graphs.
        """
        torch = self._torch
        kwargs = {"input_ids": input_ids, "attention_mask": attention}
        if self._accepts_token_type_ids:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        out = self._model(**kwargs)
        if self.cfg.task == "text-classification":
            return torch.softmax(out.logits.float(), dim=-1)
        return self._head(out.last_hidden_state, attention)

    def _eager(self, ids_t: Any, mask_t: Any, n: int) -> np.ndarray:
        """The plain forward of padded host tensors: the first ``n`` rows, float32."""
        torch = self._torch
        with torch.inference_mode():
            input_ids = ids_t.to(self.device, non_blocking=True)
            attention = mask_t.to(self.device, non_blocking=True)
            return self._compute(input_ids, attention)[:n].cpu().numpy()

    @property
    def splits_by_length(self) -> bool:
        """Whether the worker should run a batch's rows in groups of similar length
        (:func:`~streamer.models.shapes.length_groups`): on the CPU with exact shapes, where
        padding costs compute; never on a ladder (CUDA graphs want the batch's shape)."""
        return self.device == "cpu" and self.ladder.exact

    def forward(self, batch: list[list[int]]) -> Any:
        """Float32 outputs, exactly ``len(batch)`` rows (dummy rows dropped)."""
        n = len(batch)
        self.pad(batch)
        ids_t, mask_t = self._views
        if self.graphs is not None:
            with self._torch.inference_mode():
                return self.graphs.run(ids_t, mask_t, n)
        return self._eager(ids_t, mask_t, n)

    @property
    def graph_replays(self) -> int:
        """Batches served by a CUDA graph replay since warm-up."""
        return self.graphs.replays if self.graphs is not None else 0

    @property
    def eager_fallbacks(self) -> int:
        """Batches run eagerly although graphs are on (a shape outside the warmed ladder)."""
        return self.graphs.fallbacks if self.graphs is not None else 0

    def postprocess(self, outputs: Any, n: int) -> list[dict[str, Any]]:
        arr = np.asarray(outputs, dtype=np.float32)
        if self.cfg.task == "text-classification":
            results = []
            for row in arr:
                top = int(row.argmax())
                res: dict[str, Any] = {
                    "label": self._labels.get(top, str(top)),
                    "score": float(row[top]),
                }
                if self.cfg.return_all_scores:
                    res["scores"] = {
                        self._labels.get(i, str(i)): float(s) for i, s in enumerate(row)
                    }
                results.append(res)
            return results
        return [{"embedding": arr[i]} for i in range(n)]

    def uses_cuda_graphs(self) -> bool:
        """Graphs need CUDA and the torch model itself (not an exported runtime)."""
        return self.cfg.cuda_graphs and self.device == "cuda" and self._model is not None

    def warmup(self, max_batch_size: int, max_batch_tokens: int) -> float:
        """Run representative shapes once so the first real batch pays no one-time cost.

        On CUDA (torch) every ladder shape that a batch within ``max_batch_size`` and
        ``max_batch_tokens`` can pad to is run, and captured as a CUDA graph when graphs are
        on, so no real batch meets a new shape. On CPU that costs seconds and buys nothing
        (measured: the first 64x128 batch takes as long after it as without it), so one small
        batch pays the one-time initialisation instead.
        """
        t = time.perf_counter()
        if self.device == "cuda" and self._model is not None:
            self._warm_ladder(max_batch_size, max_batch_tokens, t)
        else:
            filler = self._pad_id + 1
            small = min(self.max_length, 32)
            rows = min(8, max_batch_size)
            self.postprocess(self.forward([[filler] * small] * rows), rows)
            self.warm_shapes = 1
            if self.device != "cpu":  # an exported runtime on CUDA (ONNX Runtime)
                width = min(self.max_length, max(2, max_batch_tokens))
                rows = max(1, min(max_batch_size, max_batch_tokens // width))
                self.postprocess(self.forward([[filler] * width] * rows), rows)
                self._torch.cuda.synchronize()
                self.warm_shapes = 2
        self.timings.phases["warmup"] = time.perf_counter() - t
        return self.timings.phases["warmup"]

    def _warm_ladder(self, max_batch_size: int, max_batch_tokens: int, started: float) -> None:
        torch = self._torch
        self.graphs = None  # a second warm-up captures afresh
        self.ladder = self.build_ladder(max_batch_size)
        shapes = self.ladder.ladder_shapes(max_batch_size, max_batch_tokens)
        # Largest first: the graphs share one memory pool, which the smaller ones then reuse.
        shapes.sort(key=lambda s: (s[0] * s[1], s), reverse=True)
        self._host_views(*shapes[0])  # grow the pinned buffers once, before serving
        failed = 0
        if self.uses_cuda_graphs():
            self._graph_pool = torch.cuda.graph_pool_handle()
            self._capture_stream = torch.cuda.Stream()
            runner = GraphRunner(self._capture_graph, self._eager, name=self.cfg.ref)
            runner.prepare_all(shapes)
            failed = len(runner.failed)
            self.graphs = runner
        else:
            for rows, width in shapes:
                ids, mask = self._sample(rows, width, seed=0)
                self._eager(torch.from_numpy(ids), torch.from_numpy(mask), rows)
        torch.cuda.synchronize()
        self.warm_shapes = len(shapes)
        log.info(
            "model %s: warmed %d shapes (rows %s, widths %s) in %.1fs; CUDA graphs: %s",
            self.cfg.ref,
            len(shapes),
            sorted({r for r, _ in shapes}),
            sorted({w for _, w in shapes}),
            time.perf_counter() - started,
            f"{len(shapes) - failed} captured, {failed} eager" if self.graphs else "off",
        )

    def _sample(self, rows: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Ragged inputs of one shape: seed 0 has no full row, others full and 1-token rows.

        Ragged on purpose: transformers drops an all-ones mask (and picks another kernel), so
        warm-up and capture see the masked path; the check after capture uses other lengths.
        """
        rng = np.random.default_rng(seed)
        vocab = int(getattr(self._model.config, "vocab_size", 0) or self._pad_id + 2)
        if seed == 0:
            lengths = np.linspace(max(1, width - 1), 1, rows).round().astype(np.int64)
        else:
            lengths = rng.integers(1, width + 1, size=rows)
            lengths[0] = width
            lengths[-1] = 1 if rows > 1 else width
        mask = (np.arange(width) < lengths[:, None]).astype(np.int64)
        ids = np.where(mask == 1, rng.integers(0, vocab, size=(rows, width)), self._pad_id)
        return ids.astype(np.int64), mask

    def _capture_graph(self, shape: Shape) -> CudaGraph:
        """Warm ``shape`` eagerly on the capture stream, capture it, check it against eager."""
        torch = self._torch
        rows, width = shape
        ids, mask = self._sample(rows, width, seed=0)
        check_ids, check_mask = self._sample(rows, width, seed=1)
        stream = self._capture_stream
        with torch.inference_mode():
            static_ids = torch.from_numpy(ids).to(self.device)
            static_mask = torch.from_numpy(mask).to(self.device)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(GRAPH_WARM_RUNS):
                    self._compute(static_ids, static_mask)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a model serving on another thread (during a reload) may allocate.
            with torch.cuda.graph(
                graph, pool=self._graph_pool, stream=stream, capture_error_mode="thread_local"
            ):
                out = self._compute(static_ids, static_mask)
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            runner = CudaGraph(torch, graph, static_ids, static_mask, out, host)
            # Other inputs than the captured ones: a graph that baked its inputs in shows here.
            got = runner(torch.from_numpy(check_ids), torch.from_numpy(check_mask), rows)
        want = self._eager(torch.from_numpy(check_ids), torch.from_numpy(check_mask), rows)
        worst = min_cosine(got, want)
        if not worst >= GRAPH_MIN_COSINE:  # NaN fails too
            raise GraphMismatchError(
                f"replay agrees with eager at cosine {worst:.6f} < {GRAPH_MIN_COSINE}"
            )
        return runner
