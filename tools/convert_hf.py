#!/usr/bin/env python
"""Convert between Hugging Face GPTNeoX folders and neox-l2e checkpoints. No network access.

    # a HF GPTNeoX / Pythia folder on disk -> a neox-l2e checkpoint that training continues from
    python tools/convert_hf.py import path/to/pythia-70m runs/pythia-70m-init
    # a neox-l2e checkpoint (any TP degree) -> a HF folder (transformers, lm-eval's hf model)
    python tools/convert_hf.py export runs/demo/checkpoints runs/demo/hf [--tag global_step300] [--dtype bf16]

Import writes `OUT/global_step0/mp_rank_00_model_states.pt` + `OUT/latest` (weights only) and
`OUT/model.yml` (the model keys read from config.json); train with `load: OUT` and `finetune: true`
to continue from it. Export merges tensor-parallel shards, drops the L2E buffers, writes
config.json (hidden_act says which GELU the run used), model.safetensors, and copies the run's
tokenizer file when there is one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch  # noqa: E402
import yaml  # noqa: E402

from neox_l2e.config import build_config, config_from_checkpoint_dict  # noqa: E402
from neox_l2e.errors import InteropError, NeoXL2EError  # noqa: E402
from neox_l2e.interop.hf import (
    check_export_dir,
    hf_state_to_ours,
    neox_keys_from_hf,
    read_hf_dir,  # noqa: E402
    write_hf_dir,
)
from neox_l2e.l2e.keys import is_l2e_state_key  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def import_hf(hf_dir: Path, out_dir: Path, overwrite: bool = False) -> Path:
    from neox_l2e.checkpoint import write_weights_checkpoint
    from neox_l2e.model import GPTNeoX
    from neox_l2e.parallel import ParallelState

    if out_dir.exists() and not out_dir.is_dir():
        raise InteropError(f"{out_dir}: exists and is a file; choose a folder name for the checkpoint")
    if out_dir.resolve() == Path(hf_dir).resolve():
        raise InteropError(f"{out_dir}: is the Hugging Face folder itself; write the checkpoint to another folder")
    hf, state = read_hf_dir(hf_dir)
    keys = neox_keys_from_hf(hf, str(hf_dir / "config.json"))
    cfg = build_config(keys, {k: str(hf_dir / "config.json") for k in keys})
    model = GPTNeoX(cfg, ParallelState.single(torch.device("meta")), init=False)
    expected = {
        k: v.shape
        for k, v in model.state_dict().items()
        if k.endswith((".weight", ".bias")) and not is_l2e_state_key(k)
    }
    weights = hf_state_to_ours(state, expected, str(hf_dir))
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InteropError(f"{out_dir}: exists and is not empty; pass --overwrite or choose another folder")
    write_weights_checkpoint(out_dir, cfg, [weights], tag="global_step0")
    model_keys = {k.replace("_", "-"): v for k, v in keys.items()}
    (out_dir / "model.yml").write_text(
        f"# model keys read from {hf_dir.name}/config.json\n" + yaml.safe_dump(model_keys, sort_keys=False)
    )
    return out_dir


def export_hf(
    ckpt_dir: Path, out_dir: Path, tag=None, dtype=None, overwrite: bool = False, verify: bool = True
) -> Path:
    from neox_l2e.checkpoint import CheckpointError, latest_tag, read_model_states
    from neox_l2e.checkpoint.tp_states import merge_tp_states

    if tag is None and latest_tag(ckpt_dir) is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint (no 'latest' file); pass a tag or a folder with a checkpoint")
    check_export_dir(out_dir, overwrite, protect=(ckpt_dir,))  # before reading the weights
    cfg_dict, states, _client = read_model_states(ckpt_dir, tag, verify=verify)
    cfg = config_from_checkpoint_dict(cfg_dict)
    full = merge_tp_states(states, cfg) if len(states) > 1 else states[0]
    full = {k: v for k, v in full.items() if not is_l2e_state_key(k)}
    vocab = full["gpt_neox.embed_in.weight"].shape[0]
    tokenizer_files = []
    if cfg.data.vocab_file:
        if Path(cfg.data.vocab_file).is_file():
            tokenizer_files = [cfg.data.vocab_file]
        else:
            print(
                f"note: the run's tokenizer {cfg.data.vocab_file} (vocab-file) is not found from here, so the export "
                "has none; run from the training folder, or copy the tokenizer into the export",
                file=sys.stderr,
            )
    return write_hf_dir(
        out_dir,
        cfg,
        full,
        vocab,
        tokenizer_files=tokenizer_files,
        dtype=dtype,
        overwrite=overwrite,
        protect=(ckpt_dir,),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF GPTNeoX folder -> neox-l2e checkpoint")
    imp.add_argument("hf_dir", type=Path)
    imp.add_argument("out_dir", type=Path)
    imp.add_argument("--overwrite", action="store_true")
    exp = sub.add_parser("export", help="neox-l2e checkpoint -> HF GPTNeoX folder")
    exp.add_argument("ckpt_dir", type=Path, help="the save directory (holding `latest`)")
    exp.add_argument("out_dir", type=Path)
    exp.add_argument("--tag", default=None, help="checkpoint tag (default: the one `latest` names)")
    exp.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the weights (default: as saved)")
    exp.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous export in out_dir (never other files, never the checkpoint)",
    )
    exp.add_argument(
        "--no-verify",
        action="store_true",
        help="do not check the checkpoint files against its manifest (size and sha256)",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            out = import_hf(args.hf_dir, args.out_dir, args.overwrite)
            print(f"wrote {out} (train with load: {out} and finetune: true)")
        else:
            out = export_hf(
                args.ckpt_dir, args.out_dir, args.tag, DTYPES.get(args.dtype), args.overwrite, verify=not args.no_verify
            )
            print(f"wrote {out} (GPTNeoXForCausalLM.from_pretrained('{out}'))")
    except (NeoXL2EError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
