"""MLflow's registry webhooks as our receiver reads them (cul/io/webhooks.py): a delivery signed
the way MLflow signs it is accepted and read as a promotion; a wrong secret, a stale timestamp or
a missing signature is refused. The end-to-end path (MLflow server -> receiver -> Prefect) runs in
test_team.py."""

from __future__ import annotations

import json
import time

import pytest

from cul.io.webhooks import WebhookRejected, alias_event, verify


def _delivery(secret: str, payload: dict, timestamp: int | None = None) -> tuple[dict, bytes]:
    from mlflow.webhooks.delivery import _generate_hmac_signature  # what MLflow's server sends

    body = json.dumps(payload)
    ts = str(int(time.time()) if timestamp is None else timestamp)
    headers = {
        "X-MLflow-Delivery-Id": "d-1",
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": _generate_hmac_signature(secret, "d-1", ts, body),
        "Content-Type": "application/json",
    }
    return headers, body.encode()


PROMOTION = {
    "entity": "model_version_alias",
    "action": "created",
    "timestamp": "2026-12-02T10:00:00+00:00",
    "data": {"name": "cul-world", "alias": "champion", "version": "4"},
}


def test_a_delivery_signed_as_mlflow_signs_it_is_read_as_a_promotion():
    headers, body = _delivery("s3cret", PROMOTION)
    event = alias_event(verify(headers, body, "s3cret"))
    assert event is not None and (event.name, event.alias, event.version, event.delivery) == (
        "cul-world",
        "champion",
        4,
        "d-1",
    )
    other = {**PROMOTION, "entity": "model_version", "action": "created"}
    assert alias_event(verify(*_delivery("s3cret", other), "s3cret")) is None


@pytest.mark.parametrize(
    "case, match",
    [("wrong secret", "does not match"), ("replayed", "replay"), ("unsigned", "unsigned"), ("tampered", "match")],
)
def test_a_delivery_that_is_not_ours_or_not_fresh_is_refused(case, match):
    secret = "s3cret"
    headers, body = _delivery("other" if case == "wrong secret" else secret, PROMOTION)
    if case == "replayed":
        headers, body = _delivery(secret, PROMOTION, timestamp=int(time.time()) - 3600)
    if case == "unsigned":
        del headers["X-MLflow-Signature"]
    if case == "tampered":
        body = body.replace(b'"4"', b'"1"')
    with pytest.raises(WebhookRejected, match=match):
        verify(headers, body, secret)
