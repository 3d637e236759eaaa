"""``streamer check-model PATH``: what is in a model directory, and can streamer serve it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from streamer.config import ModelConfig
from streamer.models.checks import Finding, ModelCheckError, custom_code, scan, weights_format

STYLE = {"ok": "green", "warning": "yellow", "error": "red"}


def run_check_model(
    path: Path, task: str, max_length: int | None, device: str, allow_pickle: bool = False
) -> int:
    console = Console(width=None if sys.stdout.isatty() else 160)  # full hashes in logs too
    try:
        files = scan(path)
    except ModelCheckError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    files_table = Table(title=f"files in {path}", show_lines=False)
    for col in ("file", "kind", "bytes", "sha256"):
        files_table.add_column(col)
    for kind, group in (
        ("weights", files.weights),
        ("config", files.config),
        ("tokenizer", files.tokenizer),
        ("sentence-transformers", files.modules),
    ):
        for p in group:
            files_table.add_row(
                files.rel(p), kind, f"{p.stat().st_size:,}", files.hashes[files.rel(p)]
            )
    console.print(files_table)
    console.print(f"[bold]manifest sha256 (fingerprint):[/] {files.fingerprint}")
    console.print("pin it with  pins: {manifest_sha256: " + files.fingerprint + "}")

    fmt, names = weights_format(path)
    if fmt == "pickle":
        verdict = (
            "allowed here (--allow-pickle): unpickling can run code, trusted files only"
            if allow_pickle
            else "refused unless model.allow_pickle: true (unpickling can run code)"
        )
        console.print(f"[bold]weights format:[/] pickle ({', '.join(names)}), {verdict}")
    else:
        console.print(f"[bold]weights format:[/] {fmt} ({', '.join(names)})")
    auto_map = custom_code(path)
    note = "never executed (trust_remote_code=False)"
    if auto_map:
        named = ", ".join(f"{k} -> {v}" for k, v in sorted(auto_map.items()))
        note += f"; config.json's auto_map names custom code ({named}): ignored"
    console.print(f"[bold]remote code:[/] {note}")

    from streamer.models.hf import HFTextModel

    # max_length only when given: unset, a sentence-transformers folder's max_seq_length caps it.
    given = {"max_length": max_length} if max_length is not None else {}
    cfg = ModelConfig(  # type: ignore[arg-type]
        path=path, task=task, device=device, allow_pickle=allow_pickle, **given
    )
    model = HFTextModel(cfg)
    t = time.perf_counter()
    findings: list[Finding]
    try:
        model.load()
        findings = model.findings
        model.warmup(64, 8192)
    except ModelCheckError as exc:
        console.print(f"[red]cannot be served:[/] {exc}")
        return 1
    total = time.perf_counter() - t
    torch_model = model._model
    params = sum(p.numel() for p in torch_model.parameters())
    facts = Table(title="model", show_header=False)
    facts.add_row("architecture", ", ".join(torch_model.config.architectures or ["?"]))
    facts.add_row("model type", torch_model.config.model_type)
    facts.add_row("parameters", f"{params:,}")
    facts.add_row("dtype / device", f"{model.dtype} / {model.device}")
    facts.add_row("memory", f"{model.memory_bytes / 2**20:.1f} MiB")
    facts.add_row("hidden size", str(getattr(torch_model.config, "hidden_size", "?")))
    facts.add_row("max positions", str(getattr(torch_model.config, "max_position_embeddings", "?")))
    facts.add_row("served max_length", str(model.max_length))
    tok = model._backend
    facts.add_row("tokenizer", f"{type(tok.model).__name__}, {tok.get_vocab_size()} tokens")
    console.print(facts)

    if task == "feature-extraction":
        from streamer.models.sbert import summary

        pipeline = Table(title="sentence-transformers pipeline", show_header=False)
        for key, value in summary(model.sbert, model.head):
            pipeline.add_row(key, value)
        pipeline.add_row("embedding size", str(model.embedding_dim))
        console.print(pipeline)

    checks = Table(title="checks")
    for col in ("check", "result", "detail"):
        checks.add_column(col)
    for f in findings:
        checks.add_row(f.check, f"[{STYLE[f.level]}]{f.level}[/]", f.message)
    console.print(checks)

    timing = Table(title=f"cold start on this machine: {total:.2f}s", show_header=False)
    for phase, seconds in model.timings.phases.items():
        timing.add_row(phase, f"{seconds:.3f}s")
    console.print(timing)
    return 1 if any(f.level == "error" for f in findings) else 0
