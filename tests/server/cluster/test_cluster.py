"""loramux on Ray Serve, end to end through the ingress's HTTP port: outputs equal the single server's,
adapters uploaded / replaced / deleted through the ingress reach both replicas, and a replica killed
under load comes back with no request left hanging."""
from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.real_server import adapter_files, multipart, wait_until

PROMPTS = [[5, 17, 3, 99], [42, 7], [1, 2, 3, 4, 5, 6, 7, 8], [200, 100, 50]]


def _body(prompt, adapter=None, max_tokens=12, stream=False):
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream,
            **({"adapter": adapter} if adapter else {})}


def _complete(http: httpx.Client, body: dict) -> str:
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _stream(http: httpx.Client, body: dict) -> tuple[str, list[str]]:
    """(text, errors) of an SSE completion stream."""
    text, errors, done = "", [], False
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return "", [f"status {r.status_code}: {r.read()[:200]!r}"]
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    errors.append(str(event["error"]))
                else:
                    text += event["choices"][0]["text"]
    return text, errors + ([] if done else ["no [DONE]"])


def _upload(url: str, name: str, files, replace: bool = False) -> None:
    config, weights, _ = files
    r = httpx.post(f"{url}/v1/adapters", timeout=60, **multipart(name, config, weights, replace=replace))
    assert r.status_code in (200, 201), r.text


def _resident(http: httpx.Client, name: str) -> dict[str, float]:
    """level -> replicas holding `name`, from the ingress's aggregated /metrics."""
    out = {}
    for line in http.get("/metrics").text.splitlines():
        m = re.match(rf'^loramux_adapter_resident\{{adapter="{re.escape(name)}",level="(\w+)"\}} (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _burst(url: str, bodies: list[dict], timeout: float = 60.0) -> list[str]:
    def one(body):
        with httpx.Client(base_url=url, timeout=timeout) as http:
            return _complete(http, body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def test_mixed_adapter_traffic_equals_the_single_server(cluster):
    for url in (cluster.url, cluster.single_url):
        _upload(url, "mix-a", adapter_files(cluster.spec, seed=1))
        _upload(url, "mix-b", adapter_files(cluster.spec, seed=2))
    bodies = [_body(p, a) for p in PROMPTS for a in (None, "mix-a", "mix-b")]
    got = _burst(cluster.url, bodies)
    with cluster.single() as single:
        want = [_complete(single, b) for b in bodies]
    assert got == want
    assert len({(b.get("adapter"), g) for b, g in zip(bodies, got, strict=True)}) > len(PROMPTS)  # adapters matter
    with cluster.http() as http:  # streaming through the ingress: the same text
        text, errors = _stream(http, _body(PROMPTS[0], "mix-b"))
    assert (text, errors) == (want[2], [])


def test_upload_replace_delete_reach_both_replicas(cluster):
    v1, v2 = adapter_files(cluster.spec, seed=11), adapter_files(cluster.spec, seed=12)
    _upload(cluster.url, "shared", v1)
    _upload(cluster.single_url, "shared", v1)
    long = [_body(PROMPTS[i % 4], "shared", max_tokens=48) for i in range(24)]
    with cluster.single() as single:
        want_v1 = [_complete(single, b) for b in long[:4]]
    # A burst larger than one replica takes (2 x batch 4) spills onto the other: both load "shared".
    got = _burst(cluster.url, long)
    assert got == want_v1 * 6
    with cluster.http() as http:
        assert wait_until(lambda: sum(_resident(http, "shared").values()) == 2, timeout=10), _resident(http, "shared")

    # Replace: a new version, a new multiplexed id; every replica serves v2 and drops v1.
    _upload(cluster.url, "shared", v2, replace=True)
    _upload(cluster.single_url, "shared", v2, replace=True)
    with cluster.single() as single:
        want_v2 = [_complete(single, b) for b in long[:4]]
    assert want_v2 != want_v1
    assert _burst(cluster.url, long) == want_v2 * 6
    with cluster.http() as http:
        assert http.get("/v1/adapters/shared").json()["version"] == 2

        # Delete: refused at once at the ingress; unloaded from every replica shortly after.
        assert http.delete("/v1/adapters/shared").status_code in (200, 204)
        r = http.post("/v1/completions", json=_body(PROMPTS[0], "shared"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
        assert wait_until(lambda: _resident(http, "shared") == {}, timeout=10), _resident(http, "shared")
    assert not (cluster.adapter_dir / "shared").exists()


def test_killed_replica_restarts_and_nothing_hangs(cluster):
    import ray

    _upload(cluster.url, "chaos", adapter_files(cluster.spec, seed=21))
    bodies = [_body(PROMPTS[i % 4], "chaos" if i % 2 else None, max_tokens=900) for i in range(12)]

    def one(body):
        with httpx.Client(base_url=cluster.url, timeout=90) as http:
            return _stream(http, body)

    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        futures = [pool.submit(one, b) for b in bodies]
        time.sleep(1.0)  # under way
        [victim] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if "LoramuxEngine" in a["name"]][:1]
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
        t0 = time.monotonic()
        # Sent right after the kill: any that lands on the dead replica has no output yet -> retried.
        late = [pool.submit(_burst, cluster.url, [_body(p, a) for p in PROMPTS for a in (None, "chaos")])]
        results = [f.result(timeout=120) for f in futures]  # none hangs
        late_texts = late[0].result(timeout=120)  # every one succeeds (_complete asserts 200)
    assert time.monotonic() - t0 < 120
    ok = [r for r in results if not r[1]]
    failed = [r for r in results if r[1]]
    print(f"replica killed: {len(ok)} streams finished, {len(failed)} ended with {[e for _, e in failed]}")
    assert ok, results  # the other replica's requests (and retried ones) finished
    for _, errors in failed:  # a stream cut mid-way says so, in an error event
        assert any("replica" in e or "status 5" in e for e in errors), errors
    with cluster.http() as http:
        def two_ready():
            return http.get("/v1/models").json()["data"][0]["loramux"].get("replicas") == 2
        assert wait_until(two_ready, timeout=240, interval=0.5)  # Ray restarts the replica (slow on busy cores)
        after = [_complete(http, _body(p, a)) for p in PROMPTS for a in (None, "chaos")]
    with cluster.single() as single:
        _upload(cluster.single_url, "chaos", adapter_files(cluster.spec, seed=21))
        want = [_complete(single, _body(p, a)) for p in PROMPTS for a in (None, "chaos")]
    assert after == want and late_texts == want
