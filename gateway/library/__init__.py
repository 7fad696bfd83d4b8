"""The Model Library: the registry over HTTP (models, versions, aliases, gates, events)."""
