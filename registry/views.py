"""The registry's REST API: validate, call registry/services.py, serialise the row."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from access.rest import actor
from instances.api.schema import errors
from instances.api.serializers import validation_error
from registry import services
from registry.models import Model
from registry.serializers import ModelCreateSerializer, ModelSerializer

_NO_MODEL = {404: ["MODEL_NOT_FOUND"]}
_MODEL_ID = OpenApiParameter(
    "model_id", str, OpenApiParameter.PATH, description="The model id; '/' is allowed."
)


class _ModelDeletedSerializer(serializers.Serializer):
    model_id = serializers.CharField()
    deleted = serializers.BooleanField()


class ModelList(APIView):
    @extend_schema(responses={200: ModelSerializer(many=True), **errors()})
    def get(self, request: Request) -> Response:
        return Response(ModelSerializer(Model.objects.all(), many=True).data)

    @extend_schema(
        request=ModelCreateSerializer,
        responses={
            201: ModelSerializer,
            **errors(
                {400: ["VALIDATION_ERROR"], 409: ["MODEL_EXISTS"]}, changes_state=True, body=True
            ),
        },
    )
    def post(self, request: Request) -> Response:
        serializer = ModelCreateSerializer(data=request.data)
        if not serializer.is_valid():
            raise validation_error(serializer.errors)
        model = services.register_model(actor(request), **serializer.validated_data)
        return Response(ModelSerializer(model).data, status=201)


class ModelDetail(APIView):
    @extend_schema(parameters=[_MODEL_ID], responses={200: ModelSerializer, **errors(_NO_MODEL)})
    def get(self, request: Request, model_id: str) -> Response:
        return Response(ModelSerializer(services.get_model(model_id)).data)

    @extend_schema(
        parameters=[_MODEL_ID],
        responses={
            200: _ModelDeletedSerializer,
            **errors({**_NO_MODEL, 409: ["MODEL_BUSY"]}, changes_state=True),
        },
    )
    def delete(self, request: Request, model_id: str) -> Response:
        services.delete_model(model_id, actor(request))
        return Response({"model_id": model_id, "deleted": True})


class DownloadModel(APIView):
    @extend_schema(
        request=None,
        parameters=[_MODEL_ID],
        responses={
            202: ModelSerializer,
            **errors({**_NO_MODEL, 409: ["MODEL_BUSY"]}, changes_state=True),
        },
    )
    def post(self, request: Request, model_id: str) -> Response:
        """Download the model's files (safetensors, tokenizer, config, ONNX) into the
        Hugging Face cache, in the background; progress shows in bytes_done/bytes_total."""
        model = services.download_model(model_id, actor(request))
        return Response(ModelSerializer(model).data, status=202)


class CancelDownload(APIView):
    @extend_schema(
        request=None,
        parameters=[_MODEL_ID],
        responses={
            200: ModelSerializer,
            **errors({**_NO_MODEL, 409: ["NOT_DOWNLOADING"]}, changes_state=True),
        },
    )
    def post(self, request: Request, model_id: str) -> Response:
        return Response(ModelSerializer(services.cancel_download(model_id, actor(request))).data)


class VerifyModel(APIView):
    @extend_schema(
        request=None,
        parameters=[_MODEL_ID],
        responses={
            202: ModelSerializer,
            **errors({**_NO_MODEL, 409: ["MODEL_BUSY"]}, changes_state=True),
        },
    )
    def post(self, request: Request, model_id: str) -> Response:
        """Start a throwaway instance, embed a probe text, stop it; records dimensions,
        max input length, model type, load time and memory."""
        model = services.verify_model(model_id, actor(request))
        return Response(ModelSerializer(model).data, status=202)
