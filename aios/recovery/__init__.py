"""Recovery: every repair of lost or stuck work. Who moves a dead agent's task, and when.

**Who notices a dead agent.** Every live agent, after each of its heartbeats (every
``agents.heartbeat_interval_s``, 5 s), sweeps the ledger for agents silent longer than
``agents.heartbeat_timeout_s`` (default three intervals, 15 s) and marks them OFFLINE
(:func:`aios.recovery.reroute.sweep_offline`, called from :mod:`workers.heartbeat`). With no agent
left alive, the sync job's ``agents`` step does the same sweep every ``orchestrator.sync_interval_s``
(60 s, in the beat leader; also ``aios sync`` and ``POST /api/v1/sync/run``). With the defaults a dead
agent is OFFLINE 15-20 s after its last heartbeat while a peer lives, and at most a sync interval
after its heartbeat timeout when none does.
Each agent's OFFLINE is one conditional UPDATE (:mod:`aios.agents.registry`), and only the process
whose UPDATE won moves its work, so the work moves once however many notice at the same moment.

**Who moves its tasks, and when.** That winning process, at once (:func:`aios.recovery.reroute.reroute`):

* its QUEUED tasks go back to PENDING and are dispatched to a healthy agent under a new dispatch id
  (a copy of the old message that turns up later is skipped by the claim's fence). With no healthy
  agent they wait PENDING (``no_healthy_agent``) for the next heartbeat of an agent that can run them
  (:mod:`workers.heartbeat`) or the sync job's ``pending`` step;
* its RUNNING tasks are settled as lost runs (:func:`aios.recovery.lost_runs.settle_lost_run`):
  FAILED if the task asked ``on_agent_lost: fail``, DEAD when no retries are left, else RETRYING and
  dispatched again at once (:func:`aios.tasks.retries.after_failure` decides).

An agent that stops cleanly (:func:`aios.recovery.reroute.agent_stopped`) or that an operator drains
or disables (:func:`aios.recovery.reroute.admin_status_changed`) has its QUEUED tasks moved the same
way at once; what it is running finishes there.

**A run lost mid-way**, by how it was lost:

* its pool process died (OOM, SIGKILL, a task killing its own process): the agent's main process saw
  it and records a failed attempt, retried after its backoff or DEAD (:class:`workers.tasks.AiosRequest`
  → :func:`workers.runner.record_lost_run`); killed at the hard time limit, it is TIMED_OUT;
* Celery cancelled it when the agent lost its broker connection: the agent settles it as a lost run at
  once, and a task left to retry waits PENDING (``connection_lost``) for the sync job's ``pending``
  step to dispatch it when the broker answers (:func:`aios.recovery.lost_runs.record_cancelled_run`);
* its agent died: moved as above, by the sweep that marked the agent OFFLINE;
* nobody settled it (the sweeper died half-way, the agent's row was deleted, the agent cannot reach
  the database): the sync job's ``lost_runs`` step (agent OFFLINE or unknown) and ``orphaned_runs``
  step (a live agent whose ``inspect active`` reply lacks it, ``lost_message_grace_s`` after it
  started), by the same rule (:mod:`aios.recovery.lost_runs`);
* it hangs: still RUNNING ``timeout_s + 2 * timeout_grace_s`` after it started, the sync job records it
  TIMED_OUT and revokes it (:mod:`aios.recovery.timeouts`).

And for work the broker lost track of (a publish that failed, a message lost, a task stranded in a
dead agent's queue), the sync job's ``pending``, ``lost_messages`` and ``duplicates`` steps
(:mod:`aios.recovery.messages`), ``lost_message_grace_s`` (60 s) after the task last moved.

Modules:

- :mod:`aios.recovery.sync` — the sync job: runs the steps in order, records each run
- :mod:`aios.recovery.context` — one sync run as its steps see it (counts, notes, ``inspect`` replies)
- :mod:`aios.recovery.reroute` — offline sweep, clean stop, drain/disable: move an agent's tasks
- :mod:`aios.recovery.lost_runs` — the lost-run rule, the ``lost_runs``/``orphaned_runs`` steps, cancelled runs
- :mod:`aios.recovery.timeouts` — runs past every limit their agent enforces
- :mod:`aios.recovery.messages` — pending dispatches, lost and stranded messages, duplicates

Recovery imports :mod:`aios.agents` and :mod:`aios.tasks`; neither imports recovery. The heartbeat,
the runner, the request class and the API only call in.
"""
