"""Roles and what they may grant. Endpoint permissions are declared next to each route (webapi)."""

from __future__ import annotations

ADMIN, OPERATOR, VIEWER, AGENT = "admin", "operator", "viewer", "agent"
ROLES: tuple[str, ...] = (ADMIN, OPERATOR, VIEWER, AGENT)
#: Human roles in increasing power; ``agent`` is a role of its own (agent endpoints only).
_RANK = {VIEWER: 1, OPERATOR: 2, ADMIN: 3}


def can_grant(granter: str, role: str) -> bool:
    """May a principal with role ``granter`` create a key (or user) with ``role``? Never above itself."""
    if granter == ADMIN:
        return role in ROLES
    return role in _RANK and granter in _RANK and _RANK[role] <= _RANK[granter]
