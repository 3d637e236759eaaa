"""Command line: ``streamer run | broker | demo | bench | profile | soak | chaos | replay-dlq``
(``python -m streamer`` too)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from streamer import __version__, eventloop
from streamer.config import ConfigError, load_config

EPILOG = """\
configuration:
  A YAML file (see configs/) whose keys can each be overridden from the environment with the
  STREAMER_ prefix and __ between levels, e.g. STREAMER_KAFKA__BOOTSTRAP_SERVERS=host:9092.

examples:
  streamer broker                               # embedded broker for local development
  streamer run --config configs/minilm.yaml     # the service, until SIGTERM/SIGINT
  streamer demo                                 # broker + 1,000 sentences + MiniLM, a summary
  streamer profile --config FILE --memory-budget-mb 2000   # settings that fit a memory budget
  streamer soak                                 # RSS and lag while 1M records drain
  streamer chaos                                # kills, rebalance storm, network faults
  streamer replay-dlq -c FILE --error-class InvalidJson --dry-run   # dead letters, after a fix
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="streamer",
        description="Kafka-native streaming inference for Hugging Face transformer models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"streamer {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the service in the foreground until SIGTERM/SIGINT",
        description="Consume, batch, infer, publish and commit until SIGTERM or SIGINT, then "
        "drain in-flight work, commit and leave the group within runtime.shutdown_grace_s.",
    )
    run.add_argument("--config", "-c", type=Path, help="YAML config file (default: built-ins)")
    run.add_argument("--check", action="store_true", help="validate the config, print it, exit")
    # set by the supervisor (runtime.processes > 1) on each worker it starts: tags its logs
    run.add_argument("--worker", metavar="I/N", help=argparse.SUPPRESS)

    broker = sub.add_parser(
        "broker",
        help="run the embedded Kafka-compatible broker (tansu) for local development",
        description="Start the embedded broker on loopback, create topics, print the bootstrap "
        "address and run until Ctrl-C. Memory storage: topics vanish when it stops.",
    )
    broker.add_argument("--port", type=int, default=9092, help="port (0 = any free; default 9092)")
    broker.add_argument(
        "--topic",
        action="append",
        default=[],
        metavar="NAME[:PARTITIONS]",
        help="create a topic (repeatable; default: texts:4, texts.embeddings:4, texts.dlq:1)",
    )

    demo = sub.add_parser(
        "demo",
        help="embedded broker + sample sentences + MiniLM end to end, then a summary",
        description="Start the embedded broker, create topics, produce sample sentences, run "
        "the pipeline with the bundled all-MiniLM-L6-v2 and print records/s, latency and a "
        "sample result. What `make demo` runs.",
    )
    demo.add_argument("--records", type=int, default=1000, help="sentences to produce (1000)")
    demo.add_argument("--model-path", type=Path, help="model dir (default: bundled MiniLM)")
    demo.add_argument("--batch-size", type=int, default=64, help="batching.max_batch_size")

    check = sub.add_parser(
        "check-model",
        help="report on a model directory: files and hashes, checks, load and warm-up times",
        description="Hash every weight, config and tokenizer file (the manifest hash is the "
        "fingerprint results carry, and what `pins.manifest_sha256` expects), check that the "
        "tokenizer and model belong together and fit the task, then load and warm the model "
        "and time each phase. Exit code 1 when it cannot be served.",
    )
    check.add_argument("path", type=Path, help="local model directory")
    check.add_argument(
        "--task",
        choices=["feature-extraction", "text-classification"],
        default="feature-extraction",
    )
    check.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="model.max_length (default: 256, capped by a sentence-transformers folder's "
        "max_seq_length)",
    )
    check.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    check.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load pickle-based weights (.bin/.pt) like model.allow_pickle: trusted files only",
    )

    bench = sub.add_parser(
        "bench",
        help="offline model vs streamer end to end vs a per-record consumer",
        description="One run on the same records and model: the model alone offline "
        "(length-sorted batches), streamer end to end through the embedded broker, and a naive "
        "consumer that runs the model once per record. Prints a table, writes JSON.",
    )
    bench.add_argument("--records", type=int, default=2000)
    bench.add_argument(
        "--naive-records",
        type=int,
        default=300,
        help="records for the per-record consumer (it is slow)",
    )
    bench.add_argument("--model-path", type=Path, help="model dir (default: bundled MiniLM)")
    bench.add_argument("--out", type=Path, default=Path("bench/results.json"))
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (default)")
    bench.add_argument(
        "--backends",
        help="comma-separated variants, e.g. torch-fp32,torch-int8,onnxruntime-int8 "
        "(default: every one available on the device)",
    )
    bench.add_argument("--quick", action="store_true", help="fewer records: a smoke run")
    bench.add_argument(
        "--only",
        metavar="SECTIONS",
        help="comma-separated sections to run (default: all): offline, streamer, encodings, "
        "low-load, per-record, passthrough, no-model, processes, order, compression; e.g. --only "
        "passthrough,no-model",
    )
    bench.add_argument(
        "--no-model-records",
        type=int,
        metavar="N",
        help="records for the kafka passthrough and streamer no-model rows (default: --records, "
        "at least 20,000 unless --quick: a 30k records/s pipeline needs them to be measured)",
    )
    bench.add_argument(
        "--offline-passes",
        type=int,
        choices=[1, 2],
        help="passes over the data per variant offline, cold then warm (default: 2 on CUDA, "
        "1 on CPU)",
    )
    bench.add_argument(
        "--cuda-graphs",
        choices=["on", "off", "both"],
        default="on",
        help="model.cuda_graphs for the CUDA torch variants; both: a row each, the eager one "
        "named VARIANT-eager (default: on)",
    )
    bench.add_argument(
        "--processes",
        metavar="LIST",
        default="1,2",
        help="runtime.processes counts for the processes section (default: 1,2)",
    )
    bench.add_argument(
        "--append",
        action="store_true",
        help="merge into the results already in --out (several runs, e.g. one per section, "
        "one table)",
    )

    from streamer.tools.profiler import add_arguments as profile_arguments

    profile = sub.add_parser(
        "profile",
        help="sweep sequence lengths x batch sizes: latency, throughput, peak memory",
        description="Run the configured model (device, backend, precision) on every sequence "
        "length x batch size, write a CSV and a PNG (memory and throughput against sequence "
        "length, one line per batch size) and recommend model.max_length and "
        "batching.max_batch_tokens for --memory-budget-mb.",
    )
    profile_arguments(profile)

    from streamer.tools.replay import add_arguments as replay_arguments

    replay = sub.add_parser(
        "replay-dlq",
        help="re-inject dead letters into their input topic after a fix (filters, --dry-run)",
        description="Read the DLQ topic up to its end offsets at start, keep the dead letters "
        "that match the filters (error class, stage, source topic/partition/offsets), strip the "
        "streamer.error.*/streamer.source.* headers and produce key, value and the original "
        "headers to streamer.source.topic (or --to). Progress is committed in a consumer group "
        "of its own once the records are acknowledged, so a second run does not re-inject them. "
        "Dead letters whose value was dropped are listed, not replayed.",
    )
    replay_arguments(replay)

    from streamer.tools.soak import add_arguments as soak_arguments

    soak = sub.add_parser(
        "soak",
        help="memory under a backlog: drain 1M records through `streamer run`, sample RSS and lag",
        description="Produce a backlog of small JSON records to the embedded broker first, then "
        "start `streamer run` (a child process, runtime.processes 1) and sample its RSS "
        "(process tree) and the group's lag every --interval-s until the lag is 0, then SIGTERM "
        "it (it must exit 0). The RSS reference is the median RSS once --warmup-fraction of the "
        "records are committed; RSS should stay within ±10 % of it, and lag should fall "
        "steadily (never rising, a negative least-squares slope in each quarter of the drain). "
        "Writes JSON and a PNG of RSS and lag over time, prints a summary; exit 1 when a "
        "criterion fails. The default null model costs nothing, so the pipeline's own memory "
        "is what is measured (MiniLM on 2 CPU cores would take about an hour for a million "
        "records). What `make soak` runs.",
    )
    soak_arguments(soak)

    chaos = sub.add_parser(
        "chaos",
        help="faults under load: kills, a rebalance storm, network faults; every record checked",
        description="Run `streamer run` members against the embedded broker behind a fault "
        "proxy under a steady produce rate: kill-loop (SIGKILL at random moments, in start-up, "
        "running and in drain, with a second member taking over), rebalance-storm (three "
        "members on six partitions stopped and started every few seconds), network (connection "
        "resets, stalls longer than request_timeout_ms, added latency). Each ends by draining, "
        "then checks every input (partition, offset) against the output and DLQ topics: lost "
        "must be 0; duplicates are counted against their bound (max_in_flight per fault). "
        "Prints a table, writes JSON; exit 1 if any scenario failed. The long form (50 kills, a "
        "two-minute storm, five network rounds) is `make chaos`, some minutes; --short is the "
        "form inside `make test`.",
    )
    chaos.add_argument("--short", action="store_true", help="3 kills, a 12 s storm, one round")
    chaos.add_argument(
        "--scenarios", metavar="LIST", help="comma-separated: kill-loop, rebalance-storm, network"
    )
    chaos.add_argument("--out", type=Path, default=Path("bench/chaos.json"))
    chaos.add_argument("--seed", type=int, default=7, help="random moments are reproducible")
    chaos.add_argument(
        "--model-path",
        type=Path,
        help="a model directory (default: the zero-cost null model: the pipeline's guarantees "
        "do not depend on the model, and a real one on 2 CPU cores makes it slow)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "broker":
            from streamer.tools.devtools import run_broker

            return run_broker(args.port, args.topic)
        if args.command == "demo":
            from streamer.tools.demo import run_demo

            return run_demo(args.records, args.model_path, args.batch_size)
        if args.command == "check-model":
            from streamer.tools.checkmodel import run_check_model

            return run_check_model(
                args.path, args.task, args.max_length, args.device, args.allow_pickle
            )
        if args.command == "bench":
            from streamer.tools.bench import run_bench

            return run_bench(args)
        if args.command == "profile":
            from streamer.tools.profiler import run_profile

            return run_profile(args)
        if args.command == "replay-dlq":
            from streamer.tools.replay import run_replay

            return run_replay(args)
        if args.command == "soak":
            from streamer.tools.soak import run_soak

            return run_soak(args)
        if args.command == "chaos":
            from streamer.tools.chaos import run_chaos

            return run_chaos(args)
    except ConfigError as exc:
        print(f"streamer: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


class _StoppedBeforeStart(BaseException):
    """SIGTERM/SIGINT arrived before the service's own handlers were in place."""


def _stop_before_start(signum: int, frame: object) -> None:
    raise _StoppedBeforeStart(signum)


def _run(args: argparse.Namespace) -> int:
    # Importing torch and loading the config take seconds; a SIGTERM then (a rollout, a storm
    # of restarts) must end the process cleanly, not by the signal's default action (exit 143).
    # The event loop's handlers replace these once the service is up.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_before_start)
    try:
        return _run_service(args)
    except _StoppedBeforeStart:
        logging.getLogger("streamer").info("stopped during start-up (nothing consumed yet)")
        return 0


def _run_service(args: argparse.Namespace) -> int:
    from streamer.observability.logs import setup_logging

    cfg = load_config(args.config)
    cfg.require_model_path()
    if args.check:
        print(cfg.model_dump_json(indent=2))
        return 0
    worker = args.worker.split("/")[0] if args.worker else None
    setup_logging(cfg.log.level, cfg.log.json_format, worker=worker)
    try:
        if cfg.runtime.processes > 1:
            from streamer.supervisor import supervise

            return eventloop.run(supervise(cfg, args.config))
        from streamer.app import serve

        return eventloop.run(serve(cfg, args.config))
    except Exception as exc:
        logging.getLogger("streamer").error("fatal: %s: %s", type(exc).__name__, exc)
        return 1
