"""Cron expressions: the 5-field parser and the next firing time, a leaf module.

Read by the config loader (a backup schedule is checked at load), by periodic schedules and by beat;
it imports nothing of AIOS but the error tree and the time helpers, so anything may import it.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from celery.schedules import crontab

from aios.errors import ValidationFailed
from aios.timeutil import as_utc

__all__ = ["next_cron_time", "parse_cron"]


def parse_cron(expression: str) -> crontab:
    """A 5-field cron expression (minute hour day-of-month month day-of-week), via Celery's parser."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValidationFailed("cron: needs 5 fields: minute hour day-of-month month day-of-week", field="cron")
    minute, hour, day_of_month, month, day_of_week = fields
    try:
        return crontab(
            minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month, day_of_week=day_of_week
        )
    except Exception as exc:  # noqa: BLE001 - celery raises ValueError or its own ParseException
        raise ValidationFailed(f"cron: {exc}", field="cron") from exc


def next_cron_time(expression: str, after: datetime) -> datetime:
    """The first minute strictly after ``after`` that matches ``expression`` (UTC).

    As in cron, when both day fields are restricted a day matches if either does.
    """
    spec = parse_cron(expression)
    fields = expression.split()
    dom_any, dow_any = fields[2] == "*", fields[4] == "*"
    moment = as_utc(after).replace(second=0, microsecond=0) + timedelta(minutes=1)  # type: ignore[union-attr]
    for _ in range(366 * 5):
        cron_dow = (moment.weekday() + 1) % 7
        dom_ok, dow_ok = moment.day in spec.day_of_month, cron_dow in spec.day_of_week
        day_ok = (dom_ok and dow_ok) if (dom_any or dow_any) else (dom_ok or dow_ok)
        if moment.month in spec.month_of_year and day_ok:
            for hour in sorted(h for h in spec.hour if h >= moment.hour):
                minutes = sorted(m for m in spec.minute if hour > moment.hour or m >= moment.minute)
                if minutes:
                    return moment.replace(hour=hour, minute=minutes[0])
        moment = (moment + timedelta(days=1)).replace(hour=0, minute=0)
    raise ValidationFailed(f"cron: {expression!r} never fires", field="cron")
