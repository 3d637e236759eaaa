"""``streamer profile``: latency, throughput and peak memory over sequence lengths x batch sizes.

Runs the configured model (device, backend, precision) on synthetic batches of every
(length, rows) pair, writes a CSV and a PNG (memory and throughput against sequence length, one
line per batch size) and recommends ``model.max_length`` and ``batching.max_batch_tokens`` for
a memory budget.

**Peak memory.** On CUDA: the caching allocator's peak (``max_memory_allocated`` after
``reset_peak_memory_stats``), weights included. On the CPU: the process's peak resident set
(``VmHWM``), reset before each configuration by writing ``5`` to ``/proc/self/clear_refs``
(Linux >= 4.0), after freed heap has been handed back with ``malloc_trim``. That catches the
true peak inside the forward pass without a sampling thread. ``ru_maxrss`` cannot be reset, and
RSS read after the call misses transient activations; that read is the fallback where
``clear_refs`` is not writable (the CSV's ``memory_source`` column says which was used).
Configurations run from the fewest tokens to the most, so memory an allocator keeps from an
earlier configuration is never more than the current one needs.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from streamer.config import ModelConfig

OOM_MARKERS = ("out of memory", "outofmemory", "bad_alloc", "failed to allocate")
NEAR_BEST = 0.95  # a batch budget within 5 % of the best throughput is as good, and waits less


@dataclass(slots=True)
class ProfileRow:
    seq_len: int
    batch_size: int
    tokens: int
    latency_ms: float  # median of the repeats
    latency_ms_max: float
    records_per_s: float
    tokens_per_s: float
    peak_mb: float  # the whole process (CPU) or the CUDA allocator, weights included
    delta_mb: float  # above what was held just before the call
    memory_source: str  # cuda_allocator | rss_peak | rss_after
    status: str  # ok | oom


@dataclass(slots=True)
class Recommendation:
    budget_mb: float | None
    max_length: int | None
    max_batch_tokens: int | None
    batch_size: int | None
    seq_len: int | None
    tokens_per_s: float | None
    reason: str


# -- memory ---------------------------------------------------------------------------------------
class MemoryMeter:
    """Peak memory around one call (see the module docstring for the method)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.source = "cuda_allocator" if device == "cuda" else "rss_peak"
        self._libc: Any = None
        if device != "cuda":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None
            if not self._reset_hwm():
                self.source = "rss_after"

    @staticmethod
    def _status_mb(field: str) -> float | None:
        try:
            text = Path("/proc/self/status").read_text()
        except OSError:
            return None
        m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
        return int(m.group(1)) / 1024 if m else None

    def _reset_hwm(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            return False
        return True

    def current_mb(self) -> float:
        if self.device == "cuda":
            import torch

            return torch.cuda.memory_allocated() / 2**20
        import psutil

        return psutil.Process().memory_info().rss / 2**20

    def start(self) -> float:
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            if self._libc is not None:
                self._libc.malloc_trim(0)
            if self.source == "rss_peak":
                self._reset_hwm()
        return self.current_mb()

    def peak_mb(self) -> float:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        if self.source == "rss_peak":
            hwm = self._status_mb("VmHWM")
            if hwm is not None:
                return hwm
        return self.current_mb()


# -- sweep ----------------------------------------------------------------------------------------
def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, MemoryError) or any(m in text for m in OOM_MARKERS)


def _token_rows(model: Any, length: int) -> list[int]:
    """One realistic row of ``length`` tokens: real text through the model's tokenizer."""
    from streamer.tools.devtools import sample_texts

    text = " ".join(sample_texts(64, seed=3))
    ids = model.tokenize([text])[0].ids
    while len(ids) < length:  # a short max_length capped it: repeat the body
        ids = ids[:-1] + ids[1:]
    return ids[: length - 1] + ids[-1:]  # keep the closing special token


