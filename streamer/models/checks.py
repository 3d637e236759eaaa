"""Model/tokenizer verification: pins, fingerprints and "do these belong together" checks.

Version drift is the quiet failure: a tokenizer updated without its model, weights swapped under
a running service. Every file that shapes an output (weights, config, tokenizer) is hashed; the
*manifest* hash over all of them is the fingerprint every result names, so two results are
comparable only if both were made by byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from streamer.config import ModelConfig, PinsConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
CONFIG_FILES = ("config.json",)
# A sentence-transformers folder's pipeline (pooling, Dense, normalisation, prompts) shapes the
# embeddings too: these, and the config and weight files of each module folder it lists.
SBERT_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
SBERT_MODULE_SUFFIXES = (".json", *WEIGHT_SUFFIXES)
# Weight formats torch reads through pickle, which can run arbitrary code while loading.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


class ModelCheckError(RuntimeError):
    """The model directory must not be served as it is; the message says why and what to do."""


@dataclass(frozen=True)
class Finding:
    level: Literal["ok", "warning", "error"]
    check: str
    message: str


@dataclass
class ModelFiles:
    root: Path
    weights: list[Path] = field(default_factory=list)
    config: list[Path] = field(default_factory=list)
    tokenizer: list[Path] = field(default_factory=list)
    modules: list[Path] = field(default_factory=list)  # sentence-transformers files
    hashes: dict[str, str] = field(default_factory=dict)  # relative name -> sha256 hex

    def all(self) -> list[Path]:
        return sorted(self.weights + self.config + self.tokenizer + self.modules)

    def rel(self, p: Path) -> str:
        return str(p.relative_to(self.root))

    @property
    def fingerprint(self) -> str:
        """sha256 over (name, sha256) of every file: the manifest hash."""
        h = hashlib.sha256()
        for name in sorted(self.hashes):
            h.update(f"{name}\0{self.hashes[name]}\n".encode())
        return "sha256:" + h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def scan(root: Path) -> ModelFiles:
    """Find and hash the files that shape the model's outputs."""
    files = ModelFiles(root)
    for p in sorted(root.iterdir()):
        if not p.is_file():
            continue
        if p.suffix in WEIGHT_SUFFIXES and p.name not in TOKENIZER_FILES:
            files.weights.append(p)
        elif p.name in CONFIG_FILES:
            files.config.append(p)
        elif p.name in TOKENIZER_FILES:
            files.tokenizer.append(p)
        elif p.name in SBERT_FILES:
            files.modules.append(p)
    files.modules += _sbert_module_files(root)
    if not files.weights:
        raise ModelCheckError(
            f"{root}: no weight files ({', '.join(WEIGHT_SUFFIXES)}); is this the model directory?"
        )
    if not files.tokenizer:
        raise ModelCheckError(f"{root}: no tokenizer files (tokenizer.json expected)")
    for p in files.all():
        files.hashes[files.rel(p)] = sha256_file(p)
    return files


def _sbert_module_files(root: Path) -> list[Path]:
    """Files of the module folders ``modules.json`` lists (unreadable: none; loading says why)."""
    try:
        entries = json.loads((root / "modules.json").read_text())
    except (OSError, ValueError):
        return []
    found: list[Path] = []
    for entry in entries if isinstance(entries, list) else []:
        sub = str(entry.get("path") or "") if isinstance(entry, dict) else ""
        directory = (root / sub).resolve()
        if not sub or not directory.is_dir() or not directory.is_relative_to(root.resolve()):
            continue
        found += [
            root / sub / p.name
            for p in sorted(directory.iterdir())
            if p.is_file() and p.name.endswith(SBERT_MODULE_SUFFIXES)
        ]
    return found


def weights_format(root: Path) -> tuple[str, list[str]]:
    """``("safetensors" | "pickle" | "none", names)``: what ``from_pretrained`` would read.

    Any ``*.safetensors`` file wins (transformers prefers it, and streamer loads with
    ``use_safetensors=True``); pickle-based files matter only when there is none.
    """
    names = sorted(p.name for p in root.iterdir() if p.is_file())
    safe = [n for n in names if n.endswith(".safetensors")]
    if safe:
        return "safetensors", safe
    pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES) and n not in TOKENIZER_FILES]
    return ("pickle", pickled) if pickled else ("none", [])


def check_weights_format(root: Path, allow_pickle: bool, ref: str) -> str:
    """Refuse pickle-only weights unless ``model.allow_pickle``; returns the format."""
    fmt, names = weights_format(root)
    if fmt == "pickle" and not allow_pickle:
        raise ModelCheckError(
            f"model {ref} at {root} has pickle-based weights ({', '.join(names)}) and no "
            "*.safetensors: unpickling can execute arbitrary code while loading, so streamer "
            'refuses it. Convert the weights once, on a trusted machine: python -c "from '
            f"transformers import AutoModel; AutoModel.from_pretrained('{root}')"
            f".save_pretrained('{root}', safe_serialization=True)\" (AutoModelForSequence"
            "Classification for a classifier), remove the pickle files and re-pin; or, if you "
            "trust these files, set model.allow_pickle: true."
        )
    return fmt


def custom_code(root: Path) -> dict[str, str]:
    """config.json's ``auto_map`` (custom Python classes the directory asks to run), if any."""
    try:
        data = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in auto_map.items()} if isinstance(auto_map, dict) else {}


