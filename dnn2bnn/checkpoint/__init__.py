"""Checkpoint files: self-describing BNN checkpoints, safe reading of DNN checkpoints.

:func:`save_bnn` / :func:`load_bnn` are the public entry points; the ``dnn2bnn`` command
line (:mod:`dnn2bnn.cli`) is built on the same private helpers.
"""

from dnn2bnn.checkpoint._bnn import FORMAT_VERSION, load_bnn, save_bnn

__all__ = ["FORMAT_VERSION", "load_bnn", "save_bnn"]
