"""The shapes of /v1/usage, /v1/audit, /v1/config and /v1/projects/{id}/quotas. Times are unix
seconds, as in OpenAI's API."""

from __future__ import annotations

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
