"""Token balancing: which rank trains which prompt group, and which samples share a micro-batch.

Every optimizer step is a collective, so the rank with the most tokens sets the pace of each mini-batch; and a
micro-batch's cost is its tokens. Both plans here are greedy longest-first partitions (LPT: the heaviest item
goes to the lightest part), over whole prompt groups wherever they fit, so the n samples of a prompt stay
together (one vision pass for its picture). The plans are pure functions of token counts; ``balance_step``
applies the rank plan to a step (the exchange) and hands the update its schedule of mini-batches.

Neither plan changes the maths of the first pass over a step's batch: the loss is normalised by global counts
(``mm_gmpo.update``), so the gradient of a mini-batch is the sum over its samples wherever they are computed, and
the rank plan keeps each mini-batch's set of groups (it only moves a group between ranks within its mini-batch).
With ``trainer.ppo_epochs`` > 1 the later passes split each rank's groups afresh (seeded), and a rank then holds
other groups than without balancing: their mini-batches are different random splits of the same batch, drawn
the same way, not the same sets. Runs with one pass (the default) are identical with balancing on or off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from mm_gmpo import distributed

if TYPE_CHECKING:
    from mm_gmpo.rollout.batch import Generated


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


def group_minibatches(n_samples: int, group_size: int, n_mini: int, seed: int) -> list[list[int]]:
    """Sample indices of ``n_mini`` mini-batches made of whole prompt groups, the groups in a seeded random order.

    The ``group_size`` samples of a prompt are adjacent in a batch. Keeping them in one mini-batch (as verl and
    EasyR1 do) means every update sees all samples of its prompts, and a prompt's image goes through the vision
    tower once per micro-batch rather than once per sample. With fewer groups than mini-batches (tiny runs on
    many ranks), samples are shuffled individually instead.
    """
    n_groups = n_samples // group_size if group_size > 0 and n_samples % group_size == 0 else 0
    g = torch.Generator().manual_seed(seed)
    if n_groups < n_mini:
        order = torch.randperm(n_samples, generator=g).tolist()
        return [order[k * n_samples // n_mini:(k + 1) * n_samples // n_mini] for k in range(n_mini)]
    perm = torch.randperm(n_groups, generator=g).tolist()
    return [[q * group_size + s for q in perm[k * n_groups // n_mini:(k + 1) * n_groups // n_mini]
             for s in range(group_size)] for k in range(n_mini)]


def update_schedule(n_samples: int, group_size: int, n_mini: int, ppo_epochs: int, step: int) -> list[list[int]]:
    """The mini-batches of one step, in order: ``ppo_epochs`` passes over the batch, each split afresh by
    :func:`group_minibatches` (the first pass with seed ``step``)."""
    return [part for epoch in range(ppo_epochs)
            for part in group_minibatches(n_samples, group_size, n_mini, seed=step + 1_000_003 * epoch)]


# ---------------------------------------------------------------- the rank-balancing step (collective)

BALANCE_TOLERANCE = 0.02  # moving groups costs an exchange: only when the busiest rank is this much above the mean


@dataclass
class Balanced:
    """The balancing step's hand-off: this rank's groups after the move, and the step's whole update schedule
    over them (the sample indices of each optimizer step's mini-batch, in order)."""

    gen: Generated
    schedule: list[list[int]]
    metrics: dict[str, float]


def _first_pass_plan(per_rank: list[list[float]], n: int, n_mini: int, step: int
                     ) -> tuple[list[int], list[int], list[float]] | None:
    """(owner rank, mini-batch, tokens) of every group of every rank in the schedule's first pass; None when the
    samples are shuffled one by one there (fewer groups than mini-batches): no group to move then."""
    owner, minibatch, flat = [], [], []
    for r, toks in enumerate(per_rank):
        mb: dict[int, set[int]] = {}
        for k, part in enumerate(group_minibatches(len(toks) * n, n, n_mini, seed=step)):
            for i in part:
                mb.setdefault(i // n, set()).add(k)
        if any(len(v) != 1 for v in mb.values()):
            return None
        owner += [r] * len(toks)
        minibatch += [mb[q].pop() for q in range(len(toks))]
        flat += toks
    return owner, minibatch, flat


def _exchange(gen: Generated, n: int, owner: list[int], new_owner: list[int], minibatch: list[int], start: int,
              me: int) -> tuple[Generated, list[list[int]]]:
    """Send the groups this rank gives away, receive those it takes; its groups in mini-batch order and the
    first pass over them. ``start``: the global index of this rank's first group."""
    def group(q: int) -> tuple:
        rewards = None if gen.rewards is None else gen.rewards[q * n:(q + 1) * n]
        return gen.prompts[q].for_training(), gen.rollouts[q * n:(q + 1) * n], rewards

    outgoing = {g: group(g - start) for g in range(start, start + len(gen.prompts)) if new_owner[g] != me}
    arriving = distributed.gather_dicts(outgoing)
    mine = sorted((g for g in range(len(owner)) if new_owner[g] == me), key=lambda g: (minibatch[g], g))
    groups = [group(g - start) if owner[g] == me else arriving[g] for g in mine]
    rollouts = [replace(x, prompt_index=p) for p, (_, rs, _) in enumerate(groups) for x in rs]
    rewards = None if gen.rewards is None else torch.cat([rw for _, _, rw in groups])
    first_pass = [[p * n + s for p, g in enumerate(mine) if minibatch[g] == k for s in range(n)]
                  for k in sorted(set(minibatch))]
    return replace(gen, prompts=[enc for enc, _, _ in groups], rollouts=rollouts, rewards=rewards), first_pass


def balance_step(gen: Generated, group_size: int, n_mini: int, ppo_epochs: int, step: int,
                 info: distributed.DistInfo, *, enabled: bool = True, uneven: bool = False) -> Balanced:
    """Owner of rank balancing and of the step's update schedule. Evens out the ranks' tokens (prompt + response)
    in every mini-batch of the first pass by moving prompt groups between ranks within their mini-batch
    (:func:`assign_groups`): each global mini-batch keeps its groups and each rank its number of groups, so the
    first pass's maths is unchanged and only the slowest rank's wait shrinks (later passes: see the module).
    ``uneven``: the ranks may hold different numbers of groups (online filtering when its rounds ran out short):
    every rank then takes as many optimizer steps, each at least a group.

    ``perf/rank_token_imbalance`` is the pace the ranks run at, the sum over mini-batches of the busiest rank's
    tokens over the sum of the mean rank's (1 = balanced); ``..._unbalanced`` the same without moving anything."""
    n = group_size
    if uneven:
        n_mini = min(n_mini, -int(distributed.all_reduce_max(-float(len(gen.prompts)), info.device)))
    schedule = update_schedule(len(gen.rollouts), n, n_mini, ppo_epochs, step)  # whole prompt groups
    tokens = [float(sum(len(x.prompt_ids) + len(x.response_ids) for x in gen.rollouts[q * n:(q + 1) * n]))
              for q in range(len(gen.prompts))]
    per_rank = distributed.all_gather_objects(tokens)
    plan = _first_pass_plan(per_rank, n, n_mini, step)
    if plan is None:
        return Balanced(gen, schedule, {})
    owner, minibatch, flat = plan
    before = pace(flat, owner, minibatch, info.world_size)
    new_owner = assign_groups(flat, owner, minibatch, info.world_size) if enabled else owner
    after = pace(flat, new_owner, minibatch, info.world_size)
    if before <= 1 + BALANCE_TOLERANCE or after >= before:
        new_owner, after = owner, before
    metrics = {"perf/rank_token_imbalance": after, "perf/rank_token_imbalance_unbalanced": before}
    if new_owner == owner:
        return Balanced(gen, schedule, metrics | {"perf/balance_moved_groups": 0.0})
    start = sum(len(t) for t in per_rank[:info.rank])
    gen, first_pass = _exchange(gen, n, owner, new_owner, minibatch, start, info.rank)
    moved = float(sum(a != b for a, b in zip(owner, new_owner, strict=True)))
    return Balanced(gen, first_pass + schedule[n_mini:], metrics | {"perf/balance_moved_groups": moved})
