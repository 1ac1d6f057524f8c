"""common.py — the plumbing every script shares: the episode protocol, the environments behind one interface, the
dataclass-to-argparse bridge, JSONL logs and a mean ± standard error.

Nothing here is part of the method; it exists so that train.py, eval.py and report.py do not each carry their own
copy. The episode protocol is the contract between an environment and `model.rollout` (METHOD.md §11): an episode
gives its first chat messages, takes one reply per turn and answers with the next observation, and ends with a result
dict. env_sokoban.SokobanEpisode and env_appworld.AppWorldEpisode implement it; so can any other multi-turn task.

Run: `python -m pytest -q tests/test_common.py`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

import env_sokoban
import rule_skills


# ----------------------------------------------------------------------------------------------------------------------
# The episode protocol and the environments

class Episode(Protocol):
    """One attempt at one task, played turn by turn by `model.rollout` (METHOD.md §11, the episode protocol)."""
    task_id: str
    done: bool              # no more turns: solved, out of turns, or aborted
    trajectory: list        # one dict per turn: at least reply, observation, valid, error

    def initial_messages(self) -> list[dict]:
        """The chat before the first reply: system + first user message (the plain prompt the student sees)."""

    def step(self, reply: str) -> tuple[str, bool]:
        """Play one turn with the model's reply text; (next observation, done). Never raises on any reply."""

    def abort(self, reason: str) -> None:
        """End now (the context cap); the result keeps what was achieved."""

    def result(self) -> dict:
        """reward, success, completion, turns, format_errors (and anything else worth logging)."""

    def task_text(self) -> str:
        """The task in words, for the summariser."""

    def privileged_context(self) -> str | None:
        """Ground truth for the OPD teacher (a solution), or None."""

    # optional: summary_context() -> dict, extra facts for a rule summariser (Sokoban: the initial room)


@dataclass
class Env:
    name: str
    train_tasks: list                      # Sokoban: Level objects (curriculum order); AppWorld: task ids
    test_tasks: list
    new_episode: Callable                  # task -> Episode
    step_fn: Callable | None = None        # batched stepping (AppWorld: parallel servers); None = model's
                                           # step_one_by_one
    close: Callable = lambda: None
    max_context: int = 8192                # logical tokens per episode; model.rollout aborts before overflowing it
    skill_covers: Callable | None = None   # (skill text, observation text) -> bool; Sokoban (--sdl-mask covered)
    metrics: Callable | None = None        # [episode result] -> extra metrics (AppWorld: TGC, SGC)


def episode_failed(result: dict) -> bool:
    """An episode the environment could not play to the end (AppWorld: its server died twice): its reward says
    nothing about the policy, so it is dropped from the update and the summaries instead of trained on as 0."""
    return bool(result.get("server_error") or result.get("env_error"))


def task_key(task) -> str:
    """A stable string id of a task (a Sokoban Level or an AppWorld task id)."""
    return task if isinstance(task, str) else task.task_id


def make_env(name: str, preset: str = "paper", max_turns: int = 40, format_penalty: float = 0.0,
             reward: str = "completion", appworld_root: str | None = None, appworld_bin: str | None = None,
             appworld_slots: int = 4, train_split: str = "train", test_split: str = "dev") -> Env:
    """Build the train/test task lists and the episode factory of one environment."""
    if name == "sokoban":
        def new_episode(level):
            return env_sokoban.SokobanEpisode(level, max_turns=max_turns, format_penalty=format_penalty,
                                              reward=reward)
        return Env("sokoban", env_sokoban.load_levels(preset, "train"), env_sokoban.load_levels(preset, "test"),
                   new_episode, max_context=8192, skill_covers=rule_skills.skill_covers)
    if name == "appworld":
        import env_appworld  # imported lazily: Sokoban users need no AppWorld set-up at all
        aw = env_appworld.AppWorldEnv(root=appworld_root, appworld_bin=appworld_bin, num_slots=appworld_slots,
                                      max_turns=max_turns, format_penalty=format_penalty,
                                      reward="success" if reward == "success" else "completion")
        return Env("appworld", aw.task_ids(train_split), aw.task_ids(test_split), aw.episode,
                   step_fn=env_appworld.step_episodes, close=aw.close, max_context=16384, metrics=appworld_extra)
    raise SystemExit(f"unknown --env {name!r}: choose 'sokoban' or 'appworld'")


def appworld_extra(results: list[dict]) -> dict:
    """AppWorld's own metrics next to Acc / Comp: TGC and SGC (percent, env_appworld.appworld_metrics), per
    difficulty too; results need their task_id."""
    import env_appworld
    m = env_appworld.appworld_metrics(results)
    return {"TGC": m["TGC"], "SGC": m["SGC"], "scenarios": m["num_scenarios"],
            "by_difficulty": {str(d): {"TGC": t["TGC"], "SGC": t["SGC"], "tasks": t["num_tasks"]}
                              for d, t in m["by_difficulty"].items()}}


# ----------------------------------------------------------------------------------------------------------------------
# Configuration: dataclass fields that carry their help text, parsed into the flags a user gave

def flag(default=None, help="", factory=None):
    """A dataclass field with its command-line help (the TRL/HfArgumentParser pattern, in 3 lines)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


_TYPES = {"int": int, "float": float, "str": str}


def _type_name(t) -> str:
    """A field's annotation as text ("int", "list[str]"), whether or not the module postpones annotations."""
    if isinstance(t, str):
        return t.replace(" ", "")
    args = typing.get_args(t)
    return f"{typing.get_origin(t).__name__}[{args[0].__name__}]" if args else t.__name__


def parse_flags(cls, argv=None, description: str = "", notes: dict | None = None) -> dict:
    """The flags given on the command line as {field name: value}, one `--a-b` flag per field `a_b` of the dataclass
    `cls`; flags not given are left out, so the caller can layer defaults (a profile, a resumed run's config) under
    them. notes: field -> extra help text (e.g. the value a profile uses). Booleans get --x / --no-x; list fields
    (`list[int]`, `list[str]`) take one or more values."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kind = _type_name(f.type)
        shown = f" (default {default!r}" + (f"; {notes[f.name]}" if notes and f.name in notes else "") + ")"
        help = f.metadata["help"] + ("" if default in ("", []) and not (notes and f.name in notes) else shown)
        name = "--" + f.name.replace("_", "-")
        if kind == "bool":
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help)
        elif kind.startswith("list"):
            p.add_argument(name, nargs="+", type=_TYPES[kind[5:-1]], default=None, help=help)
        else:
            p.add_argument(name, type=_TYPES[kind], default=None, help=help)
    return {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}


def require(cfg, rules: dict) -> None:
    """rules: field -> (test, what it must be); the first field whose value fails its test (NaN fails every
    comparison) ends the program with one line naming the flag."""
    for name, (ok, what) in rules.items():
        value = getattr(cfg, name)
        try:
            good = bool(ok(value))
        except TypeError:
            good = False
        if not good:
            raise SystemExit(f"--{name.replace('_', '-')} {value!r}: must be {what}")


# ----------------------------------------------------------------------------------------------------------------------
# Logs and statistics

def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL log; a partial last line (a run killed mid-write) is skipped, a missing file is []."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def append_jsonl(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def mean_se(x) -> tuple[float, float]:
    """Mean and standard error of the mean (n − 1 in the std); s.e. 0 for fewer than two values, mean nan for none."""
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return float("nan"), 0.0
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
