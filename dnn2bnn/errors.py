"""Project exception and warning types.

Every error subclasses the built-in exception a user would expect (``ValueError`` or
``TypeError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConversionError", "ConversionWarning", "Dnn2BnnError"]


class Dnn2BnnError(Exception):
    """Base class of every dnn2bnn error."""


class ConversionError(Dnn2BnnError, ValueError):
    """A model, a layer or an option could not be converted as asked."""


class CheckpointError(Dnn2BnnError, ValueError):
    """A checkpoint file cannot be read, written, or matched to its architecture."""


class ConversionWarning(UserWarning):
    """Conversion went on, but not as asked (a fallback or a skipped layer)."""
