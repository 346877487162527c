"""Hooks for the fuzzing run. Some values must be unique or signed, which no schema can say;
in cases generated to be valid, they are made so just before the call. Cases generated to be
invalid are sent as generated.

- An Idempotency-Key is made unique: the same key with a different body is, by design,
  refused (422 idempotency_key_reused).
- A pack's stripe_price_id is made unique: two packs cannot sell one Stripe price.
- A webhook is signed for real over the exact bytes sent, with the secret the service was
  started with, so the fuzzing reaches the event handlers.
- An AdMob callback is signed the way Google signs it (ECDSA P-256 with SHA-256 over the
  query string as received, percent-decoded, up to `&signature=`), with the run's own key,
  and `signature` and `key_id` are put last, as AdMob sends them.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import time
import uuid
from urllib.parse import urlencode

import schemathesis
from schemathesis.engine import observations

# Schemathesis 4.32.5 scans every string of a 2xx JSON body for links, and a string that starts
# with "http://" but is no URL Python can split (such as "http://[" in a display name a user
# may set) raises out of the scan and ends the run with an internal error. Such a string is
# simply not a link.
_same_origin_path = observations._same_origin_path


def _same_origin_path_or_none(value, origin):
    try:
        return _same_origin_path(value, origin)
    except ValueError:
        return None


observations._same_origin_path = _same_origin_path_or_none

WEBHOOK_SECRET = os.environ.get("FUZZ_WEBHOOK_SECRET", "")
ADMOB_KEY = os.environ.get("FUZZ_ADMOB_KEY", "")
ADMOB_KEY_ID = os.environ.get("FUZZ_ADMOB_KEY_ID", "")
USER_ID = os.environ.get("FUZZ_USER_ID", "")


def percent_decoded(query):
    """The query as the service reads it before checking the signature: %XX decoded, `+` kept."""
    raw = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), query.encode())
    return raw.decode("utf-8")


def sign_admob(case):
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    with open(ADMOB_KEY, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    pairs = [(k, v) for k, v in case.query.items() if k not in ("signature", "key_id")]
    message = percent_decoded(urlencode(pairs))
    der = key.sign(message.encode("utf-8"), ec.ECDSA(hashes.SHA256()))
    signature = base64.urlsafe_b64encode(der).decode().rstrip("=")
    case.query = {**dict(pairs), "signature": signature, "key_id": int(ADMOB_KEY_ID)}


def generated_valid(case):
    meta = case.meta
    return meta is None or not meta.generation.mode.is_negative


@schemathesis.hook
def before_call(context, case, kwargs):
    if not generated_valid(case):
        return
    if case.headers and "Idempotency-Key" in case.headers:
        case.headers["Idempotency-Key"] = f"fuzz-{uuid.uuid4()}"
    if case.operation.path == "/v1/holds" and isinstance(case.body, dict) and USER_ID:
        # Holds are for the run's user: a random id only finds no profile.
        case.body["user_id"] = USER_ID
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
    if (
        case.operation.path == "/v1/ads/admob/ssv"
        and ADMOB_KEY
        and isinstance(case.query, dict)
        and "signature" in case.query
    ):
        sign_admob(case)
