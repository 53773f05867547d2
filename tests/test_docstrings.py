"""Every public docstring example runs and prints what it says."""
import doctest

import pytest

import fastbn
from fastbn import _api, _inference, _layer, _moments, _sync, _threads


@pytest.mark.parametrize("module", [_api, _moments, _threads, _inference, _layer, _sync], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_every_public_function_has_an_example():
    for name in fastbn.__all__:
        doc = getattr(fastbn, name).__doc__ or ""
        assert "Examples" in doc and ">>>" in doc, name
