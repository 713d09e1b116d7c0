"""HMAC-SHA256 signatures on forwarded events.

The signature covers `timestamp + "." + body`, so a captured request cannot be replayed with
another timestamp and a changed body fails verification.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Signature"
TIMESTAMP_HEADER = "X-Signature-Timestamp"
IDEMPOTENCY_HEADER = "Idempotency-Key"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return mac.hexdigest()


def signed_headers(secret: str, body: bytes, *, now: float | None = None) -> dict[str, str]:
    timestamp = str(int(now if now is not None else time.time()))
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(secret, timestamp, body)}


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, max_skew_s: float = 300, now: float | None = None) -> str | None:
    """Return None when the signature is valid, else the reason it is not."""
    try:
        moment = int(timestamp)
    except ValueError:
        return f"signature timestamp {timestamp!r} is not an integer"
    current = now if now is not None else time.time()
    if abs(current - moment) > max_skew_s:
        return f"signature timestamp {moment} is more than {max_skew_s:.0f} s from the receiver's clock"
    if not hmac.compare_digest(sign(secret, timestamp, body), signature):
        return "signature does not match the body"
    return None
