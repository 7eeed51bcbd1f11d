"""Token balancing: which rank trains which prompt group, and which samples share a micro-batch.

Every optimizer step is a collective, so the rank with the most tokens sets the pace of each mini-batch; and a
micro-batch's cost is its tokens. Both plans here are greedy longest-first partitions (LPT: the heaviest item
goes to the lightest part), over whole prompt groups wherever they fit, so the n samples of a prompt stay
together (one vision pass for its picture). Pure functions of token counts; the trainer does the exchange.

Neither plan changes the maths: the loss is normalised by global counts (``mm_gmpo.update``), so the gradient of
a mini-batch is the sum over its samples wherever they are computed, and the rank plan keeps each mini-batch's
set of groups (it only moves a group between ranks within its mini-batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def lpt_partition(weights: Sequence[float], parts: int, capacity: Sequence[int] | None = None) -> list[list[int]]:
    """Indices of ``weights`` in ``parts`` parts with near-equal sums: heaviest first, each to the part with the
    least weight so far (among those with room: part b takes at most ``capacity[b]`` items). Ties go to the lower
    index, so the result is deterministic; each part lists its indices in ascending order."""
    if capacity is not None and sum(capacity) < len(weights):
        raise ValueError(f"capacities {list(capacity)} hold fewer than {len(weights)} items")
    load = [0.0] * parts
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        room = [b for b in range(parts) if capacity is None or len(out[b]) < capacity[b]]
        b = min(room, key=lambda b: (load[b], b))
        out[b].append(i)
        load[b] += weights[i]
    return [sorted(p) for p in out]


def _units(lengths: Sequence[int], group_size: int, max_tokens: int) -> list[list[int]]:
    """Whole prompt groups (``group_size`` adjacent samples); a group over the budget becomes single samples."""
    n = len(lengths)
    if group_size <= 1 or n % group_size:
        return [[i] for i in range(n)]
    units: list[list[int]] = []
    for s in range(0, n, group_size):
        group = list(range(s, s + group_size))
        units += [group] if sum(lengths[i] for i in group) <= max_tokens else [[i] for i in group]
    return units


def micro_batches_needed(lengths: Sequence[int], max_tokens: int, group_size: int = 1) -> int:
    """The fewest micro-batches whose balanced partition keeps every one within ``max_tokens`` (a sample longer
    than the budget gets one of its own)."""
    units = _units(lengths, group_size, max_tokens)
    weights = [sum(lengths[i] for i in u) for u in units]
    k = max(1, math.ceil(sum(weights) / max_tokens))
    while k < len(units):
        loads = [sum(weights[u] for u in part) for part in lpt_partition(weights, k)]
        if max(loads) <= max_tokens:
            return k
        k += 1
    return max(1, len(units))


def balanced_micro_batches(lengths: Sequence[int], k: int, max_tokens: int, group_size: int = 1) -> list[list[int]]:
    """Exactly ``k`` micro-batches of sample indices with near-equal token sums (as verl's dynamic batch size
    does): whole prompt groups where there are at least ``k`` of them, else single samples; micro-batches in
    order of their first sample, empty ones (a rank with fewer samples than ``k``) last."""
    units = _units(lengths, group_size, max_tokens)
    if len(units) < k:
        units = [[i] for i in range(len(lengths))]
    weights = [sum(lengths[i] for i in u) for u in units]
    parts = [sorted(i for u in part for i in units[u]) for part in lpt_partition(weights, k)]
    return sorted(parts, key=lambda p: (not p, p[0] if p else 0))


def assign_groups(tokens: Sequence[float], owner: Sequence[int], minibatch: Sequence[int], world: int) -> list[int]:
    """The rank that trains each prompt group: within each mini-batch every rank keeps its number of groups
    (so every rank takes the same optimizer steps over the same samples as before) and the groups go heaviest
    first to the rank with the fewest tokens in that mini-batch.

    ``tokens[g]``: prompt + response tokens of group g's samples; ``owner[g]``: the rank that generated it;
    ``minibatch[g]``: its mini-batch of the step."""
    new = list(owner)
    for k in sorted(set(minibatch)):
        members = [g for g in range(len(tokens)) if minibatch[g] == k]
        capacity = [sum(owner[g] == r for g in members) for r in range(world)]
        parts = lpt_partition([tokens[g] for g in members], world, capacity)
        # parts of equal size may go to any of those ranks: give each the rank that already holds most of it, so
        # fewer groups travel (greedy, largest overlap first)
        pairs = sorted(((sum(owner[members[j]] == r for j in parts[b]), b, r) for b in range(world)
                        for r in range(world) if len(parts[b]) == capacity[r]), key=lambda x: (-x[0], x[1], x[2]))
        rank_of: dict[int, int] = {}
        for _, b, r in pairs:
            if b not in rank_of and r not in rank_of.values():
                rank_of[b] = r
        busiest_now = max(rank_loads(tokens, owner, members, world))
        if max(sum(tokens[members[j]] for j in part) for part in parts) >= busiest_now:
            continue  # no better than it was: nothing moves
        for b, part in enumerate(parts):
            for j in part:
                new[members[j]] = rank_of[b]
    return new


def rank_loads(tokens: Sequence[float], owner: Sequence[int], members: Sequence[int], world: int) -> list[float]:
    """Tokens each rank holds of the groups ``members``."""
    loads = [0.0] * world
    for g in members:
        loads[owner[g]] += tokens[g]
    return loads


def pace(tokens: Sequence[float], owner: Sequence[int], minibatch: Sequence[int], world: int) -> float:
    """How much the busiest rank holds the others up over a step's mini-batches: the sum over mini-batches of the
    busiest rank's tokens over the sum of the mean rank's (1 = balanced)."""
    busiest = mean = 0.0
    for k in sorted(set(minibatch)):
        loads = rank_loads(tokens, owner, [g for g in range(len(tokens)) if minibatch[g] == k], world)
        busiest += max(loads)
        mean += sum(loads) / world
    return busiest / max(mean, 1e-9)
