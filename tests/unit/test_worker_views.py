"""What a viewer sees of a worker (webapi.workers.for_viewer): no process ids, no broker connection."""

from __future__ import annotations

from webapi.workers import for_viewer


def test_for_viewer_drops_every_pid_and_the_broker_but_keeps_counts_and_tasks():
    # Given a worker as Celery's inspect describes it, with a task in each list
    task = {"id": "t1", "name": "aios.run", "hostname": "w@h", "worker_pid": 4242, "acknowledged": True}
    worker = {
        "name": "w@h",
        "online": True,
        "stats": {
            "pid": 4200,
            "pool": {"max-concurrency": 2, "processes": [4242, 4243]},
            "broker": {"hostname": "10.0.0.5", "port": 6379, "userid": "aios"},
            "total": {"aios.run": 3},
        },
        "active": [task],
        "reserved": [dict(task, id="t2")],
        "scheduled": [{"eta": "2026-01-01T00:00:00", "priority": 5, "request": dict(task, id="t3")}],
        "revoked": [],
        "registered": ["aios.run"],
    }

    # When it is shown to a viewer
    shown = for_viewer(worker)

    # Then no pid and no broker detail is left anywhere, and the rest is untouched
    text = repr(shown)
    for secret in ("4200", "4242", "4243", "10.0.0.5", "worker_pid", "broker"):
        assert secret not in text, secret
    assert shown["stats"]["pool"] == {"max-concurrency": 2}
    assert shown["stats"]["total"] == {"aios.run": 3}
    assert [t["id"] for t in shown["active"] + shown["reserved"]] == ["t1", "t2"]
    assert shown["scheduled"][0]["request"]["id"] == "t3" and shown["scheduled"][0]["eta"]
    # And the original is not changed (the operator's view of the same answer)
    assert worker["stats"]["pid"] == 4200 and worker["active"][0]["worker_pid"] == 4242
