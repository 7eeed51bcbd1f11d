"""algorithm.reward_function: user reward functions by path, both contracts, run isolated; every mistake named."""

import sys
import textwrap

import pytest

from mm_gmpo.rewards import score_batch
from mm_gmpo.rewards.custom import RewardFunction, RewardFunctionError, probe, resolve_spec

USER_FILE = textwrap.dedent('''\
    import time

    def batch(reward_inputs, bonus=0.0):
        out = []
        for x in reward_inputs:
            if x["response"] == "boom":
                raise ValueError("boom")
            acc = float(x["response"].strip() == x["ground_truth"])
            out.append({"overall": acc + bonus, "accuracy": acc, "length": float(x["response_length"]), "tag": "s"})
        return out

    def item(response, ground_truth, scale=1.0):
        if response == "boom":
            raise ValueError("boom")
        if response == "slow":
            time.sleep(3)
        return scale * float(response.strip() == ground_truth)

    def item_dict(response, ground_truth):
        return {"overall": float(response == ground_truth), "format": 0.5}

    def no_args():
        return []

    def returns_float(reward_inputs):
        return 1.0

    def returns_short(reward_inputs):
        return [{"overall": 1.0}]

    def returns_no_overall(reward_inputs):
        return [{"score": 1.0} for _ in reward_inputs]

    def returns_text(response, ground_truth):
        return "good"

    def returns_nan(response, ground_truth):
        return float("nan")

    def raises(reward_inputs):
        return [1 / 0 for _ in reward_inputs]

    NOT_A_FUNCTION = 3
''')


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rw") / "my_reward.py"
    path.write_text(USER_FILE)
    return path


def rf(user_file, name, **kw) -> RewardFunction:
    return RewardFunction(resolve_spec(f"{user_file}:{name}"), **kw)


RESPONSES = ["red", "blue", "boom", "red"]


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_contract_scores_extra_keys_and_counts_errors(user_file, workers):
    f = rf(user_file, "batch", kwargs={"bonus": 0.5})
    scores, m = score_batch(RESPONSES, ["red"] * 4, task="math", reward_function=f, workers=workers,
                            response_lengths=[1, 1, 1, 7])
    assert [s["overall"] for s in scores] == [1.5, 0.5, 0.0, 1.5]  # the raising item alone scores 0
    assert [s.get("length") for s in scores] == [1.0, 1.0, None, 7.0]  # response_length reached the function
    assert m["reward/errors"] == 1.0 and m["reward/overall"] == pytest.approx(3.5 / 4)
    assert m["reward/accuracy"] == pytest.approx(2 / 3) and m["reward/length"] == pytest.approx(3.0)
    assert "reward/tag" not in m  # non-numeric extras are not metrics


@pytest.mark.parametrize("workers", [0, 2])
def test_item_contract_with_kwargs_timeout_and_errors(user_file, workers):
    f = rf(user_file, "item", kwargs={"scale": 2.0}, timeout_s=0.5)
    responses = ["red", "blue", "boom", "slow", "red"]
    scores, m = score_batch(responses, ["red"] * 5, task="math", reward_function=f, workers=workers)
    assert [s["overall"] for s in scores] == [2.0, 0.0, 0.0, 0.0, 2.0]
    assert m["reward/errors"] == 2.0  # the raising and the slow item
    assert m["reward/accuracy"] == pytest.approx(4 / 5)  # no 'accuracy' key: the reward itself


def test_auto_detects_the_contract_and_dict_results(user_file):
    from mm_gmpo.rewards.custom import caller

    assert caller(rf(user_file, "batch")).kind == "batch"
    assert caller(rf(user_file, "item")).kind == "item"
    assert caller(rf(user_file, "item", kind="batch")).kind == "batch"  # an explicit reward_type wins
    scores, m = score_batch(["a", "b"], ["a", "a"], task="math", reward_function=rf(user_file, "item_dict"),
                            workers=0)
    assert [s["overall"] for s in scores] == [1.0, 0.0] and m["reward/format"] == 0.5


def test_module_form(tmp_path, monkeypatch):
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text("")
    (tmp_path / "my_pkg" / "rewards.py").write_text(USER_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    f = RewardFunction(resolve_spec("my_pkg.rewards:item"))
    assert f.spec == "my_pkg.rewards:item"
    assert probe(f, "x") == {"overall": 0.0}
    scores, _ = score_batch(["red", "x"], ["red", "red"], task="math", reward_function=f, workers=0)
    assert [s["overall"] for s in scores] == [1.0, 0.0]
    sys.modules.pop("my_pkg.rewards", None)


@pytest.mark.parametrize("name, message", [
    ("no_such_function", "has no function 'no_such_function'; it defines ['batch', 'item'"),
    ("NOT_A_FUNCTION", "NOT_A_FUNCTION is a int, not a function"),
    ("no_args", "takes 0 positional parameter(s); a batch reward function is fn(reward_inputs: list[dict]"),
    ("returns_float", "returned a float for 1 reward input(s); a batch reward function returns a list"),
    ("returns_no_overall", "returned a dict without 'overall' (keys: ['score'])"),
    ("returns_text", "returned str 'good' for an item; expected a float or a dict with an 'overall' float"),
    ("returns_nan", "returned overall=nan; expected a finite float"),
    ("raises", "raised ZeroDivisionError: division by zero at my_reward.py:"),
])
def test_probe_stops_the_run_naming_file_function_and_expectation(user_file, name, message):
    with pytest.raises(RewardFunctionError) as e:
        probe(rf(user_file, name), "x")
    assert message in str(e.value) and "algorithm.reward_function" in str(e.value)
    assert "my_reward.py" in str(e.value)


def test_spec_errors(tmp_path):
    with pytest.raises(RewardFunctionError, match=r"file .*nope\.py not found"):
        resolve_spec(f"{tmp_path}/nope.py:fn")
    with pytest.raises(RewardFunctionError, match=r"expected path/to/file\.py:function"):
        resolve_spec("just_a_name")
    with pytest.raises(RewardFunctionError, match=r"importing no_such_module_xyz failed: ModuleNotFoundError"):
        probe(RewardFunction("no_such_module_xyz:fn"), "x")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\ndef f(:\n")
    with pytest.raises(RewardFunctionError, match=r"importing .*bad.py failed.*SyntaxError"):
        probe(RewardFunction(resolve_spec(f"{bad}:f")), "x")


def test_wrong_shape_at_run_time_scores_zero_and_counts(user_file):
    scores, m = score_batch(["a", "b", "c"], ["a"] * 3, task="math", reward_function=rf(user_file, "returns_short"),
                            workers=0)
    # three inputs, one result: the whole call is wrong, each item alone returns one result: all score 1.0
    assert [s["overall"] for s in scores] == [1.0, 1.0, 1.0] and m["reward/errors"] == 0.0
    scores, m = score_batch(["a", "b"], ["a"] * 2, task="math", reward_function=rf(user_file, "raises"), workers=2)
    assert [s["overall"] for s in scores] == [0.0, 0.0] and m["reward/errors"] == 2.0
