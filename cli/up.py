"""``bark-serve up`` (run the app on a local or existing Ray) and ``bark-serve say`` (an HTTP client).

How ``up`` stops: SIGINT and SIGTERM both raise :class:`_Stopping` in the main thread, whatever
it is doing (starting Ray, waiting for the stages, idling). ``ray.init`` installs its own SIGTERM
handler, so ours is installed again after it. The ``finally`` block then ignores both signals (a
second Ctrl-C must not cut the shutdown short) and stops everything it started: a local Ray
instance (``ray.shutdown`` stops the head that ``ray.init`` started, and with it every worker),
the local redis-server, the Ray temp dir.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from .common import CliError, check_output_path, check_text, number, ray_temp_dir, server_url, write_output

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Stopping(BaseException):
    """Raised by the signal handler: unwinds whatever ``up`` is doing (BaseException, like Ctrl-C)."""


def register(sub) -> None:
    _register_up(sub)
    _register_say(sub)


def _register_up(sub) -> None:
    p = sub.add_parser("up", help="start a local Ray instance (or join --address) and serve the whole app",
                       description="Serve bark-serve: the four stage deployments and the orchestrator (and the "
                                   "batch workers with --batch). Without --address, a new local Ray instance is "
                                   "started (never one found on the machine) and stopped with it. Prints one line "
                                   "with the URL, the Ray address and the routes when every stage is ready; "
                                   "Ctrl-C or SIGTERM stops everything within seconds.")
    p.add_argument("--config", help="YAML config or profile name (local-cpu, pipelined-gpu, single-gpu)")
    p.add_argument("--model", help="hub id or local checkpoint directory (overrides the config)")
    p.add_argument("--host", help="HTTP host (overrides the config; default 127.0.0.1 in local-cpu)")
    p.add_argument("--port", type=number(int, 1, 65535), help="HTTP port (overrides the config)")
    p.add_argument("--address", help="an existing Ray cluster to deploy to (e.g. 10.0.0.5:6379); "
                                     "without it a new local Ray instance is started")
    p.add_argument("--num-cpus", type=number(int, 1), help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--batch", action="store_true",
                   help="enable batch jobs (/v1/batches); without batch.redis_url a local redis-server is "
                        "started, with its data in $BARK_STATE_DIR or ~/.cache/bark-serve/redis")
    p.add_argument("--ready-timeout", type=number(float, 0, above=True), default=900.0,
                   help="seconds to wait for all stages")
    p.add_argument("--verbose", action="store_true", help="show Ray's and Serve's own logs in this terminal")
    p.set_defaults(func=up, exit_at_once=True)  # see cli.main._exit_at_once


def _register_say(sub) -> None:
    p = sub.add_parser("say", help="synthesize through a running server and write an audio file",
                       description="Send TEXT to a running bark-serve (POST /v1/tts) and write the audio it "
                                   "answers. The server is --url, else $BARK_URL, else http://127.0.0.1:8000.")
    p.add_argument("text", help="the text to speak")
    p.add_argument("-o", "--output", required=True,
                   help="output file; its extension picks the format: .wav, .flac, .mp3, .ogg/.opus or .pcm")
    p.add_argument("--url", help="server URL (default: $BARK_URL, else http://127.0.0.1:8000)")
    p.add_argument("--voice", help="voice preset or alias (GET /v1/voices lists them)")
    p.add_argument("--seed", type=int, help="random seed (same seed, same audio)")
    p.add_argument("--temperature", type=number(float, 0), help="temperature of every stage; 0 is greedy")
    p.add_argument("--api-key", default=os.environ.get("BARK_API_KEY"), help="Bearer key (default: $BARK_API_KEY)")
    p.add_argument("--timeout", type=number(float, 0, above=True), default=900.0,
                   help="seconds to wait for the answer (default 900)")
    p.set_defaults(func=say)


def _raise_stopping(signum, frame):
    raise _Stopping(signal.Signals(signum).name)


def _catch_signals() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _raise_stopping)


def _check_placement(cfg, local: bool) -> None:
    """Deployments that certainly cannot be placed on this cluster: an error for a local instance (nothing
    will add a node), a warning on a cluster given with --address (an autoscaler may add nodes)."""
    from bark_serve.serving.serve_config import live_placement_problems

    problems = live_placement_problems(cfg)
    if problems and local:
        raise CliError("cannot start: " + "; ".join(problems) + ". Lower num_cpus / num_gpus / num_replicas in "
                       "the config (or start from a profile: `profile: local-cpu`), or give Ray more CPUs with "
                       "--num-cpus")
    for problem in problems:
        print(f"bark-serve: warning: {problem}; waiting for the cluster to grow", flush=True)


def _scheduling_warnings(app_name: str) -> dict[str, str]:
    """Deployment -> Serve's own word on its replicas still waiting for resources (after
    RAY_SERVE_SLOW_STARTUP_WARNING_S)."""
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # the controller is busy or starting: nothing to say yet
        return {}
    return {name: d.message for name, d in (app.deployments.items() if app else [])
            if "to be scheduled" in (d.message or "")}


def _pending_bundles() -> list[dict[str, float]]:
    """What Ray's scheduler holds back for want of resources now, one bundle per waiting task or actor (the
    demands `ray status` lists); a replica that has its resources and is still loading is not among them."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    try:
        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception:  # the GCS is busy: nothing to say this time
        return []
    return [dict(b.bundle) for demand in status.resource_demands.ray_task_actor_demand
            for b in demand.bundles_by_count for _ in range(b.count)]


