"""Policy log-probs against a plain full-logits reference; batching helpers; optimizer schedule; checkpoint I/O."""

import math
from itertools import pairwise

import pytest
import torch

from mm_gmpo.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from mm_gmpo.data import geometry3k_prompts, load_geometry3k
from mm_gmpo.data.processing import encode_prompt, load_processor
from mm_gmpo.loss import gmpo_loss
from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
from mm_gmpo.optim import build_optimizer, build_scheduler
from mm_gmpo.policy import Policy, collate, split_by_token_budget
from mm_gmpo.update import UpdateBatch, policy_update

PAD = 151643


@pytest.fixture(scope="module")
def tiny():
    return build_model("tiny", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=0)


@pytest.fixture(scope="module")
def image_batch():
    proc = load_processor()
    ds = load_geometry3k(split="test").select(range(3))
    encs = [encode_prompt(p, proc, min_pixels=3136, max_pixels=50_000) for p in geometry3k_prompts(ds)]
    g = torch.Generator().manual_seed(0)
    resp = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (5, 12, 9)]
    return collate([e.input_ids for e in encs], resp, pad_id=PAD, pixel_values=[e.pixel_values for e in encs],
                   image_grid_thw=[e.image_grid_thw for e in encs])


def response_logits(model, b, *, mrope: bool = True):
    """(B, R, V) logits predicting the response tokens, from the model's own full forward.

    The model is called as with the processor's outputs, ``mm_token_type_ids`` included (1 on image tokens): that
    is how transformers learns which tokens get multimodal RoPE positions. ``mrope=False`` leaves it out.
    """
    mm = {"mm_token_type_ids": (b.input_ids == 151655).int()} if mrope else {}
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, pixel_values=b.image_pixels(),
                   image_grid_thw=b.image_grid_thw, **mm).logits
    P = b.input_ids.shape[1] - b.response_width
    return logits[:, P - 1:P - 1 + b.response_width]


def reference_logprobs(model, b, *, mrope: bool = True):
    """The naive way: full (B, L, V) logits, log_softmax in float64, gather."""
    with torch.no_grad():
        logits = response_logits(model, b, mrope=mrope).double()
    P = b.input_ids.shape[1] - b.response_width
    lp = torch.log_softmax(logits, -1).gather(-1, b.input_ids[:, P:, None]).squeeze(-1)
    return lp * b.response_mask, torch.distributions.Categorical(logits=logits).entropy()


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_logprobs_match_full_logits_reference(tiny, image_batch, chunk):
    lp, ent = Policy(tiny, chunk_size=chunk)(image_batch, with_entropy=True)
    ref, ref_ent = reference_logprobs(tiny, image_batch)
    assert lp.shape == image_batch.response_mask.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref, rtol=0, atol=5e-6)
    mask = image_batch.response_mask.bool()
    torch.testing.assert_close(ent.double()[mask], ref_ent[mask], rtol=0, atol=5e-6)
    assert torch.all(lp[~mask] == 0)


def test_multimodal_rope_positions_as_the_processor_and_model_compute_them(tiny, image_batch):
    """Image tokens get (t, h, w) positions and text after an image continues from its largest side, exactly as
    transformers computes them from the processor's mm_token_type_ids; 1-D positions would give other log-probs."""
    proc = load_processor()
    pos = Policy(tiny).position_ids(image_batch)
    assert pos.shape == (3, *image_batch.input_ids.shape)
    # the processor's own token types (not our image-pad test) give the same positions, row by row
    prompts = geometry3k_prompts(load_geometry3k(split="test").select(range(3)))
    for i, prompt in enumerate(prompts):
        enc = encode_prompt(prompt, proc, min_pixels=3136, max_pixels=50_000)
        out = proc(text=[enc.text], images=enc.images, return_tensors="pt")
        ref, _ = tiny.model.get_rope_index(out["input_ids"], mm_token_type_ids=out["mm_token_type_ids"],
                                           image_grid_thw=out["image_grid_thw"])
        keep = image_batch.attention_mask[i].bool()
        n = out["input_ids"].shape[1]
        assert torch.equal(pos[:, i, keep][:, :n], ref[:, 0])
        img = out["input_ids"][0] == 151655
        assert len(set(pos[1, i, keep][:n][img].tolist())) > 1  # height positions vary across the image
    ref1d, _ = reference_logprobs(tiny, image_batch, mrope=False)
    ref, _ = reference_logprobs(tiny, image_batch)
    assert (ref - ref1d).abs().max() > 1e-4  # the tests above would see 1-D positions


