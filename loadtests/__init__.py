"""Load tests of the gateway's streaming API: locust scenarios (`scenarios.py`, the locustfile),
what they measure (`metrics.py`), SLO thresholds (`thresholds.py`, `slo/*.json`), the headless
runner and its report (`runner.py`, `report.py`) and the capacity search (`capacity.py`).

This package imports no other project package: it talks to a gateway over HTTP only. Nothing
here imports locust except the locustfile, which runs in its own process (gevent).
"""
