"""Celery, kombu and billiard extensions that know nothing of writing sessions.

- broker: kombu's Redis transport (and Sentinel's) with atomic batch fetch, batched settling and
  heartbeat recovery;
- consumer: Celery's worker consumer with batched task events and malformed-message records;
- results: Celery's Redis result backend storing in one round trip (a group's in one);
- group_commit: a task Strategy that runs the messages waiting together as one pool job;
- malformed: what becomes of a message that cannot be a task request;
- stop: a SIGTERM to the whole process group is a warm shutdown.

Nothing here imports a schema, a model or a task name of this project; the domain hands in
callables (a task's `group_runner`, the `malformed_message_handler` setting). Each override,
its upstream issue and when to delete it: docs/internals.md.
"""
