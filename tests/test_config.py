"""Config validation: every mistake ends in one message naming the key."""

from __future__ import annotations

import pytest

from conftest import ROOT
from minivlm.config import ConfigError, from_dict, load_config

GOOD = {"model": {"name_or_path": "x"}, "lora": {"r": 8}, "train": {"lr": 1e-4}}


def with_(section: str, **values) -> dict:
    raw = {k: dict(v) for k, v in GOOD.items()}
    raw.setdefault(section, {}).update(values)
    return raw


@pytest.mark.parametrize("raw, message", [
    (with_("lora", rank=8), r"unknown key lora.rank; did you mean 'r'\?"),
    (with_("lora", bias="none"), r"unknown key lora.bias; known: r, alpha, dropout"),
    (with_("lora", alpah=8), r"unknown key lora.alpah; did you mean 'alpha'\?"),
    (with_("train", learning_rate=1e-4), r"unknown key train.learning_rate; did you mean 'lr'\?"),
    ({"trian": {}}, r"unknown section \[trian\]; did you mean 'train'\?"),
    (with_("lora", r=0), r"lora.r = 0 must be > 0"),
    (with_("lora", r=-2), r"lora.r = -2 must be > 0"),
    (with_("train", lr=0.0), r"train.lr = 0.0 must be > 0"),
    (with_("train", fp16=True, bf16=True), r"train.fp16 = True and train.bf16 are both true"),
    (with_("lora", r="8"), r"lora.r must be int, got str '8'"),
    (with_("train", bf16="yes"), r"train.bf16 must be true or false"),
    (with_("lora", r=True), r"lora.r must be int, got bool"),
    (with_("lora", targets="q_proj"), r"lora.targets must be a list"),
    (with_("train", schedule="cosin"), r"train.schedule = 'cosin' is not one of .*did you mean 'cosine'\?"),
    (with_("model", family="lava"), r"model.family = 'lava' must be one of \[.*'paligemma'.*\]"),
    (with_("lora", dropout=1.0), r"lora.dropout = 1.0 must be in \[0, 1\)"),
    (with_("train", betas=[0.9]), r"train.betas = \[0.9\] must be two numbers"),
    (with_("data", random_resized_crop=[0.9]), r"data.random_resized_crop = \[0.9\] must be \[\] or \[min_scale"),
    (with_("data", streaming=True), r"train.max_steps = 0 must be set with data.streaming = true"),
    ({"data": {"streaming": True, "eval_split": "test"}, "train": {"max_steps": 5}},
     r"data.eval_samples = 0 must be set with data.streaming = true and a data.eval_split"),
    (with_("data", shuffle_buffer=-1), r"data.shuffle_buffer = -1 must be >= 0"),
    (with_("lora", init="pisa"), r"lora.init = 'pisa' is not one of .*did you mean 'pissa'\?"),
    (with_("lora", init="loftq", loftq_iterations=0), r"lora.loftq_iterations = 0 must be >= 1"),
    (with_("lora", init_lora_weights="loftq"), r"unknown key lora.init_lora_weights; did you mean .init.\?"),
    (with_("lora", use_dora=True, init="pissa"), r"lora.use_dora = True and lora.init = 'pissa' are both set"),
])
def test_bad_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_good_config_and_int_for_float():
    cfg = from_dict(with_("train", lr=1, bf16=True))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.bf16
    assert cfg.lora.targets is None  # family default


def test_overrides_and_shipped_configs(tmp_path):
    for name in sorted(str(p) for p in ROOT.glob("configs/*.toml")):
        load_config(name)
    cfg = load_config("configs/paligemma.toml", ["train.max_steps=3", "model.name_or_path=/tmp/x", "train.bf16=false"])
    assert cfg.train.max_steps == 3 and cfg.model.name_or_path == "/tmp/x" and cfg.train.bf16 is False
    assert cfg.train.batch_size == 2 and cfg.train.grad_accum == 8 and cfg.train.lr == 2e-5
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config("configs/demo.toml", ["max_steps=3"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def grpo(**values) -> dict:
    raw = with_("train", objective="grpo")
    for key, value in values.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return raw


@pytest.mark.parametrize("raw, message", [
    (grpo(grpo__num_generations=1), r"grpo.num_generations = 1 must be >= 2"),
    (grpo(grpo__temperature=0.0), r"grpo.temperature = 0.0 must be > 0"),
    (grpo(grpo__top_p=1.5), r"grpo.top_p = 1.5 must be in \(0, 1\]"),
    (grpo(grpo__epsilon_high=0.1), r"grpo.epsilon_high = 0.1 must be 0 \(= grpo.epsilon\) or >= grpo.epsilon"),
    (grpo(grpo__iterations=0), r"grpo.iterations = 0 must be >= 1"),
    (grpo(grpo__beta=-0.1), r"grpo.beta = -0.1 must be >= 0"),
    (grpo(grpo__loss_type="ppo"), r"grpo.loss_type = 'ppo' is not one of \['grpo', 'dr_grpo', 'dapo'\]"),
    (grpo(grpo__scale_rewards="batch"), r"grpo.scale_rewards = 'batch' is not one of \['group', 'none'\]"),
    (grpo(grpo__rewards=[]), r"grpo.rewards = \[\] is empty"),
    (grpo(grpo__rewards=["exact"]), r"has \['exact'\], which is neither built in .* nor a module:function"),
    (grpo(grpo__reward_weights=[1.0, 2.0]), r"grpo.reward_weights = \[1.0, 2.0\] must be \[\] or one weight for each "
                                            r"of the 1 grpo.rewards"),
    (grpo(grpo__rewards=["format"]), r"grpo.format_pattern = '' is empty, and grpo.rewards has \"format\""),
    (grpo(grpo__rewards=["format"], grpo__format_pattern="(a"), r"grpo.format_pattern = '\(a' is not a valid regular"),
    (grpo(grpo__rewards=["length"], grpo__overlong_cache=32), r"grpo.overlong_cache = 32 must be in \(0, "
                                                              r"grpo.max_new_tokens\)"),
    (grpo(train__best_by="val_loss"), r"train.best_by = 'val_loss' must be \"metric\" with train.objective = \"grpo\""),
    (grpo(train__fsdp=True), r"train.fsdp = True is not supported with train.objective = \"grpo\""),
    (grpo(data__conversations_column="c"), r"data.conversations_column = 'c' is set, and train.objective = \"grpo\""),
    (grpo(lora__train_modules=["proj"], grpo__beta=0.1), r"lora.train_modules = \['proj'\] needs train.init_from"),
])
def test_bad_grpo_values_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_grpo_keys_are_read_only_with_its_objective():
    """[grpo] of an SFT run is not validated (nothing reads it); with train.objective = "grpo" it is,
    and a good one loads."""
    from_dict({**with_("train", objective="sft"), "grpo": {"num_generations": 1}})
    cfg = from_dict(grpo(grpo__rewards=["exact_match", "length", "my_rewards:f"], grpo__overlong_cache=8,
                         grpo__reward_weights=[1, 0.5, 2]))
    assert cfg.grpo.reward_weights == [1.0, 0.5, 2.0] and cfg.grpo.epsilon_high == 0.0
