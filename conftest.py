"""Root pytest configuration: names available to the docstring examples, hypothesis profiles."""

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

import dnn2bnn

# Property-based tests (tests/test_properties.py). "dnn2bnn" is the default: derandomized, so
# every run draws the same few models and a strict xfail stays deterministic; no shrinking and
# no example database (nothing is written into the working tree). "long" explores many more
# random models and shrinks a failure to a minimal one: pytest --hypothesis-profile=long.
_PROFILE = dict(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
settings.register_profile(
    "dnn2bnn",
    max_examples=12,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    print_blob=False,
    **_PROFILE,
)
settings.register_profile("long", max_examples=400, print_blob=True, **_PROFILE)
settings.load_profile("dnn2bnn")


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict) -> None:
    doctest_namespace.update(torch=torch, dnn2bnn=dnn2bnn)
    torch.manual_seed(0)
