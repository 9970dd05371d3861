"""Time helpers: every timestamp AIOS stores or returns is timezone-aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """Attach UTC to a naive datetime (SQLite returns naive ones); convert aware ones to UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def isoformat(value: datetime | None) -> str | None:
    value = as_utc(value)
    return value.isoformat().replace("+00:00", "Z") if value else None


def parse_iso(text: str) -> datetime:
    """Parse an ISO 8601 time; a time without zone is taken as UTC."""
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "+", 1) if "T" in text else text)
    try:
        return as_utc(parsed)  # type: ignore[return-value]
    except OverflowError as exc:  # 0001-01-01T00:00+01:00 and 9999-12-31T23:59-14:00 have no UTC time
        raise ValueError(f"{text!r} is outside the range of UTC times") from exc
