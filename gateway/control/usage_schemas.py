"""The shapes of /v1/usage, /v1/audit, /v1/config and /v1/projects/{id}/quotas. Times are unix
seconds, as in OpenAI's API; /v1/usage?format=csv writes them as ISO 8601 UTC for spreadsheets."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from controlplane.audit import AuditView
from controlplane.usage import UsageBucket

Tokens = Annotated[int, Meta(ge=1)]  # the service states the upper bound in its message


class UsagePage(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    start_time: int
    end_time: int
    group_by: str
    data: list[UsageBucket]  # in time order; buckets with no requests left out


CSV_COLUMNS = ("start_time", "end_time", "project_id", "key_id", "model", "requests",
               "prompt_tokens", "completion_tokens", "errors")  # fmt: skip
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet reads such a cell as a formula


def usage_csv(buckets: list[UsageBucket]) -> str:
    """The buckets as CSV with a header row: times ISO 8601 UTC, text quoted, counts bare. A text
    cell that a spreadsheet would run as a formula (a model name is anyone's choice) starts with
    an apostrophe, as OWASP's CSV-injection advice says, so it shows as text."""
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for b in buckets:
        writer.writerow((_iso(b.start_time), _iso(b.end_time), _text(b.project_id),
                         _text(b.key_id), _text(b.model), b.requests, b.prompt_tokens,
                         b.completion_tokens, b.errors))  # fmt: skip
    return out.getvalue()


def _iso(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value: str) -> str:
    return "'" + value if value.startswith(FORMULA_STARTS) else value


class AuditPage(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[AuditView]  # newest first
    last_id: int | None  # pass as `after` for the next page; None when this one is empty


class Setting(msgspec.Struct, kw_only=True):
    object: Literal["setting"] = "setting"
    key: str
    value: Any
    default: Any
    type: Literal["int", "str"]
    min: int  # int: the least value; str: the least length
    max: int
    nullable: bool  # null: no limit, or no default model
    description: str


class SettingList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Setting]


class QuotasUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """PATCH body: the quotas to change; null returns one to the platform's default."""

    tokens_per_day: Tokens | None | msgspec.UnsetType = msgspec.UNSET
    tokens_per_month: Tokens | None | msgspec.UnsetType = msgspec.UNSET
