"""Fine-tuning jobs on SQLite and PostgreSQL: creation and its bounds (400 naming field, value and
limit), isolation, the queue (one claim per job, also when workers race; SKIP LOCKED; takeover
of an expired lease; max_attempts), heartbeats, cancel, events and checkpoints."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from controlplane import jobs
from controlplane.access import Principal
from controlplane.errors import Conflict, Forbidden, InvalidInput, NotFound
from controlplane.models import ModelOwner, utcnow
from tests.controlplane.test_files import TEXT_JSONL, key_of, member, project, store, upload

__all__ = ["store"]  # the fixture, imported for these tests


@pytest.fixture
def setup(db, store):
    p = project(db)
    k = key_of(p)
    return p, k, upload(db, store, k, TEXT_JSONL).id


def create(db, principal, file_id, **kw):
    with db.session() as s:
        return jobs.create(s, principal, model=kw.pop("model", "tiny"), training_file=file_id, **kw)


def test_create_queues_a_job_and_lists_it(db, setup):
    p, k, f = setup
    job = create(db, k, f, suffix="mine", hyperparameters={"n_epochs": 1, "batch_size": "auto"},
                 seed=7)  # fmt: skip
    assert (job.status, job.project_id, job.seed) == ("queued", p, 7)
    assert job.hyperparameters == {"n_epochs": 1}
    second = create(db, k, f)
    with db.session() as s:
        assert [j.id for j in jobs.list_jobs(s, k)] == [second.id, job.id]
        assert [j.id for j in jobs.list_jobs(s, k, after=second.id)] == [job.id]
        assert jobs.retrieve(s, k, job.id) == job


@pytest.mark.parametrize(
    ("hyperparameters", "message"),
    [
        ({"n_epochs": 0}, "hyperparameters.n_epochs=0 must be >= 1"),
        ({"n_epochs": 51}, "hyperparameters.n_epochs=51 must be <= 50"),
        ({"learning_rate": 2.0}, "hyperparameters.learning_rate=2.0 must be <= 1"),
        (
            {"learning_rate_multiplier": 0},
            "hyperparameters.learning_rate_multiplier=0.0 must be > 0",
        ),
        ({"batch_size": 1.5}, "hyperparameters.batch_size=1.5 must be an integer"),
        ({"block_size": 4}, "hyperparameters.block_size=4 must be >= 8"),
        ({"warmup_steps": "x"}, "hyperparameters.warmup_steps='x' must be a number"),
        ({"dropout": 0.1}, "hyperparameters.dropout is not a hyperparameter"),
        ({"n_epochs": 1, "max_steps": 5}, "n_epochs and hyperparameters.max_steps both given"),
    ],
)
def test_hyperparameters_out_of_bounds_are_refused(db, setup, hyperparameters, message):
    _, k, f = setup
    with pytest.raises(InvalidInput) as err:
        create(db, k, f, hyperparameters=hyperparameters)
    assert message in str(err.value) and err.value.param.startswith("hyperparameters.")


def test_model_file_seed_and_suffix_are_checked(db, setup):
    p, k, f = setup
    with pytest.raises(NotFound, match="no model 'nope'"):
        create(db, k, f, model="nope", registry=_NoModels())
    with pytest.raises(InvalidInput, match="seed=-1 must be an integer"):
        create(db, k, f, seed=-1)
    with pytest.raises(InvalidInput, match="suffix 'a b' is not allowed"):
        create(db, k, f, suffix="a b")
    other = project(db, "other")
    with db.session() as s:
        s.add(ModelOwner(name="taken", project_id=other, created_at=utcnow()))
    with pytest.raises(Conflict, match="belongs to another project"):
        create(db, k, f, suffix="taken")
    with pytest.raises(NotFound, match="no model 'taken'"):
        create(db, k, f, model="taken")  # another project's model does not exist here
    with pytest.raises(NotFound, match=f"no file '{f}'"):
        create(db, key_of(other), f)  # another project's file does not either


def test_a_viewer_may_read_jobs_but_not_create_them(db, setup):
    p, k, f = setup
    viewer = member(db, p, "viewer")
    job = create(db, k, f)
    with pytest.raises(Forbidden):
        create(db, viewer, f)
    with pytest.raises(Forbidden):
        create(db, key_of(p, role="viewer"), f)
    with db.session() as s:
        assert jobs.retrieve(s, viewer, job.id).id == job.id


class _NoModels:
    def resolve(self, ref):
        from registry.errors import NotFound as Missing

        raise Missing(f"no model {ref}")


# ── the queue ──


def claim(db, worker: str, now=None, lease_s: float = 30):
    with db.session() as s:
        return jobs.claim(s, worker, lease_s, now=now)


def test_one_job_is_claimed_once(db, setup):
    _, k, f = setup
    job = create(db, k, f)
    got = claim(db, "w1")
    assert got.job.id == job.id and not got.resumed and got.job.status == "running"
    assert claim(db, "w2") is None


def test_racing_workers_claim_each_job_once(db, setup):
    _, k, f = setup
    created = {create(db, k, f).id for _ in range(3)}
    claimed: list[str] = []
    start = threading.Barrier(6)

    def work(name):
        start.wait()
        while (got := claim(db, name)) is not None:
            claimed.append(got.job.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(created)


def test_skip_locked_passes_over_a_job_another_worker_is_claiming(request, setup):
    db = request.getfixturevalue("db")
    if db.dialect != "postgresql":
        pytest.skip("SKIP LOCKED is PostgreSQL's; SQLite serializes writers")
    _, k, f = setup
    first, second = create(db, k, f), create(db, k, f)
    with db.session() as a:  # a's transaction holds first's row lock until it ends
        assert jobs.claim(a, "wa", 30).job.id == first.id
        got = claim(db, "wb")  # does not wait for a: takes the next row
        assert got.job.id == second.id


def test_an_expired_lease_is_taken_over_and_resumed(db, setup):
    _, k, f = setup
    job = create(db, k, f)
    now = utcnow()
    claim(db, "w1", now=now, lease_s=5)
    assert claim(db, "w2", now=now + timedelta(seconds=4)) is None  # still w1's
    got = claim(db, "w2", now=now + timedelta(seconds=6))
    assert (got.job.id, got.resumed, got.job.attempts) == (job.id, True, 2)
    with db.session() as s, pytest.raises(jobs.LeaseLost):
        jobs.heartbeat(s, job.id, "w1", 5)  # w1 came back: the job is not its any more


def test_a_job_whose_workers_keep_dying_fails_after_max_attempts(db, setup):
    _, k, f = setup
    job = create(db, k, f)
    now = utcnow()
    for attempt in range(jobs.MAX_ATTEMPTS):
        now += timedelta(seconds=10)
        assert claim(db, f"w{attempt}", now=now, lease_s=5).job.attempts == attempt + 1
    assert claim(db, "last", now=now + timedelta(seconds=10)) is None
    with db.session() as s:
        failed = jobs.retrieve(s, k, job.id)
    assert failed.status == "failed" and failed.error["code"] == "worker_lost"
    assert "max_attempts=3" in failed.error["message"]


def test_cancel_queued_at_once_running_through_the_heartbeat(db, setup):
    _, k, f = setup
    queued, running = create(db, k, f), create(db, k, f)
    with db.session() as s:
        assert jobs.cancel(s, k, queued.id).status == "cancelled"
    assert claim(db, "w").job.id == running.id
    with db.session() as s:
        assert jobs.heartbeat(s, running.id, "w", 30) is False
        assert jobs.cancel(s, k, running.id).status == "running"
    with db.session() as s:
        assert jobs.heartbeat(s, running.id, "w", 30) is True
        jobs.finish(s, running.id, "w", "cancelled", message="cancelled at step 3")
    with db.session() as s:
        assert jobs.retrieve(s, k, running.id).status == "cancelled"
        with pytest.raises(Conflict, match="has already cancelled"):
            jobs.cancel(s, k, running.id)


def test_events_and_checkpoints(db, setup):
    _, k, f = setup
    job = create(db, k, f)
    claim(db, "w")
    with db.session() as s:
        for step in (1, 2):
            jobs.add_event(s, job.id, f"step {step}", data={"step": step, "train_loss": 3.0 / step})
        jobs.add_checkpoint(s, job.id, 2, {"train_loss": 1.5})
        jobs.add_checkpoint(s, job.id, 2, {"train_loss": 1.5})  # a resumed run's rewrite: once
    with db.session() as s:
        newest = jobs.list_events(s, k, job.id, limit=2)
        assert [e.message for e in newest] == ["step 2", "step 1"]
        since = jobs.list_events(s, k, job.id, after=newest[1].seq, ascending=True)
        assert [e.message for e in since] == ["step 2"]
        assert jobs.last_metrics_step(s, job.id) == 2
        (ckpt,) = jobs.list_checkpoints(s, k, job.id)
        assert (ckpt.step, ckpt.metrics) == (2, {"train_loss": 1.5})
        with pytest.raises(NotFound):
            jobs.list_events(s, key_of(project(db, "b")), job.id)


def test_a_finished_job_owns_its_model_name(db, setup):
    p, k, f = setup
    job = create(db, k, f, suffix="acme-model")
    claim(db, "w")
    with db.session() as s:
        assert jobs.own_model_name(s, job.id, "w") == "acme-model"
        done = jobs.finish(s, job.id, "w", "succeeded", message="done",
                           fine_tuned_model="acme-model:1")  # fmt: skip
    assert done.status == "succeeded" and done.fine_tuned_model == "acme-model:1"
    with db.session() as s:
        assert s.get(ModelOwner, "acme-model").project_id == p
    assert Principal("worker", "w").actor == "worker:w"
