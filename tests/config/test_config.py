"""Config loading: the real Pythia files, merging rules, error messages, generated docs."""

import difflib
import os
from pathlib import Path

import pytest
import torch
import yaml

from neox_l2e.config import ConfigError, load_config
from neox_l2e.config.docs import render
from neox_l2e.model import GPTNeoX
from neox_l2e.parallel import ParallelState

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("NEOX_L2E_PYTHIA_CONFIGS", ROOT.parent / "shared" / "data" / "pythia-configs"))

# Parameter counts of the published Hugging Face Pythia checkpoints (vocab padded to 128 x TP).
PUBLISHED = {
    "14m": 14_067_712,
    "31m": 30_494_720,
    "70m": 70_426_624,
    "160m": 162_322_944,
    "410m": 405_334_016,
    "1b": 1_011_781_632,
    "1.4b": 1_414_647_808,
    "2.8b": 2_775_208_960,
    "6.9b": 6_857_302_016,
    "12b": 11_846_072_320,
}
SHAPES = {  # layers, hidden, heads, lr (the published Pythia configs)
    "70m": (6, 512, 8, 1e-3),
    "160m": (12, 768, 12, 6e-4),
    "410m": (24, 1024, 16, 3e-4),
    "1b": (16, 2048, 8, 2.5e-4),
    "1.4b": (24, 2048, 16, 2e-4),
    "2.8b": (32, 2560, 32, 1.6e-4),
    "6.9b": (32, 4096, 32, 1.2e-4),
    "12b": (36, 5120, 40, 1.2e-4),
    "14m": (6, 128, 4, 1e-3),
    "31m": (6, 256, 8, 1e-3),
}


def count(cfg):
    return GPTNeoX(cfg, ParallelState(tp=cfg.tp, device=torch.device("meta"))).num_parameters()


def expected_count(layers, h, vocab):
    return 2 * vocab * h + layers * (12 * h * h + 13 * h) + 2 * h


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_shipped_pythia_configs(size):
    cfg = load_config(ROOT / "configs" / "pythia" / f"pythia-{size}.yml")
    layers, h, heads, lr = SHAPES[size]
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, cfg.lr) == (layers, h, heads, lr)
    assert (m.rotary_pct, m.gpt_j_residual, m.no_weight_tying, m.layernorm_epsilon) == (0.25, True, True, 1e-5)
    assert cfg.optimizer.weight_decay == 0.1 and cfg.optimizer.min_lr == pytest.approx(lr / 10)
    assert cfg.optimizer.optimizer["params"]["betas"] == [0.9, 0.95] and cfg.training.train_iters == 143000
    n = count(cfg)
    assert n == PUBLISHED[size] == expected_count(layers, h, cfg.padded_vocab_size())


def test_70m_parameter_count_with_vocab_50304():
    cfg = load_config(ROOT / "configs" / "pythia" / "pythia-70m.yml")
    assert cfg.padded_vocab_size() == 50304 and count(cfg) == 70_426_624


REAL_FILES = sorted(p.name for p in SHARED.glob("*.yml"))


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_pythia_training_configs(name):
    path = SHARED / name
    if name == "pythia-12b.yml":  # published with a missing comma after "attention-config"
        with pytest.raises(
            ConfigError, match=r"pythia-12b\.yml:21:\d+: YAML syntax error.*missing comma after line 19\?"
        ):
            load_config(path)
        return
    if name == "pythia-12b-deduped.yml":  # published with layers and heads swapped: 36 heads cannot split 5120
        with pytest.raises(
            ConfigError,
            match=r"pythia-12b-deduped\.yml: num-layers 40 and num-attention-heads 36 "
            r"look swapped: 36 heads do not divide hidden-size 5120, 40 would",
        ):
            load_config(path, overrides={"vocab_size": 50277})
        return
    cfg = load_config(path, overrides={"vocab_size": 50277})
    size = name.removeprefix("pythia-").removesuffix(".yml").removesuffix("-deduped")
    assert count(cfg) == PUBLISHED[size]
    assert cfg.data.train_data_paths and cfg.data.tokenizer_type == "HFTokenizer"
    assert cfg.gelu_approximate == "tanh"  # bias-gelu-fusion: true


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


