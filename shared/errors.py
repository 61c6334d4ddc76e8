"""The EdgeFleet error tree; every error knows the HTTP status it maps to.

EdgeFleetError (500)
├── InvalidInput (400)
│   ├── ProtocolError (400)       malformed MQTT message or topic
│   │   └── UnsupportedSchema (400) a newer major schema_version than this side reads
│   ├── TensorError (400)         wrong shape, dtype, NaN, unknown tensor
│   └── ModelInvalid (422)        an ONNX file that does not check
├── IntegrityError (400)          bytes that do not match their hash
├── SignatureError (400)          a document whose signature does not verify
│   ├── ExpiredDocument (400)
│   └── StaleRevision (409)       rev lower than or equal to one already applied
├── Unauthorized (401)
├── Forbidden (403)
├── NotFound (404)
├── Conflict (409)
├── PayloadTooLarge (413)
├── TooManyRequests (429)         a caller over its rate limit (retry_after_s says when)
├── ServiceUnavailable (503)      (retry_after_s when the service knows when to come back)
└── InferenceFailed (500)         the inference engine failed on an input it accepted
"""

from __future__ import annotations

__all__ = [
    "Conflict",
    "EdgeFleetError",
    "ExpiredDocument",
    "Forbidden",
    "GateFailed",
    "InferenceFailed",
    "IntegrityError",
    "InvalidInput",
    "MissingExtra",
    "ModelInvalid",
    "NotFound",
    "PayloadTooLarge",
    "ProtocolError",
    "ServiceUnavailable",
    "SignatureError",
    "StaleRevision",
    "TensorError",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedSchema",
]


class EdgeFleetError(Exception):
    """Base of every error EdgeFleet raises on purpose."""

    status_code: int = 500

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # When the caller may try again (HTTP ``Retry-After``): for overload and rate limits.
        self.retry_after_s = retry_after_s


class InvalidInput(EdgeFleetError):
    status_code = 400


class ProtocolError(InvalidInput):
    status_code = 400


class UnsupportedSchema(ProtocolError):
    """A message of a newer major protocol version: refused with the reason, never guessed at."""

    status_code = 400


class TensorError(InvalidInput):
    status_code = 400


class ModelInvalid(InvalidInput):
    status_code = 422


class IntegrityError(EdgeFleetError):
    status_code = 400


class SignatureError(EdgeFleetError):
    status_code = 400


class ExpiredDocument(SignatureError):
    status_code = 400


class StaleRevision(SignatureError):
    status_code = 409


class Unauthorized(EdgeFleetError):
    status_code = 401


class Forbidden(EdgeFleetError):
    status_code = 403


class NotFound(EdgeFleetError):
    status_code = 404


class Conflict(EdgeFleetError):
    status_code = 409


class PayloadTooLarge(EdgeFleetError):
    status_code = 413


class TooManyRequests(EdgeFleetError):
    status_code = 429


class ServiceUnavailable(EdgeFleetError):
    status_code = 503


class InferenceFailed(EdgeFleetError):
    """The inference engine raised while running a model on an input that passed its checks."""

    status_code = 500


class MissingExtra(EdgeFleetError):
    """The request needs an optional part this installation lacks (a pip extra)."""

    status_code = 422


class GateFailed(EdgeFleetError):
    """A quantized candidate lost more than the tolerance against its FP32 parent."""

    status_code = 422
