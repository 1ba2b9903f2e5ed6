"""The one base class of every error a user can cause.

Everything the tool refuses because of what it was given (a model, an option, a file, a recipe)
raises a subclass of :class:`RetrofitError`. It is a ``ValueError``, so code that already catches
``ValueError`` keeps working, and the command line maps it to one line on stderr and exit code 2.

Example:
    >>> import se_retrofit
    >>> try:
    ...     se_retrofit.RetrofitConfig(position="sideways")
    ... except se_retrofit.RetrofitError as error:
    ...     print(type(error).__name__)
    ConfigError
"""
from __future__ import annotations


class RetrofitError(ValueError):
    """Base of every user-facing error of se_retrofit (bad model, option, file or recipe)."""
