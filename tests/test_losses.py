from __future__ import annotations

import math

import pytest
import torch

from subspace_cli.errors import UsageError
from subspace_cli.losses import correct_count, loss_sum


def test_mse_matches_hand_computed_value():
    # sample 0: f = (1, 0, 2), y = 2, onehot (0, 0, 1), diff (1, 0, 1): 0.5 * 2 = 1.0
    # 0.5 * (1 + 0 + 1) = 1.0
    # sample 1: f = (0.5, 0.5, 0), y = 0 -> onehot (1, 0, 0), diff (-0.5, 0.5, 0): 0.5 * 0.5 = 0.25
    out = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 0.0]])
    y = torch.tensor([2, 0])
    total = loss_sum("mse", out, y)
    assert float(total) == pytest.approx(1.25)
    assert float(total) / 2 == pytest.approx(0.625)  # the mean over samples


def test_ce_matches_hand_computed_value():
    out = torch.tensor([[0.0, math.log(3.0)]])  # softmax = (1/4, 3/4)
    assert float(loss_sum("ce", out, torch.tensor([1]))) == pytest.approx(-math.log(0.75))
    assert float(loss_sum("ce", out, torch.tensor([0]))) == pytest.approx(math.log(4.0))


def test_unknown_loss_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown loss"):
        loss_sum("hinge", torch.zeros(1, 2), torch.tensor([0]))


def test_correct_count():
    out = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert correct_count(out, torch.tensor([1, 1, 1])) == 2
