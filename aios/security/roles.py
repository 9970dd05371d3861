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


def effective_key_role(key_role: str, owner_role: str) -> str | None:
    """The role an API key acts with today: its own, but never above its owner's *current* role.

    A key keeps the role it was made with while its owner may still grant it; a demoted owner's
    human-role key is capped at the owner's new role; a key and an owner with no role in common
    (agent vs a human role) gives None: the key is refused.
    """
    if key_role == owner_role or can_grant(owner_role, key_role):
        return key_role
    if key_role in _RANK and owner_role in _RANK:
        return owner_role
    return None
