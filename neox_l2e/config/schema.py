"""Typed config sections. Every field is a NeoX key (hyphens or underscores) with a one-line doc.

A field's ``effect`` says what it does here: ``used`` (read by this project), or ``ignored``
(a NeoX key accepted so real NeoX/Pythia configs load unchanged; the doc says why it has no
effect). docs/config.md is generated from these declarations (``python -m neox_l2e.config.docs``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional


def setting(
    default: Any = dataclasses.MISSING, doc: str = "", *, effect: str = "used", aliases: tuple = (), factory: Any = None
):
    """Declare a config field: default, one-line doc, effect (used / ignored) and NeoX aliases."""
    meta = {"doc": doc, "effect": effect, "aliases": tuple(aliases)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


IGN = "ignored"
DEFAULT_SEED = 1234


@dataclass(frozen=True)
class ModelConfig:
    """The Pythia / GPT-NeoX architecture, and how its forward runs (activation checkpointing)."""

    num_layers: int = setting(None, "Number of transformer layers (required).")
    hidden_size: int = setting(None, "Model width h (required).")
    num_attention_heads: int = setting(
        None, "Attention heads; must divide hidden-size (and heads must divide by the TP degree)."
    )
    seq_length: int = setting(2048, "Training sequence length in tokens.")
    max_position_embeddings: Optional[int] = setting(
        None, "Longest position the model supports; defaults to seq-length."
    )
    intermediate_size: Optional[int] = setting(None, "MLP width; defaults to 4 x hidden-size, as in Pythia.")
    vocab_size: Optional[int] = setting(
        None,
        "Tokenizer vocabulary size before padding; taken from the tokenizer when one is configured (Pythia's 20B tokenizer: 50277).",
    )
    make_vocab_size_divisible_by: int = setting(
        128, "Pad the vocabulary to a multiple of this times the TP degree, as NeoX does."
    )
    pos_emb: str = setting("rotary", "Position embedding; only 'rotary' (Pythia's) is implemented.")
    rotary_pct: float = setting(
        1.0, "Fraction of each head's dims that get rotary embeddings (Pythia: 0.25); in (0, 1]."
    )
    rotary_emb_base: int = setting(10000, "Rotary base frequency.")
    gpt_j_residual: bool = setting(False, "Parallel residual: x + attn(ln1(x)) + mlp(ln2(x)) (Pythia: true).")
    gpt_j_tied: bool = setting(
        False, "GPT-J style single shared LayerNorm for attention and MLP in the parallel residual."
    )
    no_weight_tying: bool = setting(False, "Untied input and output embeddings (Pythia: true).")
    norm: str = setting("layernorm", "Normalisation; only 'layernorm' (torch's LayerNorm, no apex) is implemented.")
    layernorm_epsilon: float = setting(1.0e-5, "LayerNorm epsilon (> 0).")
    activation: str = setting(
        "gelu", "MLP activation; only 'gelu' is implemented (see bias-gelu-fusion for which GELU)."
    )
    bias_gelu_fusion: bool = setting(
        False, "NeoX fuses bias+GELU with the tanh approximation: true = tanh GELU, false = exact erf GELU."
    )
    hidden_dropout: float = setting(0.0, "Dropout on the attention and MLP outputs.")
    attention_dropout: float = setting(0.0, "Dropout on attention probabilities.")
    init_method: str = setting(
        "normal", "Init of input-side weights: normal, small_init (std sqrt(2/(5h))), xavier_normal, xavier_uniform."
    )
    output_layer_init_method: str = setting(
        "scaled_normal",
        "Init of layer-output weights: scaled_normal (std/sqrt(2L)), wang_init (2/(L sqrt(h))), normal, small_init.",
    )
    init_method_std: float = setting(0.02, "Standard deviation for the 'normal' and 'scaled_normal' inits.")
    output_layer_parallelism: str = setting(
        "column", "How the output head is split under TP; only 'column' (NeoX default, Pythia) is implemented."
    )
    attention_config: Any = setting(
        None,
        "Attention type per layer, NeoX form [[['flash'], N]]; 'global' and 'flash' both use torch scaled_dot_product_attention (flash kernel picked by torch on GPU); other types are refused.",
    )
    sdpa_backend: str = setting(
        "auto",
        "Kernel of torch scaled_dot_product_attention: auto (torch's choice: flash on CUDA in bf16/fp16 when it applies), or only flash, efficient, cudnn or math (a forced kernel that cannot run raises).",
    )
    scaled_upper_triang_masked_softmax_fusion: bool = setting(
        False,
        "NeoX fused-softmax flag; no effect here: attention always goes through torch SDPA, which is fused.",
        effect=IGN,
    )
    scaled_masked_softmax_fusion: bool = setting(
        False, "NeoX fused-softmax flag; no effect here: torch SDPA is always used.", effect=IGN
    )
    rope_fusion: bool = setting(False, "NeoX fused-rotary flag; no effect here: rotary is plain torch.", effect=IGN)
    use_bias_in_attn_linear: bool = setting(True, "Biases in the QKV and attention-out projections (Pythia: true).")
    use_bias_in_norms: bool = setting(True, "Biases in LayerNorms (Pythia: true).")
    checkpoint_activations: bool = setting(
        False, "Recompute each layer's activations in backward (torch.utils.checkpoint)."
    )
    checkpoint_num_layers: int = setting(1, "Layers per checkpointed chunk.")
    compile: Any = setting(
        False,
        "torch.compile the model's forward in place after DeepSpeed's initialize (engine.compile; ZeRO 0-2): false, true (torch's default mode), or a mode: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs; an inhibited layer's up-projection runs eagerly (a graph break).",
    )
    compile_backend: str = setting(
        "inductor", "torch.compile backend when compile is on: inductor, or aot_eager / eager (no code generation)."
    )
    partition_activations: bool = setting(
        False,
        "NeoX splits checkpointed activations across TP ranks; no effect here (memory optimisation not implemented).",
        effect=IGN,
    )


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule (NeoX names)."""

    optimizer: dict = setting(
        None,
        "NeoX optimizer block {type: Adam|AdamW, params: {lr, betas, eps}}; Adam means AdamW with weight-decay, as in NeoX.",
        factory=lambda: {"type": "Adam", "params": {"lr": 6e-4, "betas": [0.9, 0.95], "eps": 1e-8}},
    )
    lr: Optional[float] = setting(None, "Peak learning rate; defaults to optimizer.params.lr.")
    min_lr: float = setting(0.0, "Learning rate at the end of decay (Pythia: lr/10).")
    weight_decay: float = setting(0.01, "Decoupled weight decay (Pythia: 0.1; >= 0); not applied to biases and norms.")
    lr_decay_style: str = setting("cosine", "Decay after warmup: cosine, linear or constant.")
    lr_decay_iters: Optional[int] = setting(None, "Iterations over which lr decays; defaults to train-iters.")
    warmup: float = setting(0.01, "Linear warmup as a fraction of lr-decay-iters (Pythia: 0.01).")
    gradient_clipping: float = setting(1.0, "Clip the global gradient norm to this (0 = off; >= 0).")
    zero_allow_untested_optimizer: bool = setting(
        True,
        "Passed to DeepSpeed as zero_allow_untested_optimizer. The optimizer is always torch's AdamW, which DeepSpeed's ZeRO counts as tested, so either value trains the same.",
    )


