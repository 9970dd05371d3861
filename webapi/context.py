"""What every request handler needs: the settings and the Celery app, stored on the Flask app."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import current_app

from aios.config import Settings


@dataclass(frozen=True)
class ApiContext:
    settings: Settings
    celery: Celery


def ctx() -> ApiContext:
    return current_app.extensions["aios"]  # type: ignore[no-any-return]
