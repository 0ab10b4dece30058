"""The read representation of a Node."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from instances.api.serializers import iso
from nodes.models import Node, NodeStatus


class GpuSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    name = serializers.CharField()
    memory_total_bytes = serializers.IntegerField()
    memory_free_bytes = serializers.IntegerField()


class NodeSerializer(serializers.ModelSerializer):
    status = serializers.ChoiceField(
        choices=NodeStatus.choices,
        read_only=True,
        help_text="down: no heartbeat for node_timeout_secs; its instances are unreachable.",
    )
    gpus = GpuSerializer(many=True, read_only=True)
    instances = serializers.IntegerField(read_only=True, help_text="Instances placed on it.")

    class Meta:
        model = Node
        fields = [
            "name",
            "status",
            "instance_host",
            "port_start",
            "port_end",
            "prometheus_port_start",
            "prometheus_port_end",
            "gpus",
            "cpu_count",
            "ram_bytes",
            "version",
            "instances",
            "registered_at",
            "last_seen",
        ]
        read_only_fields = fields

    def to_representation(self, node: Node) -> dict[str, Any]:
        data = {name: getattr(node, name, None) for name in self.Meta.fields}
        data["instances"] = getattr(node, "instance_count", 0)
        data["registered_at"] = iso(node.registered_at)
        data["last_seen"] = iso(node.last_seen)
        return data