@dataclass(frozen=True)
class TrainingConfig:
    """Steps, batches, evaluation and checkpoints."""

    train_iters: Optional[int] = setting(
        None,
        "Optimizer steps to train; defaults to lr-decay-iters, else 1000 (a Pythia config alone trains its whole schedule; a grid file can stop it early).",
    )
    train_micro_batch_size_per_gpu: int = setting(4, "Sequences per micro-batch on each data-parallel rank.")
    gradient_accumulation_steps: int = setting(1, "Micro-batches per optimizer step.", aliases=("gas",))
    train_batch_size: Optional[int] = setting(
        None, "Global batch in sequences; if set it must equal micro-batch x gas x DP size."
    )
    seed: int = setting(DEFAULT_SEED, "Seed for weights, data order and dropout.")
    eval_interval: int = setting(1000, "Evaluate on the valid split every this many steps.")
    eval_iters: int = setting(10, "Micro-batches per evaluation.")
    save: Optional[str] = setting(None, "Checkpoint directory to save to.")
    load: Optional[str] = setting(None, "Checkpoint directory to resume from (the `latest` tag).")
    checkpoint_factor: Optional[int] = setting(
        None,
        "Save a checkpoint every this many steps (NeoX's save-interval); >= 1, or unset for no periodic saves.",
        aliases=("save_interval",),
    )
    extra_save_iters: Optional[list] = setting(
        None, "Additional steps at which to save (Pythia's log-spaced early checkpoints)."
    )
    keep_last_n_checkpoints: Optional[int] = setting(None, "Keep only the newest N checkpoints (None keeps all).")
    save_on_interrupt: bool = setting(True, "On Ctrl-C (SIGINT/SIGTERM), save a checkpoint before exiting.")
    max_bad_steps: int = setting(
        10, "Stop with an error after this many consecutive steps with a NaN/inf loss (each one is skipped)."
    )
    dist_timeout_s: int = setting(
        300,
        "Seconds a collective may wait before a rank gives up (so a dead rank ends the run instead of hanging); >= 1.",
    )
    synchronize_each_layer: bool = setting(False, "NeoX CUDA-sync debugging flag; no effect here.", effect=IGN)
    finetune: bool = setting(False, "Load only model weights from `load` (fresh optimizer, step 0).")
    no_load_optim: bool = setting(False, "When resuming, do not load optimizer state.")
    checkpoint_verify: bool = setting(
        True,
        "Check size and sha256 of the checkpoint files read on resume against its manifest.json (false: skip, e.g. for huge checkpoints; a note says what is skipped).",
    )
    iteration: Optional[int] = setting(
        None, "NeoX internal resume counter; ignored (the checkpoint records the step).", effect=IGN
    )


