"""Second-read probes of the control plane's edges, against a real gateway: a key cannot mint
a key beyond its own scopes, and a hostile upload file name is a 400, never a 500."""

from __future__ import annotations

from tests.controlplane.conftest import postgres_url  # noqa: F401 (a fixture)
from tests.gateway.conftest import assert_openai_error, base_config, http, make_key, running


def test_an_admin_key_cannot_mint_a_key_with_scopes_it_lacks(tmp_path):
    config = base_config(tmp_path, tmp_path / "registry")
    record, admin_key = make_key(config.database, "acme", ["admin"], role="admin")
    with running(config) as gw, http(gw, authorization=f"Bearer {admin_key}") as h:
        path = f"/v1/projects/{record.project_id}/api_keys"
        r = h.post(path, json={"scopes": ["train", "models:write"]})
        error = assert_openai_error(r, 400, param="scopes")
        assert "'train'" in error["message"] and "admin" in error["message"]
        assert h.post(path, json={"scopes": ["admin"]}).status_code == 201  # its own: fine


def test_an_upload_file_name_the_spool_cannot_hold_is_a_400(tmp_path, monkeypatch):
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "home"))
    config = base_config(tmp_path, tmp_path / "registry")
    with running(config) as gw, http(gw) as h:
        for name in ("a." + "x" * 400, "a.jsonl\x00"):
            r = h.post("/v1/files", data={"purpose": "fine-tune"},
                       files={"file": (name, b'{"text": "x"}\n')})  # fmt: skip
            assert_openai_error(r, 400, param="file")


def test_a_nul_character_is_a_400_on_postgresql_too(tmp_path, monkeypatch, postgres_url):  # noqa: F811
    """PostgreSQL stores no NUL in text: it was a 500 (DataError) for a name, a path id, or the
    email of a sign-in; now a 400 before the statement runs, as on SQLite."""
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "home"))
    config = base_config(tmp_path, tmp_path / "registry", database=postgres_url)
    with running(config) as gw, http(gw) as h:
        for method, path, body in [
            ("POST", "/v1/projects", {"name": "a\x00b"}),
            ("GET", "/v1/projects/%00", None),
            ("GET", "/v1/files/file-%00", None),
            ("POST", "/v1/auth/login", {"email": "a\x00@b.cd", "password": "x" * 8}),
        ]:
            error = assert_openai_error(h.request(method, path, json=body), 400)
            assert "NUL character" in error["message"]