@pytest.mark.parametrize("with_grad", [False, True])
def test_packed_layout_equals_padded(image_batch, with_grad):
    """One padding-free row (position ids restart per sequence) gives the padded batch's log-probs, entropies and
    gradients: no token attends across sequences and every image keeps its multimodal positions."""
    from dataclasses import replace

    m64 = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float64, seed=0)
    b = replace(image_batch, pixel_values=image_batch.pixel_values.double())
    w = torch.randn(b.response_mask.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = []
    for packed in (False, True):
        m64.zero_grad()
        with torch.set_grad_enabled(with_grad):
            lp, ent = Policy(m64, chunk_size=5, packed=packed)(b, with_entropy=True)
            if with_grad:
                (lp.double() * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in m64.named_parameters() if p.grad is not None}
        outs.append((lp.detach(), ent.detach(), grads))
    (lp0, ent0, g0), (lp1, ent1, g1) = outs
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-6)
    torch.testing.assert_close(ent1, ent0, rtol=0, atol=1e-6)
    ref, _ = reference_logprobs(m64, b)
    torch.testing.assert_close(lp1.double(), ref, rtol=0, atol=5e-6)
    if with_grad:
        assert set(g0) == set(g1) and len(g0) > 50
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


def test_packed_layout_text_only_lm():
    """A text-only causal LM (Qwen2, as Qwen2.5-Math) packs the same way, with 1-D positions."""
    from mm_gmpo.models import model_config

    cfg = model_config({"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
                        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1})
    m = build_model("t", random_init=True, config=cfg, dtype=torch.float64, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (7, 3, 11)]
    resp = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (4, 9, 1)]
    b = collate(prompts, resp, pad_id=0)
    with torch.no_grad():
        padded, _ = Policy(m)(b)
        packed, _ = Policy(m, packed=True)(b)
        alone = [Policy(m)(collate([p], [r], pad_id=0))[0][0] for p, r in zip(prompts, resp, strict=True)]
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-9)
    for i, a in enumerate(alone):  # left padding does not change a sequence's log-probs
        torch.testing.assert_close(padded[i, :a.shape[0]], a, rtol=0, atol=1e-9)


def test_pack_rows_indices():
    from mm_gmpo.policy import pack_rows

    b = collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    seq_pos, at = pack_rows(b.attention_mask, b.response_mask)
    # packed row: 1 2 3 5 6 | 4 7 8 9
    assert seq_pos.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    packed = b.input_ids[b.attention_mask.bool()]
    assert packed.tolist() == [1, 2, 3, 5, 6, 4, 7, 8, 9]
    assert packed[at + 1].tolist() == [5, 6, 7, 8, 9] and at.tolist() == [2, 3, 5, 6, 7]


