"""One local Ray for the module (2 engine replicas, half a CPU each, every port on 127.0.0.1), the
loramux Serve app on it, and a single server on the same tiny model to compare with."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import httpx
import pytest

from tests.real_server import save_tiny_model, tiny_server
from tests.server.api.live import free_port

ray = pytest.importorskip("ray")  # `make test` installs the ray extra: these tests run there

# Small batches so that a burst saturates one replica and spills over to the other.
OVERRIDES = dict(max_batch_size=4, max_num_batched_tokens=256, max_cpu_adapters=8, unload_timeout_s=5.0)


@dataclasses.dataclass
class Cluster:
    url: str
    single_url: str
    model_dir: Path
    adapter_dir: Path
    single_adapter_dir: Path
    spec: object

    def http(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def single(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.single_url, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from ray import serve

    from server.cluster.app import deploy, init_ray
    from tests.real_server import real_settings

    root = tmp_path_factory.mktemp("cluster")
    model_dir = save_tiny_model(root / "model")
    settings = real_settings(model_dir, root / "adapters", replicas=2, port=free_port(), **OVERRIDES)
    with tiny_server(model_dir, root / "single-adapters", **OVERRIDES) as single:
        init_ray(settings, num_cpus=2)
        try:
            deploy(settings, engine_cpus=0.5)
            yield Cluster(f"http://127.0.0.1:{settings.port}", single.url, model_dir, root / "adapters",
                          root / "single-adapters", single.engine.adapters.spec)
        finally:
            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
