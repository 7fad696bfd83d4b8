"""Runs a model package target: preallocated KV cache, continuous-batching scheduler, runner,
sampling, streaming detokenization; an in-process API and an engine server. May import `registry`."""
