"""The built-in task: "What color is the shape?" on small PIL drawings. No download, learnable on a CPU.

Each image is a white 56x56 canvas with one circle, square or triangle in one of four colours, at a random place
and size. The answer is the colour word. Rollouts for this task restrict sampling to the four answer tokens
(``answer_token_ids``; vLLM calls the same thing ``allowed_token_ids``) so that a random-initialised tiny model can
find rewarded answers at all; the policy itself is trained over the full vocabulary. Chance accuracy is 0.25.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from mm_gmpo.data.prompts import Prompt, build_messages

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTION = "What color is the shape? Answer with one word: red, green, blue or yellow."


def draw(color: str, shape: str, rng: random.Random, size: int = 56) -> Image.Image:
    r = rng.randint(size // 4, size // 2 - 2)
    return draw_at(color, shape, rng.randint(r, size - r), rng.randint(r, size - r), r, size)


def draw_at(color: str, shape: str, cx: int, cy: int, r: int, size: int = 56) -> Image.Image:
    """A white ``size`` x ``size`` canvas with the shape of radius ``r`` centred at (cx, cy)."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def synthetic_prompts(n: int, seed: int = 0, split: str = "train") -> list[Prompt]:
    """n prompts, deterministic in (seed, split); colours are balanced."""
    rng = random.Random(f"{seed}-{split}")
    out = []
    colors = list(COLORS)
    for i in range(n):
        color = colors[i % len(colors)]
        shape = rng.choice(SHAPES)
        out.append(Prompt(
            id=f"synthetic/{split}/{i}", task="exact", messages=build_messages(QUESTION, 1, "plain"),
            images=[draw(color, shape, rng)], ground_truth=color, metadata={"shape": shape},
        ))
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------- the built-in video task

FLASH_COUNTS = ("1", "2", "3", "4")
FLASH_QUESTION = "How many times does the screen flash blue? Answer with one digit: 1, 2, 3 or 4."


def flashing_screen(count: int, rng: random.Random, n_frames: int = 8, size: int = 56):
    """(n_frames, 3, size, size) uint8 frames, white, ``count`` of them (chosen at random) blue: no single frame
    tells the count, the clip does. (A smaller flashing square, 16 or 40 pixels wide at a random place, was not
    learnt by the tiny model within 100 supervised steps; the whole screen is.)"""
    import numpy as np
    import torch

    shown = set(rng.sample(range(n_frames), count))
    pictures = np.full((n_frames, size, size, 3), 255, dtype=np.uint8)
    for k in shown:
        pictures[k] = COLORS["blue"]
    return torch.from_numpy(pictures).permute(0, 3, 1, 2).contiguous()


def flash_prompts(n: int, fit, seed: int = 0, split: str = "train") -> list[Prompt]:
    """The built-in video task: n prompts "How many times does the screen flash blue?" on 8-frame clips made here
    (``fit``: the run's ``VideoFit``), counts 1-4 balanced; the answer is the digit (one token each; rollouts
    restrict sampling to the four, chance 0.25). Deterministic in (seed, split)."""
    from mm_gmpo.data.videos import clip_from_frames

    rng = random.Random(f"flashes-{seed}-{split}")
    out = []
    for i in range(n):
        count = i % len(FLASH_COUNTS) + 1
        clip = clip_from_frames(flashing_screen(count, rng), fit, f"flashes/{split}/{i}")
        out.append(Prompt(id=f"flashes/{split}/{i}", task="exact", messages=build_messages(FLASH_QUESTION, 0, "plain",
                                                                                             n_videos=1),
                          images=[], ground_truth=str(count), videos=[clip]))
    rng.shuffle(out)
    return out


def answer_token_ids(tokenizer) -> list[int]:
    """Token ids of the four answers (each a single token in the Qwen2 vocabulary)."""
    return single_token_ids(tokenizer, list(COLORS))


def single_token_ids(tokenizer, words: list[str]) -> list[int]:
    """The token id of each word; every word must be one token (restricted sampling, ``rollout.allowed_tokens``)."""
    ids = [tokenizer.encode(w, add_special_tokens=False) for w in words]
    bad = [(w, x) for w, x in zip(words, ids, strict=True) if len(x) != 1]
    if bad:
        raise ValueError(f"restricted sampling needs single-token words; this tokenizer splits {bad}")
    return [x[0] for x in ids]


# ---------------------------------------------------------------- the built-in text-math task

DIGITS = tuple(str(d) for d in range(10))


def arithmetic_prompts(n: int, seed: int = 0, split: str = "train", template: str = "qwen_math") -> list[Prompt]:
    """n text-only prompts "What is a + 1?" (a in 0..8: answers 1..9, each one digit token), rendered with a math
    template (the system prompt and chat format of Qwen2.5-Math). The answer is the digit alone; rollouts restrict
    sampling to the ten digits (chance 0.1). Deterministic in (seed, split). Measured: a random tiny Qwen2 finds
    these; harder sums (a + b with two operands) stayed at the most frequent answer within a few hundred steps."""
    from mm_gmpo.data.prompts import render_question

    rng = random.Random(f"arith-{seed}-{split}")
    out = []
    for i in range(n):
        a = rng.randint(0, 8)
        out.append(Prompt(
            id=f"arithmetic/{split}/{i}", task="exact",
            messages=build_messages(render_question(template, f"What is {a} + 1? Answer with one digit."), 0, template),
            images=[], ground_truth=str(a + 1), metadata={"a": a},
        ))
    return out
