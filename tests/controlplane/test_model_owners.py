"""What outlives a change of membership: a deleted project's models stay hidden (the registry
keeps them, and a name whose owner row went with the project would become shared with every
other project); a person's keys do not outlive or outrank them."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher

from controlplane import identity
from controlplane.access import CLI, Principal
from controlplane.errors import Conflict
from controlplane.keys import create_key
from controlplane.models import ApiKey, ModelOwner, User


def test_a_deleted_projects_models_stay_its_own(db):
    with db.session() as s:
        alpha = identity.create_project(s, CLI, "alpha").id
        beta = identity.create_project(s, CLI, "beta").id
        identity.own_model(s, CLI, alpha, "ft-private")
    with db.session() as s:
        identity.delete_project(s, CLI, alpha)
    with db.session() as s:
        assert identity.model_owners(s) == {"ft-private": alpha}
        key = Principal("key", "k1", project_id=beta, role="owner", scopes=("inference",))
        assert not identity.may_see_model(s, key, identity.model_owners(s)["ft-private"])
        assert identity.may_see_model(s, CLI, alpha)  # a platform admin still sees it
        with pytest.raises(Conflict, match="taken"):  # and nobody else can take the name
            identity.own_model(s, CLI, beta, "ft-private")
        assert s.get(ModelOwner, "ft-private").project_id == alpha


# ── a person's keys never outlive or outrank them ──


@pytest.fixture
def cheap_hashes(monkeypatch):
    monkeypatch.setattr(
        identity, "_HASHER", PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
    )


def _person_with_keys(s, project_id: str, role: str) -> tuple[str, list[str]]:
    user = identity.create_user(s, CLI, f"{role}-{project_id}@example.org", role, "pw-long-enough")
    identity.add_member(s, CLI, project_id, user.email, role)
    person = Principal("user", user.id)
    made = [create_key(s, person, project_id, ["inference"])[0].key_id for _ in range(2)]
    return user.id, made


def test_leaving_a_project_revokes_the_keys_one_made_there(db, cheap_hashes):
    with db.session() as s:
        p = identity.create_project(s, CLI, "p").id
        user_id, made = _person_with_keys(s, p, "admin")
        identity.remove_member(s, CLI, p, user_id)
    with db.session() as s:
        assert all(s.get(ApiKey, k).revoked_at is not None for k in made)


def test_a_lower_role_lowers_the_keys_above_it(db, cheap_hashes):
    with db.session() as s:
        p = identity.create_project(s, CLI, "p").id
        user_id, made = _person_with_keys(s, p, "admin")
        identity.set_role(s, CLI, p, user_id, "viewer")
    with db.session() as s:
        assert {s.get(ApiKey, k).role for k in made} == {"viewer"}
        assert all(s.get(ApiKey, k).revoked_at is None for k in made)


def test_disabling_a_person_revokes_their_keys_everywhere(db, cheap_hashes):
    with db.session() as s:
        p, q = (identity.create_project(s, CLI, n).id for n in ("p", "q"))
        user_id, made = _person_with_keys(s, p, "developer")
        email = s.get(User, user_id).email
        identity.add_member(s, CLI, q, email, "developer")
        made.append(create_key(s, Principal("user", user_id), q, ["inference"])[0].key_id)
        identity.disable_user(s, CLI, user_id)
    with db.session() as s:
        assert all(s.get(ApiKey, k).revoked_at is not None for k in made)
