"""The model package format (manifest schema) and the model registry: local-folder and S3
backends, immutable versions, aliases moved by compare-and-swap, events, promotion gates."""
