"""--replicas / --ray-address: parsed and validated like every serve flag; 1 replica = the single server."""
from __future__ import annotations

import pytest

from server.settings import ServerSettings


def test_replicas_and_ray_address_flags_and_env():
    s = ServerSettings.from_args(["--replicas", "3", "--ray-address", "ray://head:10001"])
    assert (s.replicas, s.ray_address) == (3, "ray://head:10001")
    assert ServerSettings.from_args([], env={"LORAMUX_REPLICAS": "2"}).replicas == 2
    default = ServerSettings.from_args([])
    assert (default.replicas, default.ray_address) == (1, None)  # the single-process server
    with pytest.raises(ValueError, match="--replicas"):
        ServerSettings.from_args(["--replicas", "0"])


def test_app_builder_takes_serve_flags():
    """KubeRay's serveConfigV2 args are serve flags (dashes or underscores), checked like the CLI's."""
    pytest.importorskip("ray")
    from ray import serve

    from server.cluster.app import app_builder, settings_from_args

    s = settings_from_args({"model": "default", "adapter-dir": "/mnt/adapters", "max_cpu_adapters": 16,
                            "replicas": 3})
    assert (s.adapter_dir, s.max_cpu_adapters, s.replicas) == ("/mnt/adapters", 16, 3)
    with pytest.raises(ValueError, match="--replicas"):
        settings_from_args({"replicas": 0})
    assert isinstance(app_builder({"replicas": 2}), serve.Application)
