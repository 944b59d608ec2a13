"""Session event streams through the gateway: relayed as they come, resumed when a worker goes.

Frames are written to the client as soon as they are complete (in practice every chunk: a worker
writes one frame per write), and each write is flushed. The gateway remembers the ``id:`` of the
last frame it relayed; when the upstream stream ends or breaks while the client is still there
(the worker stopped, crashed, or handed the session over) it opens the stream again on the
session's current owner, or the next worker on the ring, with ``Last-Event-ID`` — the client
sees one unbroken stream. A resumed stream that is refused (e.g. 404 after a delete) ends it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator, Mapping

import aiohttp
from aiohttp import web

from gateway.proxy import WORKER_HEADER, Answer, Call, Proxy, to_response
from gateway.routing import Plan
from shared import metrics
from shared.errors import QuotaStreams, StreamsFull, WalinkError

log = logging.getLogger("walink.gateway.sse")

MAX_PENDING_BYTES = 1 << 20
RESUME_WINDOW_S = 60.0
MAX_RESUMES_IN_WINDOW = 5
STARTED_AT = web.RequestKey("sse_started_at", float)
# the Retry-After of a refused stream: a place frees when another stream ends
STREAM_RETRY_S = 5.0
UNLIMITED = 1 << 30


class Frames:
    """Cuts a byte stream at frame boundaries and remembers the last event id."""

    def __init__(self, last_id: str | None = None) -> None:
        self.last_id = last_id
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        self._pending += chunk
        cut = self._pending.rfind(b"\n\n")
        if cut < 0:
            if len(self._pending) <= MAX_PENDING_BYTES:
                return b""
            cut = len(self._pending) - 2  # not SSE framing: pass it on regardless
        out, self._pending = self._pending[: cut + 2], self._pending[cut + 2 :]
        for line in out.split(b"\n"):
            if line.startswith(b"id:"):
                self.last_id = line[3:].strip().decode(errors="replace") or None
        return out


class Streams:
    """The open upstream streams, so that shutdown can end them all at once; and the client
    streams' places: at most ``max_total`` on this gateway, ``max_per_workspace`` of one workspace
    (an admin's streams across workspaces count in the total only)."""

    def __init__(self, *, max_total: int = UNLIMITED, max_per_workspace: int = UNLIMITED) -> None:
        self.closing = False
        self._open: set[aiohttp.ClientResponse] = set()
        self.max_total = max_total
        self.max_per_workspace = max_per_workspace
        self.clients = 0
        self._per_workspace: dict[str, int] = {}

    def open_of(self, workspace_id: str) -> int:
        """The client streams of ``workspace_id`` open on this gateway now."""
        return self._per_workspace.get(workspace_id, 0)

    @contextlib.contextmanager
    def slot(self, workspace_id: str | None) -> Iterator[None]:
        """A place for one client stream while it is open, or the 429 that says there is none."""
        if self.clients >= self.max_total:
            metrics.QUOTA_REFUSALS.labels("streams_gateway").inc()
            raise StreamsFull(
                f"this gateway has {self.clients} event streams open, its limit is {self.max_total}; "
                "retry later (or through another gateway)",
                limit=self.max_total,
                used=self.clients,
                retry_after_s=STREAM_RETRY_S,
            )
        used = self.open_of(workspace_id) if workspace_id is not None else 0
        if workspace_id is not None and used >= self.max_per_workspace:
            metrics.QUOTA_REFUSALS.labels("streams_workspace").inc()
            raise QuotaStreams(
                f"the workspace has {used} event streams open on this gateway, its limit is "
                f"{self.max_per_workspace}; close one first",
                limit=self.max_per_workspace,
                used=used,
                retry_after_s=STREAM_RETRY_S,
            )
        self.clients += 1
        if workspace_id is not None:
            self._per_workspace[workspace_id] = used + 1
        metrics.GATEWAY_SSE_STREAMS.set(self.clients)
        try:
            yield
        finally:
            self.clients -= 1
            if workspace_id is not None:
                left = self._per_workspace.pop(workspace_id, 1) - 1
                if left > 0:
                    self._per_workspace[workspace_id] = left
            metrics.GATEWAY_SSE_STREAMS.set(self.clients)

    def __len__(self) -> int:
        return len(self._open)

    def add(self, upstream: aiohttp.ClientResponse) -> None:
        self._open.add(upstream)

    def discard(self, upstream: aiohttp.ClientResponse) -> None:
        self._open.discard(upstream)

    def close_all(self) -> None:
        self.closing = True
        for upstream in list(self._open):
            upstream.close()


async def _open_client_stream(request: web.Request, answer: Answer) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",
            WORKER_HEADER: answer.worker.name,
        }
    )
    await response.prepare(request)
    request[STARTED_AT] = time.monotonic()
    return response


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _pump(upstream: aiohttp.ClientResponse, response: web.StreamResponse, frames: Frames) -> None:
    """Relay until the upstream ends or breaks (a broken client raises ConnectionResetError)."""
    try:
        async for chunk in upstream.content.iter_any():
            out = frames.feed(chunk)
            if out:
                await response.write(out)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.info("event stream from upstream broke: %s", type(exc).__name__)


async def relay(
    request: web.Request,
    proxy: Proxy,
    plan: Plan,
    path: str,
    headers: Mapping[str, str],
    streams: Streams,
) -> web.StreamResponse:
    frames = Frames(headers.get("Last-Event-ID"))
    response: web.StreamResponse | None = None
    resumes: deque[float] = deque()
    avoid: set[str] = set()
    try:
        while True:
            call_headers = dict(headers)
            if frames.last_id is not None:
                call_headers["Last-Event-ID"] = frames.last_id
            try:
                answer = await proxy.forward(
                    Call("GET", path, call_headers, idempotent=True, stream=True), plan, avoid=avoid
                )
            except WalinkError:
                if response is None:
                    raise
                break
            upstream = answer.stream
            if upstream is None:  # refused: an error the client should see, or the end
                if response is None:
                    return to_response(answer)
                break
            streams.add(upstream)
            try:
                if response is None:
                    response = await _open_client_stream(request, answer)
                await _pump(upstream, response, frames)
            finally:
                streams.discard(upstream)
                upstream.close()
            now = time.monotonic()
            while resumes and resumes[0] < now - RESUME_WINDOW_S:
                resumes.popleft()
            if streams.closing or _client_gone(request) or len(resumes) >= MAX_RESUMES_IN_WINDOW:
                break
            resumes.append(now)
            metrics.GATEWAY_SSE_RESUMES.inc()
            log.info("%s: upstream stream ended; resuming after event %s", path, frames.last_id)
            await plan.redirect()
            # the worker that ended the stream is usually stopping: another one first, if any
            ended_by = answer.worker.name
            avoid = {ended_by} if any(w.name != ended_by for w in plan.candidates(set())) else set()
    except ConnectionResetError:
        pass  # the client went away
    if response is None:  # the client left before the stream opened
        return web.Response(status=204)
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await response.write_eof()
    return response
