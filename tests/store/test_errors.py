"""The error hierarchy, the store's errors and the capture's under one root: templates, builtins, pickling."""

from __future__ import annotations

import inspect
import pickle

import pytest

from capture import errors as capture_errors
from store import errors


def _classes():
    return [cls for module in (errors, capture_errors) for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, errors.ResdiffError) and cls is not errors.ResdiffError
            and cls.__module__ == module.__name__]


def test_each_layer_holds_its_own_errors():
    names = {cls.__name__: cls.__module__ for cls in _classes()}
    assert names["StoreLocked"] == names["CorruptChunk"] == "store.errors"
    assert names["PromptTooLong"] == names["ModelMissing"] == names["NonFiniteActivation"] == "capture.errors"
    assert len(names) == len(_classes())  # no class defined twice


@pytest.mark.parametrize("cls", _classes(), ids=lambda c: c.__name__)
def test_every_error_is_also_a_builtin_and_pickles(cls):
    builtins = [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (object, BaseException, Exception)]
    assert builtins, f"{cls.__name__} inherits no builtin besides Exception"
    err = cls("a finished message")
    assert str(err) == "a finished message"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == "a finished message"


def test_templates_fill_from_fields():
    err = capture_errors.PromptTooLong(index=3, n=900, limit=512, why="--max-tokens")
    assert str(err).startswith("prompt 3 has 900 tokens, more than the limit of 512 (--max-tokens)")
    assert isinstance(err, ValueError) and isinstance(err, errors.UsageError)
    assert isinstance(errors.StoreWriteError(path="x", reason="full"), OSError)
    assert isinstance(errors.LensNotSaved(), KeyError) and "--save-lens" in str(errors.LensNotSaved())
    with pytest.raises(KeyError):  # a template's missing field is a bug, not a silent blank
        errors.StoreNotFound(where="x")
