"""eval.py — evaluate a policy on held-out tasks, and compare training runs from their logs.

Paper: Skill-SD §8 (metrics). Acc = pass@1 success rate, Comp = completion rate (Sokoban: boxes on targets at the end
over all boxes; AppWorld: the fraction of unit tests passed). The student is always evaluated under the plain task
prompt; `--with-skill` puts one retrieved skill in the prompt instead, which measures the teacher (the "teacher gap"
that the method's gain rests on, method.md §11).

Choices (numbered so the README can refer to them):
  1. Batch-size independence. Greedy decoding is deterministic per row. For sampled evaluation every episode gets its
     own torch.Generator seeded from (seed, task index, sample index), so a row's tokens do not depend on which other
     rows share its batch.
  2. pass@k uses the unbiased estimator of Chen et al. (2021): 1 − C(n−c, k)/C(n, k) per task, averaged.
  3. Standard errors are over tasks (levels), treating the samples of one task as one clustered observation.

Run:
  python eval.py --model runs/skill-sd-s0/ckpt/model --env sokoban                    # greedy, one episode per level
  python eval.py --model runs/skill-sd-s0/ckpt/model --samples 8 --temperature 1     # sampled, pass@1..8
  python eval.py --model tiny --with-skill runs/skill-sd-s0/ckpt/skill_bank.json     # the teacher, with skills
  python eval.py --compare runs/grpo-s0 runs/skill-sd-s0 --out report                # table + PNG curves
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

import env_sokoban
import model as model_lib
import skills as skills_lib


# ----------------------------------------------------------------------------------------------------------------------
# Environments behind one small interface (tasks + a factory of episodes that follow the episode protocol)

@dataclass
class Env:
    name: str
    train_tasks: list                      # Sokoban: Level objects (curriculum order); AppWorld: task ids
    test_tasks: list
    new_episode: Callable                  # task -> episode (see design: initial_messages / step / result ...)
    step_fn: Callable | None = None        # batched stepping (AppWorld: parallel servers); None = one by one
    close: Callable = lambda: None
    max_context: int = 8192


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
                   new_episode, step_fn=env_sokoban.step_episodes, max_context=8192)
    if name == "appworld":
        import env_appworld  # imported lazily: Sokoban users need no AppWorld set-up at all
        aw = env_appworld.AppWorldEnv(root=appworld_root, appworld_bin=appworld_bin, num_slots=appworld_slots,
                                      max_turns=max_turns, format_penalty=format_penalty,
                                      reward="success" if reward == "success" else "completion")
        return Env("appworld", aw.task_ids(train_split), aw.task_ids(test_split), aw.episode,
                   step_fn=env_appworld.step_episodes, close=aw.close, max_context=16384)
    raise SystemExit(f"unknown --env {name!r}: choose 'sokoban' or 'appworld'")


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c successes (Chen et al. 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def per_episode_generators(seed: int, num_tasks: int, samples: int) -> list[torch.Generator]:
    """One generator per (task, sample): sampling is then independent of how episodes are batched (choice 1)."""
    gens = []
    for t in range(num_tasks):
        for s in range(samples):
            g = torch.Generator()
            g.manual_seed((seed * 1_000_003 + t * 1009 + s) % (2 ** 63))
            gens.append(g)
    return gens


@torch.no_grad()
def evaluate(model, tokenizer, env: Env, tasks: list, samples: int = 1, temperature: float = 0.0,
             max_new_tokens: int = 256, batch_size: int = 64, seed: int = 0,
             skill_for: Callable | None = None, progress: bool = False) -> dict:
    """Play `samples` episodes per task and return Acc, Comp, pass@k, mean turns and the format-error rate.

    skill_for(task) -> skill text or None: when given, the skill block is put in the prompt (teacher evaluation).
    """
    sampling = model_lib.SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
    jobs = [(ti, s) for ti in range(len(tasks)) for s in range(samples)]
    gens = per_episode_generators(seed, len(tasks), samples)
    results: list[dict | None] = [None] * len(jobs)
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="eval", leave=False)
    for start in range(0, len(jobs), batch_size):
        chunk = list(range(start, min(start + batch_size, len(jobs))))
        episodes = [env.new_episode(tasks[jobs[j][0]]) for j in chunk]
        prompts = []
        for j, ep in zip(chunk, episodes):
            messages = ep.initial_messages()
            skill = skill_for(tasks[jobs[j][0]]) if skill_for is not None else None
            prompts.append(skills_lib.with_skill(messages, skill) if skill else messages)
        model_lib.rollout(model, tokenizer, episodes, sampling,
                          generator=[gens[j] for j in chunk] if temperature > 0 else None,
                          prompts=prompts, step_fn=env.step_fn, max_context=env.max_context)
        for j, ep in zip(chunk, episodes):
            results[j] = ep.result()
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    model.train(was_training)
    return summarize_results(tasks, jobs, results, samples)


def summarize_results(tasks: list, jobs: list, results: list, samples: int) -> dict:
    """Aggregate episode results into the metrics table (per task first, then over tasks)."""
    per_task_success = np.zeros((len(tasks), samples))
    per_task_comp = np.zeros((len(tasks), samples))
    turns, format_errors = [], []
    for (ti, s), r in zip(jobs, results):
        per_task_success[ti, s] = float(r["success"])
        per_task_comp[ti, s] = float(r["completion"])
        turns.append(r["turns"])
        format_errors.append(r["format_errors"])
    n_tasks = len(tasks)
    acc_t = per_task_success.mean(1)                       # (tasks,) success rate per task
    comp_t = per_task_comp.mean(1)
    se = lambda x: float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0   # noqa: E731
    out = {
        "acc": float(acc_t.mean()), "acc_se": se(acc_t),
        "comp": float(comp_t.mean()), "comp_se": se(comp_t),
        "mean_turns": float(np.mean(turns)),
        "format_error_rate": float(np.sum(format_errors) / max(1, np.sum(turns))),
        "tasks": n_tasks, "samples": samples, "episodes": len(jobs),
        "per_task_success": {task_key(t): float(a) for t, a in zip(tasks, acc_t)},
    }
    for k in sorted({1, 2, 4, 8, samples} - {0}):
        if k <= samples:
            c = per_task_success.sum(1).astype(int)
            out[f"pass@{k}"] = float(np.mean([pass_at_k(samples, int(ci), k) for ci in c]))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Comparing runs: a Markdown table of final evaluations (mean ± s.e. over seeds) and PNG training curves

def read_jsonl(path: str) -> list[dict]:
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
                    pass  # a run killed mid-write leaves a partial last line; skip it rather than fail the report
    return rows


def load_run(run_dir: str) -> dict:
    cfg_path = os.path.join(run_dir, "config.json")
    cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
    return {"dir": run_dir, "config": cfg, "train": read_jsonl(os.path.join(run_dir, "log.jsonl")),
            "eval": read_jsonl(os.path.join(run_dir, "eval.jsonl"))}


def run_label(run: dict) -> str:
    """Runs that differ only in their seed share a label (so seeds are averaged)."""
    cfg = run["config"]
    return cfg.get("label") or cfg.get("method") or os.path.basename(run["dir"].rstrip("/"))


def compare_runs(run_dirs: list[str], out_prefix: str | None = None) -> str:
    runs = [load_run(d) for d in run_dirs]
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(run_label(r), []).append(r)
    lines = ["| run | seeds | Acc (%) | Comp (%) | train reward (last 10 it.) |", "|---|---:|---:|---:|---:|"]
    for label, rs in groups.items():
        finals = [r["eval"][-1] for r in rs if r["eval"]]
        accs = np.array([100 * f["acc"] for f in finals])
        comps = np.array([100 * f["comp"] for f in finals])
        rewards = np.array([np.mean([t["reward"] for t in r["train"][-10:]]) for r in rs if r["train"]])

        def fmt(x):
            if len(x) == 0:
                return "–"
            if len(x) == 1:
                return f"{x[0]:.1f}"
            return f"{x.mean():.1f} ± {x.std(ddof=1) / math.sqrt(len(x)):.1f}"
        lines.append(f"| {label} | {len(rs)} | {fmt(accs)} | {fmt(comps)} | "
                     f"{fmt(rewards) if len(rewards) else '–'} |")
    table = "\n".join(lines)
    if out_prefix:
        with open(out_prefix + ".md", "w") as f:
            f.write(table + "\n")
        plot_curves(groups, out_prefix + ".png")
    return table


def plot_curves(groups: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG plots (pip install matplotlib); the table is above.")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, rs in groups.items():
        for key, ax in (("train", axes[0]), ("eval", axes[1])):
            curves = [[(row["iteration"], row["reward"] if key == "train" else row["acc"]) for row in r[key]]
                      for r in rs if r[key]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            xs = [c[i][0] for i in range(n)] if curves else []
            ys = np.array([[c[i][1] for i in range(n)] for c in curves])   # (seeds, points)
            ax.plot(xs, ys.mean(0), label=f"{label} (n={len(curves)})")
            if len(curves) > 1:
                s = ys.std(0, ddof=1) / math.sqrt(len(curves))
                ax.fill_between(xs, ys.mean(0) - s, ys.mean(0) + s, alpha=0.2)
    axes[0].set(title="training reward (rollouts)", xlabel="iteration")
    axes[1].set(title="held-out Acc", xlabel="iteration")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------------------------
# Command line

@dataclass
class EvalConfig:
    model: str = "tiny"            # HF id, local path, a run's ckpt/model folder, or "tiny" (built-in)
    env: str = "sokoban"           # sokoban | appworld
    preset: str = "paper"          # Sokoban level set (paper: 6x6, 2 boxes, 64 test levels)
    split: str = "test"            # test | train (AppWorld: dev by default, as in the paper)
    samples: int = 1               # episodes per task; paper: 1 (its Acc values are k/64 and k/57)
    temperature: float = 0.0       # 0 = greedy (paper's pass@1 evaluation, method.md §10)
    max_turns: int = 40            # paper: 40 steps (Sokoban) / 40 turns (AppWorld)
    max_new_tokens: int = 256      # per turn; method.md §10
    batch_size: int = 64           # results do not depend on it (choice 1)
    seed: int = 0
    with_skill: str = ""           # path of a skill_bank.json: evaluate the teacher with each task's best skill
    appworld_root: str = ""        # $APPWORLD_ROOT with data/ (AppWorld only)
    out: str = ""                  # write the metrics JSON here
    compare: list = field(default_factory=list)   # run dirs to compare instead of evaluating


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(EvalConfig):
        if f.name == "compare":
            p.add_argument("--compare", nargs="+", default=[], help="run directories to compare (globs allowed)")
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    cfg = EvalConfig(**vars(args))
    if cfg.compare:
        dirs = sorted({d for pat in cfg.compare for d in glob.glob(pat)})
        if not dirs:
            raise SystemExit(f"--compare: no run directories match {cfg.compare}")
        print(compare_runs(dirs, cfg.out or None))
        return
    torch.manual_seed(cfg.seed)
    model, tokenizer = model_lib.load(cfg.model)
    split = cfg.split if not (cfg.env == "appworld" and cfg.split == "test") else "dev"
    env = make_env(cfg.env, cfg.preset, cfg.max_turns, appworld_root=cfg.appworld_root or None,
                   test_split=split)
    try:
        tasks = env.train_tasks if split == "train" else env.test_tasks
        skill_for = None
        if cfg.with_skill:
            bank = skills_lib.SkillBank.load(cfg.with_skill)
            skill_for = lambda task: (lambda s: s.to_prompt() if s else None)(bank.best(task_key(task)))  # noqa
        metrics = evaluate(model, tokenizer, env, tasks, cfg.samples, cfg.temperature, cfg.max_new_tokens,
                           cfg.batch_size, cfg.seed, skill_for=skill_for, progress=True)
    finally:
        env.close()
    shown = {k: v for k, v in metrics.items() if k != "per_task_success"}
    print(json.dumps(shown, indent=2))
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(metrics, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
