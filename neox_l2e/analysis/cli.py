"""Pieces shared by the analysis command-line tools: arguments, loading, the one-line error exit."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, List, Sequence

from .common import AnalysisError, offline_env, parse_dtype, pick_device


def run_main(main: Callable[[List[str]], int], argv=None) -> int:
    """Call ``main(argv)``; a user error prints one line ``error: ...`` and returns 2."""
    offline_env()
    try:
        return int(main(sys.argv[1:] if argv is None else argv) or 0)
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line `error: ...` and exit 2."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parser(description: str) -> argparse.ArgumentParser:
    return _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_args(p: argparse.ArgumentParser, many: bool = False) -> None:
    if many:
        p.add_argument(
            "checkpoints",
            nargs="+",
            metavar="CHECKPOINT",
            help="our checkpoint folder (with 'latest') or a Hugging Face GPTNeoX/Pythia folder; "
            "NAME=PATH names the model in the report",
        )
    else:
        p.add_argument(
            "checkpoint", help="our checkpoint folder (with 'latest') or a Hugging Face GPTNeoX/Pythia folder"
        )
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer file or folder (SentencePiece .model, tokenizer.json, HF folder); default: the "
        "one the checkpoint names or holds",
    )
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default=None, help="model dtype: fp32 (default on CPU), bf16 (default on GPU), fp16")


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        help='labelled jsonl: one {"text": ..., "label": ...} per line (tools/build_labelled_dataset.py makes one)',
    )
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument(
        "--max-tokens-per-label",
        type=int,
        default=20000,
        help="cap per label, to balance the labels (default 20000; 0 = no cap)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def split_named(spec: str):
    """'name=path' -> (name, path); 'path' -> (None, path)."""
    if "=" in spec:
        name, path = spec.split("=", 1)
        if name and "/" not in name:
            return name, path
    return None, spec


def resolve_device_dtype(args):
    device = pick_device(args.device)
    dtype = parse_dtype(args.dtype)
    if dtype is None:
        import torch

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, dtype


def load_for_analysis(spec: str, args, device, dtype):
    from .loading import load_model

    name, path = split_named(spec)
    return load_model(path, device=device, dtype=dtype, tokenizer=args.tokenizer, tag=args.tag, name=name)


def tokenize_for(loaded, records, args):
    from .labelled import tokenize_labelled

    seq = min(args.seq_len, loaded.cfg.model.max_position_embeddings or args.seq_len)
    cap = args.max_tokens_per_label or None
    return tokenize_labelled(records, loaded.tokenizer, seq, cap)


def parse_floats(text: str, what: str) -> List[float]:
    try:
        vals = [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise AnalysisError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise AnalysisError(f"{what}: no values")
    return vals


def parse_percent_list(text: str, what: str) -> List[float]:
    """'0.5,1,2' or '0.5%,1%,2%' -> percents [0.5, 1.0, 2.0]."""
    out = []
    for x in text.replace(" ", "").split(","):
        if not x:
            continue
        try:
            v = float(x.rstrip("%"))
        except ValueError:
            raise AnalysisError(f"{what}: {x!r} is not a number") from None
        if not 0 < v <= 100:
            raise AnalysisError(f"{what}: {x!r} must be a percent in (0, 100]")
        out.append(v)
    if not out:
        raise AnalysisError(f"{what}: no values")
    return out


def print_table(lines: Sequence[str]) -> None:
    print("\n".join(lines))


# ------------------------------------------------------------------------------------------------
# the scan, shared by tools/ms_scan.py and tools/fkr.py


def add_scan_args(p):
    p.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    from ..config.schema import L2EConfig
    from .scan import DEFAULT_KS

    default_k = ",".join(f"{k:g}" for k in DEFAULT_KS)
    first = L2EConfig().l2e_fkr_tau_mode  # the config's default reading, listed first
    modes = ",".join([first] + [m for m in ("per-token", "global") if m != first])
    p.add_argument(
        "--fkr-k",
        "--k",
        dest="fkr_k",
        default=default_k,
        help=f"FKR k values in percent (default {default_k}: l2e-fkr-k)",
    )
    p.add_argument(
        "--fkr-modes",
        "--modes",
        dest="fkr_modes",
        default=modes,
        help=f"tau_k readings (default {modes}; the first is l2e-fkr-tau-mode's default): per-token "
        "(k-th largest phi of the token's neurons) and/or global (k-th largest over all "
        "token-neuron pairs of the layer)",
    )


def scan_options(args, neuron_sample, ks_tokens, compute_ks):
    from .scan import ScanOptions

    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise AnalysisError(f"--layers {args.layers!r}: expected comma-separated integers") from None
    modes = [m.strip() for m in args.fkr_modes.split(",") if m.strip()]
    return ScanOptions(
        batch_size=args.batch_size,
        layers=layers,
        neuron_sample=neuron_sample,
        ks_tokens=ks_tokens,
        fkr_ks=parse_percent_list(args.fkr_k, "--fkr-k"),
        fkr_modes=modes,
        compute_ks=compute_ks,
        seed=args.seed,
        progress=not args.no_progress,
    )


def inhibited_layers(cfg) -> List[int]:
    """The layers L2E inhibited in the run that wrote the checkpoint ([] when L2E was off)."""
    try:
        return sorted(int(i) for i in cfg.inhibited_layers()) if cfg.l2e.l2e_enabled else []
    except (AttributeError, ValueError):
        return []


def scan_checkpoints(args, opts):
    """Load each checkpoint in turn, scan it, free it. Returns the ScanResults."""
    import gc

    import torch

    from .labelled import read_labelled_jsonl
    from .scan import scan_model

    records = read_labelled_jsonl(args.data)
    device, dtype = resolve_device_dtype(args)
    results = []
    specs = getattr(args, "checkpoints", None) or [args.checkpoint]
    for spec in specs:
        loaded = load_for_analysis(spec, args, device, dtype)
        opts.validate(loaded.num_layers)  # bad --layers / k fail before any work
        data = tokenize_for(loaded, records, args)
        if not args.no_progress:
            print(
                f"[scan] {loaded.name}: {loaded.num_parameters:,} parameters, {loaded.num_layers} layers x "
                f"{loaded.ffn_size} neurons, {data.num_tokens:,} tokens {data.tokens_per_label()} on {device}",
                file=sys.stderr,
            )
        res = scan_model(loaded.model, data, opts, name=loaded.name, path=loaded.path)
        res.inhibited_layers = inhibited_layers(loaded.cfg)
        results.append(res)
        del loaded, data
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results
