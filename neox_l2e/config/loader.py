"""Load NeoX yml files into typed, validated config sections.

    cfg = load_config(["configs/pythia/70M.yml", "configs/local/cpu.yml"])
    cfg.model.hidden_size, cfg.l2e.l2e_ratio, cfg.padded_vocab_size(tp=1)

Keys may use hyphens or underscores. Several files are merged; a key set in two files is an
error naming both. Everything is validated here, once; errors are ``ConfigError`` with one
line naming the file and key. Library code never exits: the command-line tools print the line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

from ..errors import ConfigError
from .schema import (
    SECTIONS,
    DataConfig,
    L2EConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    TrainingConfig,
    field_index,
)

OVERRIDE = "<override>"
# the values of model.compile: off, on (torch's default mode), or a torch.compile mode
COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def canon(key: str) -> str:
    return str(key).strip().replace("-", "_")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = canon(loader.construct_object(key_node, deep=deep))
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' given twice (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yml(path: Union[str, Path]) -> dict:
    """Parse one NeoX yml file (safe loader). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not a text (UTF-8) file: byte {e.start} is 0x{e.object[e.start]:02x}; a config is a NeoX yml file"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        hint = ""
        if "expected ','" in str(e.problem) and mark:
            prev = _previous_entry_line(path, mark.line)
            hint = f" (a missing comma after line {prev}?)" if prev else " (a missing comma after the previous entry?)"
        raise ConfigError(f"{where}: YAML syntax error: {e.problem or e}{hint}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML error: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def _previous_entry_line(path: Path, line0: int) -> Optional[int]:
    """1-based number of the last non-blank, non-comment line before 0-based line0 (where a comma is missing)."""
    lines = path.read_text().splitlines()
    for i in range(min(line0, len(lines)) - 1, -1, -1):
        text = lines[i].strip()
        if text and not text.startswith("#"):
            return i + 1
    return None


def merge_files(paths: Iterable[Union[str, Path]]) -> tuple[dict, dict]:
    """Merge yml files; return (values, sources) keyed by underscore names."""
    values, sources = {}, {}
    for path in paths:
        for key, value in read_yml(path).items():
            k = canon(key)
            if k in values:
                raise ConfigError(f"{path}: key '{key}' is also set in {sources[k]}; set it in one file only")
            values[k], sources[k] = value, str(path)
    return values, sources


# --------------------------------------------------------------------------------------------
# type checking


def _check_type(value, hint, key, src):
    if value is None:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], key, src) if len(inner) == 1 else value
    if hint is Any:
        return value
    bad = None
    if hint is bool:
        if not isinstance(value, bool):
            bad = "true or false"
    elif hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            bad = "an integer"
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads '2e-05' (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            bad = "a number"
        else:
            value = float(value)
            if not math.isfinite(value):
                bad = "a finite number"
    elif hint is str:
        if not isinstance(value, str):
            bad = "a string"
    elif hint is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            bad = "a list"
    elif hint is dict or origin is dict:
        if not isinstance(value, dict):
            bad = "a mapping"
    if bad:
        raise ConfigError(f"{src}: {key}: expected {bad}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# the resolved config


@dataclasses.dataclass(frozen=True)
class NeoXConfig:
    """The resolved configuration: one typed object per section, plus where each key came from."""

    model: ModelConfig
    optimizer: OptimizerConfig
    training: TrainingConfig
    data: DataConfig
    parallel: ParallelConfig
    precision: PrecisionConfig
    logging: LoggingConfig
    l2e: L2EConfig
    sources: dict = dataclasses.field(default_factory=dict)

    # ---- derived values (computed, never stored twice) ----
    @property
    def ffn_size(self) -> int:
        return self.model.intermediate_size or 4 * self.model.hidden_size

    @property
    def head_dim(self) -> int:
        return self.model.hidden_size // self.model.num_attention_heads

    @property
    def lr(self) -> float:
        return self.optimizer.lr if self.optimizer.lr is not None else float(self.optimizer.optimizer["params"]["lr"])

    @property
    def tp(self) -> int:
        return self.parallel.model_parallel_size

    @property
    def zero_stage(self) -> int:
        return int((self.parallel.zero_optimization or {}).get("stage", 0))

    @property
    def precision_name(self) -> str:
        p = self.precision
        if p.precision:
            return {"float16": "fp16", "half": "fp16", "bf16": "bfloat16", "float32": "fp32"}.get(
                p.precision, p.precision
            )
        if p.bf16 and p.bf16.get("enabled", True):
            return "bfloat16"
        if p.fp16 and p.fp16.get("enabled", True):
            return "fp16"
        return "fp32"

    @property
    def gelu_approximate(self) -> str:
        """'tanh' when NeoX's bias-gelu-fusion is on (its fused kernel uses the tanh form), else 'none'."""
        return "tanh" if self.model.bias_gelu_fusion else "none"

    @property
    def data_order(self) -> str:
        """The run's sample order, "stable" or "neox": data-order as set; "auto" (the default) is "neox" for a
        config taken from GPT-NeoX / Pythia, recognised by a file (or override) setting pipe-parallel-size (every
        NeoX and Pythia yml does, configs/pythia included; the project's own configs do not), else "stable".
        deepy.py passes the decided value to its ranks (their resolved config no longer tells which keys a file
        set)."""
        if self.data.data_order != "auto":
            return self.data.data_order
        return "neox" if self.source_of("pipe_parallel_size") != "<default>" else "stable"

    @property
    def compile_mode(self) -> Optional[str]:
        """The torch.compile mode of model.compile ("default" for true), or None when compile is off."""
        c = self.model.compile
        return None if c is False else ("default" if c is True else c)

    @property
    def l2e_active(self) -> bool:
        return bool(self.l2e.l2e_enabled) and self.l2e.l2e_method != "none"

    def padded_vocab_size(self, tp: Optional[int] = None, vocab_size: Optional[int] = None) -> int:
        """Vocab padded to a multiple of make-vocab-size-divisible-by x TP, as NeoX does."""
        tp = self.tp if tp is None else tp
        vocab = vocab_size or self.model.vocab_size
        if vocab is None:
            raise ConfigError(
                f"{self.source_of('vocab_size')}: vocab-size is not set and no tokenizer gave one; "
                "set vocab-size or vocab-file"
            )
        multiple = self.model.make_vocab_size_divisible_by * tp
        return int(math.ceil(vocab / multiple) * multiple)

    def inhibited_layers(self) -> list:
        """0-based layer indices L2E acts on (see docs/l2e.md)."""
        return resolve_layers(self.l2e.l2e_layers, self.model.num_layers)

    def source_of(self, key: str) -> str:
        return self.sources.get(canon(key), "<default>")

    def check_world_size(self, world_size: int) -> int:
        """Validate the parallel layout against a world size; return the data-parallel size."""
        tp = self.tp
        if world_size % tp:
            raise ConfigError(
                f"{self.source_of('model_parallel_size')}: model-parallel-size {tp} does not divide "
                f"the world size {world_size}; launch a multiple of {tp} ranks"
            )
        dp = world_size // tp
        t = self.training
        if t.train_batch_size is not None:
            want = t.train_micro_batch_size_per_gpu * t.gradient_accumulation_steps * dp
            if t.train_batch_size != want:
                raise ConfigError(
                    f"{self.source_of('train_batch_size')}: train-batch-size {t.train_batch_size} != micro-batch "
                    f"{t.train_micro_batch_size_per_gpu} x gas {t.gradient_accumulation_steps} "
                    f"x data-parallel size {dp} "
                    f"(= {want}) for world size {world_size}"
                )
        return dp

    # ---- serialisation (saved with every checkpoint) ----
    def to_dict(self) -> dict:
        out = {}
        for name in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, name)))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **overrides) -> "NeoXConfig":
        """A copy with some keys changed (validated again)."""
        values = self.to_dict()
        sources = dict(self.sources)
        for k, v in overrides.items():
            values[canon(k)] = v
            sources[canon(k)] = OVERRIDE
        return build_config(values, sources)


