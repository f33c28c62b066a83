"""MLflow's registry webhooks, received: is a delivery genuine, and is it a promotion?

MLflow (3.3+, SQL backend) POSTs an event to a webhook's URL when an alias is set on a model
version, signed with the webhook's secret: header `X-MLflow-Signature: v1,<base64 HMAC-SHA256>`
of `"{delivery id}.{timestamp}.{body}"`, with the delivery id and the Unix timestamp in
`X-MLflow-Delivery-Id` and `X-MLflow-Timestamp`. A delivery is accepted only if that signature
matches (constant-time comparison) and its timestamp is recent, so a captured request cannot be
replayed later. The receiver that acts on it is `flows/promotion.py`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping

from pydantic import BaseModel

SIGNATURE = "x-mlflow-signature"
TIMESTAMP = "x-mlflow-timestamp"
DELIVERY = "x-mlflow-delivery-id"
MAX_AGE = 300.0  # seconds a signed delivery stays valid
ALIAS_CREATED = "model_version_alias.created"


class WebhookRejected(ValueError):
    """A delivery that is not signed with our secret, is too old, or cannot be read."""


class AliasEvent(BaseModel):
    """`model_version_alias.created`: `alias` now points at `version` of registered model `name`."""

    delivery: str
    name: str
    alias: str
    version: int


def sign(secret: str, delivery: str, timestamp: str, body: bytes) -> str:
    """The `X-MLflow-Signature` value MLflow sends for this delivery (HMAC over the raw body)."""
    signed = f"{delivery}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


def verify(headers: Mapping[str, str], body: bytes, secret: str, now: float | None = None) -> dict:
    """The delivery's JSON payload, if signed with `secret` within `MAX_AGE` seconds; otherwise
    `WebhookRejected` saying why."""
    h = {k.lower(): v for k, v in headers.items()}
    delivery, timestamp, signature = h.get(DELIVERY), h.get(TIMESTAMP), h.get(SIGNATURE)
    if not (delivery and timestamp and signature):
        raise WebhookRejected("unsigned delivery: X-MLflow-Signature, -Timestamp and -Delivery-Id are required")
    try:
        age = (time.time() if now is None else now) - int(timestamp)
    except ValueError as e:
        raise WebhookRejected(f"bad timestamp {timestamp!r}") from e
    if abs(age) > MAX_AGE:
        raise WebhookRejected(f"delivery timestamp is {age:.0f} s off (at most {MAX_AGE:.0f} s): a replay?")
    if not hmac.compare_digest(sign(secret, delivery, timestamp, body).encode(), signature.encode()):
        raise WebhookRejected("signature does not match this receiver's secret")
    try:
        payload = json.loads(body)
    except ValueError as e:
        raise WebhookRejected("body is not JSON") from e
    if not isinstance(payload, dict):
        raise WebhookRejected("body is not a JSON object")
    payload["delivery"] = delivery
    return payload


def alias_event(payload: dict) -> AliasEvent | None:
    """The alias that was set, if the payload is `model_version_alias.created`; else None."""
    if f"{payload.get('entity')}.{payload.get('action')}" != ALIAS_CREATED:
        return None
    data = payload.get("data") or {}
    return AliasEvent(
        delivery=payload["delivery"], name=data["name"], alias=data["alias"], version=int(data["version"])
    )
