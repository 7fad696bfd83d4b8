"""The control plane over HTTP: sign-in, people, projects, members, API keys (auth_routes,
project_routes), usage, audit, configuration and quotas (usage_routes); each module exports
ROUTES, which gateway/app.py mounts."""
