"""Prometheus metrics of the gateway (served at /metrics)."""

from gateway.metrics.prometheus import GatewayMetrics

__all__ = ["GatewayMetrics"]
