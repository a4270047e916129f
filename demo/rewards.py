"""The GRPO demo's reward (configs/grpo_demo.toml): how a user writes one.

A reward function takes the prompts, the sampled completions and the dataset rows they answer,
one of each per completion, and returns one number per completion. It is named in the config as
grpo.rewards = ["demo.rewards:caption_parts"], "module:function", imported from the directory
train.py runs in.
"""


def caption_parts(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """A third for each of the colour, the shape and the position that a caption "<colour> <shape>
    <position>" gets right, read off the row's columns: partial credit, so that a group whose
    captions are all wrong somewhere still ranks the less wrong above the others."""
    rewards = []
    for completion, row in zip(completions, rows):
        words = completion.split()
        right = [words[:1] == [row["color"]], words[1:2] == [row["shape"]], " ".join(words[2:]) == row["position"]]
        rewards.append(sum(right) / 3)
    return rewards
