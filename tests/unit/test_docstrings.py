"""The examples in public docstrings run and print what they say."""

import doctest

import pytest

import finch_jax.linen
import finch_jax.transform


@pytest.mark.parametrize("module", [finch_jax.transform, finch_jax.linen])
def test_docstring_examples(module):
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0
  assert result.failed == 0
