"""The public gateway (aiohttp): auth, consistent-hash routing onto workers, failover, SSE relay.

``python -m gateway`` listens on ``WALINK_HOST:WALINK_GATEWAY_PORT`` (8080). Modules:
:mod:`~gateway.app` (resources, lifecycle), :mod:`~gateway.auth` (API keys → workspace),
:mod:`~gateway.membership` (configured workers + Redis heartbeats), :mod:`~gateway.breaker`
(per-worker circuit breaker), :mod:`~gateway.health` (health checks, cluster view),
:mod:`~gateway.ring` (uhashring + bounded-load placement), :mod:`~gateway.routing` (which
workers, in which order), :mod:`~gateway.proxy` (attempts and safe retries), :mod:`~gateway.sse`
(event streams that survive a worker), :mod:`~gateway.api` (the public routes),
:mod:`~gateway.pages` (health, metrics, docs, dashboard), :mod:`~gateway.openapi`.
"""
