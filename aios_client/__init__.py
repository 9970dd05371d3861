"""The AIOS client: the Python SDK and the ``aios`` commands that talk to a running API over HTTP.

It imports nothing of the server (``aios``, ``webapi``, ``workers``), so it can ship on its own.

- :mod:`aios_client.client` — :class:`~aios_client.client.AiosClient`, the SDK, and its error classes
- :mod:`aios_client.commands` — the client commands (``aios login``, ``aios submit``, ``aios watch`` …)
"""