def sweep(
    model: Any,
    device: str,
    lengths: list[int],
    batch_sizes: list[int],
    repeats: int = 3,
    on_step: Any = None,
) -> list[ProfileRow]:
    """Run every (length, batch size) pair, fewest tokens first; one row each."""
    meter = MemoryMeter(device)
    pairs = sorted((b * n, n, b) for n in lengths for b in batch_sizes)
    rows: list[ProfileRow] = []
    for tokens, length, batch in pairs:
        if on_step is not None:
            on_step(length, batch)
        row = _token_rows(model, length)
        ids = [row] * batch
        base = meter.start()
        times: list[float] = []
        try:
            model.postprocess(model.forward(ids), batch)  # first call: settle the shapes
            for _ in range(repeats):
                t = time.perf_counter()
                model.postprocess(model.forward(ids), batch)
                times.append(time.perf_counter() - t)
            peak = meter.peak_mb()
            status = "ok"
        except Exception as exc:
            if not _is_oom(exc):
                raise
            peak, status = float("nan"), "oom"
        if status == "ok":
            med = statistics.median(times)
            rows.append(
                ProfileRow(
                    length,
                    batch,
                    tokens,
                    med * 1000,
                    max(times) * 1000,
                    batch / med,
                    tokens / med,
                    peak,
                    max(0.0, peak - base),
                    meter.source,
                    status,
                )
            )
        else:
            nan = float("nan")
            rows.append(
                ProfileRow(length, batch, tokens, nan, nan, nan, nan, nan, nan, meter.source, "oom")
            )
            meter.start()  # hand the failed attempt's memory back
    return rows


def recommend(rows: list[ProfileRow], budget_mb: float | None) -> Recommendation:
    """Largest swept ``max_length`` that fits, and the token budget with the best throughput.

    A token budget T is safe when every swept configuration of at most T padded tokens (and at
    most max_length) ran and fit: the batcher may form any of them. Of the safe ones, the
    smallest T within 5 % of the best tokens/s wins (the same throughput, less waiting).
    """
    ok = [r for r in rows if r.status == "ok"]

    def fits(r: ProfileRow) -> bool:
        return r.status == "ok" and (budget_mb is None or r.peak_mb <= budget_mb)

    lengths = sorted({r.seq_len for r in ok if fits(r)})
    if not lengths:
        smallest = min((r.peak_mb for r in ok), default=float("nan"))
        return Recommendation(
            budget_mb,
            None,
            None,
            None,
            None,
            None,
            f"nothing fits: the smallest configuration peaks at {smallest:.0f} MB",
        )
    max_length = lengths[-1]
    within = [r for r in rows if r.seq_len <= max_length]
    safe = [r for r in within if fits(r) and all(fits(o) for o in within if o.tokens <= r.tokens)]
    if not safe:
        safe = [r for r in within if fits(r) and r.batch_size == 1]
    best = max(r.tokens_per_s for r in safe)
    pick = min((r for r in safe if r.tokens_per_s >= NEAR_BEST * best), key=lambda r: r.tokens)
    return Recommendation(
        budget_mb,
        max_length,
        pick.tokens,
        pick.batch_size,
        pick.seq_len,
        pick.tokens_per_s,
        f"{pick.batch_size} x {pick.seq_len} tokens: {pick.tokens_per_s:,.0f} tokens/s "
        f"(best {best:,.0f}), peak {pick.peak_mb:,.0f} MB",
    )


# -- output ---------------------------------------------------------------------------------------
def write_csv(rows: list[ProfileRow], path: Path, meta: dict[str, str]) -> None:
    names = [*meta, *(f.name for f in fields(ProfileRow))]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=names)
        w.writeheader()
        for r in rows:
            d = asdict(r)
            w.writerow(
                {**meta, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}}
            )


