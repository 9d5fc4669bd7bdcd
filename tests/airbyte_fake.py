"""A local fake of Airbyte's public API v1, for tests: the Airbyte platform cannot run here.

It serves the endpoints the platform calls (OAuth token, list/create/patch sources, destinations and
connections, create/get/cancel jobs) on 127.0.0.1 from a thread, keeps its state in memory, and is
strict where a lenient fake would hide bugs: every request body is deserialised into the SDK's own
request model (422 when that fails), secrets come back masked as Airbyte masks them, and a few of
the real server's rules are enforced (no cursor on a CDC stream, no dedup into S3, Quartz cron at
most hourly, one running sync per connection). Jobs go pending -> running -> ``job_outcome``, one
step per ``GET /jobs/{id}``.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import pytest
from airbyte_api import models
from pydantic import BaseModel, ValidationError

BASE_PATH = "/api/public/v1"
MASK = "**********"
SECRET_KEYS = frozenset(
    {
        "password",
        "private_key",
        "private_key_password",
        "access_key_id",
        "secret_access_key",
        "ca_certificate",
        "client_key",
        "client_key_password",
        "tunnel_user_password",
        "ssh_key",
    }
)
CDC_CURSOR = {"postgres": ["_ab_cdc_lsn"], "mongodb-v2": ["_ab_cdc_cursor"]}
DEDUP_MODES = {"incremental_deduped_history", "full_refresh_overwrite_deduped"}
TERMINAL = {"succeeded", "failed", "cancelled"}

Outcome = Literal["succeeded", "failed", "cancelled", "hang"]


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.body = status, {"status": status, "message": message, **extra}


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: MASK if k in SECRET_KEYS else _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def _unmasked(new: Any, old: Any) -> Any:
    """A PATCH may send back the mask: Airbyte then keeps the stored secret."""
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _unmasked(v, old.get(k)) for k, v in new.items()}
    return old if new == MASK else new


def _parse(model: type[BaseModel], body: Any) -> BaseModel:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = [
            {"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors(include_url=False)[:20]
        ]
        raise ApiError(422, f"invalid {model.__name__}", errors=errors) from None


def _check_connector_type(body: dict[str, Any], key: str, parsed: BaseModel | None) -> None:
    """The configuration must name its connector, and parse as that connector's model."""
    declared = body.get(key)
    if declared is None:
        raise ApiError(422, f"configuration.{key} is required")
    actual = parsed.model_dump(by_alias=True).get(key) if parsed is not None else None
    if actual != declared:
        raise ApiError(422, f"configuration does not validate as a {declared!r} connector")


def _check_cron(schedule: dict[str, Any] | None) -> None:
    # Airbyte's AirbyteCatalogHelper.validateCronConfiguration, in short.
    if not schedule or schedule.get("scheduleType") != "cron":
        return
    cron = (schedule.get("cronExpression") or "").removesuffix("UTC").split()
    if (
        len(cron) not in (6, 7)
        or not cron[0].isdigit()
        or (len(cron) == 7 and not cron[1].isdigit())
    ):
        raise ApiError(400, f"The cron expression {schedule.get('cronExpression')} is not valid")


