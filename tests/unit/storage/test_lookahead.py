"""The prefetch window: which batches are requested when, what counts as upcoming, and a resume mid-plan."""

import numpy as np
import pytest

from diet_engine.storage.head import Lookahead


def _plan(n: int) -> list[np.ndarray]:
    return [np.array([10 * k, 10 * k + 1]) for k in range(n)]


def _ids(batches) -> list[int]:
    return [int(b[0]) // 10 for b in batches]


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("start", [0, 2])
def test_requests_each_batch_depth_ahead_once(depth, start):
    """Batch k + depth is requested when batch k is used; the first `depth` when the window opens;
    every batch from `start` on exactly once, none past the plan."""
    plan, asked = _plan(7), []
    window = Lookahead(lambda b: asked.append(int(b[0]) // 10), plan, depth, start)
    assert asked == list(range(start, min(start + depth, 7)))
    for k in range(start, 7):
        upcoming = window.advance()
        assert asked[-1] == min(k + depth, 6)
        assert _ids(upcoming) == list(range(k + 1, min(k + 1 + max(depth, 1), 7)))
    assert asked == list(range(start, 7))
    with pytest.raises(IndexError, match="plan has 7 batches"):
        window.advance()


def test_depth_zero_requests_the_batch_as_it_is_used_and_still_offers_the_next():
    asked = []
    window = Lookahead(lambda b: asked.append(int(b[0]) // 10), _plan(3), 0)
    assert asked == []
    assert _ids(window.advance()) == [1] and asked == [0]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="depth=-1"):
        Lookahead(lambda b: None, _plan(3), -1)
    with pytest.raises(ValueError, match="start=4"):
        Lookahead(lambda b: None, _plan(3), 1, 4)
