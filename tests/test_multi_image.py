"""Several images per prompt, end to end on the tiny model of every family (Qwen2.5-VL, Qwen2-VL, Qwen3-VL dense and
MoE, each with its own bundled processor): the policy's log-probs equal the model's own forward on the processor's
output, packed equals padded equals each sample alone for mixed 0/1/3-image batches, a picture shared by two
prompts is encoded once, and after a weight sync the HF engine agrees with the trainer."""

import random

import pytest
import torch

from mm_gmpo.data.processing import encode_prompt, load_processor
from mm_gmpo.data.prompts import Prompt
from mm_gmpo.data.synthetic import COLORS, SHAPES, draw
from mm_gmpo.families import TINY_MODELS
from mm_gmpo.models import build_model, processor_source, random_model_config
from mm_gmpo.policy import Policy, collate

FAMILIES = list(TINY_MODELS)  # tiny-random (Qwen2.5-VL), tiny-random-qwen2-vl, -qwen3-vl, -qwen3-vl-moe
# where a check has nothing family-specific beyond what Qwen3-VL (DeepStack) exercises, the other new families run
# it in the slow tier (the fast tier stays within its time budget)
SLOW = pytest.mark.slow
SOME = ["tiny-random", pytest.param("tiny-random-qwen2-vl", marks=SLOW), "tiny-random-qwen3-vl",
        pytest.param("tiny-random-qwen3-vl-moe", marks=SLOW)]

PAD = 151643
IMAGE_PAD = 151655
PIX = {"min_pixels": 3136, "max_pixels": 20_000}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def processor(family):
    return load_processor(processor_source(family))  # cached per folder


def tiny(family: str, dtype: torch.dtype, seed: int = 0):
    return build_model("t", random_init=True, config=random_model_config(family), dtype=dtype, seed=seed)


def pictures(n: int, seed: int) -> list:
    rng = random.Random(seed)
    return [draw(rng.choice(list(COLORS)), rng.choice(SHAPES), rng, size=rng.choice((56, 84))) for _ in range(n)]


def prompt(images: list, idx: int) -> Prompt:
    """Images interleaved with text (the <image> placement of data.dataset=files)."""
    content: list[dict] = [{"type": "text", "text": f"Problem {idx}."}]
    for k in range(len(images)):
        content += [{"type": "text", "text": f" Picture {k + 1}:"}, {"type": "image"}]
    content.append({"type": "text", "text": " Which colours?"})
    return Prompt(id=f"t/{idx}", task="exact", messages=[{"role": "user", "content": content if images else
                                                          f"Problem {idx}. No picture."}],
                  images=images, ground_truth="red")


def encoded(processor, counts: list[int], seed: int = 0):
    imgs = pictures(sum(counts), seed)
    out, k = [], 0
    for i, c in enumerate(counts):
        out.append(encode_prompt(prompt(imgs[k:k + c], i), processor, **PIX))
        k += c
    return out


def responses(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 151000, (int(x),), generator=g).tolist() for x in torch.randint(3, 12, (n,), generator=g)]


def batch_of(encs, resp, dtype=torch.float32):
    return collate([e.input_ids for e in encs], resp, pad_id=PAD,
                   pixel_values=[None if e.pixel_values is None else e.pixel_values.to(dtype) for e in encs],
                   image_grid_thw=[e.image_grid_thw for e in encs], image_ids=[e.image_keys for e in encs])


@pytest.mark.parametrize(("family", "n_images"), [("tiny-random", 2), *(
    pytest.param(*f.values, 3, marks=f.marks) if hasattr(f, "values") else (f, 3) for f in SOME)])
