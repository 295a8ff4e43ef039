"""API errors: the one JSON error body `{"error": {"message", "type", "code"}}` and the errors the routes and
the turn service raise."""

from __future__ import annotations

from app.settings import Settings


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "code"}}`; `outcome` labels h2o_requests_total."""

    def __init__(
        self, status: int, message: str, type_: str, outcome: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.outcome, self.headers = status, message, type_, outcome, headers


def invalid_policy(message: str) -> ApiError:
    return ApiError(422, message, "invalid_policy", "invalid")


def retry_later(settings: Settings, status: int, message: str, type_: str) -> ApiError:
    """A refusal that may succeed later (429, 503), with the configured Retry-After."""
    return ApiError(status, message, type_, "rejected", headers={"Retry-After": str(settings.retry_after_s)})


def not_found(session_id: str) -> ApiError:
    return ApiError(404, f"no session {session_id!r}", "session_not_found")


def error_body(message: str, type_: str, code: int) -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}
