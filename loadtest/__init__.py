"""loramux load test: an external HTTP client measuring throughput and latency of a running server.

It drives POST /v1/completions with Punica-style adapter mixes (distinct / uniform / skewed /
identical / base) over a concurrency sweep or open-loop rates, reads the server's batch size from
/metrics, and writes results.json, results.csv and PNG plots. Modules: workload (what to send),
client (one timed request), runner (the sweep), stats, metrics, admin + synthetic + churn
(adapters), report + plots (output), cli. It imports nothing else of loramux.
"""