def test_logprob_gradients_match_reference(image_batch):
    """Chunked + checkpointed log-prob gradients equal autograd through full logits (float64 model)."""
    from dataclasses import replace

    m64 = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float64, seed=0)
    b = replace(image_batch, pixel_values=image_batch.pixel_values.double())
    w = torch.randn(b.response_mask.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (Policy(m64, chunk_size=5)(b)[0].double() * w).sum().backward()
    g_chunked = {n: p.grad.clone() for n, p in m64.named_parameters() if p.grad is not None}
    m64.zero_grad()
    P = b.input_ids.shape[1] - b.response_width
    lp = torch.log_softmax(response_logits(m64, b), -1).gather(-1, b.input_ids[:, P:, None]).squeeze(-1)
    (lp * b.response_mask * w).sum().backward()
    n_checked = 0
    for n, p in m64.named_parameters():
        if p.grad is not None:
            # the chunked path computes logits in float32 (as on GPU); everything else is float64
            torch.testing.assert_close(g_chunked[n], p.grad, rtol=1e-5, atol=1e-7)
            n_checked += 1
    assert n_checked == len(g_chunked) > 50


def test_allowed_token_ids_score_the_restricted_distribution(tiny, image_batch):
    """With allowed_token_ids the policy is the softmax over those rows only (what a restricted sampler draws)."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(3)
    allowed = [7, 1151, 13250, 151000, 99]
    R = image_batch.response_width
    P = image_batch.input_ids.shape[1] - R
    choice = torch.tensor(allowed)[torch.randint(0, len(allowed), (3, R), generator=g)]
    ids = image_batch.input_ids.clone()
    ids[:, P:] = torch.where(image_batch.response_mask.bool(), choice, ids[:, P:])
    b = replace(image_batch, input_ids=ids)
    lp, ent = Policy(tiny, chunk_size=4)(b, with_entropy=True, temperature=0.7, allowed_token_ids=allowed)
    with torch.no_grad():
        logits = response_logits(tiny, b).double() / 0.7
    sub = torch.log_softmax(logits[..., sorted(allowed)], -1)
    pos = torch.searchsorted(torch.tensor(sorted(allowed)), b.input_ids[:, P:])
    ref = sub.gather(-1, pos.clamp(max=len(allowed) - 1)[..., None]).squeeze(-1)
    mask = b.response_mask.bool()
    torch.testing.assert_close(lp.double()[mask], ref[mask], rtol=0, atol=5e-6)
    ref_ent = -(sub.exp() * sub).sum(-1)
    torch.testing.assert_close(ent.double()[mask], ref_ent[mask], rtol=0, atol=5e-6)
    assert lp[mask].exp().max() < 1 and lp[mask].min() > math.log(1e-3)  # 5-way, not 152k-way
    with pytest.raises(ValueError, match="not in allowed_token_ids"):
        Policy(tiny)(b, allowed_token_ids=allowed[:2])


def test_select_slices_images_and_trims(tiny, image_batch):
    pol = Policy(tiny)
    with torch.no_grad():
        full, _ = pol(image_batch)
        sub_b = image_batch.select([2, 0])
        sub, _ = pol(sub_b)
    assert sub_b.input_ids.shape[1] < image_batch.input_ids.shape[1]  # padding trimmed
    assert sub_b.image_grid_thw.tolist() == image_batch.image_grid_thw[[2, 0]].tolist()
    torch.testing.assert_close(sub, full[[2, 0], :sub.shape[1]], rtol=0, atol=1e-5)


def test_collate_layout():
    b = collate([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 5, 6, 0], [0, 0, 4, 7, 8, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b.n_tokens() == 9  # 3 + 2 real tokens, 1 + 3 real tokens


def test_split_by_token_budget():
    lengths = [10, 50, 20, 45, 5, 100]
    groups = split_by_token_budget(lengths, 100)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert len(g) == 1 or max(lengths[i] for i in g) * len(g) <= 100
    assert [5] in groups  # longer than... exactly the budget: alone
    assert len(split_by_token_budget([60, 10, 10, 10, 10], 100)) == 2  # 60 x 2 > 100


@pytest.mark.parametrize("packed", [False, True])
def test_samples_of_one_image_share_one_vision_pass(image_batch, packed):
    """Samples given the same pixel tensor (a prompt's n samples) get one key per image; the vision tower then sees
    each picture once per forward, and log-probs, entropies and gradients equal those of separate copies."""
    from mm_gmpo.data import geometry3k_prompts, load_geometry3k
    from mm_gmpo.data.processing import encode_prompt, load_processor

    proc = load_processor()
    e0, e1 = [encode_prompt(p, proc, min_pixels=3136, max_pixels=50_000)
              for p in geometry3k_prompts(load_geometry3k(split="test").select(range(2)))]
    g = torch.Generator().manual_seed(0)
    order = [e0, e0, e1, e0]  # prompt 0 sampled three times, prompt 1 once
    resp = [torch.randint(0, 151000, (n,), generator=g).tolist() for n in (5, 12, 9, 7)]
    pv0, pv1 = e0.pixel_values.double(), e1.pixel_values.double()

    def batch(shared: bool):
        pvs = [pv0, pv0, pv1, pv0] if shared else [pv0.clone(), pv0.clone(), pv1, pv0.clone()]
        return collate([e.input_ids for e in order], resp, pad_id=PAD, pixel_values=pvs,
                       image_grid_thw=[e.image_grid_thw for e in order])

    shared, copies = batch(True), batch(False)
    assert shared.image_keys == [0, 0, 1, 0] and copies.image_keys == [0, 1, 2, 3]
    assert shared.pixel_values.shape[0] == pv0.shape[0] + pv1.shape[0]  # each picture held once
    sub = shared.select([1, 2, 3])
    assert sub.image_keys == [0, 1, 0] and torch.equal(sub.pixel_values, torch.cat([pv0, pv1]))
    assert torch.equal(shared.image_pixels(), torch.cat([pv0, pv0, pv1, pv0]))
    m64 = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float64, seed=0)
    seen = []
    m64.model.visual.patch_embed.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    w = torch.randn(shared.response_mask.shape, generator=g, dtype=torch.float64)
    outs = []
    for b in (copies, shared):
        m64.zero_grad()
        seen.clear()
        policy = Policy(m64, chunk_size=5, packed=packed)
        lp, ent = policy(b, with_entropy=True)
        (lp.double() * w).sum().backward()
        assert policy.vision_patches == sum(seen)  # the count FLOP accounting uses
        outs.append((lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in m64.named_parameters()
                                                 if p.grad is not None}, sum(seen)))
    (lp0, ent0, g0, patches0), (lp1, ent1, g1, patches1) = outs
    n0, n1 = (int(x.image_grid_thw.prod(-1).sum()) for x in (e0, e1))
    assert patches0 == 3 * n0 + n1 and patches1 == n0 + n1
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-6)
    torch.testing.assert_close(ent1, ent0, rtol=0, atol=1e-6)
    assert set(g1) == set(g0) and any("visual" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)  # logits are fp32 (as on GPU)


def test_scheduler_shapes():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sch = build_scheduler(opt, schedule="cosine", warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] < 0.2 and all(a >= b for a, b in pairwise(lrs[1:]))
    with pytest.raises(ValueError, match="constant' or 'cosine"):
        build_scheduler(opt, schedule="linear", warmup_steps=0, total_steps=1)


def test_update_micro_batch_split_does_not_change_the_gradient(tiny, image_batch):
    """Global normalisation: one micro-batch or one per sample gives the same gradient (single process)."""
    old = (-11.93 + 0.3 * torch.randn(image_batch.response_mask.shape, generator=torch.Generator().manual_seed(2)))
    data = UpdateBatch(image_batch, old * image_batch.response_mask, torch.tensor([1.0, -1.0, 0.5]))
    grads = []
    for budget in (10**6, 1):
        opt = torch.optim.SGD(tiny.parameters(), lr=0.0)  # lr 0: only look at the gradient
        m = policy_update(Policy(tiny), opt, data, gmpo_loss, max_tokens_per_micro_batch=budget, max_grad_norm=0,
                          keep_grads=True)
        grads.append({n: p.grad.clone() for n, p in tiny.named_parameters() if p.grad is not None})
        assert m["actor/micro_batches"] == (1 if budget > 1 else 3)
        assert math.isfinite(m["loss/total"]) and m["actor/grad_norm"] > 0
    # per-tensor relative error: fp32 summation order differs between splits; a normalisation bug would be O(1)
    rel = max(((grads[0][n] - grads[1][n]).norm() / grads[0][n].norm().clamp(min=1e-30)).item() for n in grads[0])
    assert rel < 1e-4
    # by default the gradients are freed after the step (they would hold memory through the next rollout)
    policy_update(Policy(tiny), torch.optim.SGD(tiny.parameters(), lr=0.0), data, gmpo_loss, max_grad_norm=0)
    assert all(p.grad is None for p in tiny.parameters())


def test_single_process_checkpoint_roundtrip(tmp_path, image_batch):
    model = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=3)
    pol = Policy(model)
    opt = build_optimizer(pol, lr=1e-3)
    sch = build_scheduler(opt, schedule="cosine", warmup_steps=1, total_steps=5)
    old = -11.93 * image_batch.response_mask
    data = UpdateBatch(image_batch, old, torch.tensor([1.0, -1.0, 0.5]))
    policy_update(pol, opt, data, gmpo_loss)
    sch.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, pol, opt, sch, TrainerState(step=step, data_position={"index": 8 * step}),
                        keep_last=2)
    assert [p.name for p in sorted(tmp_path.glob("step_*"))] == ["step_00000002", "step_00000003"]
    expected_next = torch.rand(3)
    # a fresh model + optimizer restores to the saved state
    model2 = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=4)
    pol2 = Policy(model2)
    opt2 = build_optimizer(pol2, lr=1e-3)
    sch2 = build_scheduler(opt2, schedule="cosine", warmup_steps=1, total_steps=5)
    torch.manual_seed(999)
    state = load_checkpoint(latest_checkpoint(tmp_path), pol2, opt2, sch2)
    assert state.step == 3 and state.data_position == {"index": 24}
    assert torch.equal(torch.rand(3), expected_next)  # RNG as it was at save time
    for (n, a), (_, b) in zip(pol.state_dict().items(), pol2.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert len(s1) == len(s2) > 0
    for k in s1:
        assert torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"])
    assert sch2.last_epoch == sch.last_epoch


def run_script(src: str, *, timeout: int = 300, threads: int = 1) -> dict:
    """Run ``src`` in a fresh Python (FSDP2 needs a process group of its own) and return the JSON of its last line."""
    import json
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


_FSDP_OPTIONS = r"""
import json, sys, torch
from mm_gmpo import distributed
from mm_gmpo.loss import gmpo_loss
from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
from mm_gmpo.policy import Policy, collate
from mm_gmpo.optim import build_optimizer
from mm_gmpo.update import UpdateBatch, policy_update

def run(**opts):
    m = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32, seed=5)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    pol = Policy(m)
    distributed.parallelize(pol, param_dtype=None, activation_checkpointing=True, **opts)
    opt = build_optimizer(pol, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    pv = torch.randn(16, 1176, generator=g)
    ids = [151644, 151652] + [151655] * 4 + [151653, 9707]
    b = collate([ids, ids], [[1, 2, 3], [4, 5]], pad_id=151643, pixel_values=[pv, pv],
                image_grid_thw=[torch.tensor([[1, 4, 4]])] * 2)
    data = UpdateBatch(b, torch.full(b.response_mask.shape, -11.9), torch.tensor([1.0, -1.0]))
    policy_update(pol, opt, data, gmpo_loss)
    after = distributed.full_model_state_dict(pol)
    changed = {n: not torch.equal(before[n], after[n].to(before[n].device)) for n in before}
    return changed, after

frozen, _ = run(freeze_vision=True)
plain_changed, plain = run()
if torch.cuda.is_available():
    offload_changed, offload = run(cpu_offload=True)
    diff = max((plain[n] - offload[n]).abs().max().item() for n in plain)
else:
    try:
        run(cpu_offload=True)
        diff = "no error"
    except ValueError as e:
        diff = str(e)
vis = [n for n in frozen if ".visual." in n]
print(json.dumps({"vision_changed_when_frozen": sum(frozen[n] for n in vis), "n_vision": len(vis),
                  "text_changed_when_frozen": sum(v for n, v in frozen.items() if n not in vis),
                  "n_text": len(frozen) - len(vis), "all_changed_plain": all(plain_changed.values()),
                  "offload_vs_plain_max_diff": diff}))
"""


@pytest.mark.slow
def test_freeze_vision_and_cpu_offload_options():
    """FSDP2 options (one process): a frozen vision tower does not move, the rest does; CPU offload gives the
    same update as no offload on a GPU machine and a clear refusal on a CPU-only one."""
    out = run_script(_FSDP_OPTIONS)
    assert out["n_vision"] > 10 and out["vision_changed_when_frozen"] == 0
    assert out["text_changed_when_frozen"] == out["n_text"]
    assert out["all_changed_plain"]
    if torch.cuda.is_available():
        assert out["offload_vs_plain_max_diff"] < 1e-6
    else:  # FSDP2 offload computes on a GPU; without one the option is refused with the fix
        assert "no CUDA device, so set trainer.cpu_offload=false" in out["offload_vs_plain_max_diff"]


_SELECTIVE_AC = r"""
import json, torch
from transformers.modeling_layers import GradientCheckpointingLayer
from mm_gmpo import distributed
from mm_gmpo.models import build_model, tiny_qwen2_5_vl_config
from mm_gmpo.policy import Policy, collate

def grads(ac, every):
    cfg = tiny_qwen2_5_vl_config(layers=4, vision_depth=4)
    m = build_model("t", random_init=True, config=cfg, dtype=torch.float64, seed=3)
    pol = Policy(m)
    distributed.parallelize(pol, param_dtype=None, reduce_dtype=None, activation_checkpointing=ac,
                            checkpoint_every=every)
    calls = {}
    mods = [x for x in m.modules() if isinstance(x, GradientCheckpointingLayer)]  # vision blocks, then layers
    assert mods == [*distributed._vision_blocks(m), *distributed._decoder_layers(m)]
    for i, layer in enumerate(mods):  # the MLP runs inside the layer: twice where the layer is recomputed
        def counted(*a, i=i, f=layer.mlp.forward, **k):  # (module hooks do not fire in the recompute)
            calls[i] = calls.get(i, 0) + 1
            return f(*a, **k)
        layer.mlp.forward = counted
    g = torch.Generator().manual_seed(0)
    pv = torch.randn(16, 1176, generator=g, dtype=torch.float64)
    ids = [151644, 151652] + [151655] * 4 + [151653, 9707]
    b = collate([ids, ids], [[1, 2, 3], [4, 5]], pad_id=151643, pixel_values=[pv, pv],
                image_grid_thw=[torch.tensor([[1, 4, 4]])] * 2)
    pol.train()
    lp, _ = pol(b)
    (lp * torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, 0.0]], dtype=torch.float64)).sum().backward()
    out = {n: p.grad.full_tensor() for n, p in pol.named_parameters() if p.grad is not None}
    return out, [calls.get(i, 0) for i in range(len(mods))]

