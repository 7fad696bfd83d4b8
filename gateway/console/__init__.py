"""The console: pages served by the gateway at /console (see routes.py)."""