def _same_ask(bundle: dict[str, float], ask: dict[str, float]) -> bool:
    return bundle.keys() == ask.keys() and all(abs(bundle[k] - v) < 1e-6 for k, v in ask.items())


def unplaced_deployments(cfg) -> dict[str, str]:
    """Deployment -> why it waits: its replicas whose ask Ray holds back for want of resources, with what the
    cluster has free and in all of each resource asked for."""
    import ray

    from bark_serve.serving.serve_config import replica_asks

    pending = _pending_bundles()
    if not pending:
        return {}
    free, total = ray.available_resources(), ray.cluster_resources()
    out = {}
    for name, _, ask in replica_asks(cfg):
        waiting = sum(_same_ask(bundle, ask) for bundle in pending)
        # A lease can also wait for a worker process to start (a loaded machine starts few at once) while
        # its resources are free: that is loading, not a want of resources, and never counts.
        if waiting and any(free.get(k, 0.0) < v for k, v in ask.items()):
            asks = ", ".join(f"{k} {v:g}" for k, v in sorted(ask.items()))
            has = ", ".join(f"{k} {free.get(k, 0.0):g} free of {total.get(k, 0.0):g}" for k in sorted(ask))
            out[name] = (f"deployment {name} cannot be placed: {waiting} replica(s) wait for {asks} each; "
                         f"the cluster has {has}")
    return out


CHECK_EVERY_S = 5.0  # how often the wait looks at what Ray holds back (a local instance fails at the 2nd sight)
# Ray Serve's proxy holds a request for an app whose ingress has no running replica (it must, to let a
# deployment scale up from zero); with this header it answers 408 after that many seconds instead.
PROXY_TIMEOUT_HEADER = "x-request-timeout-seconds"