BASE = '{"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "vocab-size": 100, "rotary-pct": 0.25}\n'


def test_hyphens_and_underscores_and_merge(tmp_path):
    a = write(tmp_path, "a.yml", BASE)
    b = write(tmp_path, "b.yml", "seq_length: 128\ntrain-micro-batch-size-per-gpu: 3\ngas: 2\n")
    cfg = load_config([a, b])
    assert cfg.model.seq_length == 128 and cfg.training.train_micro_batch_size_per_gpu == 3
    assert cfg.training.gradient_accumulation_steps == 2 and cfg.source_of("seq-length") == str(b)


def test_key_in_two_files_names_both(tmp_path):
    a = write(tmp_path, "a.yml", BASE)
    b = write(tmp_path, "b.yml", "hidden_size: 128\n")
    with pytest.raises(ConfigError, match=r"b\.yml: key 'hidden_size' is also set in .*a\.yml"):
        load_config([a, b])


def test_duplicate_key_in_one_file(tmp_path):
    a = write(tmp_path, "a.yml", "num-layers: 2\nnum_layers: 3\n")
    with pytest.raises(ConfigError, match=r"a\.yml:2:1: YAML syntax error: key 'num_layers' given twice"):
        load_config(a)


def test_unknown_key_suggests_closest(tmp_path):
    a = write(tmp_path, "a.yml", BASE)
    b = write(tmp_path, "b.yml", "hiden-size: 3\n")
    with pytest.raises(ConfigError, match=r"b\.yml: unknown key 'hiden-size'; did you mean 'hidden-size'\?"):
        load_config([a, b])


def test_safe_loader_refuses_python_objects(tmp_path):
    a = write(tmp_path, "a.yml", "num-layers: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match=r"a\.yml:1:\d+: YAML syntax error"):
        load_config(a)


BASE_KEYS = {"num-layers": 2, "hidden-size": 64, "num-attention-heads": 4, "vocab-size": 100, "rotary-pct": 0.25}


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"num-attention-heads": 5}, r"num-attention-heads 5 does not divide hidden-size 64"),
        ({"rotary-pct": 1.5}, r"rotary-pct must be in \(0, 1\]"),
        ({"rotary-pct": 0.0}, r"rotary-pct must be in \(0, 1\]"),
        ({"pipe-parallel-size": 2}, r"pipeline parallelism is not implemented"),
        (
            {"model-parallel-size": 2, "zero_optimization": {"stage": 3}},
            r"ZeRO stage 3 with model-parallel-size 2 is not supported",
        ),
        ({"model-parallel-size": 3}, r"model-parallel-size 3 does not divide num-attention-heads 4"),
        ({"zero_optimization": {"stage": 4}}, r"stage must be 0, 1, 2 or 3"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, r"fp16 and bf16 are both enabled"),
        ({"lr-decay-style": "exponential"}, r"lr-decay-style: 'exponential' is not supported"),
        ({"num-layers": "two"}, r"num-layers: expected an integer"),
        ({"l2e-ratio": 2}, r"l2e-ratio is a fraction"),
        ({"l2e-layers": [7]}, r"layer 7 is out of range for num-layers 2"),
        ({"attention-config": [[["sparse"], 2]]}, r"type 'sparse' is not supported"),
        (
            {"data-path": "d/x_text_document", "valid-data-paths": ["d/v"]},
            r"valid-data-paths is used only together with train-data-paths",
        ),
    ],
)
def test_impossible_combinations(tmp_path, extra, message):
    a = tmp_path / "a.yml"
    a.write_text(yaml.safe_dump({**BASE_KEYS, **extra}))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(a)
    assert "\n" not in str(err.value) and "a.yml" in str(err.value)


def test_numeric_strings_from_yaml_1_1(tmp_path):
    cfg = load_config([write(tmp_path, "a.yml", BASE), write(tmp_path, "b.yml", "min_lr: 2e-05\n")])
    assert cfg.optimizer.min_lr == 2e-05


