"""Prometheus metrics of the gateway (served at /metrics), and the last hour of time to first
token the console's overview reads (window.py)."""

from gateway.metrics.prometheus import GatewayMetrics, model_name
from gateway.metrics.window import LatencyWindow, WindowSummary

__all__ = ["GatewayMetrics", "LatencyWindow", "WindowSummary", "model_name"]
