"""The running gateway, fuzzed with schemathesis against its own OpenAPI document.

A real cluster in one process: the simulator, one worker (Playwright, Postgres, Redis; no warm
pool, one cold start at a time) and the gateway, each on a TCP port. Schemathesis loads
``/openapi.json`` from the gateway and, for every operation the document holds (routes added
later are covered as they appear), sends a bounded number of generated requests, valid and
invalid, with a workspace API key. Every answer must pass its checks: no 5xx, a documented status
code, a documented content type, a body that conforms to the documented schema.

Bounded: a fixed number of examples per operation and generation mode, derandomized (the same
requests on every run), no shrinking, a timeout on every request. A session the fuzzer manages to
create is deleted at once, so at most one browser starts at a time and none stays; one session
showing its QR (one more browser) is there for the reads of a session that exists.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from gateway.app import create_app as create_gateway
from shared.settings import Settings
from shared.store import Store
from tests.conftest import REDIS_URL, AiohttpServer, EventStream, Sim, free_port, worker_settings
from worker.app import create_app as create_worker
from worker.keys import MANAGER

pytestmark = [pytest.mark.chromium, pytest.mark.timeout(300)]

EXAMPLES = {GenerationMode.POSITIVE: 25, GenerationMode.NEGATIVE: 15}
LIVE_EXAMPLES = 15
REQUEST_TIMEOUT_S = 15.0
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]


@dataclass
class Tally:
    """What the fuzzer did and found, per operation and generation mode."""

    examples: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    created: int = 0

    def summary(self) -> str:
        lines = [f"{'operation':<52} {'examples':>8}  statuses"]
        for name in sorted(self.examples):
            codes = ", ".join(f"{code}x{n}" for code, n in sorted(self.statuses.get(name, Counter()).items()))
            lines.append(f"{name:<52} {self.examples[name]:>8}  {codes}")
        total = sum(self.examples.values())
        lines.append(
            f"{len(self.examples)} operation-mode runs, {total} requests, {len(self.failures)} failures, "
            f"{self.created} sessions created (each deleted at once)"
        )
        lines.extend(f"skipped: {s}" for s in self.skipped)
        lines.extend(f"FAILURE: {f}" for f in self.failures)
        return "\n".join(lines)


def fuzz(base_url: str, api_key: str, live_session: str) -> Tally:
    """Every operation of the gateway's document, in both generation modes, then with a NUL in
    each of its string inputs; the reads of one session also on ``live_session``, a session
    showing its QR (runs in a thread: schemathesis and requests block)."""
    document = requests.get(base_url + "/openapi.json", timeout=REQUEST_TIMEOUT_S).json()
    schema = schemathesis.openapi.from_dict(document)
    auth = {"Authorization": f"Bearer {api_key}"}
    tally = Tally()
    http = requests.Session()
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):  # the document itself is broken there
            tally.failures.append(f"invalid operation in the document: {result.err()}")
            continue
        operation = result.ok()
        for mode, examples in EXAMPLES.items():
            name = f"{operation.label} [{mode.value}]"
            _fuzz_operation(operation, mode, examples, name, base_url, auth, http, tally)
        for case in nul_cases(operation, document):
            _call_and_check(operation, case, f"{operation.label} [nul]", base_url, auth, http, tally)
        if _reads_one_session(operation):
            name = f"{operation.label} [live session]"
            _fuzz_operation(
                operation,
                GenerationMode.POSITIVE,
                LIVE_EXAMPLES,
                name,
                base_url,
                auth,
                http,
                tally,
                path_parameters={"session_id": live_session},
            )
    return tally


def _reads_one_session(operation: Any) -> bool:
    """A read of one session that answers at once (not its event stream, which never ends)."""
    responses = operation.definition.raw.get("responses", {})
    streams = any("text/event-stream" in (r.get("content") or {}) for r in responses.values())
    return operation.method.upper() == "GET" and "{session_id}" in operation.path and not streams


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        node: Any = document
        for part in ref[2:].split("/"):
            node = node[part]
        return _resolve(document, node)
    return schema


def nul_cases(operation: Any, document: dict[str, Any]) -> list[Any]:
    """Cases with the NUL character (which Postgres refuses) in one string input each: every
    string query parameter, every string property of the JSON body, and a key and a value of
    every free-form object property. Derived from the document, so new routes are covered too.

    Schemathesis can send NUL but in a bounded run rarely does; these make sure it is tried."""
    raw = operation.definition.raw
    params = [
        _resolve(document, p)
        for p in [*document["paths"][operation.path].get("parameters", []), *raw.get("parameters", [])]
    ]
    path = {p["name"]: "fuzz-nul" for p in params if p.get("in") == "path"}
    cases = []
    for p in params:
        if p.get("in") == "query" and _resolve(document, p.get("schema", {})).get("type") == "string":
            cases.append(operation.Case(path_parameters=path, query={p["name"]: "nul\x00here"}))
    content = raw.get("requestBody", {}).get("content", {}).get("application/json")
    body_schema = _resolve(document, content["schema"]) if content else {}
    for prop, sub in body_schema.get("properties", {}).items():
        kind = str(_resolve(document, sub).get("type"))
        nasty: dict[str, list[Any]] = {
            "string": ["nul\x00here"],
            "object": [{"nul\x00key": 1}, {"k": ["nul\x00value"]}],
            "array": [["nul\x00item"]],
        }
        values = nasty.get(kind, [])
        for value in values:
            body = {prop: value}
            cases.append(operation.Case(path_parameters=path, body=body, media_type="application/json"))
    return cases


def _call_and_check(
    operation: Any,
    case: Any,
    name: str,
    base_url: str,
    auth: dict[str, str],
    http: requests.Session,
    tally: Tally,
) -> None:
    """One request: its answer counted, a created session deleted, the checks run."""
    tally.examples[name] += 1
    try:
        response = case.call(base_url=base_url, session=http, headers=auth, timeout=REQUEST_TIMEOUT_S)
    except requests.RequestException as exc:
        tally.failures.append(f"{name}: no answer ({type(exc).__name__}: {exc}) to {case.as_curl_command()}")
        return
    tally.statuses.setdefault(name, Counter())[response.status_code] += 1
    _delete_if_created(operation, response, base_url, auth, http, tally)
    try:
        case.validate_response(response, checks=CHECKS)
    except (Exception, BaseExceptionGroup) as exc:  # schemathesis groups what it found
        text = str(exc).strip().replace("\n", " | ")[:900]
        tally.failures.append(f"{name}: {response.status_code}: {text}")


def _fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    examples: int,
    name: str,
    base_url: str,
    auth: dict[str, str],
    http: requests.Session,
    tally: Tally,
    path_parameters: dict[str, Any] | None = None,
) -> None:
    try:
        strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)
    except Exception as exc:  # e.g. nothing to make invalid in an operation without parameters
        tally.skipped.append(f"{name}: {type(exc).__name__}: {exc}")
        return

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        _call_and_check(operation, case, name, base_url, auth, http, tally)

    try:
        run()
    except Exception as exc:  # generation itself gave up (unsatisfiable schema for this mode)
        tally.skipped.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")


def _delete_if_created(
    operation: Any, response: Any, base_url: str, auth: dict[str, str], http: requests.Session, tally: Tally
) -> None:
    """A created session is deleted at once: its browser stops, the next create starts afresh."""
    if operation.method.upper() != "POST" or operation.path != "/v1/sessions" or response.status_code != 201:
        return
    tally.created += 1
    sid = response.json()["id"]
    gone = http.delete(f"{base_url}/v1/sessions/{sid}", headers=auth, timeout=REQUEST_TIMEOUT_S)
    if gone.status_code != 204:
        tally.failures.append(f"cleanup: DELETE {sid} answered {gone.status_code}: {gone.text[:300]}")


async def test_the_gateway_fuzzed_against_its_openapi_document_has_no_server_error_or_schema_violation(
    tmp_path: Path,
    sim: Sim,
    aiohttp_server: AiohttpServer,
    pg_pool: asyncpg.Pool,
    pg_dsn: str,
    redis_prefix: str,
) -> None:
    port = free_port()
    worker_app = create_worker(
        worker_settings(
            tmp_path,
            sim,
            pg_dsn,
            redis_prefix,
            worker_port=port,
            launch_budget=1,
            qr_concurrency=1,
            max_active_sessions=2,
        )
    )
    await aiohttp_server(worker_app, port=port)
    store = Store(pg_pool)
    await store.ensure_workspace("ws_fuzz")
    api_key = await store.create_api_key("ws_fuzz")
    gateway_settings = Settings(
        workers=f"127.0.0.1:{port}",
        database_url=pg_dsn,
        redis_url=REDIS_URL,
        redis_prefix=redis_prefix,
        health_interval_s=0.5,
    )
    gateway = await aiohttp_server(create_gateway(gateway_settings))
    base_url = str(gateway.make_url("")).rstrip("/")

    # one session showing its QR, for the reads of a session that exists
    auth = {"Authorization": f"Bearer {api_key}"}
    async with aiohttp.ClientSession(base_url) as http:
        async with http.post("/v1/sessions", json={"label": "fuzz"}, headers=auth) as resp:
            assert resp.status == 201, await resp.text()
            live = (await resp.json())["id"]
        async with http.get(f"/v1/sessions/{live}/events", headers=auth) as resp:
            await EventStream(resp).until("qr")

        started = time.monotonic()
        tally = await asyncio.to_thread(fuzz, base_url, api_key, live)
        elapsed_s = time.monotonic() - started
        async with http.delete(f"/v1/sessions/{live}", headers=auth) as resp:
            assert resp.status == 204, await resp.text()
    print(f"\nschemathesis against {base_url}/openapi.json in {elapsed_s:.1f} s\n" + tally.summary())

    manager = worker_app[MANAGER]
    await manager.settle()
    assert sum(tally.examples.values()) > 0 and tally.examples  # it did fuzz every operation
    assert tally.failures == []
    assert manager.browsers() == []  # every session it created was deleted, its browser closed
