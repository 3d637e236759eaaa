"""The model interface: load, tokenize, forward, postprocess, warm-up (after Infinity).

:class:`HFTextModel` serves a local Hugging Face directory, offline. Tokenization uses the Rust
backend's ``encode_batch`` without padding (padding happens once, into one numpy buffer, in
:meth:`HFTextModel.forward`), so token counts are known before batching.

Everything here is synchronous and runs on the worker threads of :mod:`streamer.models.worker`,
never on the event loop.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from streamer.models import mlflow_registry as mlflow_models
from streamer.config import ModelConfig
from streamer.models.checks import (
    ModelCheckError,
    ModelFiles,
    check_compat,
    raise_on_errors,
    scan,
    verify_pins,
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
        self.timings.phases["fingerprint"] = time.perf_counter() - t

        t = time.perf_counter()
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        self.timings.phases["framework"] = time.perf_counter() - t

        t = time.perf_counter()
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
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
        model = auto.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
        model.eval()
        self.timings.phases["weights"] = time.perf_counter() - t

        self.findings = check_compat(tok, model, cfg)
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
        if tok.model_max_length and tok.model_max_length < 1_000_000:
            limits.append(tok.model_max_length)
        self.max_length = min(limits)
        if self.max_length < cfg.max_length:
            log.warning(
                "model.max_length=%d is above what %s supports; using %d",
                cfg.max_length,
                path,
                self.max_length,
            )
        backend = copy.deepcopy(backend)
        backend.no_padding()
        backend.enable_truncation(self.max_length)
        self._backend = backend
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self._accepts_token_type_ids = "token_type_ids" in tok.model_input_names
        if cfg.task == "text-classification":
            self._labels = {int(k): v for k, v in (mcfg.id2label or {}).items()}
        self._torch = torch
        self._model = model
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
        encs = self._backend.encode_batch(texts)
        return [Encoded(e.ids, bool(e.overflowing)) for e in encs]

    def pad(self, batch: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Pad rows into preallocated buffers (pinned on CUDA): no allocation per batch.

        The buffers grow to the largest batch seen; each batch gets a contiguous
        ``(rows, longest row)`` view of them, valid until the next call (forward is
        synchronous, so the device copy is done by then).
        """
        n, width = len(batch), max(len(ids) for ids in batch)
        size = n * width
        if self._buffers is None or self._buffers[0].numel() < size:
            torch = self._torch
            capacity = max(size, 2 * self._buffers[0].numel() if self._buffers else 0)
            pin = self.device == "cuda"
            self._buffers = tuple(  # type: ignore[assignment]
                torch.empty(capacity, dtype=torch.int64, pin_memory=pin) for _ in range(2)
            )
        assert self._buffers is not None
        ids_t, mask_t = (b[:size].view(n, width) for b in self._buffers)
        ids, mask = ids_t.numpy(), mask_t.numpy()
        ids.fill(self._pad_id)
        mask.fill(0)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        self._views = (ids_t, mask_t)
        return ids, mask

    def forward(self, batch: list[list[int]]) -> Any:
        torch = self._torch
        self.pad(batch)
        ids_t, mask_t = self._views
        input_ids = ids_t.to(self.device, non_blocking=True)
        attention = mask_t.to(self.device, non_blocking=True)
        kwargs = {"input_ids": input_ids, "attention_mask": attention}
        if self._accepts_token_type_ids:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        with torch.inference_mode():
            out = self._model(**kwargs)
            if self.cfg.task == "text-classification":
                probs = torch.softmax(out.logits.float(), dim=-1)
                return probs.cpu().numpy()
            hidden = out.last_hidden_state
            if self.cfg.pooling == "cls":
                pooled = hidden[:, 0].float()
            else:
                m = attention.unsqueeze(-1).to(hidden.dtype)
                pooled = ((hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).float()
            if self.cfg.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            return pooled.cpu().numpy()

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

    def warmup(self, max_batch_size: int, max_batch_tokens: int) -> float:
        """Run representative shapes once so the first real batch pays no one-time cost.

        On CUDA the largest batch the token budget allows is run, so the caching allocator
        and kernel selection are settled before the first real batch. On CPU that costs
        seconds and buys nothing (measured: the first 64x128 batch takes as long after it as
        without it), so one small batch pays the one-time initialisation instead.
        """
        t = time.perf_counter()
        filler = self._pad_id + 1
        small = min(self.max_length, 32)
        rows = min(8, max_batch_size)
        self.postprocess(self.forward([[filler] * small] * rows), rows)
        if self.device != "cpu":
            width = min(self.max_length, max(2, max_batch_tokens))
            rows = max(1, min(max_batch_size, max_batch_tokens // width))
            self.postprocess(self.forward([[filler] * width] * rows), rows)
            self._torch.cuda.synchronize()
        self.timings.phases["warmup"] = time.perf_counter() - t
        return self.timings.phases["warmup"]
