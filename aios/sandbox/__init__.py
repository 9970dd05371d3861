"""The command sandbox: how a ``command`` task's program runs, confined.

- :mod:`aios.sandbox.run` — run one argv under resource limits, with its output captured
- :mod:`aios.sandbox.identity` — the unprivileged user a command runs as, and its private directory
- :mod:`aios.sandbox.cgroups` — one cgroup per command, so its limits hold for all its processes
"""