def plot(
    rows: list[ProfileRow],
    path: Path,
    title: str,
    budget_mb: float | None,
    idle_mb: float | None,
    rec: Recommendation | None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lengths = sorted({r.seq_len for r in rows})
    sizes = sorted({r.batch_size for r in rows})
    cmap = plt.get_cmap("viridis")
    colors = {b: cmap(0.85 * i / max(1, len(sizes) - 1)) for i, b in enumerate(sizes)}
    fig, (mem_ax, thr_ax) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    source = rows[0].memory_source if rows else ""
    mem_label = {
        "cuda_allocator": "peak GPU memory allocated (MB)",
        "rss_peak": "peak process memory, RSS (MB)",
        "rss_after": "process memory after the call, RSS (MB)",
    }.get(source, "peak memory (MB)")
    for b in sizes:
        mine = sorted(
            (r for r in rows if r.batch_size == b and r.status == "ok"), key=lambda r: r.seq_len
        )
        if not mine:
            continue
        xs = [r.seq_len for r in mine]
        kw = {"color": colors[b], "marker": "o", "markersize": 4, "linewidth": 1.6}
        mem_ax.plot(xs, [r.peak_mb for r in mine], label=f"{b}", **kw)
        thr_ax.plot(xs, [r.records_per_s for r in mine], label=f"{b}", **kw)
    if budget_mb is not None:
        mem_ax.axhline(budget_mb, color="crimson", linestyle="--", linewidth=1.2)
        mem_ax.annotate(
            f"budget {budget_mb:,.0f} MB",
            xy=(0.98, budget_mb),
            xycoords=("axes fraction", "data"),
            xytext=(0, 4),
            textcoords="offset points",
            ha="right",
            color="crimson",
            fontsize=9,
        )
    if idle_mb is not None:
        mem_ax.axhline(idle_mb, color="grey", linestyle=":", linewidth=1.2)
        mem_ax.annotate(
            f"model loaded, idle {idle_mb:,.0f} MB",
            xy=(0.02, idle_mb),
            xycoords=("axes fraction", "data"),
            xytext=(0, -12),
            textcoords="offset points",
            color="grey",
            fontsize=9,
        )
    for ax in (mem_ax, thr_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(True, which="major", alpha=0.3)
    mem_ax.set_ylabel(mem_label)
    mem_ax.set_title("memory")
    thr_ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}")
    thr_ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    thr_ax.yaxis.set_major_formatter(plain)
    thr_ax.yaxis.set_minor_formatter(NullFormatter())
    mem_ax.yaxis.set_major_formatter(plain)
    thr_ax.set_ylabel("throughput (records/s, log scale)")
    thr_ax.set_title("throughput")
    if rec is not None and rec.seq_len is not None:
        pick = next(r for r in rows if r.seq_len == rec.seq_len and r.batch_size == rec.batch_size)
        thr_ax.plot(
            [pick.seq_len],
            [pick.records_per_s],
            marker="*",
            markersize=14,
            color="crimson",
            linestyle="none",
            label=f"recommended: {rec.max_batch_tokens} tokens/batch",
        )
    mem_ax.legend(title="batch size", fontsize=8, title_fontsize=9, loc="upper left")
    thr_ax.legend(title="batch size", fontsize=8, title_fontsize=9, loc="best")
    fig.suptitle(title, fontsize=12)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command --------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not a comma-separated list of integers"
        ) from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"'{text}': positive integers expected")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", "-c", type=Path, help="YAML config: its model, device, backend")
    src.add_argument("--model", type=Path, help="a local model directory instead of a config")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override model.device")
    p.add_argument("--backend", choices=["torch", "onnxruntime", "openvino"])
    p.add_argument("--quantize", choices=["none", "int8"])
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--task", choices=["feature-extraction", "text-classification"])
    p.add_argument(
        "--lengths", type=_ints, default=_ints("16,32,64,128,256"), help="16,32,64,128,256"
    )
    p.add_argument("--batch-sizes", type=_ints, default=_ints("1,8,32,64"), help="1,8,32,64")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (3)")
    p.add_argument("--memory-budget-mb", type=float, help="recommend settings that fit this")
    p.add_argument("--threads", type=int, help="intra-op threads (default: runtime config/cores)")
    p.add_argument("--out", type=Path, default=Path("out/profile"), help="CSV + PNG go here")


