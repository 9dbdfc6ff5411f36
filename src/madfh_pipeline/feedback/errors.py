"""Errors of the knowledge base: one class per thing a caller can act on.

The review app shows :class:`ValidationError` messages to the operator as they are, so they are written for a
person; the others name the command or call that fixes them.
"""

from __future__ import annotations


class KnowledgeBaseError(Exception):
    """Base class of everything this package raises on purpose."""


class ValidationError(KnowledgeBaseError, ValueError):
    """A record or an argument was refused before it reached the database (what is wrong is in the message)."""


class NotFoundError(KnowledgeBaseError, LookupError):
    """A referenced inspection, model version or defect type does not exist."""

    def __str__(self) -> str:  # LookupError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


class UnknownDefectTypeError(NotFoundError, ValidationError):
    """A defect type that is not (or no longer) in the category's list."""


class AlreadyExistsError(KnowledgeBaseError):
    """A defect type or model version with the same name already exists in the category."""


class InUseError(KnowledgeBaseError):
    """A defect type or model version that records refer to cannot be deleted (retire it instead)."""


class SchemaOutOfDateError(KnowledgeBaseError):
    """The database is not at the schema revision this code expects (run the migration command in the message)."""


class UnsupportedDatabaseError(KnowledgeBaseError):
    """A URL or an operation that the knowledge base does not support for this backend."""


class TextModelUnavailableError(KnowledgeBaseError, RuntimeError):
    """The optional text-embedding model is not installed; only text similarity needs it."""