def resolve_layers(spec, num_layers: int) -> list:
    L = num_layers
    if isinstance(spec, (list, tuple)):
        bad = [i for i in spec if isinstance(i, bool) or not isinstance(i, int)]
        if bad:
            raise ConfigError(
                f"l2e-layers: layer indices must be integers, got {bad[0]!r}; use mid2, mid-third, "
                "top-bot or a list of 0-based layer indices like [2, 3]"
            )
        layers = sorted(set(spec))
    elif spec == "mid2":
        layers = sorted({max(L // 2 - 1, 0), min(L // 2, L - 1)})
    elif spec == "mid-third":
        start = L // 3
        layers = list(range(start, max(start + 1, (2 * L) // 3)))
    elif spec == "top-bot":
        layers = sorted({0, L - 1})
    else:
        raise ConfigError(
            f"l2e-layers: unknown value {spec!r}; use mid2, mid-third, top-bot or a list of layer indices"
        )
    for i in layers:
        if not 0 <= i < L:
            raise ConfigError(f"l2e-layers: layer {i} is out of range for num-layers {L}")
    return layers


def _at_least(cfg, key, value, low, hint=""):
    if value < low:
        raise ConfigError(f"{cfg.source_of(key)}: {key.replace('_', '-')} must be >= {low}, got {value}{hint}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_optimizer_params(cfg, opt: dict) -> None:
    """The NeoX optimizer block: params a mapping; lr and eps finite numbers; betas two numbers in [0, 1)."""
    src = cfg.source_of("optimizer")
    params = opt.get("params")
    if params is None:
        return
    if not isinstance(params, dict):
        raise ConfigError(
            f"{src}: optimizer.params must be a mapping like {{lr: 0.0006, betas: [0.9, 0.95], "
            f"eps: 1.0e-8}}, got {params!r}"
        )
    for key in ("lr", "eps"):
        if key in params and not _number(params[key]):
            raise ConfigError(f"{src}: optimizer.params.{key} must be a finite number, got {params[key]!r}")
    if "lr" in params and params["lr"] < 0:
        raise ConfigError(f"{src}: optimizer.params.lr must be >= 0, got {params['lr']}")
    if "eps" in params and params["eps"] <= 0:
        raise ConfigError(f"{src}: optimizer.params.eps must be positive, got {params['eps']}")
    if "betas" in params:
        betas = params["betas"]
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas)):
            raise ConfigError(
                f"{src}: optimizer.params.betas must be two numbers in [0, 1) like [0.9, 0.95], got {betas!r}"
            )


def _one_of(cfg, key, value, allowed):
    if value not in allowed:
        raise ConfigError(
            f"{cfg.source_of(key)}: {key.replace('_', '-')}: {value!r} is not supported; "
            f"use one of {', '.join(map(str, allowed))}"
        )


def _attention_config_layers(m) -> Optional[int]:
    """Layers attention-config covers, or None when it is unset or malformed (validate reports that)."""
    try:
        return sum(int(count) for _, count in m.attention_config) if m.attention_config is not None else None
    except (TypeError, ValueError):
        return None


def _looks_swapped(m) -> bool:
    """num-layers and num-attention-heads exchanged (as in the published pythia-12b-deduped.yml): the heads do not
    divide the width, the layer count would, and attention-config counts as many layers as there are heads."""
    return (
        m.num_layers != m.num_attention_heads
        and m.hidden_size % m.num_layers == 0
        and _attention_config_layers(m) == m.num_attention_heads
    )


def derive(sections: Mapping[str, Any]) -> dict:
    """The sections with the values that default to other keys filled in; build_config applies it once, before
    validation. train-iters unset: lr-decay-iters, else 1000 (train the whole LR schedule). optimizer.params lr
    and eps written as YAML 1.1 reads '6e-05' (no dot, a string) become numbers. Nothing else changes."""
    out = dict(sections)
    t, o = out["training"], out["optimizer"]
    if t.train_iters is None:
        out["training"] = dataclasses.replace(t, train_iters=o.lr_decay_iters if o.lr_decay_iters is not None else 1000)
    params = o.optimizer.get("params") if isinstance(o.optimizer, dict) else None
    if isinstance(params, dict) and any(isinstance(params.get(k), str) for k in ("lr", "eps")):
        params = dict(params)
        for key in ("lr", "eps"):
            if isinstance(params.get(key), str):
                try:
                    params[key] = float(params[key])
                except ValueError:
                    pass  # validate names it
        out["optimizer"] = dataclasses.replace(o, optimizer={**o.optimizer, "params": params})
    return out


def validate(cfg: NeoXConfig) -> None:
    """Cross-field checks: impossible combinations fail here, at load time. A pure check: it changes nothing
    (values derived from other keys are filled in before, by derive)."""
    m, s = cfg.model, cfg.source_of
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if getattr(m, key) is None:
            raise ConfigError(f"{key.replace('_', '-')} is required (no config file sets it)")
        if getattr(m, key) <= 0:
            raise ConfigError(f"{s(key)}: {key.replace('_', '-')} must be positive, got {getattr(m, key)}")
    if m.hidden_size % m.num_attention_heads:
        if _looks_swapped(m):
            raise ConfigError(
                f"{s('num_attention_heads')}: num-layers {m.num_layers} and num-attention-heads "
                f"{m.num_attention_heads} look swapped: {m.num_attention_heads} heads do not divide hidden-size "
                f"{m.hidden_size}, {m.num_layers} would, and attention-config covers {m.num_attention_heads} layers; "
                "exchange the two values"
            )
        raise ConfigError(
            f"{s('num_attention_heads')}: num-attention-heads {m.num_attention_heads} does not divide "
            f"hidden-size {m.hidden_size}"
        )
    if not 0.0 < m.rotary_pct <= 1.0:
        raise ConfigError(f"{s('rotary_pct')}: rotary-pct must be in (0, 1], got {m.rotary_pct}")
    rot = int(cfg.head_dim * m.rotary_pct)
    if rot < 2 or rot % 2:
        raise ConfigError(
            f"{s('rotary_pct')}: rotary-pct {m.rotary_pct} x head dim {cfg.head_dim} gives {rot} rotary "
            "dims; it must be an even number >= 2"
        )
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        raise ConfigError(
            f"{s('max_position_embeddings')}: max-position-embeddings {m.max_position_embeddings} is "
            f"below seq-length {m.seq_length}"
        )
    _one_of(cfg, "pos_emb", m.pos_emb, ["rotary"])
    _one_of(cfg, "norm", m.norm, ["layernorm"])
    _one_of(cfg, "activation", m.activation, ["gelu"])
    _one_of(cfg, "output_layer_parallelism", m.output_layer_parallelism, ["column"])
    _one_of(
        cfg,
        "init_method",
        m.init_method,
        ["normal", "small_init", "xavier_normal", "xavier_uniform", "scaled_normal", "wang_init"],
    )
    _one_of(
        cfg,
        "output_layer_init_method",
        m.output_layer_init_method,
        ["normal", "small_init", "xavier_normal", "xavier_uniform", "scaled_normal", "wang_init"],
    )
    if m.gpt_j_tied and not m.gpt_j_residual:
        raise ConfigError(f"{s('gpt_j_tied')}: gpt-j-tied needs gpt-j-residual: true")
    if m.attention_config is not None:
        try:
            entries = [(list(types), int(count)) for types, count in m.attention_config]
        except (TypeError, ValueError):
            raise ConfigError(f"{s('attention_config')}: attention-config must look like [[['flash'], N]]") from None
        for types, _ in entries:
            for t in types:
                if t not in ("global", "flash"):
                    raise ConfigError(
                        f"{s('attention_config')}: attention-config: type {t!r} is not supported "
                        "(only global/flash, both run torch SDPA)"
                    )
        total = sum(count for _, count in entries)
        if total != m.num_layers:
            raise ConfigError(
                f"{s('attention_config')}: attention-config covers {total} layers but num-layers is {m.num_layers}"
            )
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(m, key) < 1.0:
            raise ConfigError(f"{s(key)}: {key.replace('_', '-')} must be in [0, 1)")
    if m.intermediate_size is not None and m.intermediate_size < 1:
        raise ConfigError(
            f"{s('intermediate_size')}: intermediate-size must be positive, got {m.intermediate_size} "
            "(or leave it unset for 4 x hidden-size)"
        )
    _at_least(cfg, "make_vocab_size_divisible_by", m.make_vocab_size_divisible_by, 1)
    for key in ("layernorm_epsilon", "init_method_std", "rotary_emb_base"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"{s(key)}: {key.replace('_', '-')} must be positive, got {getattr(m, key)}")

    o = cfg.optimizer
    opt = o.optimizer or {}
    _one_of(cfg, "optimizer", str(opt.get("type", "Adam")).lower(), ["adam", "adamw"])
    _check_optimizer_params(cfg, opt)
    if o.lr is None and "lr" not in (opt.get("params") or {}):
        raise ConfigError(f"{s('optimizer')}: no learning rate: set optimizer.params.lr or lr")
    for key in ("weight_decay", "gradient_clipping"):
        if getattr(o, key) < 0:
            raise ConfigError(
                f"{s(key)}: {key.replace('_', '-')} must be >= 0, got {getattr(o, key)}"
                + (" (0 = no clipping)" if key == "gradient_clipping" else "")
            )
    _one_of(cfg, "lr_decay_style", o.lr_decay_style, ["cosine", "linear", "constant"])
    if not 0.0 <= o.warmup < 1.0:
        raise ConfigError(f"{s('warmup')}: warmup is a fraction of lr-decay-iters in [0, 1), got {o.warmup}")
    if cfg.lr < 0 or o.min_lr < 0 or o.min_lr > cfg.lr:
        raise ConfigError(f"{s('min_lr')}: min-lr {o.min_lr} must be between 0 and lr {cfg.lr}")

    t = cfg.training
    if t.train_iters is None:
        raise ConfigError(
            f"{s('train_iters')}: train-iters is not set (derive fills it in from lr-decay-iters before validation)"
        )
    for key in (
        "train_iters",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "eval_iters",
        "eval_interval",
    ):
        if getattr(t, key) < 1:
            raise ConfigError(f"{s(key)}: {key.replace('_', '-')} must be >= 1")
    _at_least(cfg, "checkpoint_num_layers", m.checkpoint_num_layers, 1)
    if t.keep_last_n_checkpoints is not None and t.keep_last_n_checkpoints < 1:
        raise ConfigError(f"{s('keep_last_n_checkpoints')}: keep-last-n-checkpoints must be >= 1")
    if t.checkpoint_factor is not None:
        _at_least(cfg, "checkpoint_factor", t.checkpoint_factor, 1, " (or leave it unset: no periodic saves)")
    _at_least(cfg, "dist_timeout_s", t.dist_timeout_s, 1)
    _at_least(cfg, "max_bad_steps", t.max_bad_steps, 1)
    _at_least(cfg, "log_interval", cfg.logging.log_interval, 1)
    _at_least(cfg, "steps_per_print", cfg.logging.steps_per_print, 1)

    p = cfg.parallel
    if p.pipe_parallel_size not in (0, 1):
        raise ConfigError(
            f"{s('pipe_parallel_size')}: pipeline parallelism is not implemented; pipe-parallel-size "
            f"must be 0 or 1 (got {p.pipe_parallel_size}); use model-parallel-size and data parallelism"
        )
    if p.model_parallel_size < 1:
        raise ConfigError(f"{s('model_parallel_size')}: model-parallel-size must be >= 1")
    tp = p.model_parallel_size
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"{s('model_parallel_size')}: model-parallel-size {tp} does not divide "
            f"num-attention-heads {m.num_attention_heads}"
        )
    if cfg.ffn_size % tp:
        raise ConfigError(
            f"{s('model_parallel_size')}: model-parallel-size {tp} does not divide the MLP width {cfg.ffn_size}"
        )
    raw_stage = (p.zero_optimization or {}).get("stage", 0)
    if (
        isinstance(raw_stage, bool)
        or not isinstance(raw_stage, (int, float, str))
        or not str(raw_stage).strip().lstrip("+-").isdigit()
    ):
        raise ConfigError(f"{s('zero_optimization')}: zero_optimization.stage must be 0, 1, 2 or 3, got {raw_stage!r}")
    stage = cfg.zero_stage
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{s('zero_optimization')}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
    if stage == 3 and tp > 1:
        raise ConfigError(
            f"{s('zero_optimization')}: ZeRO stage 3 with model-parallel-size {tp} is not supported "
            "(it would shard the tensor-parallel weights again); use stage 1 or 2 with TP, or TP 1"
        )

    _one_of(cfg, "sdpa_backend", m.sdpa_backend, ["auto", "flash", "efficient", "cudnn", "math"])
    if not isinstance(m.compile, (bool, str)) or m.compile not in COMPILE_MODES:
        raise ConfigError(
            f"{s('compile')}: compile: {m.compile!r} is not supported; use one of "
            + ", ".join(str(v).lower() for v in COMPILE_MODES)
        )
    if m.compile:
        _one_of(cfg, "compile_backend", m.compile_backend, ["inductor", "aot_eager", "eager"])
        if stage == 3:
            raise ConfigError(
                f"{s('compile')}: compile with ZeRO stage 3 is not supported here (stage 3 gathers weights in "
                "hooks around each module's forward); use ZeRO stage 0, 1 or 2, or compile: false"
            )
        if m.checkpoint_activations and m.attention_dropout > 0:
            raise ConfigError(
                f"{s('compile')}: compile with checkpoint-activations and attention-dropout "
                f"{m.attention_dropout:g} is not supported (a compiled recomputation cannot replay the tensor-parallel "
                "dropout stream); set attention-dropout 0 (Pythia's), checkpoint-activations false, or compile false"
            )

    pr = cfg.precision
    if pr.fp16 and pr.fp16.get("enabled", True) and pr.bf16 and pr.bf16.get("enabled", True):
        raise ConfigError(f"{s('bf16')}: fp16 and bf16 are both enabled; choose one")
    _one_of(cfg, "precision", cfg.precision_name, ["fp32", "fp16", "bfloat16"])

    d = cfg.data
    _one_of(cfg, "data_impl", d.data_impl, ["mmap"])
    _one_of(cfg, "data_order", d.data_order, ["auto", "stable", "neox"])
    _one_of(cfg, "tokenizer_type", d.tokenizer_type, ["HFTokenizer", "SPMTokenizer"])
    try:
        weights = [float(x) for x in str(d.split).split(",")]
        if len(weights) > 3 or sum(weights) <= 0 or min(weights) < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"{s('split')}: split must be up to three non-negative weights like '969,30,1', got {d.split!r}"
        ) from None
    for kind in ("valid", "test"):
        if getattr(d, f"{kind}_data_paths") and not d.train_data_paths:
            raise ConfigError(
                f"{s(kind + '_data_paths')}: {kind}-data-paths is used only together with "
                f"train-data-paths (with data-path, {kind} comes from split); set train-data-paths too"
            )
    for kind in ("train", "valid", "test"):
        paths, weights = getattr(d, f"{kind}_data_paths"), getattr(d, f"{kind}_data_weights")
        if weights is not None and (paths is None or len(weights) != len(paths)):
            raise ConfigError(
                f"{s(kind + '_data_weights')}: {kind}-data-weights needs one weight per {kind}-data-paths entry"
            )

    e = cfg.l2e
    _one_of(cfg, "l2e_method", e.l2e_method, ["l2e", "memel", "none"])
    _one_of(cfg, "l2e_backend", e.l2e_backend, ["auto", "torch", "triton"])
    _one_of(cfg, "l2e_loss_reduction", e.l2e_loss_reduction, ["selected-mean", "token-sum"])
    _one_of(cfg, "l2e_grad_to_input", e.l2e_grad_to_input, [True, False])
    _one_of(cfg, "l2e_fkr_tau_mode", e.l2e_fkr_tau_mode, ["per-token", "global"])
    if not 0.0 < e.l2e_ratio < 1.0:
        raise ConfigError(f"{s('l2e_ratio')}: l2e-ratio is a fraction in (0, 1), got {e.l2e_ratio}")
    if e.l2e_lambda < 0 or e.l2e_eta <= 0 or e.l2e_eps < 0:
        raise ConfigError(f"{s('l2e_lambda')}: l2e-lambda and l2e-eps must be >= 0 and l2e-eta > 0")
    if e.l2e_min_samples < 2:
        raise ConfigError(f"{s('l2e_min_samples')}: l2e-min-samples must be >= 2 (the variance needs two samples)")
    if e.l2e_decay is not None and not 0.0 < e.l2e_decay < 1.0:
        raise ConfigError(f"{s('l2e_decay')}: l2e-decay must be in (0, 1) or null (cumulative)")
    if not (e.l2e_tau_init == "quantile" or (isinstance(e.l2e_tau_init, (int, float)) and e.l2e_tau_init > 0)):
        raise ConfigError(f"{s('l2e_tau_init')}: l2e-tau-init must be 'quantile' or a positive number")
    try:
        resolve_layers(e.l2e_layers, m.num_layers)
    except ConfigError as err:
        raise ConfigError(f"{s('l2e_layers')}: {err}") from None


def build_config(values: Mapping[str, Any], sources: Optional[Mapping[str, str]] = None) -> NeoXConfig:
    """Typed, validated config from a flat mapping of (NeoX) keys."""
    sources = dict(sources or {})
    index = field_index()
    per_section = {name: {} for name in SECTIONS}
    hints = {name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}
    resolved_sources = {}
    for key, value in values.items():
        k = canon(key)
        src = sources.get(k, OVERRIDE)
        if k not in index:
            close = difflib.get_close_matches(k, list(index), n=1, cutoff=0.6)
            hint = (
                f"; did you mean '{close[0].replace('_', '-')}'?"
                if close
                else "; see docs/config.md for the known keys"
            )
            raise ConfigError(f"{src}: unknown key '{k.replace('_', '-')}'{hint}")
        section, name = index[k]
        if name in per_section[section]:
            raise ConfigError(f"{src}: key '{key}' and its alias '{name}' are both set; keep one")
        per_section[section][name] = _check_type(value, hints[section][name], k.replace("_", "-"), src)
        resolved_sources[name] = src
    sections = derive({name: cls(**per_section[name]) for name, cls in SECTIONS.items()})
    cfg = NeoXConfig(**sections, sources=resolved_sources)
    validate(cfg)
    return cfg


def load_config(
    paths: Union[str, Path, Iterable[Union[str, Path]]], overrides: Optional[Mapping[str, Any]] = None
) -> NeoXConfig:
    """Load, merge and validate NeoX yml files; ``overrides`` (key -> value) win over the files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    values, sources = merge_files(list(paths))
    apply_overrides(values, sources, overrides or {})
    return build_config(values, sources)


def apply_overrides(values: dict, sources: dict, overrides: Mapping[str, Any]) -> None:
    """Put command-line overrides into merged values (in place). A key replaces the files' key, also one spelled
    by an alias (gas); a dotted key (zero_optimization.stage, optimizer.params.lr) sets one entry of a mapping
    key, keeping the mapping's other entries (from the files, else the key's default)."""
    index = field_index()
    for k, v in overrides.items():
        k = canon(k)
        head, _, rest = k.partition(".")
        if head in index:  # an override replaces the file's key also when the file spells it by an alias (gas)
            for other in [o for o in values if o != head and index.get(o) == index[head]]:
                values[head] = values.pop(other)
                sources.pop(other, None)
        if rest:
            v = _set_nested(head, values.get(head, _default_of(head, index)), rest.split("."), v)
        values[head] = v
        sources[head] = OVERRIDE


def _default_of(key: str, index: dict):
    if key not in index:
        return None
    section, name = index[key]
    f = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


def _set_nested(head: str, base, path: list, value):
    """A deep copy of the mapping ``base`` with base[path[0]][path[1]]... = value (mappings made as needed)."""
    import copy

    if base is None:
        base = {}
    if not isinstance(base, dict):
        raise ConfigError(
            f"{OVERRIDE}: {head.replace('_', '-')}.{'.'.join(path)}: {head.replace('_', '-')} is "
            f"not a mapping (it is {base!r}); a dotted key sets an entry of a mapping key"
        )
    out = node = copy.deepcopy(base)
    for i, part in enumerate(path):
        if not part:
            raise ConfigError(f"{OVERRIDE}: {head}.{'.'.join(path)}: empty name in the dotted key")
        if i == len(path) - 1:
            node[part] = value
        else:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"{OVERRIDE}: {head}.{'.'.join(path)}: {head}.{'.'.join(path[: i + 1])} is not a "
                    f"mapping (it is {nxt!r})"
                )
            node = nxt
    return out


def flag_hint(args: Iterable[str]) -> Optional[str]:
    """A one-line hint when a config key was given as a command-line flag (--train-iters 5), else None."""
    args = list(args)
    index = field_index()
    for i, a in enumerate(args):
        if not a.startswith("--") or len(a) < 3:
            continue
        name, eq, value = a[2:].partition("=")
        if canon(name).partition(".")[0] not in index:
            continue
        if not eq:
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else "VALUE"
        key = name.replace("_", "-")
        return f"{a}: config keys are not flags; give them as key=value after the config files: {key}={value}"
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """'key=value' from the command line; the value is parsed as YAML (numbers, lists, true/false)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return canon(key), value


def config_from_checkpoint_dict(d: Mapping[str, Any]) -> NeoXConfig:
    """Rebuild the config saved inside a checkpoint (a flat dict of underscore keys)."""
    return build_config(d, {k: "<checkpoint>" for k in d})