def verify_pins(files: ModelFiles, pins: PinsConfig, ref: str) -> None:
    """Refuse to serve files that differ from their pins, naming each file that differs."""
    problems = []
    for name, expected in pins.files.items():
        actual = files.hashes.get(name)
        if actual is None:
            problems.append(f"{name}: pinned but missing from {files.root}")
        elif actual != expected:
            problems.append(f"{name}: sha256 {actual} but pinned {expected}")
    if pins.manifest_sha256:
        expected = pins.manifest_sha256.removeprefix("sha256:").lower()
        actual = files.fingerprint.removeprefix("sha256:")
        if actual != expected:
            listing = ", ".join(f"{n}={h[:12]}…" for n, h in sorted(files.hashes.items()))
            problems.append(
                f"manifest sha256 {actual} but pinned {expected} (files now: {listing})"
            )
    if problems:
        raise ModelCheckError(
            f"model {ref} at {files.root} does not match its pins:\n  "
            + "\n  ".join(problems)
            + "\n  Restore the pinned files, or update the pins if the change is intended "
            "(`streamer check-model PATH` prints the current hashes)."
        )


def check_compat(tokenizer: Any, model: Any, cfg: ModelConfig) -> list[Finding]:
    """Do this tokenizer and this model belong together, and fit the task?"""
    out: list[Finding] = []
    mcfg = model.config
    rows = model.get_input_embeddings().num_embeddings
    vocab = len(tokenizer)
    if vocab > rows:
        out.append(
            Finding(
                "error",
                "vocabulary",
                f"the tokenizer has {vocab} tokens but the model has {rows} embedding rows: the "
                "tokenizer belongs to a different model. Put the tokenizer files that were saved "
                "with these weights in the directory.",
            )
        )
    elif vocab < rows * 0.5:
        out.append(
            Finding(
                "warning",
                "vocabulary",
                f"the tokenizer has {vocab} tokens, far fewer than the model's {rows} embedding "
                "rows: check that it was saved with these weights",
            )
        )
    else:
        out.append(Finding("ok", "vocabulary", f"{vocab} tokens, {rows} embedding rows"))

    max_pos = getattr(mcfg, "max_position_embeddings", None)
    tok_max = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None
    if max_pos and tok_max and tok_max > max_pos:
        out.append(
            Finding(
                "warning",
                "max length",
                f"the tokenizer allows {tok_max} tokens but the model has {max_pos} positions; "
                f"inputs are truncated to {min(cfg.max_length, max_pos)}",
            )
        )
    else:
        out.append(
            Finding(
                "ok",
                "max length",
                f"tokenizer {tok_max or 'unbounded'}, model positions {max_pos}, "
                f"model.max_length {cfg.max_length}",
            )
        )

    if tokenizer.pad_token_id is None:
        out.append(
            Finding(
                "error",
                "special tokens",
                "the tokenizer has no pad token, so records cannot be batched: set pad_token in "
                "tokenizer_config.json (e.g. to the eos or unk token)",
            )
        )
    elif cfg.task == "feature-extraction" and cfg.pooling == "cls" and tokenizer.cls_token is None:
        out.append(
            Finding(
                "error",
                "special tokens",
                "model.pooling is 'cls' but the tokenizer has no cls token: use pooling: mean",
            )
        )
    else:
        missing = [t for t in ("cls_token", "sep_token") if getattr(tokenizer, t, None) is None]
        if missing:
            out.append(
                Finding(
                    "warning",
                    "special tokens",
                    f"no {', '.join(missing)} (fine for models trained without)",
                )
            )
        else:
            out.append(Finding("ok", "special tokens", "pad, cls and sep present"))

    archs = list(getattr(mcfg, "architectures", None) or [])
    has_head = any("ForSequenceClassification" in a for a in archs)
    labels = getattr(mcfg, "id2label", None) or {}
    arch_names = ", ".join(archs) or "no architectures listed"
    if cfg.task == "text-classification":
        if not has_head:
            out.append(
                Finding(
                    "error",
                    "task",
                    f"model.task is text-classification but the model ({arch_names}) has no "
                    "sequence-classification head: its classifier would be random. Use task: "
                    "feature-extraction, or a fine-tuned classifier.",
                )
            )
        elif all(str(v).startswith("LABEL_") for v in labels.values()):
            out.append(
                Finding(
                    "warning",
                    "task",
                    "the classifier's labels are generic (LABEL_0, …): set id2label in config.json",
                )
            )
        else:
            out.append(Finding("ok", "task", f"classifier with labels {sorted(labels.values())}"))
    else:
        if has_head:
            out.append(
                Finding(
                    "warning",
                    "task",
                    "the model has a classification head but model.task is feature-extraction: "
                    "embeddings come from the encoder and the head is ignored",
                )
            )
        else:
            out.append(Finding("ok", "task", f"encoder ({', '.join(archs) or 'unknown'})"))
    return out


def raise_on_errors(findings: list[Finding], ref: str, root: Path) -> None:
    errors = [f for f in findings if f.level == "error"]
    if errors:
        raise ModelCheckError(
            f"model {ref} at {root} cannot be served:\n  "
            + "\n  ".join(f"{f.check}: {f.message}" for f in errors)
        )
