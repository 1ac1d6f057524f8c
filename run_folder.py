"""run_folder.py — a run folder belongs to one run: a lock against a second writer, refusal to mix two runs' files,
the history of starts and resumes, and atomic checkpoints with one older checkpoint kept.

What a run folder holds (README, "When things go wrong"):
  config.json     the run's config (rewritten on a resume, which may only extend it: more --iterations, ...)
  history.jsonl   one line per start (with the full config) and per resume (the iteration, the flags it changed)
  log.jsonl       one line per iteration;   eval.jsonl   one line per held-out evaluation
  ckpt/           the last checkpoint: model/ (HF weights + tokenizer), skill_bank.json, trainer_state.pt
  ckpt.prev/      the checkpoint before it: the fallback when ckpt/ cannot be loaded
  .lock           the pid and host of the process writing the folder

Choices:
  1. A new run refuses a folder that holds another run's files unless told: --resume continues that run, --overwrite
     replaces it. The lock is created with O_EXCL, so of two runs started on one folder exactly one wins; a lock whose
     process no longer exists (a crash, kill -9) is taken over with a warning.
  2. A checkpoint is written to ckpt.tmp, then ckpt -> ckpt.prev and ckpt.tmp -> ckpt, each an atomic rename: a crash
     at any point leaves at least one complete checkpoint, so at most one checkpoint interval is lost.

Run: `python -m pytest -q tests/test_faults.py` (kills, corrupted files, locks).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager

from common import append_jsonl

RUN_FILES = ("config.json", "history.jsonl", "log.jsonl", "eval.jsonl", "ckpt", "ckpt.prev", "ckpt.old", "ckpt.tmp",
             "ckpt.healthy")
CHECKPOINTS = ("ckpt", "ckpt.prev", "ckpt.old")     # newest first; ckpt.old: the name older versions used mid-write
LOCK = ".lock"


def warn(message: str) -> None:
    print(f"[run] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# One run per folder

def run_files(run_dir: str) -> list[str]:
    """The files and folders of a run that are in run_dir."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(run_dir, name))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process: it exists
        return True
    return True


def acquire_lock(run_dir: str) -> str:
    """Create run_dir/.lock for this process (choice 1); SystemExit if a live process holds it."""
    path = os.path.join(run_dir, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.load(open(path))
            except (OSError, ValueError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and pid != os.getpid() and (host != me["host"] or _alive(pid)):
                where = "" if host == me["host"] else f" on {host}"
                raise SystemExit(f"{run_dir} is being written by process {pid}{where} since {holder.get('since')} "
                                 f"(lock file {path}): two runs cannot share a folder; wait for it, stop it, or pass "
                                 f"another --run-dir")
            if pid != os.getpid():
                warn(f"taking over the stale lock of process {pid} in {run_dir} (it is not running)")
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise SystemExit(f"{run_dir}: could not create the lock file {path}")


def release_lock(path: str) -> None:
    try:
        if json.load(open(path)).get("pid") == os.getpid():
            os.remove(path)
    except (OSError, ValueError):
        pass


@contextmanager
def claim(run_dir: str, resume: bool = False, overwrite: bool = False):
    """Hold run_dir for one run: the lock, and (for a new run) a folder without another run's files."""
    os.makedirs(run_dir, exist_ok=True)
    lock = acquire_lock(run_dir)
    try:
        found = run_files(run_dir)
        if found and not resume:
            if not overwrite:
                raise SystemExit(f"{run_dir} holds another run ({', '.join(found)}): continue it with --resume "
                                 f"{run_dir}, replace it with --overwrite, or give a new folder with --run-dir")
            warn(f"--overwrite: removing the previous run's {', '.join(found)} from {run_dir}")
            for name in found:
                path = os.path.join(run_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        yield
    finally:
        release_lock(lock)


def record(run_dir: str, event: str, **fields) -> None:
    """One line of history.jsonl (a start with its config, a resume with what it changed)."""
    append_jsonl(os.path.join(run_dir, "history.jsonl"),
                 {"event": event, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(), **fields})


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints

def write_checkpoint(run_dir: str, fill) -> None:
    """fill(folder) writes a checkpoint's files into a temporary folder, which then becomes ckpt/ (choice 2)."""
    final, prev, tmp = (os.path.join(run_dir, n) for n in ("ckpt", "ckpt.prev", "ckpt.tmp"))
    shutil.rmtree(tmp, ignore_errors=True)
    fill(tmp)
    if os.path.exists(final):
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(final, prev)            # a crash from here to the next line leaves ckpt.prev as the last one
    os.replace(tmp, final)
    shutil.rmtree(os.path.join(run_dir, "ckpt.old"), ignore_errors=True)


def checkpoints(run_dir: str) -> list[str]:
    """The checkpoint folders of a run that hold a trainer state, newest first."""
    return [p for p in (os.path.join(run_dir, n) for n in CHECKPOINTS)
            if os.path.exists(os.path.join(p, "trainer_state.pt"))]
