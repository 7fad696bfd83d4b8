"""Files and fine-tuning jobs over HTTP, shaped as OpenAI's API (the official client's
`files.*` and `fine_tuning.jobs.*` work against it): handlers of a few lines over
controlplane/files.py and jobs.py, run in a worker thread. A request acts in the project of its
key, or the one its `OpenAI-Project` header names (see controlplane.files.project_scope).

    POST   /v1/files                                   files:write  multipart: file, purpose
    GET    /v1/files                                   files:read   purpose, order, limit, after
    GET    /v1/files/{file_id}                         files:read
    DELETE /v1/files/{file_id}                         files:write  the bytes too
    GET    /v1/files/{file_id}/content                 files:read   the bytes as uploaded; with
                                                                    Range: bytes=A-B, those (206)
    POST   /v1/fine_tuning/jobs                        jobs:write
    GET    /v1/fine_tuning/jobs                        jobs:read    after, limit
    GET    /v1/fine_tuning/jobs/{job_id}               jobs:read
    POST   /v1/fine_tuning/jobs/{job_id}/cancel        jobs:write
    GET    /v1/fine_tuning/jobs/{job_id}/events        jobs:read    after, limit; stream=true: SSE
    GET    /v1/fine_tuning/jobs/{job_id}/events/stream jobs:read    server-sent events, live; those
                                                                    after `after` or Last-Event-ID
    GET    /v1/fine_tuning/jobs/{job_id}/checkpoints   jobs:read    after, limit
    GET    /v1/fine_tuning/options                     jobs:read    presets, hyperparameter bounds
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.exceptions import HTTPException
from litestar.params import FromPath, FromQuery, HeaderParameter, JSONBody
from litestar.response import Stream

from controlplane import files, jobs
from controlplane.access import Principal
from controlplane.errors import InvalidInput
from gateway.control.transaction import in_transaction
from gateway.errors import error_responses
from gateway.training import schemas as api
from gateway.training.upload import read_form

Me = NamedDependency[Principal]
Id = FromPath[str]
Project = HeaderParameter(name="OpenAI-Project", required=False, max_length=100)
Range = HeaderParameter(name="Range", required=False, max_length=200)
LastEventId = HeaderParameter(name="Last-Event-ID", required=False, max_length=100)
READ_ERRORS = error_responses(400, 401, 403, 404)
WRITE_ERRORS = error_responses(400, 401, 403, 404, 409)
JOB = "/v1/fine_tuning/jobs/{job_id:str}"
OCTETS = "application/octet-stream"
BYTE_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII | re.IGNORECASE)
STREAM_POLL_S = 0.5  # how often a live stream looks for new events
STREAM_BATCH = 10_000  # events a stream reads at a time


def _db(request: Request):
    return request.app.state.db


def _store(request: Request) -> files.FileStore:
    return request.app.state.files


# ── files ──


@post("/v1/files", opt={"action": "files:write"}, request_max_body_size=None, status_code=200,
      summary="Upload a training file (validated before it is stored)",
      responses=error_responses(400, 401, 403, 404, 413))  # fmt: skip
async def create_file(request: Request, principal: Me, project: str | None = Project) -> api.File:
    db, store = _db(request), _store(request)
    project_id, limit = await in_transaction(db, files.begin_upload, principal, project)
    headers = request.headers
    form = await read_form(headers.get("content-type"), headers.get("content-length"),
                           request.stream(), store.spool_dir, limit)  # fmt: skip
    try:
        purpose = form.fields.get("purpose", "")
        files.check_form(purpose, form.filename or "")
    except InvalidInput:
        form.spooled.path.unlink(missing_ok=True)
        raise
    view = await asyncio.to_thread(files.upload, db, store, principal, project_id=project_id,
                                   purpose=purpose, filename=form.filename,
                                   spooled=form.spooled)  # fmt: skip
    return api.file_object(view)


@get("/v1/files", opt={"action": "files:read"}, summary="List the project's files",
     responses=READ_ERRORS)  # fmt: skip
async def list_files(
    request: Request,
    principal: Me,
    purpose: FromQuery[str | None] = None,
    order: FromQuery[str] = "desc",
    limit: FromQuery[int] = files.MAX_LIST,
    after: FromQuery[str | None] = None,
    project: str | None = Project,
) -> api.FileList:
    found = await in_transaction(_db(request), files.list_files, principal, project=project,
                                 purpose=purpose, order=order, limit=limit, after=after)  # fmt: skip
    data = [api.file_object(f) for f in found]
    return api.FileList(data=data, has_more=len(data) == limit,
                        first_id=data[0].id if data else None,
                        last_id=data[-1].id if data else None)  # fmt: skip


@get("/v1/files/{file_id:str}", opt={"action": "files:read"}, summary="Describe a file",
     responses=READ_ERRORS)  # fmt: skip
async def retrieve_file(request: Request, principal: Me, file_id: Id) -> api.File:
    return api.file_object(await in_transaction(_db(request), files.retrieve, principal, file_id))


@delete("/v1/files/{file_id:str}", opt={"action": "files:write"}, status_code=200,
        summary="Delete a file and its bytes", responses=WRITE_ERRORS)  # fmt: skip
async def delete_file(request: Request, principal: Me, file_id: Id) -> api.FileDeleted:
    gone = await in_transaction(_db(request), files.delete, principal, _store(request), file_id)
    return api.FileDeleted(id=gone.id)


@get("/v1/files/{file_id:str}/content", opt={"action": "files:read"},
     summary="The file's bytes, as uploaded; a Range of them (206), such as a preview's first KiB",
     responses=error_responses(400, 401, 403, 404, 416))  # fmt: skip
async def file_content(
    request: Request, principal: Me, file_id: Id, byte_range: str | None = Range
) -> Stream:
    db, store = _db(request), _store(request)
    if byte_range is None:
        chunks = await in_transaction(db, files.content, principal, store, file_id)
        return Stream(chunks, media_type=OCTETS, headers={"Accept-Ranges": "bytes"})
    view = await in_transaction(db, files.retrieve, principal, file_id)
    start, stop = _byte_range(byte_range, view.bytes)
    chunks = store.store.read_chunks(store.key(view.id), start, stop)  # only those bytes are read
    return Stream(chunks, status_code=206, media_type=OCTETS,
                  headers={"Accept-Ranges": "bytes", "Content-Length": str(stop - start),
                           "Content-Range": f"bytes {start}-{stop - 1}/{view.bytes}"})  # fmt: skip


def _byte_range(header: str, size: int) -> tuple[int, int]:
    """[start, stop) of one `bytes=FIRST-LAST`, `bytes=FIRST-` or `bytes=-SUFFIX` range (RFC 9110
    14.1.2; LAST past the end is the end). 416 for any other: several ranges, another unit, one
    that starts past the end."""
    match = BYTE_RANGE.fullmatch(header.strip())
    first, last = match.groups() if match else ("", "")
    start = stop = 0
    if first and (not last or int(last) >= int(first)):
        start, stop = int(first), min(int(last) + 1, size) if last else size
    elif last and not first:
        start, stop = max(0, size - int(last)), size
    if start >= stop:
        raise HTTPException(
            f"Range {header[:100]!r} is not one satisfiable range of this file of {size} bytes: "
            "give bytes=FIRST-LAST, bytes=FIRST- or bytes=-SUFFIX, FIRST below the size",
            status_code=416, headers={"Content-Range": f"bytes */{size}"},
        )  # fmt: skip
    return start, stop


# ── fine-tuning jobs ──


@get("/v1/fine_tuning/options", opt={"action": "jobs:read"}, responses=READ_ERRORS,
     summary="What a job may be given: the presets, each hyperparameter's bounds and default")  # fmt: skip
async def job_options() -> api.FineTuningOptions:
    return api.OPTIONS


@post("/v1/fine_tuning/jobs", opt={"action": "jobs:write"}, status_code=200,
      summary="Create a fine-tuning job (queued for a worker)", responses=WRITE_ERRORS)  # fmt: skip
async def create_job(
    request: Request, principal: Me, data: JSONBody[api.NewJob], project: str | None = Project
) -> api.Job:
    job = await in_transaction(_db(request), jobs.create, principal, project=project,
                               registry=request.app.state.catalog,
                               **msgspec.structs.asdict(data))  # fmt: skip
    return api.job_object(job)


@get("/v1/fine_tuning/jobs", opt={"action": "jobs:read"}, summary="List the project's jobs",
     responses=READ_ERRORS)  # fmt: skip
async def list_jobs(
    request: Request,
    principal: Me,
    after: FromQuery[str | None] = None,
    limit: FromQuery[int] = 20,
    project: str | None = Project,
) -> api.JobList:
    found = await in_transaction(_db(request), jobs.list_jobs, principal, project=project,
                                 after=after, limit=limit)  # fmt: skip
    return api.JobList(data=[api.job_object(j) for j in found], has_more=len(found) == limit)


@get(JOB, opt={"action": "jobs:read"}, summary="Describe a job", responses=READ_ERRORS)
async def retrieve_job(request: Request, principal: Me, job_id: Id) -> api.Job:
    return api.job_object(await in_transaction(_db(request), jobs.retrieve, principal, job_id))


@post(JOB + "/cancel", opt={"action": "jobs:write"}, status_code=200,
      summary="Cancel a job: at once if queued, within seconds if running", responses=WRITE_ERRORS)  # fmt: skip
async def cancel_job(request: Request, principal: Me, job_id: Id) -> api.Job:
    return api.job_object(await in_transaction(_db(request), jobs.cancel, principal, job_id))


@get(JOB + "/events", opt={"action": "jobs:read"}, responses=READ_ERRORS,
     summary="The job's log lines and metric points, newest first; stream=true: live (SSE)")  # fmt: skip
async def list_events(
    request: Request,
    principal: Me,
    job_id: Id,
    after: FromQuery[str | None] = None,
    limit: FromQuery[int] = 20,
    stream: FromQuery[bool] = False,
) -> Response:
    if stream:  # the handler answers two media types, so it returns whole responses
        return await _event_stream(request, principal, job_id)
    found = await in_transaction(_db(request), jobs.list_events, principal, job_id,
                                 after=_event_seq(after), limit=limit)  # fmt: skip
    return Response(api.EventList(data=[api.event_object(e) for e in found],
                                  has_more=len(found) == limit))  # fmt: skip


@get(JOB + "/events/stream", opt={"action": "jobs:read"}, responses=READ_ERRORS,
     summary="The job's events as server-sent events, oldest first (those after `after`, or the "
             "Last-Event-ID a reconnecting browser sends), until the job ends")  # fmt: skip
async def stream_events(
    request: Request,
    principal: Me,
    job_id: Id,
    after: FromQuery[str | None] = None,
    last_event_id: str | None = LastEventId,
) -> Stream:
    return await _event_stream(request, principal, job_id, _event_seq(last_event_id or after))


async def _event_stream(
    request: Request, principal: Principal, job_id: str, cursor: int | None = None
) -> Stream:
    db = _db(request)
    await in_transaction(db, jobs.retrieve, principal, job_id)  # 404 before the stream starts
    return Stream(_sse(db, principal, job_id, cursor), media_type="text/event-stream",
                  headers={"Cache-Control": "no-cache"})  # fmt: skip


async def _sse(db, principal: Principal, job_id: str, cursor: int | None) -> AsyncIterator[bytes]:
    """Each event with its id (a browser's EventSource resumes from it after a dropped
    connection), then `[DONE]` once the job has ended."""
    while True:
        finished = await in_transaction(db, jobs.is_finished, job_id)
        found = await in_transaction(db, jobs.list_events, principal, job_id, after=cursor,
                                     limit=STREAM_BATCH, ascending=True)  # fmt: skip
        for event in found:
            cursor = event.seq
            body = api.event_object(event)
            yield f"id: {body.id}\ndata: ".encode() + msgspec.json.encode(body) + b"\n\n"
        if len(found) == STREAM_BATCH:
            continue  # more are waiting: read them before any pause or end
        if finished:  # read before the events: the last ones are in this batch
            yield b"data: [DONE]\n\n"
            return
        await asyncio.sleep(STREAM_POLL_S)


def _event_seq(after: str | None) -> int | None:
    if after is None:
        return None
    digits = after.removeprefix(api.EVENT_PREFIX)
    if not re.fullmatch(r"[0-9]{1,18}", digits):  # ASCII digits only, and a bounded number
        raise InvalidInput(f"after={after!r} is not an event id ({api.EVENT_PREFIX}N)", "after")
    return int(digits)


@get(JOB + "/checkpoints", opt={"action": "jobs:read"}, responses=READ_ERRORS,
     summary="The job's checkpoints, newest first")  # fmt: skip
async def list_checkpoints(
    request: Request,
    principal: Me,
    job_id: Id,
    after: FromQuery[str | None] = None,
    limit: FromQuery[int] = 10,
) -> api.CheckpointList:
    found = await in_transaction(_db(request), jobs.list_checkpoints, principal, job_id,
                                 after=after, limit=limit)  # fmt: skip
    data = [api.checkpoint_object(c) for c in found]
    return api.CheckpointList(data=data, has_more=len(data) == limit,
                              first_id=data[0].id if data else None,
                              last_id=data[-1].id if data else None)  # fmt: skip


ROUTES = [create_file, list_files, retrieve_file, delete_file, file_content, job_options,
          create_job, list_jobs, retrieve_job, cancel_job, list_events, stream_events,
          list_checkpoints]  # fmt: skip
