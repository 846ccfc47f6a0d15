"""One training job per save folder: ``save_dir/.lock`` holds the host, pid and start time of the job writing it.

A second job with the same save folder is refused in one line while the first runs. A lock left by a job that
died is taken over when it is stale: written on this host by a pid that no longer runs (a lock from another
host cannot be checked: the message names it, and deleting the file releases it). The lock is released when the
process exits (or by ``release``).
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


class SaveLock:
    """The lock of one save folder, held by this process."""

    def __init__(self, path: Path):
        self.path = path
        self.held = False

    @classmethod
    def acquire(cls, save_dir) -> "SaveLock":
        d = Path(save_dir)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(
                f"{d}: cannot create the save folder ({e.strerror or e}); choose another save folder"
            ) from None
        lock = cls(d / LOCK_NAME)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(str(lock.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = lock.owner()
                if owner is None or lock._stale(owner) or lock._mine(owner):
                    try:
                        lock.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                raise CheckpointError(
                    f"{d}: another job (host {owner.get('host')}, pid {owner.get('pid')}, started "
                    f"{owner.get('started')}) is saving into this folder ({lock.path}); use another save folder, or "
                    f"delete {lock.path} if that job is dead"
                ) from None
            except OSError as e:
                raise CheckpointError(
                    f"{lock.path}: cannot create the lock file ({e.strerror or e}); make the save folder writable "
                    "or choose another one"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            lock.held = True
            atexit.register(lock.release)
            return lock
        raise CheckpointError(f"{lock.path}: cannot take the lock (it keeps changing); is another job starting?")

    def owner(self) -> Optional[dict]:
        """The holder recorded in the lock file; None when unreadable (a torn write: treated as stale)."""
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def _mine(owner: dict) -> bool:
        return owner.get("host") == socket.gethostname() and owner.get("pid") == os.getpid()

    @staticmethod
    def _stale(owner: dict) -> bool:
        if owner.get("host") != socket.gethostname():
            return False
        try:
            return not _pid_alive(int(owner.get("pid")))
        except (TypeError, ValueError):
            return True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = self.owner()
        if owner is not None and self._mine(owner):
            try:
                self.path.unlink()
            except OSError:
                pass
