"""The Celery app AIOS builds: the delivery, serialization and monitoring settings that matter.

Building the app connects to nothing, so these run without a broker (the URL points at a port
where nothing listens).
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import pytest

from aios.broker.celery_app import create_celery_app, queue_name
from aios.config import load_settings

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "aios.toml"
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


@pytest.fixture(scope="module")
def app():
    # Given settings for a Redis broker nobody listens on
    settings = load_settings(
        environ={
            "AIOS_CONFIG": str(REPO_CONFIG),
            "AIOS_BROKER__URL": UNREACHABLE_REDIS,
            "AIOS_BROKER__VISIBILITY_TIMEOUT_S": "7300",
        }
    )
    return create_celery_app(settings)


def test_building_the_app_connects_to_nothing():
    # Given a port that counts every connection made to it, named as the broker
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
        settings = load_settings(
            environ={
                "AIOS_CONFIG": str(REPO_CONFIG),
                "AIOS_BROKER__URL": url,
                "AIOS_BROKER__VISIBILITY_TIMEOUT_S": "7300",
            }
        )
        # When the Celery app is built
        create_celery_app(settings)
        # Then nobody connected (an order, not a time: no connection attempt, so no retries to wait out)
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_messages_and_results_are_json_only(app):
    # Then pickle is neither sent nor accepted, in either direction
    assert app.conf.task_serializer == "json"
    assert app.conf.result_serializer == "json"
    assert app.conf.event_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]
    assert list(app.conf.result_accept_content) == ["json"]


def test_a_message_is_acked_only_after_its_task_ran(app):
    # Then a worker crash redelivers instead of losing the message, one message at a time
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1


def test_redis_keeps_ten_separate_priority_levels(app):
    # Then kombu pops by priority, with all ten levels as separate lists
    options = app.conf.broker_transport_options
    assert options["queue_order_strategy"] == "priority"
    assert list(options["priority_steps"]) == list(range(10))


def test_the_visibility_timeout_is_set_everywhere_celery_reads_it(app):
    # Then the configured 7300 s reaches the broker, the result backend options and the top-level key
    assert app.conf.broker_transport_options["visibility_timeout"] == 7300
    assert app.conf.result_backend_transport_options["visibility_timeout"] == 7300
    assert app.conf.visibility_timeout == 7300


def test_task_events_are_on_for_flower_and_celery_events(app):
    assert app.conf.worker_send_task_events is True
    assert app.conf.task_send_sent_event is False  # broker.send_task_sent_events, off by default


def test_publishing_retries_a_bounded_number_of_times(app):
    # Then a dead broker costs a bounded number of attempts, each wait bounded too
    policy = app.conf.task_publish_retry_policy
    assert app.conf.task_publish_retry is True
    assert isinstance(policy["max_retries"], int)
    assert 0 <= policy["max_retries"] <= 10
    assert math.isfinite(policy["interval_max"])
    assert policy["interval_max"] <= 30


def test_the_default_queue_is_namespaced(app):
    # Then AIOS queues carry the deployment's namespace, so deployments sharing a Redis stay apart
    settings = app.aios_settings
    assert app.conf.task_default_queue == queue_name(settings, "default") == "aios.default"


def test_the_embedded_broker_gets_folders_and_no_redis_options(tmp_path):
    # Given the embedded filesystem broker under a temp folder
    settings = load_settings(
        environ={
            "AIOS_CONFIG": str(REPO_CONFIG),
            "AIOS_BROKER__URL": "filesystem://localhost/",
            "AIOS_BROKER__DATA_DIR": str(tmp_path / "broker"),
        }
    )
    # When the app is built
    app = create_celery_app(settings)
    # Then the transport has its folders (created) and no Redis-only options
    options = app.conf.broker_transport_options
    assert Path(options["data_folder_in"]).is_dir()
    assert "queue_order_strategy" not in options
    assert list(app.conf.accept_content) == ["json"]
