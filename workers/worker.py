"""The worker's Celery app (``celery -A workers.worker worker ...``): tasks registered."""

from __future__ import annotations

from api.settings import Settings
from workers.celery_app import create_celery
from workers.tasks import register

app = create_celery(Settings())
register(app)
