import math

import numpy as np
import pytest

from dino_pytorch import cosine_scheduler
from dino_pytorch.schedules import cosine_value
from reference import official_cosine_scheduler


@pytest.mark.parametrize(
    "args",
    [
        (0.002, 1e-6, 100, 10, 10, 0.0),   # lr
        (0.04, 0.4, 100, 10, 0, 0.0),      # weight decay
        (0.996, 1.0, 100, 10, 0, 0.0),     # teacher momentum
        (1.0, 0.0, 3, 7, 3, 0.5),          # warm-up only (empty cosine)
        (1.0, 0.0, 2, 1, 1, 0.0),          # one warm-up iteration
    ],
)
def test_matches_official_element_for_element(args):
    ours = cosine_scheduler(*args)
    ref = official_cosine_scheduler(*args)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float64
    assert len(ours) == len(ref) == args[2] * args[3]
    np.testing.assert_allclose(ours, ref, rtol=1e-14, atol=1e-17)


def test_documented_official_values():
    s = cosine_scheduler(0.002, 1e-6, 100, 10, warmup_epochs=10)
    assert s[0] == 0 and s[99] == s[100] == 0.002
    assert abs(s[-1] - 1.006e-6) < 1e-9
    m = cosine_scheduler(0.996, 1, 100, 10)
    assert m[0] == 0.996 and 0.99999999 <= m[-1] < 1


def test_cosine_value_equals_array():
    arr = cosine_scheduler(0.996, 1.0, 5, 13)
    assert all(abs(cosine_value(0.996, 1.0, i, 65) - arr[i]) <= 1e-15 for i in range(65))
    with pytest.raises(ValueError, match="step=65"):
        cosine_value(0.996, 1.0, 65, 65)


def test_bad_arguments():
    with pytest.raises(ValueError, match="warmup_epochs=4"):
        cosine_scheduler(1, 0, 3, 10, warmup_epochs=4)
    with pytest.raises(ValueError, match="niter_per_ep"):
        cosine_scheduler(1, 0, 3, -1)


def test_cosine_scheduler_refuses_empty_and_non_finite_schedules():
    for args, word in (((1, 0, 0, 10), "epochs=0"), ((1, 0, 5, 0), "niter_per_ep=0"),
                       ((math.nan, 0, 5, 2), "base_value=nan"), ((1, math.inf, 5, 2), "final_value=inf")):
        with pytest.raises(ValueError, match=word):
            cosine_scheduler(*args)
    # all warm-up (warmup_epochs == epochs) is a full-length schedule, as official
    assert list(cosine_scheduler(1.0, 0.0, 2, 2, warmup_epochs=2)) == [0.0, 1 / 3, 2 / 3, 1.0]
