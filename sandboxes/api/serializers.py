"""Serializers of the sandbox API (documentation of the response shapes)."""

from __future__ import annotations

from rest_framework import serializers


class _QuotaLimits(serializers.Serializer):
    max_running_instances = serializers.IntegerField()
    max_vcpu_count = serializers.IntegerField()
    max_memory_mb = serializers.IntegerField()


class _QuotaUsage(serializers.Serializer):
    running_instances = serializers.IntegerField()
    vcpu_count = serializers.IntegerField()
    memory_mb = serializers.IntegerField()


class _QuotaReservation(serializers.Serializer):
    instances = serializers.IntegerField()
    vcpu_count = serializers.IntegerField()
    memory_mb = serializers.IntegerField()


class QuotaSerializer(serializers.Serializer):
    limits = _QuotaLimits()
    usage = _QuotaUsage()
    reservation = _QuotaReservation()


class _Shape(serializers.Serializer):
    cpu = serializers.IntegerField()
    memory_mb = serializers.IntegerField()


class _MemoryRange(serializers.Serializer):
    min = serializers.IntegerField()
    max = serializers.IntegerField()
    increment = serializers.IntegerField()


class _Prices(serializers.Serializer):
    currency = serializers.CharField()
    vcpu_second = serializers.CharField()
    memory_gib_second = serializers.CharField()
    stopped_disk_gib_month = serializers.CharField(allow_null=True)
    checkpoint_gib_month = serializers.CharField(allow_null=True)
    template_gib_month = serializers.CharField(allow_null=True)
    volume_gib_month = serializers.CharField(allow_null=True)


class SandboxLimitsSerializer(serializers.Serializer):
    team = serializers.CharField()
    fallback = _Shape()
    allowed_cpu = serializers.ListField(child=serializers.IntegerField())
    memory_mb = _MemoryRange()
    max_timeout_seconds = serializers.IntegerField()
    default_network_class = serializers.CharField()
    prices = _Prices()
    quota = QuotaSerializer()
