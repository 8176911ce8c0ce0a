"""``bark-serve up`` (run the app on a local or existing Ray) and ``bark-serve say`` (an HTTP client)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from .cli import UsageError


def register(sub) -> None:
    p = sub.add_parser("up", help="start Ray (or join RAY_ADDRESS) and serve the whole app; Ctrl-C stops it",
                       description="Serve bark-serve: the four stage deployments and the orchestrator. Without "
                                   "--address (or RAY_ADDRESS) a local Ray instance is started and stopped with it.")
    p.add_argument("--config", help="YAML config or profile name (local-cpu, pipelined-gpu, single-gpu)")
    p.add_argument("--model", help="hub id or local checkpoint directory (overrides the config)")
    p.add_argument("--host", help="HTTP host (overrides the config; default 127.0.0.1 in local-cpu)")
    p.add_argument("--port", type=int, help="HTTP port (overrides the config)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="an existing Ray cluster to deploy to")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for all stages")
    p.set_defaults(func=up)

    p = sub.add_parser("say", help="synthesize through a running server and write an audio file")
    p.add_argument("text")
    p.add_argument("-o", "--output", required=True, help=".wav, .flac, .mp3, .ogg/.opus or .pcm")
    p.add_argument("--url", default=os.environ.get("BARK_URL", "http://127.0.0.1:8000"))
    p.add_argument("--voice")
    p.add_argument("--seed", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--api-key", default=os.environ.get("BARK_API_KEY"), help="Bearer key (or BARK_API_KEY)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.set_defaults(func=say)


def _wait_ready(url: str, timeout: float) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"bark-serve did not become ready within {timeout:.0f} s")


def up(args) -> int:
    import ray
    from ray import serve

    from bark_serve.serving.serve_config import pool_resources

    from .app import build_app
    from .config import load_config

    overrides = {k: v for k, v in {"model": args.model, "http_host": args.host, "http_port": args.port}.items() if v}
    cfg = load_config(args.config, overrides)
    from bark_serve.stages.weights import Checkpoint

    Checkpoint.open(cfg.model)  # a wrong model is a one-line error now, not a failing deployment later
    local_redis = _maybe_start_redis(cfg)
    if local_redis is not None:
        cfg = cfg.model_copy(update={"batch": cfg.batch.model_copy(update={"redis_url": local_redis.url})})
    if cfg.batch.enabled:
        _check_redis(cfg, local_redis)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        if args.address:
            ray.init(address=args.address, log_to_driver=False)
        else:
            ray.init(num_cpus=args.num_cpus, resources=pool_resources(cfg), include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
        url = f"http://{'127.0.0.1' if cfg.http_host in ('0.0.0.0', '::') else cfg.http_host}:{cfg.http_port}"
        print(f"bark-serve: deploying {cfg.model} ...", flush=True)
        _wait_ready(url, args.ready_timeout)
        print(f"bark-serve is up on {url}  (POST /v1/audio/speech, POST /v1/tts, GET /v1/voices, docs at /docs); "
              "Ctrl-C stops it", flush=True)
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        print("bark-serve: stopping ...", flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if local_redis is not None:
                local_redis.stop()
    print("bark-serve: stopped", flush=True)
    return 0


def _check_redis(cfg, local_redis) -> None:
    """An unreachable Redis is a one-line error now, not a batch worker failing to start later."""
    from bark_serve.cluster.redis_conn import RedisUnavailable, connect

    try:
        connect(cfg.batch.redis()).close()
    except RedisUnavailable as exc:
        if local_redis is not None:
            local_redis.stop()
        raise UsageError(str(exc)) from None


def _maybe_start_redis(cfg):
    """Batch jobs without a configured Redis: start a local redis-server with persistence (if installed)."""
    if not cfg.batch.enabled or cfg.batch.redis_url:
        return None
    from bark_serve.cluster.local_redis import LocalRedis

    state = Path(os.environ.get("BARK_STATE_DIR", Path.home() / ".cache" / "bark-serve" / "redis"))
    return LocalRedis.start(state)


def say(args) -> int:
    import httpx

    from .audio import format_for_path

    fmt = format_for_path(args.output)
    body = {"text": args.text, "voice": args.voice, "format": fmt, "seed": args.seed}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        r = httpx.post(args.url.rstrip("/") + "/v1/tts", json=body, headers=headers, timeout=args.timeout)
    except httpx.HTTPError as exc:
        raise UsageError(f"cannot reach {args.url}: {exc}") from None
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        raise UsageError(f"server answered {r.status_code}: {message}")
    Path(args.output).write_bytes(r.content)
    print(f"wrote {args.output} ({len(r.content)} bytes, seed {r.headers.get('x-bark-seed')})", file=sys.stderr)
    return 0
