"""The project's exception tree: permanent faults (bad input) never retry, transient ones do."""


class WritingSessionsError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigurationError(WritingSessionsError):
    """An environment variable holds a value the service cannot use."""


class SchemaNotCurrentError(WritingSessionsError):
    """The database schema is not at the Alembic head revision."""


class PermanentError(WritingSessionsError):
    """A message that can never succeed, however often it is retried."""


class InvalidPayloadError(PermanentError):
    """A payload or argument breaks the contract; the message names the field and the problem."""


class TransientError(WritingSessionsError):
    """A fault that may pass: database or broker unavailable, deadlock, serialization failure."""


def one_line(exc: BaseException) -> str:
    """`TypeName: first line of the message` (or just the type name), for one-line reports."""
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text.splitlines()[0]}" if text else name