class FakeAirbyte:
    """The fake server and its state. Use as a context manager or through the ``airbyte`` fixture."""

    def __init__(self) -> None:
        self.workspace_id = str(uuid.uuid4())
        # Unique per instance: the SDK caches tokens per client id/secret across clients.
        self.client_id = f"client-{uuid.uuid4().hex[:8]}"
        self.client_secret = uuid.uuid4().hex
        self.sources: dict[str, dict[str, Any]] = {}
        self.destinations: dict[str, dict[str, Any]] = {}
        self.connections: dict[str, dict[str, Any]] = {}
        self.jobs: dict[int, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every call, for assertions
        self.job_outcome: Outcome = "succeeded"  # how the next jobs end
        self._tokens: set[str] = set()
        self._job_ids = itertools.count(1001)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{BASE_PATH}"

    def __enter__(self) -> FakeAirbyte:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def add_connection(self, name: str) -> str:
        """A ready connection, put straight into the state: for tests about jobs, not configuration."""
        now = int(dt.datetime.now(dt.UTC).timestamp())
        ids = {kind: str(uuid.uuid4()) for kind in ("source", "destination", "connection")}
        common = {"name": name, "workspaceId": self.workspace_id, "createdAt": now}
        self.sources[ids["source"]] = {
            **common,
            "sourceId": ids["source"],
            "sourceType": "postgres",
            "definitionId": str(uuid.uuid4()),
            "configuration": {
                "sourceType": "postgres",
                "host": "h",
                "database": "d",
                "username": "u",
            },
        }
        self.destinations[ids["destination"]] = {
            **common,
            "destinationId": ids["destination"],
            "destinationType": "dev-null",
            "definitionId": str(uuid.uuid4()),
            "configuration": {"destinationType": "dev-null", "test_destination": {}},
        }
        self.connections[ids["connection"]] = {
            **common,
            "connectionId": ids["connection"],
            "sourceId": ids["source"],
            "destinationId": ids["destination"],
            "status": "active",
            "schedule": {"scheduleType": "manual"},
        }
        return ids["connection"]

    # --- dispatch ---------------------------------------------------------------------------

    def handle(
        self, method: str, target: str, headers: Any, raw: bytes
    ) -> tuple[int, dict[str, Any] | None]:
        url = urlsplit(target)
        if not url.path.startswith(BASE_PATH):
            return 404, {"message": f"no route {url.path}"}
        parts = url.path[len(BASE_PATH) :].strip("/").split("/")
        query = parse_qs(url.query)
        with self._lock:
            self.requests.append((method, "/" + "/".join(parts)))
            try:
                if parts == ["applications", "token"] and method == "POST":
                    return 200, self._token(headers, raw)
                token = headers.get("Authorization", "").removeprefix("Bearer ")
                if token not in self._tokens:
                    raise ApiError(401, "missing or invalid bearer token")
                body = json.loads(raw) if raw else None
                return 200, self._route(method, parts, query, body)
            except ApiError as exc:
                return exc.status, exc.body

    def _route(
        self, method: str, parts: list[str], query: dict[str, list[str]], body: Any
    ) -> dict[str, Any]:
        match method, parts:
            case "GET", [("sources" | "destinations" | "connections") as kind]:
                return self._list(kind, query)
            case "POST", ["sources"]:
                return self._create_actor("source", body)
            case "POST", ["destinations"]:
                return self._create_actor("destination", body)
            case "PATCH", ["sources", actor_id]:
                return self._patch_actor("source", actor_id, body)
            case "PATCH", ["destinations", actor_id]:
                return self._patch_actor("destination", actor_id, body)
            case "GET", ["sources" | "destinations" | "connections" as kind, item_id]:
                return self._view(kind, self._get(kind, item_id))
            case "POST", ["connections"]:
                return self._create_connection(body)
            case "PATCH", ["connections", connection_id]:
                return self._patch_connection(connection_id, body)
            case "POST", ["jobs"]:
                return self._create_job(body)
            case "GET", ["jobs", job_id]:
                return self._advance(self._job(job_id))
            case "DELETE", ["jobs", job_id]:
                job = self._job(job_id)
                if job["status"] not in TERMINAL:
                    job["status"] = "cancelled"
                return dict(job)
        raise ApiError(404, f"no route {method} /{'/'.join(parts)}")

    # --- auth -------------------------------------------------------------------------------

    def _token(self, headers: Any, raw: bytes) -> dict[str, Any]:
        if headers.get("Content-Type", "").startswith("application/json"):
            form = json.loads(raw)
        else:
            form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
        if (form.get("grant_type"), form.get("client_id"), form.get("client_secret")) != (
            "client_credentials",
            self.client_id,
            self.client_secret,
        ):
            raise ApiError(401, "invalid client credentials")
        token = uuid.uuid4().hex
        self._tokens.add(token)
        return {"access_token": token, "token_type": "Bearer", "expires_in": 180}

    # --- sources and destinations -----------------------------------------------------------

    def _store(self, kind: str) -> dict[str, dict[str, Any]]:
        """The items of a kind, named singular ("source") or as in the URL ("sources")."""
        stores = {"source": self.sources, "destination": self.destinations}
        stores |= {"connection": self.connections}
        return stores[kind.removesuffix("s")]

    def _get(self, kind: str, item_id: str) -> dict[str, Any]:
        item = self._store(kind).get(item_id)
        if item is None:
            raise ApiError(404, f"{kind} {item_id} not found")
        return item

    def _list(self, kind: str, query: dict[str, list[str]]) -> dict[str, Any]:
        workspaces = set(query.get("workspaceIds", []))
        limit, offset = int(query.get("limit", ["20"])[0]), int(query.get("offset", ["0"])[0])
        if not 1 <= limit <= 100:
            raise ApiError(400, "limit must be between 1 and 100")
        items = [
            i
            for i in self._store(kind).values()
            if not workspaces or i["workspaceId"] in workspaces
        ]
        page = items[offset : offset + limit]
        more = offset + limit < len(items)
        return {
            "data": [self._view(kind, i) for i in page],
            "next": f"{self.url}/{kind}?limit={limit}&offset={offset + limit}" if more else None,
        }

    def _view(self, kind: str, item: dict[str, Any]) -> dict[str, Any]:
        if kind.startswith("connection"):
            return self._connection_view(item)
        return {**item, "configuration": _masked(item["configuration"])}

    def _create_actor(self, kind: str, body: Any) -> dict[str, Any]:
        model = models.SourceCreateRequest if kind == "source" else models.DestinationCreateRequest
        parsed: Any = _parse(model, body)
        type_key = "sourceType" if kind == "source" else "destinationType"
        _check_connector_type(body["configuration"], type_key, parsed.configuration)
        if parsed.workspace_id != self.workspace_id:
            raise ApiError(404, f"workspace {parsed.workspace_id} not found")
        actor_id = str(uuid.uuid4())
        self._store(kind)[actor_id] = {
            f"{kind}Id": actor_id,
            "name": parsed.name,
            type_key: body["configuration"][type_key],
            "definitionId": str(uuid.uuid5(uuid.NAMESPACE_URL, body["configuration"][type_key])),
            "workspaceId": parsed.workspace_id,
            "createdAt": int(dt.datetime.now(dt.UTC).timestamp()),
            "configuration": body["configuration"],  # stored as sent, like the real server
        }
        return self._view(kind, self._store(kind)[actor_id])

    def _patch_actor(self, kind: str, actor_id: str, body: Any) -> dict[str, Any]:
        model = models.SourcePatchRequest if kind == "source" else models.DestinationPatchRequest
        parsed: Any = _parse(model, body)
        item = self._get(kind, actor_id)
        if "configuration" in body:
            type_key = "sourceType" if kind == "source" else "destinationType"
            _check_connector_type(body["configuration"], type_key, parsed.configuration)
            if body["configuration"][type_key] != item[type_key]:
                raise ApiError(400, f"cannot change a {kind}'s connector type")
            item["configuration"] = _unmasked(body["configuration"], item["configuration"])
        if parsed.name is not None:
            item["name"] = parsed.name
        return self._view(kind, item)

    # --- connections ------------------------------------------------------------------------

    def _check_streams(self, connection: dict[str, Any]) -> None:
        # A few of AirbyteCatalogHelper's rules, the ones this platform could break.
        source = self._get("source", connection["sourceId"])
        destination = self._get("destination", connection["destinationId"])
        config = source["configuration"]
        cdc = source["sourceType"] == "mongodb-v2" or (
            (config.get("replication_method") or {}).get("method") == "CDC"
        )
        names = set()
        for stream in (connection.get("configurations") or {}).get("streams") or []:
            name = stream["name"]
            if name in names:
                raise ApiError(400, f"Duplicate stream found in configuration for: {name}.")
            names.add(name)
            if cdc and stream.get("cursorField"):
                raise ApiError(
                    400,
                    f"Cursor Field {stream['cursorField']} is already defined by source for stream: "
                    f"{name}. Do not include a cursor field configuration for this stream.",
                )
            if destination["destinationType"] == "s3" and stream.get("syncMode") in DEDUP_MODES:
                raise ApiError(
                    400, f"Cannot set sync mode to {stream['syncMode']} for stream {name}."
                )
        _check_cron(connection.get("schedule"))

    def _create_connection(self, body: Any) -> dict[str, Any]:
        parsed: Any = _parse(models.ConnectionCreateRequest, body)
        for kind, item_id in (("source", parsed.source_id), ("destination", parsed.destination_id)):
            if self._get(kind, item_id)["workspaceId"] != self.workspace_id:
                raise ApiError(404, f"{kind} {item_id} not found")
        connection = {
            "status": "active",
            "namespaceDefinition": "destination",
            "nonBreakingSchemaUpdatesBehavior": "ignore",
            "schedule": {"scheduleType": "manual"},
            **body,
        }
        self._check_streams(connection)
        connection_id = str(uuid.uuid4())
        connection.update(
            connectionId=connection_id,
            workspaceId=self.workspace_id,
            createdAt=int(dt.datetime.now(dt.UTC).timestamp()),
        )
        self.connections[connection_id] = connection
        return self._connection_view(connection)

    def _patch_connection(self, connection_id: str, body: Any) -> dict[str, Any]:
        _parse(models.ConnectionPatchRequest, body)
        connection = self._get("connections", connection_id)
        updated = {**connection, **body}
        self._check_streams(updated)
        connection.update(body)
        return self._connection_view(connection)

    def _connection_view(self, connection: dict[str, Any]) -> dict[str, Any]:
        """What Airbyte's ConnectionReadMapper returns: cron with its zone, CDC cursors filled in."""
        source_type = self.sources[connection["sourceId"]]["sourceType"]
        streams = []
        for stream in (connection.get("configurations") or {}).get("streams") or []:
            stream = {k: v for k, v in stream.items() if k != "namespace"}
            if stream.get("syncMode", "").startswith("incremental") and source_type in CDC_CURSOR:
                stream["cursorField"] = CDC_CURSOR[source_type]
            streams.append(stream)
        schedule = dict(connection["schedule"])
        if schedule.get("cronExpression"):
            schedule["cronExpression"] = f"{schedule['cronExpression']} UTC"
        view = {k: v for k, v in connection.items() if k not in ("configurations", "schedule")}
        return {
            **view,
            "name": connection.get("name") or "unnamed",
            "configurations": {"streams": streams},
            "schedule": schedule,
            "tags": [],
        }

    # --- jobs -------------------------------------------------------------------------------

    def _create_job(self, body: Any) -> dict[str, Any]:
        parsed: Any = _parse(models.JobCreateRequest, body)
        connection = self._get("connections", parsed.connection_id)
        if any(
            j["connectionId"] == parsed.connection_id and j["status"] not in TERMINAL
            for j in self.jobs.values()
        ):
            raise ApiError(409, f"A sync is already running for: {parsed.connection_id}")
        job_id = next(self._job_ids)
        self.jobs[job_id] = {
            "jobId": job_id,
            "status": "pending",
            "jobType": parsed.job_type.value,
            "connectionId": connection["connectionId"],
            "startTime": dt.datetime.now(dt.UTC).isoformat(),
            "outcome": self.job_outcome,
        }
        return self._job_view(self.jobs[job_id])

    def _job(self, job_id: str) -> dict[str, Any]:
        job = self.jobs.get(int(job_id)) if job_id.isdigit() else None
        if job is None:
            raise ApiError(404, f"job {job_id} not found")
        return job

    def _advance(self, job: dict[str, Any]) -> dict[str, Any]:
        if job["status"] == "pending":
            job["status"] = "running"
        elif job["status"] == "running" and job["outcome"] != "hang":
            job["status"] = job["outcome"]
            job["rowsSynced"] = 1234 if job["outcome"] == "succeeded" else 0
        return self._job_view(job)

    @staticmethod
    def _job_view(job: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in job.items() if k != "outcome"}


def _handler(fake: FakeAirbyte) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            status, body = fake.handle(
                self.command, self.path, self.headers, self.rfile.read(length)
            )
            payload = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

    return Handler


@pytest.fixture
def airbyte() -> Iterator[FakeAirbyte]:
    """A running fake, fresh for each test."""
    with FakeAirbyte() as fake:
        yield fake