def _wait_ready(url: str, timeout: float, cfg, local: bool = True, state: dict | None = None) -> None:
    """Poll /readyz until 200. Every CHECK_EVERY_S, look for deployments Ray cannot place: on a local
    instance (nothing will add a node) one seen waiting at two checks in a row ends the wait (exit 1);
    with --address it is said once, with Serve's own word, while an autoscaler may add nodes."""
    import httpx

    deadline = time.time() + timeout
    said: set[str] = set()
    waited: dict[str, str] = {}
    next_check = time.time() + CHECK_EVERY_S
    while time.time() < deadline:
        try:
            if httpx.get(url + "/readyz", headers={PROXY_TIMEOUT_HEADER: "2"}, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if state is not None and state.get("deploy_error") is not None:
            raise CliError(f"deploying failed: {state['deploy_error']}", code=1)
        if time.time() >= next_check:
            next_check = time.time() + CHECK_EVERY_S
            unplaced = unplaced_deployments(cfg)
            stuck = [message for name, message in unplaced.items() if name in waited]
            if local and stuck:
                raise CliError("cannot start: " + "; ".join(stuck) + ". Lower num_cpus / num_gpus / num_replicas "
                               "in the config, or give Ray more with --num-cpus", code=1)
            waited = unplaced
            news = {**_scheduling_warnings(cfg.app_name), **unplaced}  # ours, where both say it
            for name, message in news.items():
                if name not in said:  # once per deployment
                    said.add(name)
                    print(f"bark-serve: still waiting: {message}", flush=True)
        time.sleep(0.5)
    raise CliError(f"bark-serve did not become ready within {timeout:.0f} s")


def _config(args):
    from bark_serve.serving.config import load_config

    overrides = {k: v for k, v in {"model": args.model, "http_host": args.host, "http_port": args.port}.items() if v}
    cfg = load_config(args.config, overrides)
    if args.batch and not cfg.batch.enabled:
        cfg = cfg.model_copy(update={"batch": cfg.batch.model_copy(update={"enabled": True})})
    return cfg


def up(args) -> int:
    from bark_serve.stages.weights import Checkpoint

    cfg = _config(args)
    Checkpoint.open(cfg.model)  # a wrong model is a one-line error now, not a failing deployment later
    _no_auto_init()
    _catch_signals()
    _quiet_ray(args.verbose)
    state: dict = {}
    try:
        cfg = _start_redis(cfg, state)
        where = f"Ray at {args.address}" if args.address else "a new local Ray instance"
        print(f"bark-serve: deploying {cfg.model} on {where} ...", flush=True)
        ray_address = _start_ray(args, cfg, state)
        _catch_signals()  # ray.init replaced our SIGTERM handler
        _check_placement(cfg, local=not args.address)
        _deploy(cfg, args.verbose, state)
        url = f"http://{'127.0.0.1' if cfg.http_host in ('0.0.0.0', '::') else cfg.http_host}:{cfg.http_port}"
        _wait_ready(url, args.ready_timeout, cfg, local=not args.address, state=state)
        _print_ready(cfg, url, ray_address, local=not args.address)
        while True:
            time.sleep(3600)
    except _Stopping:
        pass
    except SystemExit as exc:  # ray.init's own SIGTERM handler (sys.exit(15)) caught the signal mid-start
        if exc.code != signal.SIGTERM:
            raise
    finally:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        print("bark-serve: stopping ...", flush=True)
        _stop(cfg, state)
    print("bark-serve: stopped", flush=True)
    return 0


def _no_auto_init() -> None:
    """No Ray call of this process may start a Ray instance by itself. When a start is abandoned (not ready in
    time, Ctrl-C), the deploying thread may still be inside serve.run after ray.shutdown; Ray's auto-init then
    started a second, default instance under $RAY_TMPDIR/ray that outlived the stop and left its session
    folder behind. Only _start_ray starts (or joins) Ray: a call that would auto-init raises instead, in that
    thread, where run() keeps it. (RAY_ENABLE_AUTO_CONNECT=0 is no answer: the call then reaches Ray's shut
    down core worker, which ends the whole process.)"""
    import ray._private.auto_init_hook as hook

    def refuse() -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("bark-serve up: Ray was stopped; no new instance is started")

    hook.auto_init_ray = refuse  # the wrapper of every public Ray API looks this name up at each call


def _quiet_ray(verbose: bool) -> None:
    """Ray's and Serve's INFO/WARNING lines are for operators: keep them out of the terminal unless --verbose.

    Serve logs "New http_options will not be applied" from serve.run even though serve.start
    applied ours: serve.run always calls serve_start, which says so whenever Serve already runs.
    """
    if not verbose:
        for name in ("ray", "ray.serve", "ray.data", "ray.train"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _start_redis(cfg, state: dict):
    local_redis = _maybe_start_redis(cfg)
    if local_redis is not None:
        state["redis"] = local_redis
        # Big results go to files beside the local Redis's data rather than into its capped memory.
        results_dir = cfg.batch.results_dir or str(local_redis.directory / "results")
        cfg = cfg.model_copy(update={"batch": cfg.batch.model_copy(update={"redis_url": local_redis.url,
                                                                           "results_dir": results_dir})})
    if cfg.batch.enabled:
        _check_redis(cfg)
    return cfg


SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps a loopback node address as it is


def ray_node_ip(http_host: str) -> str | None:
    """The interface a local Ray instance listens on: the HTTP host's. None (every interface, Ray's default)
    when the HTTP host is every interface too."""
    if http_host in ("0.0.0.0", "::", ""):
        return None
    return "127.0.0.1" if http_host in ("127.0.0.1", "localhost", "::1") else http_host


def _start_ray(args, cfg, state: dict) -> str:
    """ray.init; a local instance gets its own temp dir and never joins a cluster found on the machine."""
    node_ip = None if args.address else ray_node_ip(cfg.http_host)
    if node_ip == "127.0.0.1":
        # Ray turns a loopback node address into the machine's own (so that other nodes could join) unless
        # it runs as a one-machine instance, its mode on macOS and Windows: then GCS, raylet, agents,
        # workers and the metrics export all listen on 127.0.0.1. Read when ray is imported, and by the
        # processes Ray starts (they inherit it).
        os.environ[SINGLE_MACHINE_ENV] = "0"
    # Ray's C++ failure-signal handler, installed in this driver during ray.init, turns a SIGTERM that lands
    # there into an abort (exit -6) before our handler can stop cleanly. It is read once, when ray is
    # imported; the processes Ray starts (GCS, raylet, workers) are not given the variable and keep theirs.
    os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"
    try:
        import ray
    finally:
        os.environ.pop("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", None)
    if node_ip == "127.0.0.1":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the variable was set

    from ray._private.worker import RayContext

    from bark_serve.serving.serve_config import patient_proxy_start, pool_resources

    level = logging.INFO if args.verbose else logging.ERROR
    if args.address:
        ray.init(address=args.address, log_to_driver=args.verbose, logging_level=level)
        return args.address
    state["ray_tmp"] = ray_temp_dir("bark-serve up")
    state["local_ray"] = True
    patient_proxy_start()
    ctx = ray.init(address="local", num_cpus=args.num_cpus, resources=pool_resources(cfg),
                   include_dashboard=False, log_to_driver=args.verbose, logging_level=level,
                   _temp_dir=state["ray_tmp"], _node_ip_address=node_ip or None)
    assert isinstance(ctx, RayContext)  # a local instance (not a ray:// client connection)
    return ctx.address_info.get("gcs_address") or ray.get_runtime_context().gcs_address


def _deploy(cfg, verbose: bool, state: dict) -> None:
    """Start Serve and deploy the app. serve.run returns only when every deployment runs (blocking=False
    only spares the wait for Ctrl-C after it), and waits forever for a replica Ray cannot place: it runs in
    a thread of its own, so that the wait for /readyz can look at placement meanwhile; its error, if any,
    lands in ``state["deploy_error"]``."""
    from ray import serve

    from bark_serve.serving.app import build_app

    _quiet_ray(verbose)  # importing ray.serve set up its logger again
    serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
    app = build_app(cfg)

    def run() -> None:
        try:
            serve.run(app, name=cfg.app_name, route_prefix="/", blocking=False)
        except BaseException as exc:  # DEPLOY_FAILED, or Ray stopped under it when up stops
            state["deploy_error"] = exc

    threading.Thread(target=run, name="serve-run", daemon=True).start()


def _routes(cfg) -> str:
    routes = ["POST /v1/audio/speech", "POST /v1/tts", "GET /v1/voices", "GET /v1/models"]
    if cfg.batch.enabled:
        routes.append("/v1/batches")
    return ", ".join(routes) + ", /docs, /playground/"


def _auth_hint() -> str:
    """Where a Ray driver finds the token of a Ray 2.60 cluster (token auth is on unless disabled)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return "token auth disabled"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_MODE=token, token in $RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return f"RAY_AUTH_MODE=token, token in {path}"


def _print_ready(cfg, url: str, ray_address: str, local: bool) -> None:
    print(f"bark-serve is up: {url}  Ray: {ray_address}  app: {cfg.app_name!r}  routes: {_routes(cfg)}",
          flush=True)
    # A Ray on loopback only is joined by drivers in Ray's one-machine mode too (else they turn 127.0.0.1
    # into the machine's address, where nothing listens).
    one_machine = f" {SINGLE_MACHINE_ENV}=0" if local and os.environ.get(SINGLE_MACHINE_ENV) == "0" else ""
    print(f"  Python: export RAY_ADDRESS={ray_address}{one_machine} ({_auth_hint()}), then "
          f"serve.get_app_handle({cfg.app_name!r}). {'Ctrl-C stops it.' if local else ''}".rstrip(), flush=True)


def _stop(cfg, state: dict) -> None:
    """Stop what up started; a local Ray instance goes whole (no graceful replica drain: nobody is left)."""
    try:
        import ray

        ours = _our_processes(state)
        if ray.is_initialized() and not state.get("local_ray"):
            from ray import serve

            serve.delete(cfg.app_name)  # someone else's cluster: remove our app, leave the rest
        ray.shutdown()
        _reap(ours)
    finally:
        if state.get("redis") is not None:
            state["redis"].stop()
        if state.get("ray_tmp"):
            shutil.rmtree(state["ray_tmp"], ignore_errors=True)


def _our_processes(state: dict) -> list:
    """Every process this one started (raylet, GCS, agents, workers; a redis-server still starting), taken
    before ray.shutdown: a start cut short by a signal leaves ray.shutdown without the list of what it started.
    A running local redis-server is left out: it is stopped gracefully, so that it writes its data."""
    import psutil

    redis = state.get("redis")
    skip = {redis.process.pid} if redis is not None else set()
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in skip]


def _reap(processes: list, timeout_s: float = 3.0) -> None:
    """Wait briefly for processes ray.shutdown stopped; kill the ones it missed."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)


def _check_redis(cfg) -> None:
    """An unreachable Redis is a one-line error now, not a batch worker failing to start later."""
    from bark_serve.cluster.redis_conn import RedisUnavailable, connect

    try:
        connect(cfg.batch.redis()).close()
    except RedisUnavailable as exc:
        raise CliError(str(exc)) from None


def _maybe_start_redis(cfg):
    """Batch jobs without a configured Redis: start a local redis-server with persistence (if installed)."""
    if not cfg.batch.enabled or cfg.batch.redis_url or _redis_url_from_env(cfg):
        return None
    from bark_serve.cluster.local_redis import LocalRedis

    state = Path(os.environ.get("BARK_STATE_DIR", Path.home() / ".cache" / "bark-serve" / "redis"))
    try:
        return LocalRedis.start(state, maxmemory=cfg.batch.local_redis_maxmemory)
    except RuntimeError as exc:
        raise CliError(str(exc)) from None


def _redis_url_from_env(cfg) -> str | None:
    """The URL the batch config names through the environment (redis_url_env, else REDIS_URL)."""
    return os.environ.get(cfg.batch.redis_url_env or "REDIS_URL") or None


def say(args) -> int:
    import httpx

    from bark_serve.schema.formats import format_for_path

    url = server_url(args.url)
    fmt = format_for_path(args.output)
    check_output_path(args.output)
    body = {"text": check_text(args.text), "voice": args.voice, "format": fmt, "seed": args.seed}
    if args.temperature is not None:
        body["temperature"] = args.temperature
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        r = httpx.post(url.rstrip("/") + "/v1/tts", json=body, headers=headers, timeout=args.timeout)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach {url}: {exc}") from None
    if r.status_code != 200:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:200]
        raise CliError(f"server answered {r.status_code}: {message}")
    write_output(args.output, r.content)
    print(f"wrote {args.output} ({len(r.content)} bytes, seed {r.headers.get('x-bark-seed')})", file=sys.stderr)
    return 0
