"""Load-test tests: a gateway over the tiny registry (tests/gateway/conftest.py's), serving for a
whole module, and a workload sized to the tiny model's 128-token context."""

from __future__ import annotations

import pytest

from loadtests.workload import Workload
from tests.gateway.conftest import base_config, running, tiny_registry  # noqa: F401  (a shared fixture)


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory, tiny_registry):  # noqa: F811
    """An open-access gateway on loopback serving `tiny`."""
    with running(base_config(tmp_path_factory.mktemp("gateway"), tiny_registry)) as gw:
        yield gw.url


def tiny_workload(**kw) -> Workload:
    """Short requests that fit the tiny model's context (its tokens are about characters)."""
    fields = dict(
        scenario="short_chat", models=["tiny"], rate=4.0, users=8, duration_s=4.0,
        max_requests=200, short_max_tokens=8, long_prompt_words=4, long_output_tokens=16,
        request_timeout_s=20.0,
    )  # fmt: skip
    return Workload(**(fields | kw))
