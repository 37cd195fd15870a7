"""One registry per extensible kind: lookups, the error that lists the choices, filters."""
from __future__ import annotations

import pytest

from distffn.data import DATASETS
from distffn.errors import UserError
from distffn.nn.activations import ACTIVATIONS
from distffn.nn.init import INITIALIZERS
from distffn.nn.objectives import OBJECTIVES
from distffn.optim import OPTIMIZERS, SCHEDULES
from distffn.parallel import BACKENDS
from distffn.registry import Registry


def test_lookup_order_docs_and_errors():
    r = Registry("colour", "paint.colour")

    @r.register("red")
    def red():
        """Like a tomato.

        More words."""

    r.register("blue", object(), doc="like the sea")
    assert r.names() == ["red", "blue"] and list(r) == ["red", "blue"] and len(r) == 2
    assert r.get("red") is red and "red" in r and "green" not in r
    assert r.doc("red") == "Like a tomato." and r.doc("blue") == "like the sea"
    with pytest.raises(UserError, match=r"^paint.colour: expected one of red, blue; got 'green'$"):
        r.get("green")
    with pytest.raises(UserError, match=r"^elsewhere: expected one of red, blue; got \['x'\]$"):
        r.get(["x"], "elsewhere")                      # an unhashable value is a user error too
    with pytest.raises(UserError, match="expected one of red; got 'blue'"):
        r.check("blue", where=lambda e: e is red)
    with pytest.raises(ValueError, match="registered twice"):
        r.register("red", 1)


@pytest.mark.parametrize("registry,names", [
    (ACTIVATIONS, ["sigmoid", "tanh", "relu", "leaky_relu", "prelu", "abs", "softplus", "maxout",
                   "linear", "sign", "step"]),
    (OBJECTIVES, ["softmax/cross_entropy", "softmax/one_minus_true_prob", "softmax/expected_squared_error",
                  "sigmoid/binary_cross_entropy", "sigmoid/mse", "linear/mse", "linear/l1"]),
    (INITIALIZERS, ["he", "xavier", "normal"]),
    (OPTIMIZERS, ["momentum", "nesterov", "adam"]),
    (SCHEDULES, ["constant", "inverse_time", "step", "cosine"]),
    (DATASETS, ["digits", "breast-cancer", "diabetes", "xor", "sine", "mnist", "fashion-mnist", "npz"]),
    (BACKENDS, ["local", "mpi", "ray"]),
])
def test_every_kind_has_its_entries_each_documented(registry, names):
    assert registry.names() == names
    assert all(registry.doc(n) for n in names)


def test_only_sign_and_step_are_untrainable():
    assert ACTIVATIONS.names(lambda a: not a.trainable) == ["sign", "step"]
