"""Token balancing plans (mm_gmpo.balance): pure functions of token counts."""

from __future__ import annotations

import random

import pytest

from mm_gmpo.balance import assign_groups, balanced_micro_batches, lpt_partition, micro_batches_needed, pace


def imbalance(loads: list[float]) -> float:
    """Largest load over the mean (1 = balanced)."""
    return max(loads) * len(loads) / sum(loads)


def test_lpt_partition_evens_sums_and_respects_capacity():
    w = [10, 9, 8, 3, 2, 1, 1]
    parts = lpt_partition(w, 3)
    assert sorted(i for p in parts for i in p) == list(range(7))
    assert sorted(sum(w[i] for i in p) for p in parts) == [11, 11, 12]
    capped = lpt_partition(w, 2, capacity=[1, 6])  # part 0 takes one item: the heaviest
    assert capped == [[0], [1, 2, 3, 4, 5, 6]]
    with pytest.raises(ValueError, match="capacities"):
        lpt_partition(w, 2, capacity=[1, 1])


def test_micro_batches_keep_groups_and_the_budget_and_split_tokens_evenly():
    rng = random.Random(0)
    lengths = [rng.choice([30, 200, 900]) + rng.randrange(20) for _ in range(48)]  # 12 groups of 4, spread lengths
    need = micro_batches_needed(lengths, 4096, group_size=4)
    assert need >= -(-sum(lengths) // 4096)
    mbs = balanced_micro_batches(lengths, need, 4096, group_size=4)
    assert len(mbs) == need and sorted(i for m in mbs for i in m) == list(range(48))
    loads = [sum(lengths[i] for i in m) for m in mbs]
    assert max(loads) <= 4096
    assert all(set(m) == {i for i in m for i in range(i - i % 4, i - i % 4 + 4)} for m in mbs)  # whole groups
    assert imbalance(loads) < 1.15
    # the budget-order split that packing used before (fill in order): same budget, more uneven
    cur, order_loads = 0, []
    for s in range(0, 48, 4):
        g = sum(lengths[s:s + 4])
        if cur and cur + g > 4096:
            order_loads.append(cur)
            cur = 0
        cur += g
    order_loads.append(cur)
    assert imbalance(loads) < imbalance(order_loads)


def test_micro_batches_with_more_passes_than_groups_or_samples():
    # another rank needs 3 passes: this one, with 2 groups, splits into samples
    mbs = balanced_micro_batches([5, 5, 5, 5], 3, 100, group_size=2)
    assert len(mbs) == 3 and all(mbs) and sorted(i for m in mbs for i in m) == [0, 1, 2, 3]
    assert balanced_micro_batches([5], 2, 100) == [[0], []]  # fewer samples than passes: an empty pass, last
    # a group over the budget is split into its samples; one sample over it gets a pass of its own
    assert micro_batches_needed([60, 60, 10, 10], 100, group_size=2) == 2
    assert micro_batches_needed([150, 10], 100) == 2


def test_assign_groups_keeps_each_minibatch_and_each_ranks_count():
    rng = random.Random(1)
    world, per = 4, 6
    owner = [r for r in range(world) for _ in range(per)]
    tokens = [float(rng.choice([100, 3000]) if r == 0 else rng.randrange(50, 150)) for r in owner]
    minibatch = [q % 2 for r in range(world) for q in range(per)]
    new = assign_groups(tokens, owner, minibatch, world)

    def loads(own):
        return [[sum(tokens[g] for g in range(len(tokens)) if own[g] == r and minibatch[g] == k)
                 for r in range(world)] for k in (0, 1)]

    for k in (0, 1):
        for r in range(world):
            assert sum(new[g] == r and minibatch[g] == k for g in range(len(new))) == \
                sum(owner[g] == r and minibatch[g] == k for g in range(len(owner)))
    assert max(imbalance(x) for x in loads(new)) < max(imbalance(x) for x in loads(owner))
    # pace: the sum over mini-batches of the busiest rank's tokens over the sum of the mean rank's
    expected = sum(max(x) for x in loads(owner)) / sum(sum(x) / world for x in loads(owner))
    assert pace(tokens, owner, minibatch, world) == pytest.approx(expected)
    assert 1.0 <= pace(tokens, new, minibatch, world) < pace(tokens, owner, minibatch, world)
    # already even: nothing moves
    even = [100.0] * len(owner)
    assert assign_groups(even, owner, minibatch, world) == owner
