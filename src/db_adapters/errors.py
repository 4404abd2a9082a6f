"""The exceptions db-adapters raises: one base class, and one per kind of bad input."""


class DbAdaptersError(Exception):
    """Base class of every error db-adapters raises on purpose."""


class InputError(DbAdaptersError, ValueError):
    """A user-supplied input (images, class noun, settings, model) cannot be used as given."""


class AdapterError(DbAdaptersError, ValueError):
    """An adapter file or adapter state cannot be saved, loaded or applied."""


class TrainingError(DbAdaptersError, RuntimeError):
    """Training cannot go on (a non-finite loss, say); the message says what to try."""
