"""TrainerConfig: YAML + overrides, type coercion, and errors that name the key."""

import dataclasses

import pytest

from trainer.config import TrainerConfig
from trainer.errors import ConfigError


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_are_the_default_run_and_valid():
    cfg = TrainerConfig.load()
    assert cfg.model.path == "smollm2"
    assert cfg.task.name == "arithmetic"
    assert cfg == TrainerConfig()
    assert cfg.engine.devices is None
    assert cfg.trainer.device == "auto"


def test_yaml_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "run:\n  steps: 5\n  seed: 7\nalgo:\n  lr: 3.0e-6\n")
    cfg = TrainerConfig.load(path, ["run.steps=3", "run.steps=4"])
    assert cfg.run.steps == 4  # the last override wins over the file
    assert cfg.run.seed == 7  # the file wins over the default
    assert cfg.algo.lr == 3e-6
    assert cfg.algo.group_size == 8  # untouched default


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("run.steps=3", "run.steps", 3),
        ("algo.lr=1e-5", "algo.lr", 1e-5),  # YAML 1.1 reads "1e-5" as a string
        ("algo.lr=2", "algo.lr", 2.0),  # int -> float
        ("algo.scale_rewards=none", "algo.scale_rewards", "none"),
        ("engine.devices=[1,2]", "engine.devices", [1, 2]),
        ("engine.devices=null", "engine.devices", None),
        ("task.name=jsonl", "task.name", "jsonl"),
        ("task.path=data/x.jsonl", "task.path", "data/x.jsonl"),
        ("run.output_dir=2024", "run.output_dir", "2024"),  # a number typed into a str field
        ("model.path=007", "model.path", "007"),  # kept as typed, not 7
        ("log.level=DEBUG", "log.level", "DEBUG"),
    ],
)
def test_override_values_are_parsed_and_coerced(override, key, expected):
    cfg = TrainerConfig().apply_overrides([override])
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    assert value == expected
    assert type(value) is type(expected)


def test_float_field_from_yaml_exponent_without_dot(tmp_path):
    # PyYAML reads `1e-5` (no dot) as the string "1e-5"; a float field accepts it.
    cfg = TrainerConfig.from_yaml(write(tmp_path, "algo:\n  lr: 1e-5\n"))
    assert cfg.algo.lr == 1e-5


def test_unknown_key_names_it_suggests_and_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        TrainerConfig().apply_overrides(["algo.grop_size=4"])
    assert e.value.key == "algo.grop_size"
    msg = str(e.value)
    assert "did you mean 'algo.group_size'?" in msg
    assert "Valid keys in [algo]:" in msg and "clip_high" in msg and "is_cap" in msg


def test_unknown_section_names_it_and_suggests():
    with pytest.raises(ConfigError) as e:
        TrainerConfig().apply_overrides(["alg.lr=1"])
    assert e.value.key == "alg.lr"
    assert "did you mean 'algo'?" in str(e.value)
    assert "Valid sections: model, run, algo, engine, gen, task, eval, trainer, reward, log" in str(e.value)


def test_key_without_section_suggests_the_section():
    with pytest.raises(ConfigError) as e:
        TrainerConfig().apply_overrides(["steps=3"])
    assert e.value.key == "steps"
    assert "'run.steps'" in str(e.value)


def test_unknown_key_in_yaml_file_names_file_and_key(tmp_path):
    path = write(tmp_path, "engine:\n  kv_cache_gib: 2\n")
    with pytest.raises(ConfigError) as e:
        TrainerConfig.from_yaml(path)
    assert e.value.key == "engine.kv_cache_gib"
    assert str(e.value).startswith(f"{path}: unknown config key 'engine.kv_cache_gib' (did you mean 'engine.kvcache_gib'?)")


def test_unknown_section_in_yaml_file(tmp_path):
    path = write(tmp_path, "generation:\n  max_tokens: 2\n")
    with pytest.raises(ConfigError) as e:
        TrainerConfig.from_yaml(path)
    assert e.value.key == "generation"
    assert str(e.value).startswith(f"{path}: unknown config section 'generation'")


