"""Apply the airbyte/ catalog to an Airbyte workspace through the public API v1.

:func:`plan` compares the catalog with what the workspace holds, matching by name, and says what
would change before anything does; :func:`apply` makes only those changes, so applying twice is a
no-op. Airbyte masks secrets in what it returns, so they cannot be compared: a rotated password
is pushed with ``plan(..., refresh_secrets=True)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from airbyte_api import AirbyteAPI, api, models
from pydantic import BaseModel

from stripe_platform.errors import PlatformError
from stripe_platform.ingestion.airbyte.client import PAGE, list_all
from stripe_platform.ingestion.catalog import (
    LAKE_FILE_NAME_PATTERN,
    LAKE_PATH_FORMAT,
    LAKE_PREFIX,
    Catalog,
    Connection,
    MongoSource,
    PostgresSource,
    ResolvedConnection,
    S3Destination,
    SnowflakeDestination,
    Stream,
    SyncMode,
    require_env,
)

__all__ = ["Change", "FieldDiff", "Plan", "PlanError", "apply", "plan"]

log = logging.getLogger(__name__)

SECRET_MASK = "**********"  # noqa: S105 - what Airbyte returns in place of a secret
_SECRET_KEYS = frozenset(
    {
        "password",
        "private_key",
        "private_key_password",
        "access_key_id",
        "secret_access_key",
        "ca_certificate",
    }
)
_PENDING = "(created by this plan)"

Kind = Literal["source", "destination", "connection"]
Action = Literal["create", "update", "unchanged"]


class PlanError(PlatformError, RuntimeError):
    """The workspace is in a state the plan cannot resolve by itself."""


# --- desired state: the catalog as SDK requests -----------------------------------------------

_API_SYNC_MODE = {
    SyncMode.INCREMENTAL_APPEND_DEDUPED: models.ConnectionSyncModeEnum.INCREMENTAL_DEDUPED_HISTORY,
    SyncMode.INCREMENTAL_APPEND: models.ConnectionSyncModeEnum.INCREMENTAL_APPEND,
    SyncMode.FULL_REFRESH_OVERWRITE: models.ConnectionSyncModeEnum.FULL_REFRESH_OVERWRITE,
    SyncMode.FULL_REFRESH_APPEND: models.ConnectionSyncModeEnum.FULL_REFRESH_APPEND,
}
# Both sources run CDC, whose cursor is the log position the source defines (_ab_cdc_lsn,
# _ab_cdc_cursor); Airbyte rejects a connection that names another one.
_SOURCE_DEFINED_CURSOR = frozenset({"postgres", "mongodb"})
_CDC_DELETION_MODE = {
    "hard_delete": models.DestinationSnowflakeCDCDeletionMode.HARD_DELETE,
    "soft_delete": models.DestinationSnowflakeCDCDeletionMode.SOFT_DELETE,
}
# The S3 destination cannot dedupe: the lake keeps every version and readers dedupe downstream.
_DEDUPING_DESTINATIONS = frozenset({"snowflake"})


def _source_request(
    catalog: Catalog,
    source: PostgresSource | MongoSource,
    env: Mapping[str, str],
    workspace_id: str,
) -> models.SourceCreateRequest:
    def secret(variable: str, attribute: str) -> str:
        return require_env(env, variable, f"airbyte/sources.yaml {source.name}.{attribute}")

    namespace = catalog.streams[source.name].namespace
    configuration: models.SourcePostgres | models.SourceMongodbV2
    if isinstance(source, PostgresSource):
        ssl_mode: Any = models.SourcePostgresRequire()
        if source.ssl_mode != "require":
            assert source.ca_certificate_env  # checked when the catalog loaded
            ssl_class = (
                models.SourcePostgresVerifyCa
                if source.ssl_mode == "verify-ca"
                else models.SourcePostgresVerifyFull
            )
            ssl_mode = ssl_class(
                ca_certificate=secret(source.ca_certificate_env, "ca_certificate_env")
            )
        configuration = models.SourcePostgres(
            host=source.host,
            port=source.port,
            database=source.database,
            username=source.username,
            password=secret(source.password_env, "password_env"),
            schemas=[namespace],
            ssl_mode=ssl_mode,
            tunnel_method=models.SourcePostgresNoTunnel(),
            replication_method=models.ReadChangesUsingWriteAheadLogCDC(
                plugin=models.Plugin(source.cdc.plugin),
                replication_slot=source.cdc.replication_slot,
                publication=source.cdc.publication,
                # The platform's contract: state moves on only once the data is durable.
                lsn_commit_behaviour=models.LSNCommitBehaviour.AFTER_LOADING_DATA_IN_THE_DESTINATION,
                invalid_cdc_cursor_position_behavior=models.SourcePostgresInvalidCDCPositionBehaviorAdvanced.FAIL_SYNC,
            ),
        )
    else:
        cluster_class = (
            models.MongoDBAtlasReplicaSet
            if source.cluster == "atlas"
            else models.SelfManagedReplicaSet
        )
        configuration = models.SourceMongodbV2(
            database_config=cluster_class(
                connection_string=source.connection_string,
                databases=[namespace],
                username=source.username,
                password=secret(source.password_env, "password_env"),
                auth_source=source.auth_source,
            ),
            update_capture_mode=models.CaptureModeAdvanced.LOOKUP,
            invalid_cdc_cursor_position_behavior=models.SourceMongodbV2InvalidCDCPositionBehaviorAdvanced.FAIL_SYNC,
        )
    return models.SourceCreateRequest(
        name=source.name, workspace_id=workspace_id, configuration=configuration
    )


def _destination_request(
    destination: SnowflakeDestination | S3Destination, env: Mapping[str, str], workspace_id: str
) -> models.DestinationCreateRequest:
    def secret(variable: str, attribute: str) -> str:
        return require_env(
            env, variable, f"airbyte/destinations.yaml {destination.name}.{attribute}"
        )

    def optional_secret(variable: str | None, attribute: str) -> str | None:
        return None if variable is None else secret(variable, attribute)

    configuration: models.DestinationSnowflake | models.DestinationS3
    if isinstance(destination, SnowflakeDestination):
        credentials: Any
        if destination.private_key_env:
            credentials = models.DestinationSnowflakeKeyPairAuthentication(
                private_key=secret(destination.private_key_env, "private_key_env"),
                private_key_password=optional_secret(
                    destination.private_key_password_env, "private_key_password_env"
                ),
            )
        else:
            assert destination.password_env  # one of the two, checked when the catalog loaded
            credentials = models.DestinationSnowflakeUsernameAndPassword(
                password=secret(destination.password_env, "password_env")
            )
        configuration = models.DestinationSnowflake(
            host=destination.host,
            role=destination.role,
            warehouse=destination.warehouse,
            database=destination.database,
            schema_=destination.schema_,
            username=destination.username,
            credentials=credentials,
            cdc_deletion_mode=_CDC_DELETION_MODE[destination.cdc_deletion_mode],
        )
    else:
        configuration = models.DestinationS3(
            s3_bucket_name=destination.bucket,
            s3_bucket_region=models.DestinationS3S3BucketRegion(destination.region),
            s3_bucket_path=LAKE_PREFIX,
            s3_path_format=LAKE_PATH_FORMAT,
            file_name_pattern=LAKE_FILE_NAME_PATTERN,
            s3_endpoint=destination.endpoint,
            role_arn=destination.role_arn,
            access_key_id=optional_secret(destination.access_key_id_env, "access_key_id_env"),
            secret_access_key=optional_secret(
                destination.secret_access_key_env, "secret_access_key_env"
            ),
            format_=models.DestinationS3ParquetColumnarStorage(
                compression_codec=models.DestinationS3CompressionCodecEnum(destination.compression)
            ),
        )
    return models.DestinationCreateRequest(
        name=destination.name, workspace_id=workspace_id, configuration=configuration
    )


def _stream_configuration(
    catalog: Catalog, connection: ResolvedConnection, stream: Stream
) -> models.StreamConfiguration:
    mode = stream.sync_mode
    if mode.deduped and connection.destination.kind not in _DEDUPING_DESTINATIONS:
        mode = SyncMode.INCREMENTAL_APPEND
    source_kind = connection.source.kind
    selected = catalog.selected_fields(connection.source.name, stream)
    return models.StreamConfiguration(
        name=stream.name,
        sync_mode=_API_SYNC_MODE[mode],
        # Full refresh ignores keys; sending them would only invite drift against the server's.
        primary_key=[[column] for column in stream.primary_key] if mode.incremental else None,
        cursor_field=(
            [stream.cursor_field]
            if mode.incremental
            and source_kind not in _SOURCE_DEFINED_CURSOR
            and stream.cursor_field
            else None
        ),
        selected_fields=(
            [models.SelectedFieldInfo(field_path=[column]) for column in selected]
            if selected
            else None
        ),
    )


def _connection_request(
    catalog: Catalog, connection: Connection, source_id: str, destination_id: str
) -> models.ConnectionCreateRequest:
    schedule = (
        models.AirbyteAPIConnectionSchedule(schedule_type=models.ScheduleTypeEnum.MANUAL)
        if connection.schedule == "manual"
        else models.AirbyteAPIConnectionSchedule(
            schedule_type=models.ScheduleTypeEnum.CRON, cron_expression=connection.schedule.cron
        )
    )
    resolved = catalog.resolve(connection.name)
    streams = [_stream_configuration(catalog, resolved, s) for s in resolved.streams]
    return models.ConnectionCreateRequest(
        name=connection.name,
        source_id=source_id,
        destination_id=destination_id,
        configurations=models.StreamConfigurations(streams=streams),
        namespace_definition=models.NamespaceDefinitionEnum.CUSTOM_FORMAT,
        namespace_format=connection.namespace,
        prefix=connection.prefix,
        schedule=schedule,
        status=models.ConnectionStatusEnum(connection.status),
        non_breaking_schema_updates_behavior=models.NonBreakingSchemaUpdatesBehaviorEnum(
            connection.schema_changes
        ),
    )


# --- comparing ------------------------------------------------------------------------------

_MISSING = "(unset)"


@dataclass(frozen=True)
class FieldDiff:
    path: str
    before: Any
    after: Any

    def render(self) -> str:
        return f"{self.path}: {self._show(self.before)} -> {self._show(self.after)}"

    def _show(self, value: Any) -> str:
        if isinstance(value, str) and value.startswith("(") and value.endswith(")"):
            return value  # a label such as (unset), not a value
        if self.path.rsplit(".", 1)[-1] in _SECRET_KEYS:
            return "(secret)"
        return repr(value) if isinstance(value, str) else str(value)


def _dump(model: BaseModel) -> dict[str, Any]:
    """The JSON body the SDK sends for ``model`` (aliases, no unset optionals)."""
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def _diff(desired: Any, current: Any, path: str = "") -> list[FieldDiff]:
    """What differs in the fields the catalog sets; fields only the server sets are not compared."""
    if isinstance(desired, dict) and isinstance(current, dict):
        found = []
        for key, value in desired.items():
            found += _diff(value, current.get(key, _MISSING), f"{path}.{key}" if path else key)
        return found
    if desired == current or current == SECRET_MASK:
        return []
    return [FieldDiff(path, current, desired)]


def _connection_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """The comparable part of a connection: streams by name, field sets unordered, cron without zone."""
    streams = {}
    for stream in (body.get("configurations") or {}).get("streams") or []:
        stream = dict(stream)
        if "selectedFields" in stream:
            stream["selectedFields"] = sorted(
                ".".join(f.get("fieldPath", [])) for f in stream["selectedFields"]
            )
        streams[stream.pop("name")] = stream
    schedule = dict(body.get("schedule") or {})
    schedule.pop("basicTiming", None)
    if cron := schedule.get("cronExpression"):
        schedule["cronExpression"] = cron.removesuffix(" UTC")  # Airbyte appends the time zone
    keys = (
        "name",
        "namespaceDefinition",
        "namespaceFormat",
        "prefix",
        "status",
        "nonBreakingSchemaUpdatesBehavior",
    )
    return {"streams": streams, "schedule": schedule, **{k: body.get(k, _MISSING) for k in keys}}


# --- plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One resource: what the catalog wants, what the workspace has, and how they differ."""

    kind: Kind
    name: str
    action: Action
    request: BaseModel = field(repr=False)  # the SDK create request; holds secrets, never rendered
    resource_id: str | None = None
    diff: tuple[FieldDiff, ...] = ()
    summary: tuple[str, ...] = ()  # what a create makes, in a few lines
    links: tuple[str, str] | None = None  # a connection's source and destination names