def test_logprobs_equal_the_models_own_forward_on_the_processor_output(family, processor, n_images):
    """Reference: the processor's own input_ids / pixel_values / image_grid_thw / mm_token_type_ids, response
    appended, through the transformers model's forward (its own M-RoPE from mm_token_type_ids), all in float64."""
    model = tiny(family, torch.float64, 0)
    (enc,) = encoded(processor, [n_images], seed=n_images)
    (resp,) = responses(1, seed=n_images)
    # the images as resized once for the trainer and the engine (the processor must not resize them again)
    out = processor(text=[enc.text], images=enc.images, return_tensors="pt", do_resize=False)
    assert out["input_ids"][0].tolist() == enc.input_ids and out["image_grid_thw"].shape[0] == n_images
    ids = torch.cat([out["input_ids"], torch.tensor([resp])], 1)
    mm = torch.cat([out["mm_token_type_ids"], torch.zeros(1, len(resp), dtype=out["mm_token_type_ids"].dtype)], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=out["pixel_values"].double(),
                       image_grid_thw=out["image_grid_thw"], mm_token_type_ids=mm).logits
        P = out["input_ids"].shape[1]
        ref = torch.log_softmax(logits[0, P - 1:-1].double(), -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]
        lp, _ = Policy(model)(batch_of([enc], [resp], torch.float64))
    torch.testing.assert_close(lp[0].double(), ref, rtol=1e-6, atol=1e-6)  # the policy's logits are fp32 by design
    # a 1-D-position forward (every token typed as text) is measurably different: the check above sees M-RoPE
    with torch.no_grad():
        flat = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=out["pixel_values"].double(),
                     image_grid_thw=out["image_grid_thw"], mm_token_type_ids=torch.zeros_like(mm)).logits
    ref1d = torch.log_softmax(flat[0, P - 1:-1].double(), -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]
    assert (ref1d - ref).abs().max() > 1e-4


@pytest.mark.parametrize(("family", "with_grad"), [
    pytest.param(*f.values, grad, marks=f.marks) if hasattr(f, "values") else (f, grad) for f in SOME
    for grad in (True, False)])
def test_mixed_0_1_3_image_batch_packed_equals_padded_and_each_alone(family, processor, with_grad):
    m64 = tiny(family, torch.float64, 0)
    encs = encoded(processor, [0, 1, 3, 0, 3, 1], seed=7)
    resp = responses(len(encs), seed=1)
    b = batch_of(encs, resp, torch.float64)
    assert b.images_per_sample == [0, 1, 3, 0, 3, 1] and b.image_grid_thw.shape[0] == 8
    w = torch.randn(b.response_mask.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    outs = []
    for packed in (False, True):
        m64.zero_grad()
        with torch.set_grad_enabled(with_grad):
            lp, ent = Policy(m64, chunk_size=7, packed=packed)(b, with_entropy=True)
            if with_grad:
                (lp.double() * w).sum().backward()
        outs.append((lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in m64.named_parameters()
                                                 if p.grad is not None}))
    (lp0, ent0, g0), (lp1, ent1, g1) = outs
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-6)
    torch.testing.assert_close(ent1, ent0, rtol=0, atol=1e-6)
    if with_grad:
        assert set(g0) == set(g1) and any("visual" in n for n in g0)
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)
    else:  # every sample alone (no padding, no neighbours) gives the same log-probs
        with torch.no_grad():
            for i, (e, r) in enumerate(zip(encs, resp, strict=True)):
                alone, _ = Policy(m64)(batch_of([e], [r], torch.float64))
                torch.testing.assert_close(lp0[i, :len(r)], alone[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["tiny-random"])
def test_select_keeps_each_samples_images(processor):
    encs = encoded(processor, [3, 0, 1, 2], seed=3)
    b = batch_of(encs, responses(4))
    sub = b.select([2, 0])
    assert sub.images_per_sample == [1, 3]
    assert torch.equal(sub.image_grid_thw, torch.cat([encs[2].image_grid_thw, encs[0].image_grid_thw]))
    assert torch.equal(sub.pixel_values, torch.cat([encs[2].pixel_values, encs[0].pixel_values]))
    assert b.select([1]).pixel_values is None


@pytest.mark.parametrize(("family", "packed"), [("tiny-random", False), ("tiny-random", True),
                                               pytest.param("tiny-random-qwen2-vl", True, marks=SLOW),
                                               ("tiny-random-qwen3-vl", True),
                                               pytest.param("tiny-random-qwen3-vl-moe", True, marks=SLOW)])
def test_a_picture_shared_by_two_prompts_is_encoded_once(family, processor, packed):
    """Prompt A shows pictures (x, y), prompt B shows (y, y): the content keys make y one vision pass per forward;
    log-probs and gradients equal those without sharing."""
    x, y = pictures(2, seed=11)
    a = encode_prompt(prompt([x, y], 0), processor, **PIX)
    b = encode_prompt(prompt([y, y], 1), processor, **PIX)
    resp = responses(3, seed=4)
    encs = [a, b, a]
    shared = batch_of(encs, resp, torch.float64)
    assert shared.image_keys == [0, 1, 1, 1, 0, 1]
    plain = collate([e.input_ids for e in encs], resp, pad_id=PAD,
                    pixel_values=[e.pixel_values.double().clone() for e in encs],
                    image_grid_thw=[e.image_grid_thw for e in encs])
    assert plain.image_keys == [0, 1, 2, 3, 4, 5]
    m64 = tiny(family, torch.float64, 0)
    outs = []
    for batch in (plain, shared):
        m64.zero_grad()
        policy = Policy(m64, chunk_size=5, packed=packed)
        lp, _ = policy(batch)
        lp.sum().backward()
        outs.append((lp.detach(), policy.vision_patches, {n: p.grad.clone() for n, p in m64.named_parameters()}))
    (lp0, patches0, g0), (lp1, patches1, g1) = outs
    nx, ny = int(a.image_grid_thw[0].prod()), int(a.image_grid_thw[1].prod())
    assert patches0 == 2 * (nx + ny) + 2 * ny and patches1 == nx + ny
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)  # logits are fp32 (as on GPU)


