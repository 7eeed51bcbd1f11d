import pytest
import torch

from mm_gmpo.advantage import group_advantages


def ref_adv(rewards, n, normalize_std, eps):
    out = []
    for g in range(len(rewards) // n):
        grp = [float(x) for x in rewards[g * n:(g + 1) * n]]
        mean = sum(grp) / n
        var = sum((x - mean) ** 2 for x in grp) / (n - 1)
        std = var ** 0.5
        for x in grp:
            if all(y == grp[0] for y in grp):
                out.append(0.0)
            else:
                out.append((x - mean) / (std + eps) if normalize_std else x - mean)
    return out


@pytest.mark.parametrize("normalize_std", [True, False])
def test_matches_reference(normalize_std):
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.2, 0.9, 1.0])
    adv, m = group_advantages(r, 4, normalize_std=normalize_std, eps=1e-6)
    assert adv.tolist() == pytest.approx(ref_adv(r.tolist(), 4, normalize_std, 1e-6), rel=1e-5)
    assert m["adv/degenerate_group_frac"] == pytest.approx(1 / 3)
    assert m["reward/mean"] == pytest.approx(r.mean().item())


def test_hand_values():
    adv, _ = group_advantages(torch.tensor([1.0, 0.0]), 2)
    # mean 0.5, unbiased std sqrt(0.5) = 0.7071
    assert adv.tolist() == pytest.approx([0.5 / 0.5**0.5, -0.5 / 0.5**0.5], rel=1e-5)
    adv2, _ = group_advantages(torch.tensor([1.0, 0.0]), 2, normalize_std=False)
    assert adv2.tolist() == [0.5, -0.5]


def test_groups_are_consecutive_not_strided():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0])
    adv, _ = group_advantages(r, 2)
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]  # each group constant
    adv_s, _ = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), 2)
    assert adv_s[0] > 0 > adv_s[1]


def test_zero_mean_per_group_and_group_size_one():
    r = torch.rand(40)
    adv, _ = group_advantages(r, 8)
    assert adv.view(5, 8).sum(1).abs().max() < 1e-4
    adv1, _ = group_advantages(r, 1)
    assert torch.all(adv1 == 0)


def test_errors():
    with pytest.raises(ValueError, match="whole number of groups"):
        group_advantages(torch.zeros(10), 3)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
