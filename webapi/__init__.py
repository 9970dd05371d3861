"""The AIOS REST API (Flask). Build it with :func:`webapi.app.create_app`."""
