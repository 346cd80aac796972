"""Errors raised by sama_core.

Every error says what was wrong with which input and what to do about it. They subclass the
built-in exception a caller would expect (ValueError, FileNotFoundError, ...) so generic handlers
keep working, and `SamaError` so the node layer can turn them into clean node errors.
"""


class SamaError(Exception):
    """Base class of every error sama_core raises on purpose."""


class SamaInputError(SamaError, ValueError):
    """A user input (video, image, prompt, size, option) cannot be used as given."""


class SamaModelFileError(SamaError, ValueError):
    """A model file is not what it was given as (wrong architecture, corrupt, missing parts)."""


class SamaFileNotFoundError(SamaError, FileNotFoundError):
    """A path given by the user does not exist."""


class SamaInterrupted(SamaError):
    """Sampling or training was interrupted cooperatively; nothing was half-written."""


class SamaNumericalError(SamaError, RuntimeError):
    """The computation produced NaN/inf (e.g. fp16 overflow or broken weights)."""
