"""Which text the ledger can store, decided in one place for the API's bodies, paths and cursors."""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def storable_text(text: str) -> bool:
    """False for text the ledger cannot store: NUL characters (PostgreSQL refuses them in text and
    JSONB) and unpaired surrogates (not encodable as UTF-8, so no driver can send them).

    Searches without copying (an encode would copy the text): this runs on every string of every
    body before authentication.
    """
    return "\x00" not in text and (text.isascii() or _SURROGATE.search(text) is None)
