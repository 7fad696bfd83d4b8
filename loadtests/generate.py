"""The load generator's process: locust as a library over loadtests/scenarios.py's user class.

    python -m loadtests.generate --workload FILE --host URL --out DIR

runner.py starts it as a child process (importing locust patches the standard library for
gevent). It spawns the workload's users at once (the schedule, not the spawn, shapes arrivals),
sends for duration_s, then lets the requests in flight finish for up to request_timeout_s and
stops. Writes DIR/samples.jsonl (one line per request) and locust's own statistics:
DIR/locust_stats.json (final) and DIR/locust_*.csv (refreshed every second).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gevent
import msgspec
from locust import events
from locust.env import Environment
from locust.log import setup_logging
from locust.stats import PERCENTILES_TO_REPORT, StatsCSVFileWriter, save_stats_json, stats_history

from loadtests import scenarios
from loadtests.workload import Workload


def generate(w: Workload, host: str, out: Path) -> None:
    env = Environment(user_classes=[scenarios.StreamingChatUser], host=host, events=events,
                      stop_timeout=w.request_timeout_s)  # fmt: skip
    scenarios.RUN = scenarios.Run(env, w, str(out / "samples.jsonl"))
    runner = env.create_local_runner()
    csv = StatsCSVFileWriter(env, PERCENTILES_TO_REPORT, str(out / "locust"))
    writer = gevent.spawn(csv.stats_writer)
    history = gevent.spawn(stats_history, runner)
    runner.start(w.users, spawn_rate=w.users)
    # runner.quit stops the users: those waiting at once, those in a request after it ends
    # (stop_timeout); the request budget may quit earlier (scenarios.Run.ended)
    gevent.spawn_later(w.duration_s, runner.quit)
    runner.greenlet.join()
    gevent.killall([writer, history])
    save_stats_json(runner.stats, str(out / "locust_stats"))
    csv.close_files()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.generate")
    parser.add_argument("--workload", required=True, help="a Workload as JSON")
    parser.add_argument("--host", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    setup_logging("WARNING")  # locust's own warnings and a user's errors, into locust.log
    w = msgspec.json.decode(Path(args.workload).read_bytes(), type=Workload)
    generate(w, args.host, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
