"""The op registry (symdiff/registry.py): what it refuses, and how an op presents itself.

Written to kill mutants that survived mutation testing (docs/testing.md).
"""
from __future__ import annotations

import numpy as np
import pytest

import symdiff
from symdiff.registry import Op, get_op, register, sum_to_shape


def _square(name: str, n_backward: int = 1) -> Op:
    return Op(name, 1, np.square, tuple(lambda d, o, x: 2 * d * x for _ in range(n_backward)), elementwise=True)


def test_an_existing_name_is_refused_unless_replace_is_given():
    first = register(_square("registry_twice"))
    with pytest.raises(ValueError, match=r"'registry_twice' already exists .*replace=True"):
        register(_square("registry_twice"))
    assert symdiff.OPS["registry_twice"] is first
    second = register(_square("registry_twice"), replace=True)
    assert symdiff.OPS["registry_twice"] is second is not first


def test_a_backward_kernel_per_input_is_required():
    with pytest.raises(ValueError, match=r"op 'registry_short': 1 inputs but 2 backward kernels"):
        register(_square("registry_short", n_backward=2))
    assert "registry_short" not in symdiff.OPS


def test_ops_say_what_they_are():
    assert repr(get_op("add")) == "<Op add/2 elementwise>"
    assert repr(get_op("mul")) == "<Op mul/2 structural>"


def test_an_unknown_op_name_gets_a_hint():
    with pytest.raises(ValueError, match=r"unknown op 'sigmoidd'\. Did you mean sigmoid\?"):
        get_op("sigmoidd")


@pytest.mark.parametrize("grad,shape,want", [
    (np.ones((4, 3)), (3,), np.full(3, 4.0)),            # a leading axis summed away
    (np.ones((4, 3)), (1, 3), np.full((1, 3), 4.0)),      # a size-1 axis summed, kept
    (np.ones((4, 3)), (4, 1), np.full((4, 1), 3.0)),
    (np.float64(2.0), (2, 2), np.full((2, 2), 2.0)),      # a constant derivative becomes a full array
    (np.ones((1, 3)), (4, 3), np.ones((4, 3))),           # did not depend on a broadcast axis
])
def test_sum_to_shape(grad, shape, want):
    got = sum_to_shape(grad, shape, np.float32)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_an_on_demand_instance_is_made_once_and_then_found():
    from symdiff.registry import instance

    made = []

    def make() -> Op:
        made.append(1)
        return Op("registry_instance_probe", 1, lambda x: x, (lambda d, o, x: d,))

    first = instance("registry_instance_probe", make)
    assert instance("registry_instance_probe", make) is first and len(made) == 1
    assert get_op("registry_instance_probe") is first
