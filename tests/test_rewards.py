"""GRPO's rewards (minivlm/rewards.py): the built-ins, a user's function, their weighted sum, and
one clear message for a reward that fails."""

from __future__ import annotations

import pytest
import torch

from minivlm.config import ConfigError, DataConfig
from minivlm.rewards import RewardError, Rewards, exact_match, format_match, metric, overlong, user_function

ROWS = [{"question": "how many", "answer": "Two"}, {"question": "what color", "answer": ["the red", "crimson"]}]


def test_exact_match_normalises_as_vqa_does_and_reads_every_reference():
    reward = exact_match(DataConfig())
    completions = ["2.", "two", "three", "Red!", "crimson", "blue"]
    rows = [ROWS[0]] * 3 + [ROWS[1]] * 3
    # "2." and "two" are VQA-normalised to "2", as "Two" is; "Red!" to "red", as "the red" is. A
    # list answer is its first entry, unless data.references_column names the column: then any.
    assert reward([""] * 6, completions, rows) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    refs = DataConfig(references_column="answer")
    assert exact_match(refs)([""] * 6, completions, rows) == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]


def test_metric_is_data_metric_on_each_completion_alone():
    cfg = DataConfig(metric="anls", references_column="answer")
    assert metric(cfg)(["", ""], ["tw", "crimsen"], ROWS) == pytest.approx([1 - 1 / 3, 1 - 1 / 7])
    with pytest.raises(ConfigError, match="data.metric = 'clip_score' cannot be a reward"):
        metric(DataConfig(metric="clip_score"))


def test_format_matches_the_whole_completion():
    reward = format_match(r"<answer>\w+</answer>")
    assert reward([""] * 3, ["<answer>red</answer>", " <answer>red</answer>\n", "red <answer>red</answer>"],
                  [{}] * 3) == [1.0, 1.0, 0.0]


def test_overlong_penalty_falls_from_zero_to_minus_one_over_the_cache():
    reward = overlong(lambda text: len(text.split()), max_new_tokens=10, cache=4)
    words = [" ".join(["w"] * n) for n in (3, 6, 7, 8, 10, 12)]
    assert reward([""] * 6, words, [{}] * 6) == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])


def test_rewards_combine_with_weights_and_keep_each():
    rewards = Rewards({"exact": exact_match(DataConfig()), "short": lambda p, c, r: [-len(x) for x in c]}, [2.0, 0.5])
    total, each = rewards(["", ""], ["two", "blue"], ROWS, [0, 1])
    assert each == {"exact": [1.0, 0.0], "short": [-3.0, -4.0]}
    assert torch.equal(total, torch.tensor([2.0 - 1.5, -2.0], dtype=torch.float64))
    with pytest.raises(ConfigError, match="1 reward weights for 2 rewards"):
        Rewards({"a": len, "b": len}, [1.0])


def test_a_users_function_is_loaded_by_module_and_name(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def counted(prompts, completions, rows):\n"
                                            "    return [float(c.count('x')) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    assert user_function("my_rewards:counted")(["", ""], ["xx", "y"], [{}, {}]) == [2.0, 0.0]
    for name, message in [("my_rewards", "is named module:function"),
                          ("my_rewards:nope", "cannot be loaded: AttributeError"),
                          ("no_such_module:f", "cannot be loaded: ModuleNotFoundError")]:
        with pytest.raises(ConfigError, match=message):
            user_function(name)


@pytest.mark.parametrize("function, message", [
    (lambda p, c, r: [1 / len(x) for x in c], r"reward bad raised ZeroDivisionError: division by zero on row 12 "
                                               r"\(completion ''\); fix the function$"),
    (lambda p, c, r: [float("nan") if x == "b" else 1.0 for x in c], r"reward bad returned nan on row 11 "
                                                                      r"\(completion 'b'\): it must return a finite"),
    (lambda p, c, r: [None for _ in c], r"reward bad returned None on row 10"),
    (lambda p, c, r: [1.0], r"reward bad returned 1 values for 3 completions"),
])
def test_a_failing_reward_is_one_message_naming_it_and_the_row(function, message):
    with pytest.raises(RewardError, match=message):
        Rewards({"bad": function})(["q"] * 3, ["a", "b", ""], [{}] * 3, [10, 11, 12])
    assert issubclass(RewardError, ConfigError)  # train.py prints a ConfigError as one `error:` line


def test_the_configured_rewards_are_built_by_name_and_weighted(tmp_path, monkeypatch):
    """grpo.rewards and grpo.reward_weights as build_rewards reads them: a built-in by its name, a
    user's module:function logged by its function's name, the length reward counting tokens."""
    from minivlm.config import from_dict
    from minivlm.rewards import build_rewards

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text("def shouting(prompts, completions, rows):\n"
                                      "    return [float(c.isupper()) for c in completions]\n")
    cfg = from_dict({"model": {"name_or_path": "x"}, "train": {"objective": "grpo"},
                     "grpo": {"rewards": ["exact_match", "mine:shouting", "length"], "reward_weights": [1.0, 0.5, 2.0],
                              "max_new_tokens": 4, "overlong_cache": 2}})
    rewards = build_rewards(cfg, lambda text, add_special_tokens: {"input_ids": text.split()})
    total, each = rewards(["q"] * 3, ["red", "RED", "a b c d"], [{"answer": "red"}] * 3, [0, 1, 2])
    assert list(each) == ["exact_match", "shouting", "length"]
    assert each == {"exact_match": [1.0, 1.0, 0.0], "shouting": [0.0, 1.0, 0.0], "length": [0.0, 0.0, -1.0]}
    assert total.tolist() == [1.0, 1.5, -2.0]
