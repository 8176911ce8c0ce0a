"""``bark-serve dataset INPUT --out DIR``: offline synthesis of a whole table on Ray Data (bark_serve.offline).

Where it runs: with --address local, or without --address and $RAY_ADDRESS, a new local Ray instance
(its own temp dir, every pool resource on the one node), stopped at the end. With --address (``auto``, an
address, ``ray://`` for Ray Client) or $RAY_ADDRESS (set by ``ray job submit``), the existing
cluster, whose nodes advertise the pool resources.
"""

from __future__ import annotations

import os
import shutil
import sys

from .common import CliError, number, ray_temp_dir


def register(sub) -> None:
    p = sub.add_parser("dataset", help="synthesize a whole table (JSONL, CSV, Parquet) on Ray Data; resumable",
                       description="Synthesize every row of INPUT (JSONL, CSV or Parquet with at least id and "
                                   "text; optionally voice, seed, format and options, as batch items) and write "
                                   "DIR/audio/<id>.<ext> plus the Parquet manifest DIR/manifest.parquet. The "
                                   "four stages run as Ray Data map_batches over actor pools placed by the "
                                   "config's stage blocks. Rerunning the same command skips the ids already ok; "
                                   "bad rows are recorded as failed and do not stop the run.")
    p.add_argument("input", help="input file or directory: local path or any URI pyarrow reads (s3://, gs://, ...)")
    p.add_argument("--out", required=True, help="output directory (local or URI; shared storage on a cluster)")
    p.add_argument("--config", help="YAML config or profile name (default: local-cpu)")
    p.add_argument("--model", help="hub id or local checkpoint directory (overrides the config)")
    p.add_argument("--address", help="Ray cluster to run on: auto, HOST:PORT, ray://HOST:10001, or local for a new "
                                     "local instance (default: $RAY_ADDRESS, else a new local instance)")
    p.add_argument("--num-cpus", type=number(int, 1), help="CPUs of a new local Ray instance (default: all)")
    p.add_argument("--format", default="wav", help="audio format of rows that name none (wav, flac, mp3, opus, pcm)")
    p.add_argument("--input-format", default="auto", choices=["auto", "jsonl", "csv", "parquet"],
                   help="how to read INPUT (default: from its extension)")
    p.add_argument("--limit", type=int, help="read only the first N rows of INPUT")
    p.add_argument("--manifest-flush-s", type=number(float, 0), default=10.0,
                   help="write finished rows to the manifest at least this often (seconds, default 10)")
    p.add_argument("--block-bytes", type=int, default=64 << 10,
                   help="Ray Data block size (default 64 KiB); smaller blocks hand rows on sooner, at more overhead")
    p.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars")
    p.set_defaults(func=dataset)


def dataset(args) -> int:
    from bark_serve.offline.outdir import OutDir
    from bark_serve.offline.run import DatasetInputError, RunOptions, check_input, check_out, run_dataset
    from bark_serve.schema.formats import check_format
    from bark_serve.serving.config import load_config
    from bark_serve.stages.weights import Checkpoint

    if args.limit is not None and args.limit < 1:
        raise CliError("--limit must be at least 1")
    if args.block_bytes < 1:
        raise CliError("--block-bytes must be at least 1")
    cfg = load_config(args.config, {"model": args.model} if args.model else None)
    opts = RunOptions(args.input, args.out, args.input_format, check_format(args.format), args.limit,
                      progress=not args.no_progress, flush_s=args.manifest_flush_s,
                      block_bytes=args.block_bytes)
    try:
        check_input(opts)
        OutDir(opts.out).makedirs()
        check_out(opts)
    except DatasetInputError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write to --out {args.out!r}: {exc}") from None
    Checkpoint.open(cfg.model)  # a missing or broken checkpoint fails here (exit 2), not in every actor
    tmp = _start_ray(args, cfg)
    try:
        summary = run_dataset(cfg, opts)
    except DatasetInputError as exc:
        raise CliError(str(exc)) from None
    finally:
        _stop_ray(tmp)
    print("\n".join(summary.lines()))
    return summary.exit_code


def _start_ray(args, cfg) -> str | None:
    """ray.init as the module docstring says; the temp dir of a local instance (removed at the end)."""
    import ray

    from bark_serve.serving.serve_config import pool_resources

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise CliError(f"cannot connect to Ray at {address!r}: {exc}") from None
        return None
    tmp = ray_temp_dir("bark-serve dataset")
    try:
        ray.init(address="local", num_cpus=args.num_cpus, resources=pool_resources(cfg), include_dashboard=False,
                 log_to_driver=False, _temp_dir=tmp)
    except Exception as exc:  # a message and exit 2, and no temp dir (nor a half-started instance) left behind
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        raise CliError(f"could not start a local Ray instance: {exc}") from None
    print(f"bark-serve dataset: started a local Ray instance ({tmp})", file=sys.stderr)
    return tmp


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A HOST:PORT address (not auto, not ray://) whose port answers, else a CliError at once: ray.init would
    wait on an unreachable GCS for many minutes."""
    import socket

    if address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(f"--address {address!r} is not HOST:PORT (or auto, local, ray://HOST:PORT)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise CliError(f"cannot reach Ray at {address!r}: {exc.strerror or exc}") from None


def _stop_ray(tmp: str | None) -> None:
    import ray

    ray.shutdown()
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