def test_override_without_equals_sign():
    with pytest.raises(ConfigError) as e:
        TrainerConfig().apply_overrides(["run.steps"])
    assert "expected section.key=value" in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("run.steps=abc", "run.steps: expected int, got 'abc' (str)"),
        ("run.steps=3.5", "run.steps: expected int, got 3.5 (float)"),
        ("run.steps=true", "run.steps: expected int, got True (bool)"),  # bool is not a number here
        ("algo.lr=fast", "algo.lr: expected float, got 'fast' (str)"),
        ("algo.lr=.nan", "algo.lr: expected float, got nan (float)"),
        ("algo.scale_rewards=1", "algo.scale_rewards: expected one of 'group', 'batch', 'none', got 1 (int)"),
        ("engine.devices=1", "engine.devices: expected a list of int or null, got 1 (int)"),
        ("engine.devices=[a]", "engine.devices: expected a list of int or null, got ['a'] (list)"),
        ("task.name=csv", "task.name: expected one of 'arithmetic', 'jsonl', 'python', 'math', got 'csv' (str)"),
        ("log.format=xml", "log.format: expected one of 'auto', 'json', 'console', got 'xml' (str)"),
        ("model.path=[1]", "model.path: expected str, got [1] (list)"),
    ],
)
def test_wrong_type_names_key_type_and_value(override, message):
    with pytest.raises(ConfigError) as e:
        TrainerConfig().apply_overrides([override])
    assert e.value.key == override.split("=")[0]
    assert str(e.value) == message


def test_wrong_type_in_yaml_file(tmp_path):
    path = write(tmp_path, "gen:\n  max_tokens: lots\n")
    with pytest.raises(ConfigError) as e:
        TrainerConfig.from_yaml(path)
    assert e.value.key == "gen.max_tokens"
    assert str(e.value) == f"{path}: gen.max_tokens: expected int, got 'lots' (str)"


@pytest.mark.parametrize(
    "override, key, rule",
    [
        ("algo.group_size=1", "algo.group_size", ">= 2"),
        ("algo.groups_per_step=0", "algo.groups_per_step", ">= 1"),
        ("algo.max_staleness=-1", "algo.max_staleness", ">= 0"),
        ("run.steps=0", "run.steps", ">= 1"),
        ("engine.count=0", "engine.count", ">= 1"),
        ("engine.kvcache_gib=0", "engine.kvcache_gib", ">= 1"),
        ("gen.max_tokens=0", "gen.max_tokens", ">= 1"),
        ("gen.temperature=0", "gen.temperature", "> 0"),
        ("gen.top_p=0", "gen.top_p", "0 < top_p <= 1"),
        ("gen.top_p=1.5", "gen.top_p", "0 < top_p <= 1"),
        ("algo.clip_low=0", "algo.clip_low", "0 < clip_low < 1"),
        ("algo.clip_high=-0.1", "algo.clip_high", "> 0"),
        ("algo.is_cap=0.5", "algo.is_cap", ">= 1"),
        ("engine.devices=[]", "engine.devices", "non-empty list of distinct GPU ids"),
        ("engine.devices=[1,1]", "engine.devices", "non-empty list of distinct GPU ids"),
        ("task.name=jsonl", "task.path", "is required when task.name is jsonl"),
        ("trainer.device=gpu", "trainer.device", '"cuda:N"'),
        ("gen.max_tokens=1024", "gen.max_tokens", "< engine.max_model_len (1024)"),
        ("algo.lr_warmup_steps=-1", "algo.lr_warmup_steps", ">= 0"),
        ("algo.lr_min_ratio=1.5", "algo.lr_min_ratio", "0 <= lr_min_ratio <= 1"),
    ],
)
def test_out_of_range_names_key_and_rule(override, key, rule):
    cfg = TrainerConfig().apply_overrides([override])  # types are fine...
    with pytest.raises(ConfigError) as e:
        cfg.validate()  # ...the range is not
    assert e.value.key == key
    assert str(e.value).startswith(f"{key}: ")
    assert rule in str(e.value)


def test_load_validates():
    with pytest.raises(ConfigError) as e:
        TrainerConfig.load(None, ["algo.group_size=1"])
    assert e.value.key == "algo.group_size"


def test_validate_catches_fields_assigned_in_code():
    cfg = TrainerConfig()
    cfg.run.steps = "3"  # a notebook user skipping the loader
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert e.value.key == "run.steps"
    cfg.run.steps = 3
    cfg.algo.lr = 1  # an int where a float belongs is fine, and becomes a float
    cfg.validate()
    assert type(cfg.algo.lr) is float


def test_jsonl_with_path_is_valid():
    cfg = TrainerConfig.load(None, ["task.name=jsonl", "task.path=data.jsonl"])
    assert (cfg.task.name, cfg.task.path) == ("jsonl", "data.jsonl")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path, "run:\n  steps: 3\n  seed: [1, 2\n")
    with pytest.raises(ConfigError) as e:
        TrainerConfig.from_yaml(path)
    assert str(e.value).startswith(f"{path}:4: invalid YAML")  # the unclosed list ends at line 4


