"""Reading Feishu's webhook bodies (no web framework here): URL verification,
schema 2.0 events and v1 events.

    schema 2.0: {"schema": "2.0", "header": {"event_id", "event_type", "token", ...}, "event": {...}}
    v1:         {"uuid": ..., "token": ..., "type": "event_callback", "event": {"type": ..., ...}}
    challenge:  {"type": "url_verification", "challenge": ..., "token": ...}
"""

from __future__ import annotations

import hmac
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .models import ID_MAX, TYPE_MAX


class BadEvent(Exception):
    """A rejected body: ``status`` is the HTTP status, the message is safe to return."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class ReceivedMessage:
    message_id: str
    chat_id: str | None
    message_type: str | None
    content: str | None


@dataclass(frozen=True)
class FeishuEvent:
    event_id: str
    event_type: str
    payload: dict[str, Any]          # the body without its verification token
    open_id: str | None = None       # the user who caused the event, when there is one
    message: ReceivedMessage | None = None   # for im.message.receive_v1
    challenge: str | None = field(default=None)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _has_nul(value: Any) -> bool:
    """PostgreSQL text and jsonb cannot hold U+0000."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def load_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw, parse_float=_finite, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BadEvent(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadEvent(400, "the body must be a JSON object")
    if _has_nul(body):
        raise BadEvent(400, "the body must not contain NUL characters")
    return body


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _short(value: Any, limit: int) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= limit else None


def check_token(given: Any, expected: str) -> None:
    if not isinstance(given, str) or not given:
        raise BadEvent(401, "missing verification token")
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        raise BadEvent(403, "wrong verification token")


def parse(body: dict[str, Any], verification_token: str) -> FeishuEvent:
    """Check the token and read the event; raises BadEvent for anything rejected."""
    if "encrypt" in body:
        raise BadEvent(400, "encrypted events are not supported (turn off the Encrypt Key)")
    v2 = body.get("schema") == "2.0"
    header = body.get("header") if v2 else None
    if v2 and not isinstance(header, dict):
        raise BadEvent(400, "schema 2.0 events need a header object")
    check_token(header.get("token") if v2 else body.get("token"), verification_token)

    if body.get("type") == "url_verification":
        challenge = body.get("challenge")
        if not isinstance(challenge, str) or not challenge:
            raise BadEvent(400, "url_verification needs a challenge string")
        return FeishuEvent(event_id="", event_type="url_verification", payload={}, challenge=challenge)

    event = body.get("event")
    if v2:
        event_id, event_type = header.get("event_id"), header.get("event_type")
    else:
        event_id, event_type = body.get("uuid"), _get(event, "type")
    event_id, event_type = _short(event_id, ID_MAX), _short(event_type, TYPE_MAX)
    if event_id is None:
        raise BadEvent(400, f"missing event id ({'header.event_id' if v2 else 'uuid'}, 1-{ID_MAX} characters)")
    if event_type is None:
        where = "header.event_type" if v2 else "event.type"
        raise BadEvent(400, f"missing event type ({where}, 1-{TYPE_MAX} characters)")

    open_id = None
    for path in (("sender", "sender_id", "open_id"), ("operator_id", "open_id"), ("user_id", "open_id"), ("open_id",)):
        open_id = _short(_get(event, *path), ID_MAX)
        if open_id:
            break

    message = None
    raw_message = _get(event, "message")
    message_id = _short(_get(raw_message, "message_id"), ID_MAX)
    if v2 and event_type == "im.message.receive_v1" and message_id:
        content = _get(raw_message, "content")
        message = ReceivedMessage(
            message_id=message_id, chat_id=_short(_get(raw_message, "chat_id"), ID_MAX),
            message_type=_short(_get(raw_message, "message_type"), TYPE_MAX),
            content=content if isinstance(content, str) else None,
        )

    return FeishuEvent(event_id, event_type, strip_token(body), open_id=open_id, message=message)


def strip_token(body: dict[str, Any]) -> dict[str, Any]:
    """The body without its verification token (a secret that has no place in the event log)."""
    payload = {k: v for k, v in body.items() if k != "token"}
    if isinstance(payload.get("header"), dict):
        payload["header"] = {k: v for k, v in payload["header"].items() if k != "token"}
    return payload
