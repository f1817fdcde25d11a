"""The error hierarchy: templates, builtins, pickling."""

from __future__ import annotations

import inspect
import pickle

import pytest

from store import errors


def _classes():
    return [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, errors.ResdiffError) and cls is not errors.ResdiffError]


@pytest.mark.parametrize("cls", _classes(), ids=lambda c: c.__name__)
def test_every_error_is_also_a_builtin_and_pickles(cls):
    builtins = [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (object, BaseException, Exception)]
    assert builtins, f"{cls.__name__} inherits no builtin besides Exception"
    err = cls("a finished message")
    assert str(err) == "a finished message"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == "a finished message"


def test_templates_fill_from_fields():
    err = errors.PromptTooLong(index=3, n=900, limit=512, why="--max-tokens")
    assert str(err).startswith("prompt 3 has 900 tokens, more than the limit of 512 (--max-tokens)")
    assert isinstance(err, ValueError) and isinstance(err, errors.UsageError)
    assert isinstance(errors.StoreWriteError(path="x", reason="full"), OSError)
    assert isinstance(errors.LensNotSaved(), KeyError) and "--save-lens" in str(errors.LensNotSaved())
    with pytest.raises(KeyError):  # a template's missing field is a bug, not a silent blank
        errors.StoreNotFound(where="x")
