"""The engine as a Ray Serve application: replicas past one machine (`maskfill-engine cluster`).

Two deployments in one Serve application (app.py):
- `FimIngress` (ingress.py, HTTP in front.py) speaks the HTTP FIM API of
  engine/serve/http_api.py (same body, answer, Bearer token, /health, /metrics) and hands each
  request to an engine replica through a Serve handle; a request whose replica dies is sent once
  more, to another replica.
- `FimEngine` (replica.py) holds the model(s): the shared engine's scheduler around
  engine.engine.Engine, one per checkpoint (Serve model multiplexing).
Requests reach engine replicas through `SessionAffinityRouter` (router.py, decisions in
affinity.py): an editing session sticks to the replica holding its context K/V unless that
replica is over a load bound. The direct topology (direct.py) drops the ingress hop for the
lowest latency, at the costs listed there. cli.py is `maskfill-engine cluster`, bench.py
`make bench-cluster`. Nothing here imports Ray unless it is used (the `cluster` extra); the
engine itself never imports Ray.
"""
