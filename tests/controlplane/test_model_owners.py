"""A deleted project's models stay hidden: the registry keeps them (it deletes nothing), and a
name whose owner row went with the project would become shared with every other project."""

from __future__ import annotations

import pytest

from controlplane import identity
from controlplane.access import CLI, Principal
from controlplane.errors import Conflict
from controlplane.models import ModelOwner


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