@pytest.mark.parametrize("family", SOME)
def test_text_only_batch_runs_a_blank_vision_pass_weighted_zero(family, processor):
    """Under FSDP every rank must use the vision shards in every micro-batch; a text-only micro-batch runs the
    tower on one blank patch whose features are weighted 0: log-probs unchanged, vision gradients exactly 0."""
    model = tiny(family, torch.float64, 0)
    encs = encoded(processor, [0, 0], seed=5)
    b = batch_of(encs, responses(2), torch.float64)
    assert b.pixel_values is None
    outs = []
    for always in (False, True):
        model.zero_grad()
        policy = Policy(model)
        policy.always_run_vision = always
        lp, _ = policy(b)
        lp.sum().backward()
        outs.append((lp.detach(), {n: p.grad for n, p in model.named_parameters() if "visual" in n}))
    (lp0, v0), (lp1, v1) = outs
    assert torch.equal(lp0, lp1)
    assert all(g is None for g in v0.values())
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in v1.values())


@pytest.mark.parametrize("family", SOME)
def test_hf_engine_after_sync_agrees_with_the_trainer_on_multi_image_prompts(family, processor):
    from mm_gmpo.rollout.base import SamplingParams
    from mm_gmpo.rollout.hf import HFEngine
    from mm_gmpo.weight_sync import sync_weights

    trainer = tiny(family, torch.float32, 0)
    engine_model = tiny(family, torch.float32, 1)
    engine = HFEngine(engine_model, processor.tokenizer)
    encs = encoded(processor, [2, 3, 0, 1], seed=9)
    sampling = SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=0)
    before = engine.generate(encs, sampling)
    b0 = batch_of([encs[r.prompt_index] for r in before], [r.response_ids for r in before])
    with torch.no_grad():
        lp0, _ = Policy(trainer)(b0)
    gap = max(abs(lp0[i, k].item() - x) for i, r in enumerate(before) for k, x in enumerate(r.logprobs))
    assert gap > 0.1
    sync_weights(Policy(trainer), engine)
    rollouts = engine.generate(encs, sampling)
    assert [r.prompt_index for r in rollouts] == [0, 0, 1, 1, 2, 2, 3, 3]
    b = batch_of([encs[r.prompt_index] for r in rollouts], [r.response_ids for r in rollouts])
    with torch.no_grad():
        lp, _ = Policy(trainer)(b)
        same, _ = Policy(engine_model)(b)
    assert torch.equal(same, lp)  # the engine's weights are the trainer's, bit for bit
    for i, r in enumerate(rollouts):  # and what it sampled with is what the trainer scores
        torch.testing.assert_close(lp[i, :len(r.logprobs)], torch.tensor(r.logprobs), rtol=0, atol=2e-5)
