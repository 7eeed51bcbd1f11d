"""A user-format dataset for the "your own data and reward" tests: jsonl rows with 0, 1 or 2 images (PNG files
beside it, paths relative to the file), and an EasyR1-style batch reward function in its own file."""

import json
import random
from pathlib import Path

from mm_gmpo.data.synthetic import COLORS, SHAPES, draw

REWARD_FILE = '''\
def compute_score(reward_inputs, format_weight=0.0):
    """EasyR1's batch contract: one dict per input, 'overall' plus extra float keys."""
    scores = []
    for x in reward_inputs:
        said = x["response"].strip().lower()
        accuracy = float(said == x["ground_truth"])
        scores.append({"overall": accuracy, "accuracy": accuracy, "length": float(x["response_length"])})
    return scores
'''


def write_dataset(folder: Path, n: int, seed: int, name: str = "train.jsonl") -> Path:
    """n rows cycling through 0, 1 and 2 images. Text-only rows state the colour in words; two-image rows show
    two shapes of the same colour, the placeholders inside the text."""
    rng = random.Random(seed)
    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    colors = list(COLORS)
    for i in range(n):
        color = colors[(i // 3) % 4]
        k = i % 3
        paths = []
        for j in range(k):
            rel = f"images/{name.split('.')[0]}_{i}_{j}.png"
            draw(color, rng.choice(SHAPES), rng).save(folder / rel)
            paths.append(rel)
        if k == 0:
            problem = f"The shape is {color}. What color is the shape? Answer with one word."
        elif k == 1:
            problem = "What color is the shape? Answer with one word."
        else:
            problem = "First picture: <image> Second picture: <image> Both shapes have one color. Which?"
        row = {"problem": problem, "answer": color, "id": f"{Path(name).stem}-{i}"}
        if paths:
            row["images"] = paths
        rows.append(row)
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
