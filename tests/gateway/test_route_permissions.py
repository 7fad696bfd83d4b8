"""Every route states the permission it needs: a route added without `opt={"action": ...}`
would be open to anyone, so the public ones are listed here, by name, and nothing else may be."""

from __future__ import annotations

from controlplane.access import ACTIONS, PLATFORM_ACTIONS
from gateway.app import create_app
from gateway.console import routes as console
from tests.gateway.conftest import base_config

# what anyone may call: signing in, probes, metrics for the scraper, the API's own description
PUBLIC = {"/v1/auth/login", "/v1/auth/setup", "/healthz", "/readyz", "/metrics"}
# the console's shells and assets: they hold no data (each page reads the API with the person's
# session; a page without one redirects to the sign-in page)
CONSOLE = {console.PREFIX, f"{console.PREFIX}/login", f"{console.PREFIX}/setup",
           f"{console.PREFIX}/static/{{file_path:path}}"} | {console.PREFIX + p.path for p in console.PAGES}  # fmt: skip


def test_every_route_but_the_public_ones_names_a_known_action(tmp_path, tiny_registry):
    app = create_app(base_config(tmp_path, tiny_registry))
    named = set()
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if handler.http_methods == {"OPTIONS"} or route.path.startswith("/docs"):
                continue
            action = handler.opt.get("action")
            if action is None:
                assert route.path in PUBLIC | CONSOLE, (
                    f"{route.path} names no action: open to anyone"
                )
            else:
                assert action in ACTIONS | PLATFORM_ACTIONS | {"authenticated"}, route.path
                named.add(route.path)
    assert "/v1/chat/completions" in named and "/v1/fine_tuning/jobs" in named
