"""The shapes of /v1/files and /v1/fine_tuning: OpenAI's file, fine-tuning job, event and
checkpoint objects (the official client parses them), with our extensions as extra fields
(`project_id`, `sha256`, `suffix`, `attempts`, `result`), and the options a job form offers
(`/v1/fine_tuning/options`, ours). Times are unix seconds."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from controlplane import files, jobs

FileId = Annotated[str, Meta(min_length=1, max_length=40)]
Number = int | float | str  # OpenAI's "auto" or a number; bounds are the service's (400s)


def ts(at: datetime | None) -> int | None:
    return None if at is None else int(at.timestamp())


class File(msgspec.Struct, kw_only=True):
    object: Literal["file"] = "file"
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None
    project_id: str
    sha256: str


class FileList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[File]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(msgspec.Struct, kw_only=True):
    object: Literal["file"] = "file"
    id: str
    deleted: bool = True


def file_object(f: files.FileView) -> File:
    return File(id=f.id, bytes=f.bytes, created_at=ts(f.created_at), filename=f.filename,
                purpose=f.purpose, status=f.status, status_details=f.status_details,
                project_id=f.project_id, sha256=f.sha256)  # fmt: skip


class NewJob(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: Annotated[str, Meta(min_length=1, max_length=200)]
    training_file: FileId
    validation_file: FileId | None = None
    suffix: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    seed: int | None = None
    hyperparameters: dict[str, Number | None] | None = None


class JobError(msgspec.Struct, kw_only=True):
    code: str
    message: str
    param: str | None = None


class Job(msgspec.Struct, kw_only=True):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    created_at: int
    finished_at: int | None
    started_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str  # OpenAI's organization: our project
    project_id: str
    result_files: list[str] = []
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]
    seed: int
    error: JobError | None
    suffix: str | None
    user_provided_suffix: str | None
    estimated_finish: int | None = None
    attempts: int
    result: dict[str, Any] | None


class JobList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Job]
    has_more: bool


def job_object(j: jobs.JobView) -> Job:
    hp = {name: j.hyperparameters.get(name, "auto") for name in jobs.AUTO} | j.hyperparameters
    return Job(id=j.id, created_at=ts(j.created_at), finished_at=ts(j.finished_at),
               started_at=ts(j.started_at), model=j.model, fine_tuned_model=j.fine_tuned_model,
               organization_id=j.project_id, project_id=j.project_id, status=j.status,
               trained_tokens=j.trained_tokens, training_file=j.training_file,
               validation_file=j.validation_file, hyperparameters=hp, seed=j.seed,
               error=JobError(**j.error) if j.error else None, suffix=j.suffix,
               user_provided_suffix=j.suffix, attempts=j.attempts, result=j.result)  # fmt: skip


class Event(msgspec.Struct, kw_only=True):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str  # ftevent-<n>: n orders a job's events
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class EventList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Event]
    has_more: bool


EVENT_PREFIX = "ftevent-"


def event_object(e: jobs.EventView) -> Event:
    return Event(id=f"{EVENT_PREFIX}{e.seq}", created_at=ts(e.created_at), level=e.level,
                 message=e.message, type=e.type, data=e.data)  # fmt: skip


class Checkpoint(msgspec.Struct, kw_only=True):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]
    fine_tuned_model_checkpoint: str | None = None  # checkpoints stay in the run, unpublished


class CheckpointList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Checkpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


def checkpoint_object(c: jobs.CheckpointView) -> Checkpoint:
    return Checkpoint(id=c.id, created_at=ts(c.created_at), fine_tuning_job_id=c.job_id,
                      step_number=c.step, metrics=c.metrics)  # fmt: skip


# ── what a job may be given: /v1/fine_tuning/options ──

# What the trainer uses for a hyperparameter a job leaves out, (training from scratch on a
# preset, fine-tuning a base model): trainer/config.py's TrainConfig and FINETUNE_DEFAULTS, and
# worker/training.py's DEFAULT_EPOCHS. Stated here because the gateway never imports the trainer;
# tests/gateway/test_training_api.py checks each against those sources. None: derived (max_steps
# is n_epochs passes over the training blocks).
TRAINER_DEFAULTS: dict[str, tuple[int | float | None, int | float | None]] = {
    "n_epochs": (1, 1),
    "max_steps": (None, None),
    "batch_size": (16, 16),
    "learning_rate_multiplier": (1.0, 1.0),
    "learning_rate": (3e-3, 1e-4),
    "block_size": (128, 128),  # and at most the model's context
    "warmup_steps": (20, 10),
    "eval_interval": (50, 50),
}
DESCRIPTIONS = {
    "n_epochs": "passes over the training file (or give max_steps)",
    "max_steps": "optimizer steps to train for; by default those of n_epochs passes",
    "batch_size": "sequences per optimizer step",
    "learning_rate_multiplier": "scales the default peak learning rate (or give learning_rate)",
    "learning_rate": "peak learning rate of the cosine schedule",
    "block_size": "tokens per training sequence, at most the model's context",
    "warmup_steps": "steps of linear warmup to the peak learning rate",
    "eval_interval": "steps between validation passes and checkpoints",
}


class Hyperparameter(msgspec.Struct, kw_only=True):
    name: str
    type: Literal["integer", "number"]
    minimum: int | float | None = None  # inclusive
    exclusive_minimum: int | float | None = None
    maximum: int | float | None = None  # inclusive
    auto: bool  # "auto" is accepted (OpenAI's name for the default)
    default: int | float | None  # from scratch on a preset; None: derived
    fine_tune_default: int | float | None  # fine-tuning a base model
    description: str


class FineTuningOptions(msgspec.Struct, kw_only=True):
    object: Literal["fine_tuning.options"] = "fine_tuning.options"
    presets: list[str]  # the `model` values that train from scratch
    hyperparameters: list[Hyperparameter]
    seed_maximum: int  # a seed is an integer in 0..seed_maximum (random when not given)


def _hyperparameter(name: str) -> Hyperparameter:
    kind, bounds = jobs.BOUNDS[name]
    default, fine_tune_default = TRAINER_DEFAULTS[name]
    return Hyperparameter(name=name, type="integer" if kind is int else "number",
                          minimum=bounds.get("ge"), exclusive_minimum=bounds.get("gt"),
                          maximum=bounds.get("le"), auto=name in jobs.AUTO, default=default,
                          fine_tune_default=fine_tune_default,
                          description=DESCRIPTIONS[name])  # fmt: skip


# built at import from controlplane.jobs' BOUNDS: a bound without a stated default fails here
OPTIONS = FineTuningOptions(presets=list(jobs.PRESETS),
                            hyperparameters=[_hyperparameter(name) for name in jobs.BOUNDS],
                            seed_maximum=jobs.MAX_SEED)  # fmt: skip
