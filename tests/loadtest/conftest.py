"""Fixtures for the load-test tests: a stub server with known delays, started per test."""
from __future__ import annotations

import pytest

from tests.loadtest.stub_server import StubServer


@pytest.fixture
def stub():
    server = StubServer(ttft_s=0.0, itl_s=0.001).start()
    yield server
    server.stop()


@pytest.fixture
def make_stub():
    started = []

    def make(**kwargs) -> StubServer:
        started.append(StubServer(**kwargs).start())
        return started[-1]

    yield make
    for server in started:
        server.stop()
