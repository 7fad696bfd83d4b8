"""The control plane's data: users, projects, members, API keys, usage, audit, configuration,
files and training jobs, in one SQL database (SQLAlchemy 2 ORM, Alembic migrations).

SQLite (WAL) under $AIMASS_HOME is the embedded default; PostgreSQL when several gateway replicas
and job workers must share one truth. This package knows nothing of HTTP: the gateway's routes,
the `aimass` CLIs and the job workers call the same services here, with the same permission
checks (`controlplane.access`).
"""
