"""Root pytest configuration: names available to the docstring examples."""

import pytest
import torch

import dnn2bnn


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict) -> None:
    doctest_namespace.update(torch=torch, dnn2bnn=dnn2bnn)
    torch.manual_seed(0)
