"""The AIOS client: the Python SDK and the ``aios`` commands that talk to a running API over HTTP.

It imports nothing of the server (``aios``, ``webapi``, ``workers``), so it can ship on its own.

- :mod:`aios_client.client` — :class:`~aios_client.client.Client`, the SDK
- :mod:`aios_client.errors` — its error classes, one per error code of the API (and the client's own)
- :mod:`aios_client.commands` — the client commands (``aios login``, ``aios submit``, ``aios tasks`` …)
"""

from aios_client import errors
from aios_client.client import Client, Event
from aios_client.errors import *  # noqa: F403 - every error class, as listed in aios_client.errors.__all__

__all__ = ["Client", "Event", *errors.__all__]
