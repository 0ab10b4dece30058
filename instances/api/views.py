"""REST API views: they validate, call the lifecycle service and serialise the result."""

from __future__ import annotations

import re

from django.http import HttpRequest, HttpResponse, JsonResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.decorators import api_view, authentication_classes, permission_classes
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from access import audit
from access.rest import actor, metrics_allowed
from instances import metrics as instance_metrics
from instances import services
from instances.api.errors import body
from instances.api.schema import errors
from instances.api.serializers import (
    InstanceCreateSerializer,
    InstanceSerializer,
    LogsSerializer,
    iso,
    list_instances_json,
    validation_error,
)
from instances.errors import InstanceNotFound, MethodNotAllowed, Unauthorized, ValidationFailed
from instances.health import evaluate as evaluate_health

_INVALID_FIELD = ["VALIDATION_ERROR", "INVALID_PORT", "INVALID_GPU_ID"]
_NO_INSTANCE = {404: ["INSTANCE_NOT_FOUND"]}
# A log line number: Python slice semantics, at most 18 digits.
_INTEGER = re.compile(r"-?[0-9]{1,18}")
_LINE = {"type": "integer", "minimum": -(10**18) + 1, "maximum": 10**18 - 1}
DEFAULT_EVENTS, MAX_EVENTS = 100, 1000


class _DeletedSerializer(serializers.Serializer):
    name = serializers.CharField()
    deleted = serializers.BooleanField()


class InstanceList(APIView):
    @extend_schema(responses={200: InstanceSerializer(many=True), **errors()})
    def get(self, request: Request) -> HttpResponse:
        return HttpResponse(list_instances_json(), content_type="application/json")

    @extend_schema(
        request=InstanceCreateSerializer,
        responses={
            201: InstanceSerializer,
            **errors(
                {
                    400: _INVALID_FIELD,
                    404: ["NODE_NOT_FOUND"],
                    409: ["INSTANCE_EXISTS", "NODE_DOWN", "INSUFFICIENT_MEMORY"],
                    422: ["PORT_CONFLICT", "MAX_INSTANCES_REACHED"],
                },
                changes_state=True,
                body=True,
            ),
        },
    )
    def post(self, request: Request) -> Response:
        serializer = InstanceCreateSerializer(data=request.data)
        if not serializer.is_valid():
            raise validation_error(serializer.errors)
        instance = services.create_instance(actor(request), **serializer.validated_data)
        return Response(InstanceSerializer(instance).data, status=201)


class InstanceDetail(APIView):
    @extend_schema(responses={200: InstanceSerializer, **errors(_NO_INSTANCE)})
    def get(self, request: Request, name: str) -> Response:
        return Response(InstanceSerializer(services.get_instance(name)).data)

    @extend_schema(responses={200: _DeletedSerializer, **errors(_NO_INSTANCE, changes_state=True)})
    def delete(self, request: Request, name: str) -> Response:
        services.delete_instance(name, actor(request))
        return Response({"name": name, "deleted": True})


class StartInstance(APIView):
    @extend_schema(
        request=None,
        responses={
            200: InstanceSerializer,
            **errors({**_NO_INSTANCE, 409: ["ALREADY_RUNNING"]}, changes_state=True),
        },
    )
    def post(self, request: Request, name: str) -> Response:
        return Response(InstanceSerializer(services.start_instance(name, actor(request))).data)


class StopInstance(APIView):
    @extend_schema(
        request=None,
        responses={
            200: InstanceSerializer,
            **errors({**_NO_INSTANCE, 409: ["NOT_RUNNING"]}, changes_state=True),
        },
    )
    def post(self, request: Request, name: str) -> Response:
        return Response(InstanceSerializer(services.stop_instance(name, actor(request))).data)


class RestartInstance(APIView):
    @extend_schema(
        request=None,
        responses={200: InstanceSerializer, **errors(_NO_INSTANCE, changes_state=True)},
    )
    def post(self, request: Request, name: str) -> Response:
        return Response(InstanceSerializer(services.restart_instance(name, actor(request))).data)


