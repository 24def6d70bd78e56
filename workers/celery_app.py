"""The Celery application: broker from the settings, long-job settings from Celery's guide.

``celery -A workers.celery_app worker -Q fedsrd.cpu,fedsrd.gpu`` runs a worker. Production
runs GPU workers on ``fedsrd.gpu`` (local training, evaluation; one task per process) and
CPU workers on ``fedsrd.cpu`` (aggregation).
"""

from __future__ import annotations

from celery import Celery

from api.dispatch import AGGREGATE, CPU_QUEUE, EVALUATE, GPU_QUEUE, TRAIN
from api.settings import Settings


def create_celery(settings: Settings) -> Celery:
    app = Celery("fedsrd", broker=settings.broker_url, set_as_current=False)
    transport: dict[str, object] = {}
    if settings.broker_url.startswith("filesystem"):
        # The embedded default: the queue is a directory, so no broker server is needed.
        q = settings.queue_dir
        (q / "messages").mkdir(parents=True, exist_ok=True)
        (q / "processed").mkdir(parents=True, exist_ok=True)
        (q / "control").mkdir(parents=True, exist_ok=True)
        transport = {
            "data_folder_in": str(q / "messages"),
            "data_folder_out": str(q / "messages"),
            "processed_folder": str(q / "processed"),
            # Exchange tables; kombu's default is ./control in the working directory.
            "control_folder": str(q / "control"),
            "store_processed": False,
        }
    else:
        # Redis redelivers an unacknowledged task after this long; it must exceed the longest
        # job or a running task would be handed to a second worker.
        transport = {"visibility_timeout": settings.task_visibility_timeout}
    app.conf.update(
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,  # results are rows and blobs, not Celery results
        task_acks_late=True,  # a task killed mid-way is redelivered, not lost
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # long jobs: never hold a second one hostage
        task_serializer="json",
        accept_content=["json"],  # never pickle
        task_routes={
            AGGREGATE: {"queue": CPU_QUEUE},
            TRAIN: {"queue": GPU_QUEUE},
            EVALUATE: {"queue": GPU_QUEUE},
        },
        task_default_queue=CPU_QUEUE,
        worker_hijack_root_logger=False,
    )
    return app