def model_config(args: argparse.Namespace) -> tuple[ModelConfig, int]:
    """The model to profile and its thread count, from --config or --model plus overrides."""
    from streamer.config import load_config

    if args.config is not None:
        cfg = load_config(args.config)
        mcfg = cfg.model_list()[0]
        threads = args.threads or cfg.runtime.torch_threads or len(cfg.runtime.cpu_affinity or [])
    else:
        path = Path(args.model)
        name = path.parent.name if path.name in ("model", "models") else path.name
        mcfg = ModelConfig(path=path, name=name.replace("@", "_") or "model")
        threads = args.threads
    if not threads:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    update: dict[str, Any] = {"max_length": max(args.lengths)}
    for key in ("device", "backend", "quantize", "dtype", "task"):
        value = getattr(args, key, None)
        if value is not None:
            update[key] = value
    data = {**mcfg.model_dump(), **update}
    return ModelConfig(**data), threads


def run_profile(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from streamer.models.backends import create_model
    from streamer.observability.logs import setup_logging

    setup_logging("WARNING")
    console = Console()
    mcfg, threads = model_config(args)
    torch.set_num_threads(threads)
    with console.status(f"loading {mcfg.path} ({mcfg.backend}, {mcfg.quantize})…"):
        model = create_model(mcfg, threads=threads)
        model.load()
    lengths = [n for n in args.lengths if n <= model.max_length]
    if len(lengths) < len(args.lengths):
        console.print(
            f"[yellow]lengths over the model's limit of {model.max_length} tokens are skipped"
        )
    info = model.info
    meter = MemoryMeter(info.device)
    idle = meter.start()
    total = len(lengths) * len(args.batch_sizes)
    with Progress(
        TextColumn("[bold]profiling"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("", total=total)
        done = [0]

        def step(length: int, batch: int) -> None:
            if done[0]:
                progress.advance(task)
            done[0] += 1
            progress.update(task, description=f"{batch} x {length} tokens")

        rows = sweep(model, info.device, lengths, args.batch_sizes, args.repeats, step)
        progress.advance(task)
    rec = recommend(rows, args.memory_budget_mb)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": info.name,
        "device": info.device,
        "backend": mcfg.backend,
        "precision": info.dtype,
        "threads": str(threads),
    }
    csv_path, png_path = args.out / "profile.csv", args.out / "profile.png"
    write_csv(rows, csv_path, meta)
    title = f"{info.name} — {info.device}, {mcfg.backend} {info.dtype}" + (
        f", {threads} threads" if info.device == "cpu" else ""
    )
    plot(rows, png_path, title, args.memory_budget_mb, idle, rec)

    table = Table(title=title)
    for col in ("length", "batch", "tokens", "latency ms", "records/s", "tokens/s", "peak MB"):
        table.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: (r.seq_len, r.batch_size)):
        if r.status != "ok":
            table.add_row(str(r.seq_len), str(r.batch_size), str(r.tokens), "OOM", "", "", "")
            continue
        over = args.memory_budget_mb is not None and r.peak_mb > args.memory_budget_mb
        table.add_row(
            str(r.seq_len),
            str(r.batch_size),
            str(r.tokens),
            f"{r.latency_ms:,.1f}",
            f"{r.records_per_s:,.0f}",
            f"{r.tokens_per_s:,.0f}",
            f"[red]{r.peak_mb:,.0f}[/red]" if over else f"{r.peak_mb:,.0f}",
        )
    console.print(table)
    budget = f"{args.memory_budget_mb:,.0f} MB" if args.memory_budget_mb else "no memory budget"
    if rec.max_length is None:
        console.print(f"[red]recommendation for {budget}: {rec.reason}")
    else:
        console.print(f"recommended for {budget} ({rec.reason}):")
        console.print(f"  model.max_length: {rec.max_length}")
        console.print(f"  batching.max_batch_tokens: {rec.max_batch_tokens}")
    console.print(f"wrote {csv_path} and {png_path}")
    return 0 if rec.max_length is not None else 1
