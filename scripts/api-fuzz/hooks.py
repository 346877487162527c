"""Hooks for the fuzzing run. Some values must be unique or signed, which no schema can say;
in cases generated to be valid, they are made so just before the call. Cases generated to be
invalid are sent as generated.

- An Idempotency-Key is made unique: the same key with a different body is, by design,
  refused (422 idempotency_key_reused).
- A pack's stripe_price_id is made unique: two packs cannot sell one Stripe price.
- A webhook is signed for real over the exact bytes sent, with the secret the service was
  started with, so the fuzzing reaches the event handlers.
"""

import hashlib
import hmac
import json
import os
import time
import uuid

import schemathesis

WEBHOOK_SECRET = os.environ.get("FUZZ_WEBHOOK_SECRET", "")


def generated_valid(case):
    meta = case.meta
    return meta is None or not meta.generation.mode.is_negative


@schemathesis.hook
def before_call(context, case, kwargs):
    if not generated_valid(case):
        return
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = f"fuzz-{uuid.uuid4()}"
    if isinstance(case.body, dict) and isinstance(case.body.get("stripe_price_id"), str):
        case.body["stripe_price_id"] = f"price_fuzz{uuid.uuid4().hex}"
    if (
        case.operation.path == "/v1/webhooks/stripe"
        and WEBHOOK_SECRET
        and case.headers
        and "Stripe-Signature" in case.headers
    ):
        payload = json.dumps(case.body).encode()
        timestamp = int(time.time())
        mac = hmac.new(WEBHOOK_SECRET.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
        case.headers["Stripe-Signature"] = f"t={timestamp},v1={mac.hexdigest()}"
        kwargs["data"] = payload
