"""Celery extensions that know nothing of writing sessions: group commit, malformed messages.

Nothing here imports a schema, a model or a task name of this project; the domain hands in
callables (a task's `group_runner`, the `malformed_message_handler` setting).
"""