@dataclass(frozen=True)
class DataConfig:
    """Datasets, tokenizer and loading."""

    data_path: Optional[str] = setting(
        None,
        "Dataset prefix (PATH for PATH.bin/.idx) whose documents are split into train/valid/test by `split`; ignored when train-data-paths is set.",
    )
    train_data_paths: Optional[list] = setting(None, "Training dataset prefixes (blended by train-data-weights).")
    valid_data_paths: Optional[list] = setting(None, "Validation dataset prefixes.")
    test_data_paths: Optional[list] = setting(None, "Test dataset prefixes.")
    train_data_weights: Optional[list] = setting(
        None, "Blend weights for train-data-paths (default: proportional to size)."
    )
    valid_data_weights: Optional[list] = setting(None, "Blend weights for valid-data-paths.")
    test_data_weights: Optional[list] = setting(None, "Blend weights for test-data-paths.")
    split: str = setting("969,30,1", "train,valid,test weights used to split data-path.")
    data_impl: str = setting("mmap", "Dataset format; only 'mmap' (the Megatron/NeoX .bin/.idx) is implemented.")
    mmap_warmup: bool = setting(False, "NeoX pre-reads the mmap; no effect here.", effect=IGN)
    num_workers: int = setting(
        2,
        "NeoX's DataLoader worker processes. No effect here: there is no DataLoader; each rank reads its micro-batches in the training process straight from the memory-mapped dataset (an index lookup and a copy per sample), which needs no workers.",
        effect=IGN,
    )
    tokenizer_type: str = setting(
        "HFTokenizer", "HFTokenizer (tokenizers JSON, e.g. Pythia's 20B) or SPMTokenizer (SentencePiece .model)."
    )
    vocab_file: Optional[str] = setting(None, "Tokenizer file for tokenizer-type.")
    merge_file: Optional[str] = setting(
        None, "GPT-2 BPE merges file; not used by the supported tokenizers.", effect=IGN
    )
    data_cache_dir: Optional[str] = setting(
        None, "Where the epoch-order index files are cached; defaults to next to the data."
    )
    data_order: str = setting(
        "auto",
        "Sample order: 'neox' (GPT-NeoX's index mappings: the same samples at the same steps as NeoX), 'stable' (epoch by epoch: a larger train-iters keeps every earlier sample in place), or 'auto' (neox when the config sets pipe-parallel-size, as NeoX/Pythia ymls do; else stable); see docs/data.md.",
    )


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor / data parallelism, ZeRO and the launcher."""

    model_parallel_size: int = setting(
        1, "Tensor-parallel degree (must divide the world size, heads and the MLP width)."
    )
    pipe_parallel_size: int = setting(
        0, "Pipeline parallelism is not implemented: 0 or 1 (as in the Pythia configs) both mean none."
    )
    zero_optimization: dict = setting(
        None,
        "DeepSpeed ZeRO block; stage 0-3 (stage 3 is refused with TP > 1); other entries go to DeepSpeed as given.",
        factory=lambda: {"stage": 0},
    )
    distributed_backend: str = setting(
        "nccl",
        "NeoX's torch.distributed backend. No effect here: the backend follows the device (NCCL when CUDA is available, gloo otherwise), whatever this says.",
        effect=IGN,
    )
    launcher: str = setting(
        "pdsh",
        "The DeepSpeed runner deepy.py uses with a hostfile (without one the ranks start on this node): pdsh (ssh), openmpi, mvapich, mpich, impi or slurm (srun). Ranks started by srun / mpirun carry only SLURM_* / OMPI_COMM_WORLD_* / MV2_COMM_WORLD_* variables, which train.py maps to rank and world size; their rendezvous is MASTER_ADDR / MASTER_PORT if exported, else master-addr / master-port.",
    )
    deepspeed_slurm: bool = setting(
        False,
        "NeoX: read rank and world size from SLURM_* variables. No effect here: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are read whenever a rank has no RANK / WORLD_SIZE, whatever this says (see launcher).",
        effect=IGN,
    )
    deepspeed_mpi: bool = setting(
        False,
        "NeoX: discover ranks through MPI (mpi4py). No effect here: OpenMPI's OMPI_COMM_WORLD_* and MVAPICH's MV2_COMM_WORLD_* variables are read whenever a rank has no RANK / WORLD_SIZE, without mpi4py (see launcher).",
        effect=IGN,
    )
    hostfile: Optional[str] = setting(None, "DeepSpeed hostfile (lines 'host slots=N') for multi-node launches.")
    include: Optional[str] = setting(None, "DeepSpeed --include host/GPU filter.")
    exclude: Optional[str] = setting(None, "DeepSpeed --exclude host/GPU filter.")
    num_nodes: int = setting(-1, "Number of nodes to use (-1: all in the hostfile).")
    num_gpus: Optional[int] = setting(None, "GPUs (or CPU ranks) per node to launch.")
    master_port: int = setting(
        29500,
        "Rendezvous port: passed to the DeepSpeed launcher; ranks whose environment has no MASTER_PORT (srun / mpirun launches) use it.",
    )
    master_addr: Optional[str] = setting(
        None,
        "Rendezvous address (the host of rank 0): passed to the DeepSpeed launcher (default: it picks the first host); ranks whose environment has no MASTER_ADDR (srun / mpirun launches) use it, and deepy.py then defaults it to the hostfile's first host left after include / exclude.",
    )


@dataclass(frozen=True)
class PrecisionConfig:
    """Numeric precision."""

    precision: Optional[str] = setting(
        None, "fp32, fp16 or bfloat16; derived from the fp16 / bf16 blocks when not given."
    )
    fp16: Optional[dict] = setting(
        None,
        "DeepSpeed fp16 block {enabled, loss_scale (0 = dynamic), initial_scale_power, loss_scale_window, hysteresis, min_loss_scale}.",
    )
    bf16: Optional[dict] = setting(None, "DeepSpeed bf16 block {enabled}.")
    fp32_allreduce: bool = setting(False, "All-reduce gradients in fp32.")
    fp16_lm_cross_entropy: bool = setting(
        False, "NeoX computes the LM loss in half precision when set; here the loss is always fp32.", effect=IGN
    )


@dataclass(frozen=True)
class LoggingConfig:
    """Logs, metrics and monitoring."""

    log_interval: int = setting(10, "Log metrics every this many steps (>= 1).")
    steps_per_print: int = setting(10, "DeepSpeed's own print interval.")
    wall_clock_breakdown: bool = setting(
        False,
        "DeepSpeed's per-phase timers (forward, backward, optimizer step): printed after every step and logged as timers/* (docs/training.md).",
    )
    log_dir: Optional[str] = setting(None, "Where metrics.jsonl goes (default: the save directory, or runs/<name>).")
    tensorboard_dir: Optional[str] = setting(None, "TensorBoard event directory (default: <log-dir>/tensorboard).")
    use_wandb: bool = setting(False, "Log to Weights & Biases when wandb is installed.")
    wandb_project: str = setting("neox-l2e", "W&B project.")
    wandb_group: Optional[str] = setting(None, "W&B group.")
    wandb_team: Optional[str] = setting(None, "W&B entity.")
    wandb_host: Optional[str] = setting(
        None,
        "W&B server URL (e.g. a self-hosted https://wandb.example.com): exported as WANDB_BASE_URL before wandb.init; unset: WANDB_BASE_URL from the environment, else wandb's default (api.wandb.ai).",
    )
    log_grad_norm: bool = setting(True, "Log the global gradient norm.")
    log_param_norm: bool = setting(False, "Log the global parameter norm.")
    progress_bar: bool = setting(True, "Show a tqdm progress bar on rank 0.")


@dataclass(frozen=True)
class L2EConfig:
    """L2E: inhibiting monosemantic neurons (docs/l2e.md says which values are the paper's and which ours)."""

    l2e_enabled: bool = setting(False, "Turn monosemantic-neuron inhibition on.")
    l2e_method: str = setting(
        "l2e",
        "l2e (moving threshold + regularisation loss), memel (per-batch top-k + reverse deactivation baseline) or none.",
    )
    l2e_layers: Any = setting(
        "mid2", "Inhibited layers: mid2, mid-third, top-bot, or an explicit list of 0-based layer indices."
    )
    l2e_ratio: float = setting(
        0.02, "Target fraction p of (token, neuron) activations selected (paper: 1% 70M, 2% 410M, 3% 2.8B)."
    )
    l2e_lambda: float = setting(
        0.003,
        "Weight of the inhibition loss added to the LM loss (our choice, from held-out measurements with token-sum: docs/l2e.md).",
    )
    l2e_eta: float = setting(
        0.05, "Step size of the log-space threshold update log tau += eta (frac - p) / p (our choice)."
    )
    l2e_tau_init: Any = setting(
        "quantile", "'quantile' = exact (1-p) quantile of phi on the first eligible batch, or a number."
    )
    l2e_decay: Optional[float] = setting(
        None, "None = cumulative statistics (the paper); a value in (0, 1) decays old counts by it per micro-batch."
    )
    l2e_min_samples: int = setting(64, "A neuron is inhibited only once its statistics hold this many samples (>= 2).")
    l2e_warmup_steps: int = setting(0, "Optimizer steps before inhibition starts (statistics are gathered meanwhile).")
    l2e_eps: float = setting(
        1.0e-6, "Epsilon inside log((z - mean)^2 + eps) (our choice; keeps the loss finite at z = mean)."
    )
    l2e_loss_reduction: str = setting(
        "token-sum",
        "L2E loss reduction: selected-mean (mean per layer over its selected entries, then over layers that selected) or token-sum (sum over layers and selected entries / tokens); docs/l2e.md.",
    )
    l2e_grad_to_input: bool = setting(
        True,
        "false: the L2E loss's gradient stops at the layer input x (reaches W_in and b_in only); the LM gradient is unchanged.",
    )
    l2e_backend: str = setting("auto", "MLP implementation: auto (triton on CUDA, torch elsewhere), torch, or triton.")
    l2e_reference_levels: list = setting(
        None, "phi levels whose exceedance fractions are logged to compare runs.", factory=lambda: [5.0, 10.0, 25.0]
    )
    l2e_fkr_k: list = setting(
        None, "FKR: k values as percentages of neurons (tools/fkr.py).", factory=lambda: [0.5, 1.0, 2.0, 3.0, 5.0, 10.0]
    )
    ms_heldout_tokens: Optional[int] = setting(
        None,
        "Held-out tokens (the valid split's first, in document order, the same for every seed) on which the ms_heldout/... metrics are measured at every evaluation: None = up to 16384 (fewer if the split is smaller), N = exactly N (an error if the split is smaller), 0 = off.",
    )
    ms_heldout_layers: Any = setting(
        "all",
        "Layers measured on the held-out set: all, inhibited (the layers l2e-layers names, also when L2E is off) or a list of 0-based indices.",
    )
    l2e_fkr_tau_mode: str = setting(
        "per-token",
        "FKR default reading of tau_k: per-token (k-th largest phi across a token's neurons) or global (over all pairs).",
    )


SECTIONS = {
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "parallel": ParallelConfig,
    "precision": PrecisionConfig,
    "logging": LoggingConfig,
    "l2e": L2EConfig,
}


def field_index():
    """Map every accepted key (canonical and aliases, underscore form) to (section, field name)."""
    index = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            index[f.name] = (section, f.name)
            for alias in f.metadata.get("aliases", ()):
                index[alias] = (section, f.name)
    return index
