"""`loramux serve --replicas N [--ray-address ADDR]`: the Serve application, and running it.

`build_app(settings)` binds two deployments: `LoramuxEngine` (N replicas, engine_replica.py, each
one CPU each) and `LoramuxIngress` (one replica, ingress.py, no CPU
reserved: it only parses and forwards). `run_cluster(settings)`:
  ray.init (join `--ray-address`, or start a local Ray in-process with every port on 127.0.0.1 and no
  dashboard) -> serve.start (HTTP proxy on --host:--port) -> serve.run (blocks until every replica is
  healthy) -> wait for SIGTERM/SIGINT -> delete the app (replicas drain for --drain-timeout-s) ->
  ray.shutdown. Start-up errors are one line (the CLI prints them), exit status 2.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from server.settings import ServerSettings

log = logging.getLogger("loramux.cluster")
APP_NAME = "loramux"
ENGINE, INGRESS = "LoramuxEngine", "LoramuxIngress"
ENGINE_CPUS = 1.0


def build_app(settings: ServerSettings, engine_cpus: float = ENGINE_CPUS):
    from ray import serve

    from server.cluster.engine_replica import make_engine_class
    from server.cluster.ingress import Ingress

    engine = serve.deployment(
        name=ENGINE, num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": engine_cpus},
        # The engine batches: let Serve hand a replica a full batch and a queue (the router still
        # prefers the least loaded replica), not Serve's default of 5 at a time.
        max_ongoing_requests=2 * settings.max_batch_size,
        max_queued_requests=-1,
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
        health_check_period_s=2.0, health_check_timeout_s=max(30.0, settings.step_stall_s),
    )(make_engine_class(max(1, settings.max_cpu_adapters)))
    ingress = serve.deployment(
        name=INGRESS, num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=settings.max_waiting + 2 * settings.max_batch_size * settings.replicas,
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
    )(serve.ingress()(Ingress))
    return ingress.bind(engine.bind(settings, APP_NAME, INGRESS), settings)


def app_builder(args: dict):
    """The application for `serve run` / a KubeRay RayService (`import_path: server.cluster.app:app_builder`):
    `args` are `loramux serve` flags without dashes ({"model": ..., "adapter-dir": ..., "replicas": 2});
    Ray and the HTTP proxy's host/port are the platform's (deploy/kuberay-rayservice.yaml)."""
    return build_app(settings_from_args(args))


def settings_from_args(args: dict | None) -> ServerSettings:
    """{"adapter-dir": "/x", "replicas": 2} -> ServerSettings, parsed and checked like the CLI's flags."""
    return ServerSettings.from_args([f"--{k.replace('_', '-')}={v}" for k, v in (args or {}).items()])


def init_ray(settings: ServerSettings, num_cpus: int | None = None) -> None:
    """Join `--ray-address`, or start a local Ray here: loopback only, no dashboard."""
    import ray

    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if settings.ray_address:
        ray.init(address=settings.ray_address, runtime_env=env, log_to_driver=False)
        return
    # A local Ray is one node: its address is the loopback (Ray's own single-machine mode, the default on
    # macOS/Windows), so GCS, raylet, object manager and workers listen on 127.0.0.1, not the LAN address.
    # The env reaches the processes Ray starts; the constant, the module already imported here.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    cpus = num_cpus or max(os.cpu_count() or 1, int(settings.replicas * ENGINE_CPUS))
    ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=env, log_to_driver=False,
             configure_logging=False)


def deploy(settings: ServerSettings, engine_cpus: float = ENGINE_CPUS) -> None:
    """serve.start on --host:--port and serve.run the app; returns once every replica is healthy."""
    from ray import serve

    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings, engine_cpus), name=APP_NAME, route_prefix="/")


def run_cluster(settings: ServerSettings) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RuntimeError("--replicas / --ray-address need Ray Serve: pip install 'loramux[ray]'") from None
    stop = threading.Event()
    init_ray(settings)
    # After ray.init: it installs a crash handler on SIGTERM that would abort the process.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(settings)
        log.info("loramux on Ray Serve: %d engine replica(s) behind http://%s:%d", settings.replicas,
                 settings.host, settings.port)
        stop.wait()
        log.info("stopping: replicas drain for up to %.0fs", settings.drain_timeout_s)
        serve.delete(APP_NAME)
        if not settings.ray_address:
            serve.shutdown()
    finally:
        ray.shutdown()
    return 0
