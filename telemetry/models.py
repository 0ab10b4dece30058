"""The fleet's recent past, one row per thing every 10 seconds, kept for 24 hours.

- TrafficSample: one instance's calls over one roll-up window of one multiplexer (`source`),
  written in one batch per window by the multiplexer's refresher thread;
- GpuSample: one GPU's memory, written by its node's worker;
- StatusSample: how many instances were in each status, written by beat's fleet tick.

Times are whole epoch seconds (`at`, the end of the window): bucketing them for a chart is
integer arithmetic in any database.
"""

from __future__ import annotations

from django.db import models


class TrafficSample(models.Model):
    at = models.BigIntegerField()
    instance = models.CharField(max_length=64)
    source = models.CharField(max_length=255, default="")
    seconds = models.FloatField()  # how long the window was
    calls = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    tokens = models.PositiveBigIntegerField(default=0)
    # Sparse latency histogram, {bucket index: calls} (telemetry/histogram.py).
    latency = models.JSONField(default=dict)
    queue_depth = models.PositiveIntegerField(default=0)  # the longest queue in the window
    in_flight = models.PositiveIntegerField(default=0)  # calls in flight at its end

    class Meta:
        indexes = [
            models.Index(fields=["at"], name="traffic_at"),
            models.Index(fields=["instance", "at"], name="traffic_instance_at"),
        ]

    def __str__(self) -> str:
        return f"{self.instance}@{self.at}: {self.calls} calls"


class GpuSample(models.Model):
    at = models.BigIntegerField()
    node = models.CharField(max_length=255)
    gpu = models.PositiveIntegerField()
    name = models.CharField(max_length=255, default="")
    memory_used = models.PositiveBigIntegerField()
    memory_total = models.PositiveBigIntegerField()
    utilization = models.PositiveSmallIntegerField(default=0)

    class Meta:
        indexes = [models.Index(fields=["at"], name="gpu_at")]

    def __str__(self) -> str:
        return f"{self.node}/GPU {self.gpu}@{self.at}"


class StatusSample(models.Model):
    at = models.BigIntegerField()
    status = models.CharField(max_length=16)
    count = models.PositiveIntegerField()

    class Meta:
        indexes = [models.Index(fields=["at"], name="status_at")]

    def __str__(self) -> str:
        return f"{self.status}@{self.at}: {self.count}"
