"""loramux on Ray Serve (`loramux serve --replicas N`, docs/ray.md): optional, needs `loramux[ray]`.

Nothing outside this package imports Ray; `server/cli.py` imports `server.cluster.app` only when
asked for replicas or a Ray address. Modules: `app` (start Ray, deploy, wait), `ingress` (the HTTP
deployment: `server/api` unchanged over a `ClusterClient`), `client` (that EngineClient: requests to
engine replicas through a DeploymentHandle with model multiplexing, retries, aggregated stats),
`engine_replica` (one loramux engine per replica), `replica_adapters` (the adapters a replica
holds, by name and version, read from the shared store), `stats` (summing replica stats), `bench`.
"""
