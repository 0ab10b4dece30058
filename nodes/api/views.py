"""GET /nodes and GET /nodes/{name}: the registered nodes, up or down."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from instances.api.schema import errors
from instances.errors import NodeNotFound
from nodes.api.serializers import NodeSerializer
from nodes.models import Node


class NodeList(APIView):
    @extend_schema(responses={200: NodeSerializer(many=True), **errors()})
    def get(self, request: Request) -> Response:
        return Response(NodeSerializer(Node.objects.with_instance_counts(), many=True).data)


class NodeDetail(APIView):
    @extend_schema(responses={200: NodeSerializer, **errors({404: ["NODE_NOT_FOUND"]})})
    def get(self, request: Request, name: str) -> Response:
        node = Node.objects.with_instance_counts().filter(name=name).first()
        if node is None:
            raise NodeNotFound(f"node '{name}' not found")
        return Response(NodeSerializer(node).data)
