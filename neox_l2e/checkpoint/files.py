"""Checkpoint files: names, tags, the `latest` pointer, the safe loader, atomic writes and the manifest.

The one place that knows a checkpoint's file names and how to read them. No DeepSpeed, no process group.

Loading never runs code from a file: every ``.pt`` file goes through ``torch_load`` (``torch.load`` with
``weights_only=True``) with only the types the format needs allowed (``ALLOWED_TYPES``: numpy arrays in the
RNG files, DeepSpeed's loss scaler, ZeRO stage enum and fragment addresses in its optimizer shards). A file
that needs anything else is refused with one ``CheckpointError`` line.

``manifest.json`` (in each ``global_stepN`` folder) holds the size and sha256 of every other file of the
folder; ``verify_manifest`` checks it before a file is read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Callable, Iterable, List, Optional

import torch

from ..errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
TMP_PREFIX = ".tmp-"
TAG_RE = re.compile(r"^global_step(\d+)$")
_CHUNK = 1 << 22


# ----------------------------------------------------------------------------------------------
# names


def tag_for(iteration: int) -> str:
    return f"global_step{int(iteration)}"


def step_of(tag: str) -> Optional[int]:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def model_states_name(tp_rank: int) -> str:
    """The model file of TP rank tp_rank (DeepSpeed's name; the consolidated weights under ZeRO-3)."""
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def zero_optim_name(dp_rank: int, tp_rank: int, prefix: str = "") -> str:
    """DeepSpeed's ZeRO optimizer shard name; prefix "bf16_" for bf16 runs."""
    return f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"


def zero_prefix(folder: Path) -> str:
    return "bf16_" if (Path(folder) / zero_optim_name(0, 0, "bf16_")).is_file() else ""


def rng_name(rank: int) -> str:
    return f"rng_state_rank{rank:05d}.pt"


# ----------------------------------------------------------------------------------------------
# tags and `latest`


def step_folders(save_dir) -> list:
    """Names of the global_stepN folders under save_dir, in step order (complete or not)."""
    d = Path(save_dir)
    if not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if p.is_dir() and step_of(p.name) is not None), key=step_of)


def list_tags(save_dir) -> list:
    """Complete checkpoint tags (global_stepN folders with model states) in step order."""
    d = Path(save_dir)
    return [t for t in step_folders(d) if (d / t / model_states_name(0)).is_file()]


def read_latest(save_dir) -> Optional[str]:
    """The text of save_dir/latest (stripped), or None when there is no such file; not checked."""
    p = Path(save_dir) / "latest"
    if not p.is_file():
        return None
    try:
        return p.read_text(errors="replace").strip()
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from None


def latest_tag(save_dir) -> Optional[str]:
    """The tag named by save_dir/latest; None when the folder holds no checkpoint at all.

    A missing, empty or garbage ``latest`` (not a global_stepN folder of save_dir) next to global_stepN
    folders is a CheckpointError naming the folders that are there: the run never guesses which to resume."""
    d = Path(save_dir)
    tag = read_latest(d)
    if tag and step_of(tag) is not None and (d / tag).is_dir():
        return tag
    present = step_folders(d)
    if not present:
        if tag:
            raise CheckpointError(
                f"{d / 'latest'}: names {tag[:60]!r}, which is not a checkpoint folder here, and "
                "there is none; point it at a checkpoint or remove it to start from scratch"
            )
        return None
    there = ", ".join(present[-5:]) + (f" (and {len(present) - 5} more)" if len(present) > 5 else "")
    if tag is None:
        what = "is missing"
    elif not tag:
        what = "is empty"
    else:
        what = f"names {tag[:60]!r}, which is not a checkpoint folder here"
    raise CheckpointError(
        f"{d / 'latest'}: {what} but {d} holds {there}; write the tag to resume from into it "
        f"(e.g. echo {present[-1]} > {d / 'latest'}) or load another folder"
    )


# ----------------------------------------------------------------------------------------------
# safe loading


def _allowed_types() -> list:
    """The non-tensor types a checkpoint written by this project (with DeepSpeed) holds."""
    import numpy as np

    types = [np.ndarray, np.dtype]
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    types.append(multiarray._reconstruct)
    for code in ("b", "B", "h", "H", "i", "I", "l", "L", "q", "Q", "f", "d", "e", "?"):
        types.append(type(np.dtype(code)))
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        types += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # readers without DeepSpeed: its optimizer files are then refused
        pass
    return types


ALLOWED_TYPES_DOC = (
    "tensors, numbers, strings, lists / dicts / tuples, numpy arrays, DeepSpeed's LossScaler / "
    "DynamicLossScaler / ZeroStageEnum / fragment_address"
)


