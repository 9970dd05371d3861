"""Authentication and authorization primitives shared by the API and the CLI.

``roles`` (who may do what), ``passwords`` (bcrypt), ``api_keys`` (hashed keys with rotation),
``users``, ``secrets`` (the JWT signing key), ``store`` (revoked tokens and counters, Redis or the
database), ``audit`` (the append-only log of writes).
"""