ref, ref_calls = grads(False, 1)
res = {"none": ref_calls}
for every in (1, 2, 3):
    gr, calls = grads(True, every)
    assert gr.keys() == ref.keys()
    diff = max((gr[n] - ref[n]).abs().max().item() for n in ref)
    res[str(every)] = calls
    res[f"diff{every}"] = diff
try:
    grads(True, 0)
except ValueError as e:
    res["zero"] = str(e)
print(json.dumps(res))
"""


@pytest.mark.slow
def test_selective_activation_checkpointing_recomputes_every_kth_layer():
    """checkpoint_every=k recomputes layers 0, k, 2k, ... of the vision blocks and decoder layers counted together
    (their MLP runs twice) and keeps the others' activations; the gradients equal those without checkpointing in
    float64 whatever k."""
    out = run_script(_SELECTIVE_AC)
    assert out["none"] == [1] * 8  # 4 vision blocks, then 4 decoder layers, counted together
    for k in (1, 2, 3):
        assert out[str(k)] == [2 if i % k == 0 else 1 for i in range(8)], k
        assert out[f"diff{k}"] < 1e-12, (k, out[f"diff{k}"])
    assert "checkpoint_every=0" in out["zero"]


_COMPILED = r"""
import json, torch
from torch._dynamo.utils import counters
from mm_gmpo import distributed
from mm_gmpo.models import build_model, compile_blocks, tiny_qwen2_5_vl_config
from mm_gmpo.policy import Policy, collate

