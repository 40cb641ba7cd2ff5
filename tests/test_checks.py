"""The shared validators and `raises`, through the public API."""
import numpy as np
import pytest
import torch

from mdxlib.checks import (check_binary_labels, check_choice, check_float, check_int, check_k, check_positive,
                           check_range, check_strings, check_tensor, check_vector, raises, same_length)


def test_raises_passes_and_fails():
    with raises(ValueError, "k"):
        raise ValueError("k is bad")
    with pytest.raises(AssertionError, match="nothing was raised"):
        with raises(ValueError):
            pass
    with pytest.raises(AssertionError, match="lacks"):
        with raises(ValueError, "steps"):
            raise ValueError("k is bad")
    with pytest.raises(TypeError):
        with raises(ValueError):
            raise TypeError("other")


@pytest.mark.parametrize("bad", [True, 1.5, "3", -1, None])
def test_check_int_refuses(bad):
    with pytest.raises(ValueError, match="steps"):
        check_int(bad, "steps", minimum=0)


def test_numbers():
    assert check_int(np.int32(4), "n", 1, 4) == 4
    assert check_int(None, "n", optional=True) is None
    assert check_positive(1, "n") == 1
    assert check_float(1, "lr", 0, 1) == 1.0
    for bad in (float("nan"), 2, True):
        with pytest.raises(ValueError, match=r"lr must be a finite number in \[0, 1\]"):
            check_float(bad, "lr", 0, 1)
    assert check_k(1, 1) == 1
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 2\]"):
        check_k(0, 2)


def test_choices_strings_lengths():
    assert check_choice("a", "mode", ("a", "b")) == "a"
    with pytest.raises(ValueError, match="mode must be one of 'a', 'b'; got 'c'"):
        check_choice("c", "mode", ("a", "b"))
    with pytest.raises(TypeError, match="prompts"):
        check_strings(["a", 1], "prompts")
    assert same_length(x=[1], y=(2,)) == 1
    with pytest.raises(ValueError, match=r"len\(x\) = 1, len\(y\) = 2"):
        same_length(x=[1], y=[1, 2])
    assert same_length(nonempty=False, x=[], y=[]) == 0


def test_tensors():
    assert check_tensor(np.zeros((2, 3)), "emb", ndim=(2, 3), kind="float").shape == (2, 3)
    with pytest.raises(TypeError, match="ids must be a int tensor"):
        check_tensor(torch.zeros(3), "ids", kind="int")
    with pytest.raises(ValueError, match="emb holds NaN"):
        check_tensor(torch.tensor([1.0, float("inf")]), "emb", finite=True)
    assert check_tensor(torch.tensor([1.0, float("inf")]), "emb").shape == (2,)  # finite check is opt-in
    assert check_vector(torch.tensor([1, 2], dtype=torch.int64), "c").dtype == torch.float64
    with pytest.raises(TypeError, match="c must hold real numbers"):
        check_vector(torch.tensor([True]), "c")
    assert check_binary_labels(torch.tensor([0, 1])).tolist() == [0, 1]
    with pytest.raises(ValueError, match="both classes"):
        check_binary_labels([0, 0])


def test_check_range():
    assert check_range(torch.tensor([0.0, 0.5, 1.0]), "t", 0, 1).shape == (3,)
    assert check_range(torch.tensor([3, 7]), "ids", low=0).shape == (2,)  # one-sided
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\] \(no NaN\); got values in \[0.0, 1.5\]"):
        check_range(torch.tensor([0.0, 1.5]), "t", 0, 1)
    with pytest.raises(ValueError, match="no NaN"):
        check_range(torch.tensor([float("nan")]), "t", 0, 1)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 9\]; got values in \[-1, 2\]"):
        check_range(torch.tensor([-1, 2]), "ids", 0, 9)