def test_world_size_check(tmp_path):
    cfg = load_config(write(tmp_path, "a.yml", BASE.rstrip()[:-1] + ', "model-parallel-size": 2}'))
    with pytest.raises(ConfigError, match="model-parallel-size 2 does not divide the world size 3"):
        cfg.check_world_size(3)
    assert cfg.check_world_size(4) == 2


def test_l2e_layer_selection(tmp_path):
    from neox_l2e.config import resolve_layers

    assert resolve_layers("mid2", 6) == [2, 3] and resolve_layers("mid2", 24) == [11, 12]
    assert resolve_layers("top-bot", 6) == [0, 5] and resolve_layers("mid-third", 6) == [2, 3]
    assert resolve_layers("mid-third", 24) == list(range(8, 16)) and resolve_layers([3, 1], 6) == [1, 3]


def test_docs_config_md_is_current():
    current = (ROOT / "docs" / "config.md").read_text()
    fresh = render()
    if current != fresh:
        diff = "\n".join(list(difflib.unified_diff(current.splitlines(), fresh.splitlines(), lineterm=""))[:20])
        pytest.fail("docs/config.md is out of date; run `make docs`\n" + diff)


def test_every_field_documented():
    import dataclasses

    from neox_l2e.config import SECTIONS

    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            doc = f.metadata.get("doc", "")
            assert doc and "\n" not in doc, f"{cls.__name__}.{f.name} needs a one-line doc"
            assert f.metadata["effect"] in ("used", "ignored")


GRIDS = sorted(p.name for p in (ROOT / "configs" / "l2e").glob("*.yml"))


@pytest.mark.parametrize("grid", GRIDS)
def test_l2e_grid_adds_to_every_pythia_config(grid):
    for size in ("70m", "410m", "2.8b"):
        cfg = load_config(
            [ROOT / "configs" / "pythia" / f"pythia-{size}.yml", ROOT / "configs" / "l2e" / grid],
            {"train-iters": 14300},
        )  # the paper's 10% runs, as the grid files' headers say
        assert cfg.training.train_iters == 14300 and cfg.optimizer.lr_decay_iters == 143000
        if grid == "baseline.yml":
            assert not cfg.l2e_active
        else:
            assert cfg.l2e_active and cfg.l2e.l2e_ratio in (0.01, 0.02, 0.03)
            assert cfg.l2e.l2e_method == ("memel" if grid.startswith("memel") else "l2e")
    L = cfg.model.num_layers  # 2.8B: 32 layers
    expect = {"mid2": [15, 16], "mid-third": list(range(10, 21)), "top-bot": [0, 31]}
    for name, layers in expect.items():
        if name in grid and not (name == "mid2" and "mid-third" in grid):
            assert cfg.inhibited_layers() == layers, (grid, L)


@pytest.mark.parametrize("grid", GRIDS)
def test_l2e_grid_files_hold_only_l2e_keys(grid):
    """A grid file is the experiment only, so it adds to any model config without a key set twice."""
    from neox_l2e.config.loader import canon, field_index

    index = field_index()
    keys = yaml.safe_load((ROOT / "configs" / "l2e" / grid).read_text())
    assert keys and {index[canon(k)][0] for k in keys} == {"l2e"}, keys