def torch_load(path, mmap: bool = False, map_location="cpu"):
    """torch.load of a checkpoint file with weights_only=True and the allow-list; CheckpointError (one line) when
    the file cannot be read or needs another type (it would have to run code to load)."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_allowed_types()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        m = re.search(
            r"(?:Unsupported global: GLOBAL|Unsupported operand|unsupported global:?)\s*([^\s]+)", str(e), re.IGNORECASE
        )
        what = f" ({m.group(1).rstrip('.,')})" if m else ""
        raise CheckpointError(
            f"{path}: refused: it needs a type outside the checkpoint allow-list{what}, so loading "
            "it could run code; only checkpoints written by neox-l2e / DeepSpeed load"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, AttributeError, TypeError) as e:
        if mmap and isinstance(e, RuntimeError) and "zip" in str(e).lower():
            return torch_load(path, mmap=False, map_location=map_location)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot read ({first})") from None


# ----------------------------------------------------------------------------------------------
# atomic writes


def fsync_dir(path) -> None:
    """fsync a directory (its entries: a rename in it survives a power cut); a no-op where unsupported."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path, text: str) -> None:
    """Write a small text file atomically: temp file in the same folder, fsync, os.replace, fsync the folder."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise CheckpointError(f"{path}: cannot write ({os_reason(e)})") from None
    fsync_dir(path.parent)


def write_latest(save_dir, tag: str) -> None:
    """Point save_dir/latest at tag atomically."""
    atomic_write_text(Path(save_dir) / "latest", tag)


def os_reason(e: OSError) -> str:
    """The reason of an OSError for a one-line message: "disk full" for ENOSPC."""
    if e.errno == errno.ENOSPC:
        return "disk full"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or str(e)


# ----------------------------------------------------------------------------------------------
# manifest


def _hash_file(path: Path, sync: bool = False) -> tuple:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
        if sync:
            try:
                os.fsync(f.fileno())
            except OSError:
                pass
    return size, h.hexdigest()


def manifest_names(folder) -> List[str]:
    """The files of a checkpoint folder the manifest lists: all but itself and hidden files, sorted."""
    return sorted(
        p.name for p in Path(folder).iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    )


def hash_entries(folder, names: Iterable[str]) -> dict:
    """{name: {"size", "sha256"}} of some files of folder, fsyncing each (so the manifest vouches for data on
    disk)."""
    out = {}
    for name in names:
        size, digest = _hash_file(Path(folder) / name, sync=True)
        out[name] = {"size": size, "sha256": digest}
    return out


def write_manifest(folder, entries: Optional[dict] = None) -> dict:
    """Write folder/manifest.json atomically from ``entries`` (hash_entries of every file, e.g. computed by
    several ranks), or hash every file here."""
    folder = Path(folder)
    files = dict(entries) if entries is not None else hash_entries(folder, manifest_names(folder))
    manifest = {"manifest_version": MANIFEST_VERSION, "algorithm": "sha256", "files": files}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_manifest(folder) -> Optional[dict]:
    """folder/manifest.json as {name: {"size", "sha256"}}, None when the folder has none (older checkpoints)."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
        files = data["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, dict) and "size" in v and "sha256" in v for v in files.values()
        ):
            raise ValueError("bad entries")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: unreadable manifest ({str(e)[:100]}); the checkpoint cannot be verified") from None
    return files


def verify_manifest(
    folder, names: Optional[Iterable[str]] = None, verify: bool = True, log: Optional[Callable[[str], None]] = None
) -> List[str]:
    """Check size and sha256 of the given files of folder (default: every file the manifest lists).

    Raises CheckpointError naming the first bad file. Without a manifest (a checkpoint written before manifests)
    nothing is checked and a note says so; with ``verify`` False the note says what is skipped. Returns the
    names checked."""
    folder = Path(folder)
    files = read_manifest(folder)
    if files is None:
        if log:
            log(f"note: {folder} has no {MANIFEST} (written by an older version): its files are not verified")
        return []
    wanted = sorted(files) if names is None else sorted(set(names))
    if not verify:
        if log:
            size = sum(files[n]["size"] for n in wanted if n in files)
            log(
                f"note: checkpoint-verify is off: not checking size and sha256 of {len(wanted)} file(s) "
                f"({size / 2**30:.2f} GiB) of {folder}"
            )
        return []
    for name in wanted:
        p = folder / name
        if name not in files:
            if not p.exists():
                continue  # not part of this checkpoint (the caller says what is missing)
            raise CheckpointError(
                f"{p}: not listed in {folder / MANIFEST}; the checkpoint was changed after it was saved"
            )
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (listed in {MANIFEST}); the checkpoint is incomplete")
        want = files[name]
        if p.stat().st_size != int(want["size"]):
            raise CheckpointError(
                f"{p}: corrupted: {p.stat().st_size} bytes, the manifest says {want['size']}; "
                "resume from an earlier checkpoint"
            )
        if _hash_file(p)[1] != want["sha256"]:
            raise CheckpointError(f"{p}: corrupted: sha256 differs from {MANIFEST}; resume from an earlier checkpoint")
    return wanted
