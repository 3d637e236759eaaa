"""Sentence-transformers model folders: the pipeline a folder declares, applied without the library.

Most embedding models (MiniLM, BGE, E5, GTE, mpnet, …) ship a ``modules.json`` naming the steps
after the encoder: a ``Pooling`` module (cls, mean, max, …), sometimes ``Dense`` projections and a
``Normalize``. Pooling by a fixed rule instead silently gives other vectors than the model's
authors (BGE pools the CLS token; a Dense layer changes the dimension), so :func:`read_pipeline`
parses those JSON files itself — sentence-transformers is never imported at run time, and no code
a folder names is ever imported — and :func:`resolve` combines them with the ``model.*`` keys
(explicit keys win, with a warning). :func:`build_head` turns the result into one small torch
module (pooling, Dense, normalisation) that :class:`~streamer.models.hf.HFTextModel` runs on the
device after the encoder, eagerly, inside CUDA graphs, and inside the ONNX export alike.

Supported modules: ``Transformer`` (at the folder's root), ``Pooling`` (cls, mean, max,
mean_sqrt_len, weightedmean, lasttoken, several concatenated; ``include_prompt``), ``Dense``
(torch activation classes only), ``Normalize`` and ``Dropout`` (a no-op at inference). Anything
else is refused at load, naming the module.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer.config import ModelConfig
from streamer.models.checks import ModelCheckError, weights_format

log = logging.getLogger(__name__)

MODULES_FILE = "modules.json"
TRANSFORMER_CONFIG = "sentence_bert_config.json"
ST_CONFIG = "config_sentence_transformers.json"

# sentence-transformers' names (both the legacy boolean keys and the ``pooling_mode`` strings) ->
# streamer's ``model.pooling`` names. The legacy keys are in the library's concatenation order.
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_NAMES = {
    "cls": "cls",
    "max": "max",
    "mean": "mean",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "mean_sqrt_len": "mean_sqrt_len",
    "weightedmean": "weightedmean",
    "lasttoken": "lasttoken",
}
# torch.nn activation classes a Dense module may name; built here by name, never imported by path.
ACTIVATIONS = (
    "Identity",
    "Tanh",
    "ReLU",
    "GELU",
    "Sigmoid",
    "SiLU",
    "LeakyReLU",
    "ELU",
    "Softplus",
)
SUPPORTED_MODULES = ("Transformer", "Pooling", "Dense", "Normalize", "Dropout")
EMBEDDING = "sentence_embedding"  # the feature key Dense/Normalize must read and write


@dataclass(frozen=True)
class DenseLayer:
    """One ``Dense`` module: ``activation(linear(x))`` (plus ``x`` or its projection, residual)."""

    directory: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # a name in ACTIVATIONS
    use_residual: bool = False

    def describe(self) -> str:
        extra = ", residual" if self.use_residual else ""
        bias = "" if self.bias else ", no bias"
        return f"{self.in_features}->{self.out_features} {self.activation}{bias}{extra}"


NORMALIZE = "normalize"  # a post-pooling step: L2 normalisation
Step = DenseLayer | str


@dataclass(frozen=True)
class Pipeline:
    """What a sentence-transformers folder declares, read from its JSON files."""

    root: Path
    modules: tuple[str, ...]  # module class names, in order
    pooling: tuple[str, ...]
    include_prompt: bool
    embedding_dimension: int | None
    steps: tuple[Step, ...]  # after pooling, in order: Dense layers and normalisation
    max_seq_length: int | None
    do_lower_case: bool
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    similarity_fn_name: str | None = None

    @property
    def normalize(self) -> bool:
        return bool(self.steps) and self.steps[-1] == NORMALIZE

    @property
    def dense(self) -> tuple[DenseLayer, ...]:
        return tuple(s for s in self.steps if isinstance(s, DenseLayer))


@dataclass(frozen=True)
class Head:
    """What runs after the encoder for feature extraction, resolved from the folder and keys."""

    pooling: tuple[str, ...]
    steps: tuple[Step, ...]
    prompt: str = ""  # prepended to every text before tokenization
    prompt_name: str | None = None
    include_prompt: bool = True  # False: pooling skips the prompt's tokens
    do_lower_case: bool = False

    @property
    def normalize(self) -> bool:
        return NORMALIZE in self.steps

    @property
    def dense(self) -> tuple[DenseLayer, ...]:
        return tuple(s for s in self.steps if isinstance(s, DenseLayer))

    def describe(self, prompt_length: int = 0) -> str:
        """One line that changes whenever the computation does (the ONNX cache key uses it)."""
        steps = ",".join(s.describe() if isinstance(s, DenseLayer) else s for s in self.steps)
        skip = prompt_length if not self.include_prompt else 0
        return f"pool={'+'.join(self.pooling)};skip={skip};steps={steps}"


def _load_json(path: Path, ref: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelCheckError(
            f"model {ref}: cannot read {path} ({exc}): restore the sentence-transformers files "
            f"or remove {MODULES_FILE} to pool by model.pooling"
        ) from exc


def _optional_json(path: Path, ref: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = _load_json(path, ref)
    if not isinstance(data, dict):
        raise ModelCheckError(f"model {ref}: {path} is not a JSON object")
    return data


def _class_name(type_name: str) -> str:
    return type_name.rsplit(".", 1)[-1]


def _pooling(cfg: dict[str, Any], where: Path, ref: str) -> tuple[str, ...]:
    mode = cfg.get("pooling_mode")
    if mode is None:
        # No key, or none enabled: sentence-transformers pools the mean.
        modes = tuple(v for k, v in LEGACY_POOLING_KEYS.items() if cfg.get(k)) or ("mean",)
    else:
        raw = [mode] if isinstance(mode, str) else list(mode)
        bad = [m for m in raw if m not in POOLING_NAMES]
        if bad:
            raise ModelCheckError(
                f"model {ref}: {where} asks for pooling {bad}, which streamer does not "
                f"implement (supported: {', '.join(sorted(set(POOLING_NAMES.values())))})"
            )
        modes = tuple(POOLING_NAMES[m] for m in raw)
    if not modes:
        raise ModelCheckError(f"model {ref}: {where} enables no pooling mode")
    return modes


def _dense(directory: Path, cfg: dict[str, Any], ref: str) -> DenseLayer:
    where = directory / "config.json"
    for key in ("module_input_name", "module_output_name"):
        if cfg.get(key, EMBEDDING) not in (EMBEDDING, None):
            raise ModelCheckError(
                f"model {ref}: {where} applies Dense to {cfg[key]!r}, not the pooled "
                f"{EMBEDDING}: token-level (multi-vector) models are not supported"
            )
    act_path = str(cfg.get("activation_function") or "torch.nn.modules.activation.Tanh")
    act = _class_name(act_path)
    if not act_path.startswith("torch.") or act not in ACTIVATIONS:
        raise ModelCheckError(
            f"model {ref}: {where} names the activation {act_path!r}; streamer builds only "
            f"torch.nn's {', '.join(ACTIVATIONS)} and never imports code a folder names"
        )
    try:
        return DenseLayer(
            directory=directory,
            in_features=int(cfg["in_features"]),
            out_features=int(cfg["out_features"]),
            bias=bool(cfg.get("bias", True)),
            activation=act,
            use_residual=bool(cfg.get("use_residual", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelCheckError(
            f"model {ref}: {where} lacks a valid in_features/out_features ({exc})"
        ) from exc


def read_pipeline(root: Path, ref: str = "model") -> Pipeline | None:
    """The folder's sentence-transformers pipeline, or None when it has no ``modules.json``.

    Raises :class:`ModelCheckError` for modules streamer cannot reproduce exactly, so a folder
    is either served as its authors meant or not at all.
    """
    modules_file = root / MODULES_FILE
    if not modules_file.is_file():
        return None
    entries = _load_json(modules_file, ref)
    if not isinstance(entries, list) or not entries:
        raise ModelCheckError(f"model {ref}: {modules_file} is not a non-empty list of modules")
    entries = sorted(entries, key=lambda e: int(e.get("idx", 0)) if isinstance(e, dict) else 0)
    names: list[str] = []
    pooling: tuple[str, ...] | None = None
    include_prompt = True
    dimension: int | None = None
    steps: list[Step] = []
    transformer_cfg: dict[str, Any] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "type" not in entry:
            raise ModelCheckError(f"model {ref}: {modules_file} entry {i} has no type")
        type_name = str(entry["type"])
        name = _class_name(type_name)
        sub = str(entry.get("path") or "")
        directory = root / sub
        if not type_name.startswith("sentence_transformers.") or name not in SUPPORTED_MODULES:
            raise ModelCheckError(
                f"model {ref}: {modules_file} module {i} is {type_name}, which streamer does not "
                f"implement (supported: {', '.join(SUPPORTED_MODULES)}); serve a folder without "
                f"it, or remove {MODULES_FILE} to pool by model.pooling"
            )
        names.append(name)
        if name == "Transformer":
            if i != 0 or sub not in ("", "."):
                raise ModelCheckError(
                    f"model {ref}: the Transformer module is at {sub or 'the root'} (position "
                    f"{i}); streamer serves folders whose encoder is at the root, first: re-save "
                    "the model with a recent sentence-transformers (model.save(path))"
                )
            transformer_cfg = _optional_json(root / TRANSFORMER_CONFIG, ref)
        elif i == 0:
            raise ModelCheckError(
                f"model {ref}: {modules_file} starts with {name}, not a Transformer module"
            )
        elif name == "Pooling":
            if pooling is not None or steps:
                raise ModelCheckError(
                    f"model {ref}: {modules_file} has Pooling at position {i}, after other "
                    "sentence-level modules: only one Pooling, right after the Transformer"
                )
            cfg = _optional_json(directory / "config.json", ref)
            pooling = _pooling(cfg, directory / "config.json", ref)
            include_prompt = bool(cfg.get("include_prompt", True))
            dim = cfg.get("embedding_dimension", cfg.get("word_embedding_dimension"))
            dimension = int(dim) if dim is not None else None
        elif pooling is None:
            raise ModelCheckError(
                f"model {ref}: {modules_file} has {name} before any Pooling module: token-level "
                "(multi-vector) models are not supported"
            )
        elif name == "Dense":
            steps.append(_dense(directory, _optional_json(directory / "config.json", ref), ref))
        elif name == "Normalize":
            cfg = _optional_json(directory / "config.json", ref)
            if cfg.get("module_input_name", EMBEDDING) != EMBEDDING:
                raise ModelCheckError(
                    f"model {ref}: {directory} normalises {cfg['module_input_name']!r}, not the "
                    f"pooled {EMBEDDING}: not supported"
                )
            steps.append(NORMALIZE)
        # Dropout: the identity at inference.
    if "Transformer" not in names:
        raise ModelCheckError(f"model {ref}: {modules_file} has no Transformer module")
    if pooling is None:
        raise ModelCheckError(
            f"model {ref}: {modules_file} has no Pooling module (token embeddings only): "
            "streamer serves one vector per text"
        )
    task = transformer_cfg.get("transformer_task")
    if task not in (None, "feature-extraction"):
        raise ModelCheckError(
            f"model {ref}: {root / TRANSFORMER_CONFIG} has transformer_task {task!r}; streamer "
            "pools the encoder's last hidden state (feature-extraction) only"
        )
    st_cfg = _optional_json(root / ST_CONFIG, ref)
    model_type = st_cfg.get("model_type")
    if model_type not in (None, "SentenceTransformer"):
        raise ModelCheckError(
            f"model {ref}: {root / ST_CONFIG} says this is a {model_type}, not a "
            "SentenceTransformer: streamer serves dense sentence embeddings"
        )
    prompts = st_cfg.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelCheckError(f"model {ref}: prompts in {root / ST_CONFIG} are not name: text")
    max_seq = transformer_cfg.get("max_seq_length")
    return Pipeline(
        root=root,
        modules=tuple(names),
        pooling=pooling,
        include_prompt=include_prompt,
        embedding_dimension=dimension,
        steps=tuple(steps),
        max_seq_length=int(max_seq) if max_seq else None,
        do_lower_case=bool(transformer_cfg.get("do_lower_case", False)),
        prompts={str(k): v for k, v in prompts.items()},
        default_prompt_name=st_cfg.get("default_prompt_name") or None,
        similarity_fn_name=st_cfg.get("similarity_fn_name"),
    )


def dense_weights_file(layer: DenseLayer, allow_pickle: bool, ref: str) -> Path:
    """The Dense layer's weights, under the same safetensors-only policy as the encoder's."""
    fmt, names = weights_format(layer.directory)
    if fmt == "safetensors":
        preferred = "model.safetensors" if "model.safetensors" in names else names[0]
        return layer.directory / preferred
    if fmt == "pickle":
        if not allow_pickle:
            files = ", ".join(f"{layer.directory.name}/{n}" for n in names)
            src, dst = layer.directory / names[0], layer.directory / "model.safetensors"
            raise ModelCheckError(
                f"model {ref}: the Dense layer's weights ({files}) are pickle-based and there is "
                "no model.safetensors beside them: unpickling can execute arbitrary code while "
                "loading, so streamer refuses it. Convert them once, on a trusted machine: "
                'python -c "import torch; from safetensors.torch import save_file; '
                f"save_file(torch.load('{src}', weights_only=True), '{dst}')\", remove the "
                "pickle file and re-pin; or, if you trust these files, set "
                "model.allow_pickle: true."
            )
        return layer.directory / names[0]
    raise ModelCheckError(
        f"model {ref}: the Dense layer in {layer.directory} has no weights "
        "(model.safetensors expected)"
    )


def check_dense_weights(pipeline: Pipeline | None, allow_pickle: bool, ref: str) -> None:
    """Refuse pickle Dense weights before anything is loaded (see :func:`dense_weights_file`)."""
    for layer in pipeline.dense if pipeline else ():
        dense_weights_file(layer, allow_pickle, ref)


def warn_override(ref: str, key: str, folder: Any, used: Any, where: str) -> None:
    """The one WARNING for an explicit key that contradicts the folder."""
    log.warning(
        "model %s: %s is set to %s, but the folder's %s says %s; using %s",
        ref,
        key,
        used,
        where,
        folder,
        used,
    )


def resolve(cfg: ModelConfig, pipeline: Pipeline | None) -> Head:
    """The head to run: the folder's pipeline, with explicitly set ``model.*`` keys on top.

    An explicit key that contradicts the folder wins and is logged once as a WARNING naming the
    key, the folder's value and the value used.
    """
    ref = cfg.ref
    if pipeline is None:
        if cfg.prompt_name is not None:
            raise ModelCheckError(
                f"model {ref}: model.prompt_name is {cfg.prompt_name!r} but {cfg.path} has no "
                f"{ST_CONFIG} with prompts: use model.prompt for a literal prefix"
            )
        steps: tuple[Step, ...] = (NORMALIZE,) if cfg.normalize is not False else ()
        return Head(pooling=(cfg.pooling or "mean",), steps=steps, prompt=cfg.prompt or "")

    pooling = pipeline.pooling
    if cfg.pooling is not None and (cfg.pooling,) != pooling:
        warn_override(ref, "model.pooling", "+".join(pooling), cfg.pooling, "Pooling module")
        pooling = (cfg.pooling,)
    steps = pipeline.steps
    if cfg.normalize is not None and cfg.normalize != pipeline.normalize:
        folder = str(pipeline.normalize).lower()
        used = str(cfg.normalize).lower()
        warn_override(ref, "model.normalize", folder, used, "modules.json (Normalize module)")
        steps = (*steps, NORMALIZE) if cfg.normalize else tuple(s for s in steps if s != NORMALIZE)

    prompt_name: str | None = None
    if cfg.prompt is not None:
        prompt = cfg.prompt
    else:
        prompt_name = cfg.prompt_name or pipeline.default_prompt_name
        if prompt_name is not None and prompt_name not in pipeline.prompts:
            known = ", ".join(sorted(pipeline.prompts)) or "none"
            source = "model.prompt_name" if cfg.prompt_name else f"{ST_CONFIG} default_prompt_name"
            raise ModelCheckError(
                f"model {ref}: {source} is {prompt_name!r} but the folder's prompts are: {known}; "
                "set model.prompt_name to one of them, or model.prompt to a literal prefix"
            )
        prompt = pipeline.prompts[prompt_name] if prompt_name is not None else ""
    return Head(
        pooling=pooling,
        steps=steps,
        prompt=prompt,
        prompt_name=prompt_name,
        include_prompt=pipeline.include_prompt,
        do_lower_case=pipeline.do_lower_case,
    )


def prompt_token_count(backend: Any, prompt: str) -> int:
    """Tokens a prompt adds at the start of a text: its encoding less a trailing special token.

    The same count sentence-transformers excludes from pooling when ``include_prompt`` is false
    (it counts the leading special token, e.g. [CLS], as part of the prompt).
    """
    if not prompt:
        return 0
    enc = backend.encode(prompt)
    n = len(enc.ids)
    if n and enc.special_tokens_mask[-1]:
        n -= 1
    return n


def lowercasing(backend: Any) -> Any:
    """``backend`` with a Lowercase normaliser in front, unless it lowercases already.

    What sentence-transformers does for ``do_lower_case: true``.
    """
    from tokenizers import normalizers

    def lowers(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Lowercase":
                return True
            if node.get("type") == "BertNormalizer" and node.get("lowercase"):
                return True
            return any(lowers(v) for v in node.values())
        if isinstance(node, list):
            return any(lowers(v) for v in node)
        return False

    if lowers(json.loads(backend.to_str()).get("normalizer")):
        return backend
    current = backend.normalizer
    parts = [normalizers.Lowercase()]
    if current is not None:
        parts.append(current)
    backend.normalizer = normalizers.Sequence(parts)
    return backend


def _load_dense(torch: Any, layer: DenseLayer, allow_pickle: bool, ref: str) -> dict[str, Any]:
    path = dense_weights_file(layer, allow_pickle, ref)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:  # allowed pickle: still no arbitrary objects
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    want = {"linear.weight": (layer.out_features, layer.in_features)}
    if layer.bias:
        want["linear.bias"] = (layer.out_features,)
    if layer.use_residual and layer.in_features != layer.out_features:
        want["residual.weight"] = (layer.out_features, layer.in_features)
    for key, shape in want.items():
        got = tuple(state[key].shape) if key in state else None
        if got != shape:
            raise ModelCheckError(
                f"model {ref}: {path} has {key} of shape {got}, but its config.json says "
                f"{shape}: the Dense weights and config do not belong together"
            )
    return state


@functools.cache
def _classes() -> tuple[type, type]:
    import torch

    def _row(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``hidden[i, index[i]]`` for every row, by a gather on the device (graph-safe)."""
        at = index.to(torch.int64).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
        return hidden.gather(1, at).squeeze(1)

    class DenseStep(torch.nn.Module):
        def __init__(self, layer: DenseLayer, state: dict[str, Any]) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
            self.linear.load_state_dict(
                {k.removeprefix("linear."): v for k, v in state.items() if k.startswith("linear.")}
            )
            self.activation = getattr(torch.nn, layer.activation)()
            self.use_residual = layer.use_residual
            self.residual: torch.nn.Module = torch.nn.Identity()
            if layer.use_residual and layer.in_features != layer.out_features:
                self.residual = torch.nn.Linear(layer.in_features, layer.out_features, bias=False)
                self.residual.load_state_dict({"weight": state["residual.weight"]})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.activation(self.linear(x))
            return out + self.residual(x) if self.use_residual else out

    class EmbeddingHead(torch.nn.Module):
        """Pooling, Dense layers and normalisation on device tensors: float32, a row each.

        Pure tensor operations with no host synchronisation, so it is captured into CUDA graphs
        and exported to ONNX as it is. Rows are right-padded (the mask is ones, then zeros).
        """

        def __init__(self, pooling: tuple[str, ...], skip: int, steps: list[Any]) -> None:
            super().__init__()
            self.pooling = pooling
            self.skip = skip  # leading tokens (a prompt) pooling leaves out
            self.steps = torch.nn.ModuleList(steps)

        def forward(self, hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
            mask = attention
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            if self.skip:
                kept = mask * (positions >= self.skip).to(mask.dtype).unsqueeze(0)
                # A row that is all prompt (truncated) keeps its tokens rather than pool nothing.
                mask = torch.where(kept.sum(dim=1, keepdim=True) > 0, kept, mask)
            m = mask.unsqueeze(-1).to(hidden.dtype)
            f32 = torch.float32
            parts = []
            count: torch.Tensor | None = None
            for mode in self.pooling:
                if mode == "cls":
                    if self.skip:  # the first pooled token, as sentence-transformers does
                        parts.append(_row(hidden, mask.to(torch.int32).argmax(dim=1)).to(f32))
                    else:
                        parts.append(hidden[:, 0].to(f32))
                elif mode == "max":
                    low = torch.finfo(hidden.dtype).min
                    parts.append(hidden.masked_fill(m == 0, low).amax(dim=1).to(f32))
                elif mode in ("mean", "mean_sqrt_len"):
                    total = (hidden * m).sum(dim=1, dtype=f32)
                    if count is None:
                        count = m.sum(dim=1, dtype=f32).clamp(min=1e-9)
                    parts.append(total / (count if mode == "mean" else count.sqrt()))
                elif mode == "weightedmean":
                    w = m.to(f32) * (positions + 1).to(f32).view(1, -1, 1)
                    total = (hidden.to(f32) * w).sum(dim=1)
                    parts.append(total / w.sum(dim=1).clamp(min=1e-9))
                elif mode == "lasttoken":
                    last = (mask * positions.unsqueeze(0)).to(torch.int32).argmax(dim=1)
                    parts.append(_row(hidden, last).to(f32))
                else:  # resolve() and the config keys admit no other name
                    raise ValueError(f"unknown pooling {mode!r}")
            x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
            for step in self.steps:
                x = step(x)
            return x

    return DenseStep, EmbeddingHead


@functools.cache
def _normalize_class() -> type:
    import torch

    class Normalize(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(x, p=2, dim=-1)

    return Normalize


def build_head(
    head: Head,
    *,
    hidden_size: int,
    prompt_length: int,
    allow_pickle: bool,
    ref: str,
    pipeline: Pipeline | None = None,
) -> tuple[Any, int]:
    """The torch module for ``head`` (on the CPU, float32) and the embedding size it returns.

    Checks that the dimensions chain up: the folder's Pooling was made for this encoder, and each
    Dense layer takes what the step before it gives.
    """
    import torch

    dense_cls, head_cls = _classes()
    if pipeline is not None and pipeline.embedding_dimension not in (None, hidden_size):
        raise ModelCheckError(
            f"model {ref}: the folder's Pooling module expects token embeddings of size "
            f"{pipeline.embedding_dimension} but the encoder's hidden size is {hidden_size}: "
            "the sentence-transformers modules belong to another model"
        )
    dim = hidden_size * len(head.pooling)
    steps: list[Any] = []
    for step in head.steps:
        if step == NORMALIZE:
            steps.append(_normalize_class()())
            continue
        assert isinstance(step, DenseLayer)
        if step.in_features != dim:
            raise ModelCheckError(
                f"model {ref}: the Dense layer in {step.directory} takes {step.in_features} "
                f"features but pooling {'+'.join(head.pooling)} gives {dim} (model.pooling "
                "changed from the folder's?): set model.pooling to the folder's pooling"
            )
        steps.append(dense_cls(step, _load_dense(torch, step, allow_pickle, ref)))
        dim = step.out_features
    skip = 0 if head.include_prompt else prompt_length
    module = head_cls(head.pooling, skip, steps).float().eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module, dim


def summary(pipeline: Pipeline | None, head: Head | None = None) -> list[tuple[str, str]]:
    """Rows for ``streamer check-model``: what the folder declares, and what is served."""
    if pipeline is None:
        rows = [("modules", f"none (no {MODULES_FILE}): model.pooling / model.normalize apply")]
    else:
        prompts = ", ".join(f"{k}={v!r}" for k, v in sorted(pipeline.prompts.items()))
        rows = [
            ("modules", " -> ".join(pipeline.modules)),
            ("pooling", "+".join(pipeline.pooling)),
            ("include_prompt", str(pipeline.include_prompt).lower()),
            ("dense", "; ".join(d.describe() for d in pipeline.dense) or "none"),
            ("normalize", str(pipeline.normalize).lower()),
            ("max_seq_length", str(pipeline.max_seq_length or "not set (tokenizer's limit)")),
            ("do_lower_case", str(pipeline.do_lower_case).lower()),
            ("prompts", prompts or "none"),
            ("default prompt", pipeline.default_prompt_name or "none"),
            ("similarity", pipeline.similarity_fn_name or "not set (cosine)"),
        ]
    if head is not None:
        served = f"pooling {'+'.join(head.pooling)}"
        if head.dense:
            served += ", dense " + "; ".join(d.describe() for d in head.dense)
        served += f", normalize {str(head.normalize).lower()}"
        if head.prompt:
            name = f" ({head.prompt_name})" if head.prompt_name else ""
            served += f", prompt {head.prompt!r}{name}"
            if not head.include_prompt:
                served += " excluded from pooling"
        rows.append(("served", served))
    return rows