def test_unreadable_file_names_it(tmp_path):
    path = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError) as e:
        TrainerConfig.load(path)
    assert str(e.value) == f"{path}: cannot read config file: No such file or directory"


@pytest.mark.parametrize("text, got", [("- 1\n- 2\n", "list"), ("just a string\n", "str")])
def test_yaml_that_is_not_a_mapping_is_an_error(tmp_path, text, got):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        TrainerConfig.from_yaml(path)
    assert str(e.value) == f"{path}: expected a mapping of sections, got {got}"


def test_section_that_is_not_a_mapping_is_an_error(tmp_path):
    path = write(tmp_path, "run: 3\n")
    with pytest.raises(ConfigError) as e:
        TrainerConfig.from_yaml(path)
    assert e.value.key == "run"
    assert "section 'run' must be a mapping of keys, got int" in str(e.value)


def test_empty_file_and_empty_section_change_nothing(tmp_path):
    assert TrainerConfig.from_yaml(write(tmp_path, "")) == TrainerConfig()
    assert TrainerConfig.from_yaml(write(tmp_path, "algo:\n", "b.yaml")) == TrainerConfig()


def test_to_dict_round_trips_through_from_dict():
    cfg = TrainerConfig.load(None, ["run.steps=3", "engine.devices=[1,2]", "algo.lr=1e-5"])
    data = cfg.to_dict()
    assert data["run"]["steps"] == 3
    assert data["engine"]["devices"] == [1, 2]
    assert set(data) == {f.name for f in dataclasses.fields(TrainerConfig)}
    assert TrainerConfig.from_dict(data) == cfg


def test_instances_do_not_share_mutable_defaults():
    a, b = TrainerConfig(), TrainerConfig()
    a.apply_overrides(["run.steps=3"])
    assert b.run.steps == TrainerConfig().run.steps != 3


def test_max_staleness_is_a_number_or_auto_resolved_by_where_the_engines_run():
    import types

    import torch

    from trainer.trainer import Trainer

    assert TrainerConfig().algo.max_staleness == "auto"
    assert TrainerConfig.load(overrides=["algo.max_staleness=2"]).algo.max_staleness == 2
    assert TrainerConfig.load(overrides=["algo.max_staleness=auto"]).algo.max_staleness == "auto"
    with pytest.raises(ConfigError) as e:
        TrainerConfig.load(overrides=["algo.max_staleness=soon"])
    assert str(e.value) == "algo.max_staleness: expected int or one of 'auto', got 'soon' (str)"

    def resolved(setting, device, engine_devices):
        cfg = TrainerConfig.load(overrides=[f"algo.max_staleness={setting}"])
        return Trainer._max_staleness(types.SimpleNamespace(cfg=cfg, device=torch.device(device)), engine_devices)

    assert resolved("auto", "cpu", None) == 0  # CPU engines: the trainer's cores
    assert resolved("auto", "cuda:0", [0]) == 0  # one GPU for both
    assert resolved("auto", "cuda:0", [1, 2, 3]) == 1  # GPUs of their own: overlap
    assert resolved("auto", "cuda:1", [0, 1]) == 0
    assert resolved(2, "cpu", None) == 2  # a number is taken as it is


def lrs(*overrides, steps=5):
    algo = TrainerConfig.load(None, ["algo.lr=1.0", *overrides]).algo
    return [round(algo.lr_at(step, steps), 6) for step in range(steps)]


def test_lr_schedule_warms_up_then_decays_to_the_floor_over_the_run():
    assert lrs() == [1.0] * 5  # the default: constant
    assert lrs("algo.lr_warmup_steps=2") == [0.5, 1.0, 1.0, 1.0, 1.0]
    # Decay from the end of warm-up over the rest of the run (HF's convention: the last
    # step is one short of the floor); a run extended past run.steps stays at the floor.
    assert lrs("algo.lr_schedule=linear", "algo.lr_warmup_steps=1") == [1.0, 1.0, 0.75, 0.5, 0.25]
    assert lrs("algo.lr_schedule=linear", "algo.lr_min_ratio=0.2") == [1.0, 0.84, 0.68, 0.52, 0.36]
    assert lrs("algo.lr_schedule=cosine") == [1.0, 0.904508, 0.654508, 0.345492, 0.095492]
    algo = TrainerConfig.load(None, ["algo.lr=1.0", "algo.lr_schedule=cosine", "algo.lr_min_ratio=0.1"]).algo
    assert algo.lr_at(5, 5) == algo.lr_at(50, 5) == pytest.approx(0.1)