def run(compiled):
    m = build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float64, seed=3)
    n = compile_blocks(m) if compiled else 0
    pol = Policy(m, packed=True)
    distributed.parallelize(pol, param_dtype=None, reduce_dtype=None, activation_checkpointing=True)
    pol.train()
    g = torch.Generator().manual_seed(0)
    pv = torch.randn(16, 1176, generator=g, dtype=torch.float64)
    ids = [151644, 151652] + [151655] * 4 + [151653, 9707]
    lps, graphs = [], []
    for resp in ([[1, 2, 3], [4, 5]], [[1, 2, 3, 7, 8, 9], [4, 5, 6, 10]]):  # two token counts
        b = collate([ids, ids], resp, pad_id=151643, pixel_values=[pv, pv],
                    image_grid_thw=[torch.tensor([[1, 4, 4]])] * 2)
        lp, _ = pol(b)
        (lp * torch.linspace(-1, 1, lp.numel(), dtype=torch.float64).view_as(lp)).sum().backward()
        lps.append(lp.detach())
        graphs.append(counters["stats"]["unique_graphs"])
    grads = {k: p.grad.full_tensor() for k, p in pol.named_parameters() if p.grad is not None}
    return n, lps, grads, graphs

n0, lp0, g0, _ = run(False)
n1, lp1, g1, graphs = run(True)
print(json.dumps({"compiled": n1, "lp_diff": max((a - b).abs().max().item() for a, b in zip(lp0, lp1)),
                  "grad_diff": max(((g0[k] - g1[k]).norm() / g0[k].norm().clamp_min(1e-30)).item() for k in g0), "same_keys": g0.keys() == g1.keys(),
                  "graphs": graphs}))
