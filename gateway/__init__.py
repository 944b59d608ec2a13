"""The public gateway (aiohttp): auth, consistent-hash routing onto workers, failover, SSE fan-out.

Arrives with the cluster work (issue 4); until then a worker serves the session API directly.
"""
