"""The tasks: one module per kind of model (see ``config/tasks.py`` for the protocol and the registry)."""