class InstanceLogs(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter("start", _LINE, description="first line (Python slice, may be < 0)"),
            OpenApiParameter("end", _LINE, description="end line, exclusive (may be < 0)"),
        ],
        responses={
            200: LogsSerializer,
            **errors({**_NO_INSTANCE, 400: ["VALIDATION_ERROR"]}),
        },
    )
    def get(self, request: Request, name: str) -> Response:
        start = _int_param(request, "start")
        end = _int_param(request, "end")
        return Response(services.read_logs(name, start, end))


class EventSerializer(serializers.Serializer):
    at = serializers.DateTimeField()
    actor_kind = serializers.ChoiceField(choices=["user", "key", "anonymous", "command", "system"])
    actor = serializers.CharField(help_text="The user's or the key's name (empty: anonymous).")
    address = serializers.CharField(help_text="The client's address.")
    action = serializers.CharField(help_text="create, start, stop, restart or delete.")
    result = serializers.CharField(help_text='"ok", or the error code it ended with.')
    detail = serializers.CharField(help_text="The error message, if any.")


class InstanceEvents(APIView):
    @extend_schema(
        parameters=[
            OpenApiParameter(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_EVENTS},
                description=f"newest first, at most this many (default {DEFAULT_EVENTS})",
            )
        ],
        responses={
            200: EventSerializer(many=True),
            **errors({**_NO_INSTANCE, 400: ["VALIDATION_ERROR"]}),
        },
    )
    def get(self, request: Request, name: str) -> Response:
        """The audit trail of an instance, a deleted one's too: who changed it, when,
        from where, with what result."""
        limit = _int_param(request, "limit")
        if limit is not None and not 1 <= limit <= MAX_EVENTS:
            raise ValidationFailed(f"limit: must be between 1 and {MAX_EVENTS}")
        events = list(audit.events(services.SUBJECT, name)[: limit or DEFAULT_EVENTS])
        if not events and not services.instance_exists(name):
            raise InstanceNotFound(f"instance '{name}' not found")
        return Response(EventSerializer(events, many=True).data)


class _HealthSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok", "unhealthy"])
    database = serializers.ChoiceField(choices=["ok", "unavailable"])
    heartbeats = serializers.DictField(child=serializers.DateTimeField(allow_null=True))
    stale = serializers.ListField(child=serializers.CharField())
    starting = serializers.ListField(child=serializers.CharField())


@extend_schema(
    responses={200: _HealthSerializer, 503: _HealthSerializer, **errors(keyed=False)}, auth=[]
)
@api_view(["GET"])
@authentication_classes([])
@permission_classes([])
def health(request: Request) -> Response:
    """200 when the database answers and no heartbeat is stale, else 503 naming the stale
    parts (instances/health.py decides, for the admin's health panel too)."""
    verdict = evaluate_health()
    return Response(
        {
            "status": "ok" if verdict.ok else "unhealthy",
            "database": "unavailable" if verdict.database_error else "ok",
            "heartbeats": {name: iso(seen) for name, seen in verdict.heartbeats.items()},
            "stale": verdict.stale,
            "starting": verdict.starting,
        },
        status=200 if verdict.ok else 503,
    )


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format; a plain view, so any Accept header gets it."""
    if request.method not in ("GET", "HEAD"):
        error = MethodNotAllowed(f'Method "{request.method}" not allowed.')
        return JsonResponse(body(error), status=error.status_code, headers={"Allow": "GET"})
    refusal = metrics_allowed(request)
    if refusal is not None:
        refused = Unauthorized(refusal[1])
        return JsonResponse(
            body(refused), status=refused.status_code, headers={"WWW-Authenticate": "Bearer"}
        )
    text, content_type = instance_metrics.render()
    return HttpResponse(text, content_type=content_type)


def _int_param(request: Request, key: str) -> int | None:
    raw = request.query_params.get(key)
    if raw is None:
        return None
    if not _INTEGER.fullmatch(raw):
        raise ValidationFailed(f"{key}: must be an integer, got {raw[:50]!r}")
    return int(raw)
