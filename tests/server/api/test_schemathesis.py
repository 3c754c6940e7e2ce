"""A bounded schemathesis pass over the OpenAPI schema (issue #16): every operation of the app (fake
engine, no keys) gets a few generated requests, valid and not; none may answer a 5xx other than a 503
with Retry-After. Bounded: few examples per operation, no deadline, no shrinking to a minimal case."""
from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, Phase, settings

from server.api.app import create_app
from server.settings import ServerSettings
from tests.server.api.fake_engine import FakeEngine

# The lifecycle is ours: schemathesis' ASGI transport would run the lifespan around every call
# (and its shutdown leaves the app draining).
APP = create_app(FakeEngine(token_delay_s=0.0), ServerSettings(max_waiting=4), manage_lifecycle=False)
APP.state.loramux.started = True
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=8, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_5xx_except_503_with_retry_after(case):
    response = case.call(timeout=10)
    status = response.status_code
    if status >= 500:
        assert status == 503 and response.headers.get("retry-after"), (status, response.text[:300])