@pytest.mark.parametrize(
    "base",
    [
        ROOT / "configs" / "local" / "demo.yml",
        ROOT / "configs" / "pythia" / "pythia-70m.yml",
        SHARED / "pythia-70m.yml",
        SHARED / "pythia-410m-deduped.yml",
    ],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_l2e_grid_combines_with_the_configs_users_run(base):
    """`train.py configs/local/demo.yml configs/l2e/l2e-1pct-mid2.yml` and the published Pythia ymls plus a grid
    file (which set train-iters themselves) load; a train-iters override stops early."""
    if not base.is_file():
        pytest.skip(f"{base} is absent")
    for grid in GRIDS:
        cfg = load_config([base, ROOT / "configs" / "l2e" / grid], {"vocab-size": 50277})
        assert cfg.l2e_active == (grid != "baseline.yml")
        assert cfg.training.train_iters == load_config(base, {"vocab-size": 50277}).training.train_iters
    cfg = load_config([base, ROOT / "configs" / "l2e" / "l2e-1pct-mid2.yml"], {"train-iters": 30})
    assert cfg.training.train_iters == 30 and cfg.l2e.l2e_ratio == 0.01


def _numbers(value, path=""):
    """(path, value) of every leaf of a plain-YAML config that is meant as a number but may load as a string."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")
    else:
        yield path, value


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yml")))
def test_configs_load_as_numbers_in_plain_pyyaml(path):
    """GPT-NeoX reads configs with PyYAML (YAML 1.1), where 1e-08 (no dot) is a string: every value that looks
    like a number must load as one, so the files also work in upstream NeoX."""
    import re

    data = yaml.safe_load((ROOT / path).read_text())
    number = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
    strings = [(k, v) for k, v in _numbers(data) if isinstance(v, str) and number.match(v.strip())]
    assert not strings, f"{path}: loads as strings in PyYAML: {strings}; write 1.0e-8 style"


ADAM = {"type": "Adam", "params": {"lr": 0.001, "betas": [0.9, 0.95], "eps": 1.0e-8}}


@pytest.mark.parametrize(
    "extra, message",
    [
        # values that raised a traceback (ValueError, ZeroDivisionError) or crashed later in training
        ({"l2e-layers": ["a"]}, r"l2e-layers: layer indices must be integers, got 'a'"),
        (
            {"optimizer": {"type": "Adam", "params": {"lr": "abc"}}},
            r"optimizer\.params\.lr must be a finite number, got 'abc'",
        ),
        (
            {"optimizer": {**ADAM, "params": {**ADAM["params"], "betas": "abc"}}},
            r"optimizer\.params\.betas must be two numbers in \[0, 1\)",
        ),
        (
            {"optimizer": {**ADAM, "params": {**ADAM["params"], "eps": -1.0}}},
            r"optimizer\.params\.eps must be positive",
        ),
        ({"optimizer": {"type": "Adam", "params": "fast"}}, r"optimizer\.params must be a mapping"),
        ({"zero_optimization": {"stage": "two"}}, r"zero_optimization\.stage must be 0, 1, 2 or 3, got 'two'"),
        ({"make-vocab-size-divisible-by": 0}, r"make-vocab-size-divisible-by must be >= 1, got 0"),
        ({"intermediate-size": -4}, r"intermediate-size must be positive, got -4"),
        ({"log-interval": 0}, r"log-interval must be >= 1, got 0"),
        ({"steps_per_print": 0}, r"steps-per-print must be >= 1, got 0"),
        # values accepted before that must be refused
        ({"layernorm-epsilon": 0.0}, r"layernorm-epsilon must be positive, got 0\.0"),
        ({"layernorm-epsilon": -1.0e-5}, r"layernorm-epsilon must be positive"),
        ({"l2e-lambda": float("nan")}, r"l2e-lambda: expected a finite number, got nan"),
        ({"l2e-lambda": float("inf")}, r"l2e-lambda: expected a finite number, got inf"),
        ({"lr": float("nan")}, r"lr: expected a finite number, got nan"),
        ({"lr": "inf"}, r"lr: expected a finite number"),
        (
            {"optimizer": {"type": "Adam", "params": {"lr": float("inf")}}},
            r"optimizer\.params\.lr must be a finite number",
        ),
        ({"checkpoint-factor": 0}, r"checkpoint-factor must be >= 1, got 0"),
        ({"checkpoint-factor": -5}, r"checkpoint-factor must be >= 1, got -5"),
        ({"gradient-clipping": -1.0}, r"gradient-clipping must be >= 0, got -1\.0"),
        ({"weight-decay": -0.1}, r"weight-decay must be >= 0, got -0\.1"),
        ({"l2e-layers": [1.5]}, r"l2e-layers: layer indices must be integers, got 1\.5"),
        ({"l2e-layers": [True]}, r"l2e-layers: layer indices must be integers, got True"),
        ({"dist-timeout-s": 0}, r"dist-timeout-s must be >= 1, got 0"),
        ({"dist-timeout-s": -30}, r"dist-timeout-s must be >= 1, got -30"),
    ],
)
def test_bad_values_are_one_line_naming_file_and_key(tmp_path, extra, message):
    a = tmp_path / "a.yml"
    a.write_text(yaml.safe_dump({**BASE_KEYS, **extra}))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(a)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{a}: ")


def test_bad_values_as_command_line_overrides(tmp_path):
    """The same checks for key=value overrides (train.py / deepy.py): the error names the key."""
    from neox_l2e.config import parse_override

    a = write(tmp_path, "a.yml", BASE)
    for text, message in [
        ("l2e-layers=[a]", r"l2e-layers: layer indices must be integers"),
        ("optimizer={type: Adam, params: {lr: abc}}", r"optimizer\.params\.lr must be a finite"),
        ("zero-optimization={stage: two}", r"zero_optimization\.stage must be 0, 1, 2 or 3"),
        ("log-interval=0", r"log-interval must be >= 1"),
        ("l2e-lambda=.nan", r"l2e-lambda: expected a finite"),
    ]:
        with pytest.raises(ConfigError, match=message) as err:
            load_config(a, dict([parse_override(text)]))
        assert "\n" not in str(err.value) and str(err.value).startswith("<override>: ")


def test_binary_garbage_yml_is_one_line(tmp_path):
    a = tmp_path / "a.yml"
    a.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(128, 256)))
    with pytest.raises(ConfigError, match=r"a\.yml: not a text \(UTF-8\) file: byte 0 is 0x89") as err:
        load_config(a)
    assert "\n" not in str(err.value)


def test_dotted_overrides_set_one_entry_of_a_mapping(tmp_path):
    from neox_l2e.config import parse_override

    pythia = ROOT / "configs" / "pythia" / "pythia-70m.yml"
    overrides = dict(
        parse_override(t)
        for t in ("zero_optimization.stage=2", "optimizer.params.lr=0.002", "fp16.enabled=false", "precision=fp32")
    )
    cfg = load_config(pythia, overrides)
    zero = cfg.parallel.zero_optimization
    assert zero["stage"] == 2 and zero["reduce_bucket_size"] == 500000000 and cfg.zero_stage == 2
    assert cfg.lr == 0.002 and cfg.optimizer.optimizer["params"]["betas"] == [0.9, 0.95]
    assert cfg.precision.fp16["enabled"] is False and cfg.precision.fp16["loss_scale_window"] == 1000
    # a mapping key no file sets starts from its default; the files are not modified
    cfg = load_config(write(tmp_path, "base.yml", BASE), dict([parse_override("zero-optimization.stage=1")]))
    assert cfg.parallel.zero_optimization == {"stage": 1}
    assert load_config(pythia).parallel.zero_optimization["stage"] == 1
    with pytest.raises(ConfigError, match=r"<override>: seed\.x: seed is not a mapping"):
        load_config(pythia, dict([parse_override("seed.x=1")]))
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage must be 0, 1, 2 or 3, got 'two'"):
        load_config(pythia, dict([parse_override("zero_optimization.stage=two")]))


def test_override_replaces_a_key_given_by_its_alias():
    """pythia-12b.yml spells gas as gradient_accumulation_steps: gas=2 replaces it (no 'both set' error)."""
    cfg = load_config(ROOT / "configs" / "pythia" / "pythia-12b.yml", {"gas": 2})
    assert (
        cfg.training.gradient_accumulation_steps == 2 and cfg.source_of("gradient_accumulation_steps") == "<override>"
    )


@pytest.mark.parametrize(
    "argv, hint",
    [
        (
            ["a.yml", "--train-iters", "5"],
            "--train-iters: config keys are not flags; give them as key=value after the config files: train-iters=5",
        ),
        (["a.yml", "--train_iters=5"], "train-iters=5"),
        (["a.yml", "--zero_optimization.stage", "1"], "zero-optimization.stage=1"),
        (["a.yml", "--l2e-ratio"], "l2e-ratio=VALUE"),
    ],
)
def test_flag_hint(argv, hint):
    from neox_l2e.config.loader import flag_hint

    assert hint in flag_hint(argv)
    assert flag_hint(["a.yml", "--not-a-key", "5", "train-iters=5"]) is None


def test_train_and_deepy_print_the_hint(capsys):
    import importlib.util

    for script in ("train.py", "deepy.py"):
        spec = importlib.util.spec_from_file_location(script[:-3] + "_cli", ROOT / script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        argv = (
            ["configs/local/tiny.yml", "--train-iters", "5"]
            if script == "train.py"
            else ["--dry-run", "train.py", "configs/local/tiny.yml", "--train-iters", "5"]
        )
        with pytest.raises(SystemExit) as e:
            mod.parse_args(argv)
        assert e.value.code == 2
        assert (
            "error: --train-iters: config keys are not flags; give them as key=value after the config files: "
            "train-iters=5" in capsys.readouterr().err
        )


def test_sections_are_typed_and_read_only():
    import dataclasses
    import typing

    from neox_l2e.config import SECTIONS, NeoXConfig

    hints = typing.get_type_hints(NeoXConfig)
    assert {name: hints[name] for name in SECTIONS} == SECTIONS
    cfg = load_config(ROOT / "configs" / "local" / "tiny.yml")  # a loaded config is read-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.training.train_iters = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model = cfg.model


def test_derived_values_are_filled_in_at_load_and_validate_changes_nothing():
    import copy
    import dataclasses

    from neox_l2e.config import build_config
    from neox_l2e.config.loader import validate

    values = {
        **BASE_KEYS,
        "lr-decay-iters": 70,
        "optimizer": {"type": "Adam", "params": {"lr": "6e-05", "eps": "1e-8"}},
    }
    given = copy.deepcopy(values)
    cfg = build_config(values)
    assert values == given  # the caller's mapping is not touched
    assert cfg.training.train_iters == 70 and cfg.source_of("train_iters") == "<default>"
    assert cfg.optimizer.optimizer["params"] == {"lr": 6e-05, "eps": 1e-08} and cfg.lr == 6e-05
    assert build_config(BASE_KEYS).training.train_iters == 1000
    before = copy.deepcopy(cfg)
    validate(cfg)
    assert cfg == before
    # validate on values nothing derived: it refuses them and leaves them as they are
    unset = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, train_iters=None))
    with pytest.raises(ConfigError, match="train-iters is not set"):
        validate(unset)
    assert unset.training.train_iters is None
    params = {"lr": "6e-05"}
    as_text = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, optimizer={"params": params}))
    with pytest.raises(ConfigError, match="optimizer.params.lr must be a finite number, got '6e-05'"):
        validate(as_text)
    assert params == {"lr": "6e-05"}


def test_activation_checkpointing_keys_are_model_keys(tmp_path):
    cfg = load_config(write(tmp_path, "a.yml", BASE), {"checkpoint-activations": True, "checkpoint-num-layers": 2})
    assert cfg.model.checkpoint_activations and cfg.model.checkpoint_num_layers == 2
    model = GPTNeoX(cfg)
    assert model.gradient_checkpointing and model.checkpoint_num_layers == 2
    with pytest.raises(ConfigError, match="<override>: checkpoint-num-layers must be >= 1"):
        load_config(write(tmp_path, "a.yml", BASE), {"checkpoint-num-layers": 0})


def test_model_weights_come_from_the_seed_it_is_given(tmp_path):
    from neox_l2e.config import DEFAULT_SEED

    cfg = load_config(write(tmp_path, "a.yml", BASE), {"seed": 5})
    weight = "gpt_neox.embed_in.weight"
    default, five, five_again = (GPTNeoX(cfg, **kw).state_dict()[weight] for kw in ({}, {"seed": 5}, {"seed": 5}))
    assert torch.equal(five, five_again) and not torch.equal(default, five)
    assert torch.equal(default, GPTNeoX(cfg, seed=DEFAULT_SEED).state_dict()[weight])
