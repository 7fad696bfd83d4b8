"""The HTTP gateway: OpenAI-compatible API, auth, quotas, routing, serverless lifecycle, metrics and
the control plane. May import `engine` and `registry`."""