"""


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    """compile_blocks (model.compile): the MLPs and norms of the 2 layers and 2 vision blocks of the tiny model
    compile without graph breaks, a second token count does not recompile, and log-probs and gradients under FSDP2 +
    activation checkpointing equal eager ones (float64 model) to float32 rounding."""
    out = run_script(_COMPILED, timeout=600, threads=2)
    assert out["compiled"] == 2 * 3 + 2 * 3  # mlp + 2 norms per layer and per block
    # transformers' RMSNorm computes in float32 whatever the model's dtype, so the two differ at float32 rounding
    # (the fused kernel sums in another order), not at float64's
    assert out["same_keys"] and out["lp_diff"] < 1e-5 and out["grad_diff"] < 1e-5, out
    assert out["graphs"][0] > 0 and out["graphs"][1] == out["graphs"][0], out  # no recompile for a new length


def test_group_minibatches_keep_prompt_groups_whole():
    from mm_gmpo.balance import group_minibatches

    parts = group_minibatches(24, 4, 3, seed=7)  # 6 prompts x 4 samples, 3 updates of 2 prompts each
    assert sorted(i for p in parts for i in p) == list(range(24))
    for p in parts:
        assert len(p) == 8 and {i // 4 for i in p} == {i // 4 for i in p[::4]}  # whole groups, adjacent
        assert all(p[j:j + 4] == list(range(p[j], p[j] + 4)) for j in range(0, 8, 4))
    assert group_minibatches(24, 4, 3, seed=7) == parts and group_minibatches(24, 4, 3, seed=8) != parts
    few = group_minibatches(4, 4, 2, seed=0)  # one prompt, two updates: samples are split instead
    assert sorted(i for p in few for i in p) == [0, 1, 2, 3] and [len(p) for p in few] == [2, 2]


def test_training_flops_count_each_matmul_parameter_once():
    """6 x params x inputs: LM parameters over tokens (a tied embedding once, an untied input embedding not at
    all: it is a lookup), vision parameters over the patches encoded."""
    from mm_gmpo.metrics import training_flops
    from mm_gmpo.models import model_config

    vl = Policy(build_model("t", random_init=True, config=tiny_qwen2_5_vl_config(), dtype=torch.float32))
    n_vis = sum(p.numel() for n, p in vl.named_parameters() if ".visual." in n)
    n_all = sum(p.numel() for p in vl.parameters())
    assert vl.model.config.tie_word_embeddings and n_vis > 0
    assert training_flops(vl, 10, 4) == 6 * (n_all - n_vis) * 10 + 6 * n_vis * 4
    cfg = model_config({"model_type": "qwen2", "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                        "tie_word_embeddings": False})
    lm = Policy(build_model("t", random_init=True, config=cfg, dtype=torch.float32))
    n_all = sum(p.numel() for p in lm.parameters())
    assert training_flops(lm, 10, 0) == 6 * (n_all - 1000 * 32) * 10


def test_update_schedule_splits_each_ppo_epoch_afresh():
    from mm_gmpo.balance import group_minibatches, update_schedule

    one = update_schedule(24, 4, 3, 1, step=5)
    assert one == group_minibatches(24, 4, 3, seed=5)  # one pass: the same split as before
    two = update_schedule(24, 4, 3, 2, step=5)
    assert two[:3] == one and len(two) == 6 and two[3:] != one
    assert sorted(i for p in two[3:] for i in p) == list(range(24))


def test_pixels_held_once_per_picture_through_select():
    """Two samples of one prompt share its picture (one key): the batch holds one copy (a copy per sample would
    be two); a sub-batch of whole groups is a view of it, one that mixes groups gathers each picture once."""
    from mm_gmpo.policy import collate

    pa, pb = torch.arange(16 * 1176.0).view(16, 1176), -torch.arange(4 * 1176.0).view(4, 1176)
    grid_a, grid_b = torch.tensor([[1, 4, 4]]), torch.tensor([[1, 2, 2]])
    batch = collate([[1, 151655, 2]] * 2 + [[3]] + [[7, 151655]] * 2, [[4], [5], [6], [8], [9]], pad_id=0,
                    pixel_values=[pa, pa, None, pb, pb], image_grid_thw=[grid_a, grid_a, None, grid_b, grid_b])
    assert batch.pixel_bytes() == (20 * 1176 * 4, 40 * 1176 * 4)
    assert batch.image_keys == [0, 0, 1, 1] and batch.patch_bounds() == [0, 16, 20]
    group = batch.select([3, 4])
    assert group.image_keys == [0, 0] and torch.equal(group.pixel_values, pb)
    assert group.pixel_values.data_ptr() == batch.pixel_values[16:].data_ptr()  # a view, no copy
    mixed = batch.select([4, 2, 0, 1])
    assert mixed.image_keys == [0, 1, 1] and mixed.images_per_sample == [1, 0, 1, 1]
    assert torch.equal(mixed.pixel_values, torch.cat([pb, pa]))
    assert torch.equal(mixed.image_grid_thw, torch.cat([grid_b, grid_a, grid_a]))
    assert torch.equal(mixed.image_pixels(), torch.cat([pb, pa, pa]))
    assert batch.select([2]).pixel_values is None
    assert collate([[1]], [[2]], pad_id=0).pixel_bytes() == (0, 0)