@dataclass(frozen=True)
class Plan:
    workspace_id: str
    changes: tuple[Change, ...]

    @property
    def pending(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.action != "unchanged")

    def count(self, action: Action) -> int:
        return sum(1 for c in self.changes if c.action == action)

    def render(self) -> str:
        """A human-readable diff: + create, ~ update, = unchanged."""
        marks = {"create": "+", "update": "~", "unchanged": "="}
        lines = [f"Airbyte workspace {self.workspace_id}"]
        for change in self.changes:
            lines.append(f"  {marks[change.action]} {change.kind} {change.name}")
            details = (
                change.summary if change.action == "create" else [d.render() for d in change.diff]
            )
            lines += [f"      {detail}" for detail in details]
        lines.append(
            f"Plan: {self.count('create')} to create, {self.count('update')} to update, "
            f"{self.count('unchanged')} unchanged."
        )
        return "\n".join(lines)


def _by_name(kind: str, items: Iterable[Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in items:
        if item.name in found:
            raise PlanError(
                f"the workspace holds two {kind}s named {item.name!r}; delete one in Airbyte"
            )
        found[item.name] = item
    return found


def _workspace(
    client: AirbyteAPI, workspace_id: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    ids = [workspace_id]
    sources = list_all(
        lambda offset: (
            client.sources.list_sources(
                request=api.ListSourcesRequest(workspace_ids=ids, limit=PAGE, offset=offset)
            ).sources_response
        )
    )
    destinations = list_all(
        lambda offset: (
            client.destinations.list_destinations(
                request=api.ListDestinationsRequest(workspace_ids=ids, limit=PAGE, offset=offset)
            ).destinations_response
        )
    )
    connections = list_all(
        lambda offset: (
            client.connections.list_connections(
                request=api.ListConnectionsRequest(workspace_ids=ids, limit=PAGE, offset=offset)
            ).connections_response
        )
    )
    live = [c for c in connections if c.status != models.ConnectionStatusEnum.DEPRECATED]
    return (
        _by_name("source", sources),
        _by_name("destination", destinations),
        _by_name("connection", live),
    )


def _actor_change(
    kind: Kind, request: Any, current: Any, refresh_secrets: bool, summary: str
) -> Change:
    if current is None:
        return Change(kind, request.name, "create", request, summary=(summary,))
    desired = {"name": request.name, "configuration": _dump(request.configuration)}
    diff = _diff(desired, {"name": current.name, "configuration": _dump(current.configuration)})
    if refresh_secrets and not diff:
        diff = [FieldDiff("(secrets)", "(masked by Airbyte)", "(sent again)")]
    resource_id = current.source_id if kind == "source" else current.destination_id
    return Change(
        kind, request.name, "update" if diff else "unchanged", request, resource_id, tuple(diff)
    )


def plan(
    client: AirbyteAPI,
    catalog: Catalog,
    env: Mapping[str, str] = os.environ,
    *,
    refresh_secrets: bool = False,
) -> Plan:
    """What :func:`apply` would create or update so the workspace matches the catalog.

    Resources are matched by name; nothing is deleted. Secrets are read from ``env`` now, so a
    missing variable fails before anything changes.
    """
    workspace_id = require_env(env, catalog.workspace.workspace_id_env, "airbyte/workspace.yaml")
    sources, destinations, connections = _workspace(client, workspace_id)
    changes: list[Change] = []
    for source in catalog.sources:
        request = _source_request(catalog, source, env, workspace_id)
        changes.append(
            _actor_change(
                "source", request, sources.get(source.name), refresh_secrets, f"kind: {source.kind}"
            )
        )
    for destination in catalog.destinations:
        request = _destination_request(destination, env, workspace_id)
        current = destinations.get(destination.name)
        changes.append(
            _actor_change(
                "destination", request, current, refresh_secrets, f"kind: {destination.kind}"
            )
        )
    for connection in catalog.connections:
        source = sources.get(connection.source)
        destination = destinations.get(connection.destination)
        request = _connection_request(
            catalog,
            connection,
            source.source_id if source else _PENDING,
            destination.destination_id if destination else _PENDING,
        )
        current = connections.get(connection.name)
        if current is None:
            summary = [
                f"{connection.source} -> {connection.destination}, namespace {connection.namespace}"
            ]
            summary += [
                f"stream {s.name}: {s.sync_mode.value}"
                for s in (request.configurations.streams or [])
            ]
            changes.append(
                Change(
                    "connection",
                    connection.name,
                    "create",
                    request,
                    summary=tuple(summary),
                    links=(connection.source, connection.destination),
                )
            )
            continue
        if (current.source_id, current.destination_id) != (
            request.source_id,
            request.destination_id,
        ):
            raise PlanError(
                f"connection {connection.name!r} links other resources than "
                f"{connection.source!r} -> {connection.destination!r}; Airbyte cannot re-point a "
                "connection: delete it in Airbyte and apply again"
            )
        desired, actual = _connection_view(_dump(request)), _connection_view(_dump(current))
        diff = _diff(desired, actual)
        diff += [
            FieldDiff(f"streams.{name}", "(configured)", "(not in the catalog)")
            for name in actual["streams"].keys() - desired["streams"].keys()
        ]
        changes.append(
            Change(
                "connection",
                connection.name,
                "update" if diff else "unchanged",
                request,
                current.connection_id,
                tuple(diff),
                links=(connection.source, connection.destination),
            )
        )
    return Plan(workspace_id, tuple(changes))


# --- apply ----------------------------------------------------------------------------------


def apply(client: AirbyteAPI, plan: Plan) -> dict[Kind, dict[str, str]]:
    """Make the plan's creates and updates; returns every resource's id by kind and name."""
    ids: dict[Kind, dict[str, str]] = {"source": {}, "destination": {}, "connection": {}}
    for change in plan.changes:  # sources, then destinations, then connections
        if change.action == "unchanged":
            assert change.resource_id is not None
            ids[change.kind][change.name] = change.resource_id
            continue
        log.info("%s %s %s", change.action, change.kind, change.name)
        request: Any = change.request
        if change.kind == "source":
            ids["source"][change.name] = _apply_source(client, change, request)
        elif change.kind == "destination":
            ids["destination"][change.name] = _apply_destination(client, change, request)
        else:
            ids["connection"][change.name] = _apply_connection(client, change, request, ids)
    return ids


def _apply_source(client: AirbyteAPI, change: Change, request: models.SourceCreateRequest) -> str:
    if change.action == "create":
        response = client.sources.create_source(request=request).source_response
    else:
        patch = models.SourcePatchRequest(name=request.name, configuration=request.configuration)
        response = client.sources.patch_source(
            request=api.PatchSourceRequest(
                source_id=change.resource_id or "", source_patch_request=patch
            )
        ).source_response
    assert response is not None
    return response.source_id


def _apply_destination(
    client: AirbyteAPI, change: Change, request: models.DestinationCreateRequest
) -> str:
    if change.action == "create":
        response = client.destinations.create_destination(request=request).destination_response
    else:
        patch = models.DestinationPatchRequest(
            name=request.name, configuration=request.configuration
        )
        response = client.destinations.patch_destination(
            request=api.PatchDestinationRequest(
                destination_id=change.resource_id or "", destination_patch_request=patch
            )
        ).destination_response
    assert response is not None
    return response.destination_id


def _apply_connection(
    client: AirbyteAPI,
    change: Change,
    request: models.ConnectionCreateRequest,
    ids: Mapping[Kind, Mapping[str, str]],
) -> str:
    if change.action == "create":
        assert change.links is not None
        source, destination = change.links
        request = request.model_copy(
            update={
                "source_id": ids["source"][source],
                "destination_id": ids["destination"][destination],
            }
        )
        response = client.connections.create_connection(request=request).connection_response
    else:
        patch = models.ConnectionPatchRequest(
            configurations=request.configurations,
            namespace_definition=models.NamespaceDefinitionEnumNoDefault(
                request.namespace_definition
            ),
            namespace_format=request.namespace_format,
            prefix=request.prefix,
            schedule=request.schedule,
            status=request.status,
            non_breaking_schema_updates_behavior=models.NonBreakingSchemaUpdatesBehaviorEnumNoDefault(
                request.non_breaking_schema_updates_behavior
            ),
        )
        response = client.connections.patch_connection(
            request=api.PatchConnectionRequest(
                connection_id=change.resource_id or "", connection_patch_request=patch
            )
        ).connection_response
    assert response is not None
    return response.connection_id
