"""A reward function for examples/colors, in EasyR1's batch contract (algorithm.reward_function=
examples/colors/reward.py:compute_score).

Each input has "response", "response_length" (tokens) and "ground_truth"; each score needs "overall" (the reward
the policy is trained on) and may add float keys, logged as reward/<key>. Extra keyword arguments come from
algorithm.reward_kwargs.
"""


def compute_score(reward_inputs: list[dict], case_sensitive: bool = False) -> list[dict]:
    scores = []
    for x in reward_inputs:
        said, gold = x["response"].strip(), x["ground_truth"]
        if not case_sensitive:
            said, gold = said.lower(), gold.lower()
        accuracy = float(said == gold)
        scores.append({"overall": accuracy, "accuracy": accuracy, "response_tokens": float(x["response_length"])})
    return scores


def per_item(response: str, ground_truth: str, **kwargs) -> float:
    """The same reward in the per-item contract (algorithm.reward_function=examples/colors/reward.py:per_item)."""
    return float(response.strip().lower() == ground_truth.lower())
