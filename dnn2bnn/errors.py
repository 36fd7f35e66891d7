"""Project exception and warning types.

Every error subclasses the built-in exception a user would expect (``ValueError`` or
``TypeError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["ConversionError", "ConversionWarning", "Dnn2BnnError"]


class Dnn2BnnError(Exception):
    """Base class of every dnn2bnn error."""


class ConversionError(Dnn2BnnError, ValueError):
    """A model, a layer or an option could not be converted as asked."""


class ConversionWarning(UserWarning):
    """Conversion went on, but not as asked (a fallback or a skipped layer)."""
