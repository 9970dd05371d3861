"""The agent side of AIOS: Celery workers that claim, run and record tasks."""
