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
  python eval.py --paper-table runs/table               # the paper's table on the tiny base: 6 arms x 3 seeds, 2 jobs
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import shlex
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
    skill_covers: Callable | None = None   # (skill text, observation text) -> bool; Sokoban only (--sdl-mask covered)


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
                   new_episode, step_fn=env_sokoban.step_episodes, max_context=8192,
                   skill_covers=env_sokoban.skill_covers)
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


METHOD_NAMES = {"grpo": "Vanilla GRPO", "opd": "Vanilla OPD", "skill-grpo": "Skill-augmented GRPO",
                "skill-sd": "Skill-SD"}   # the paper's names (method.md §9)


def run_label(run: dict, show_lam: bool = False) -> str:
    """The paper's name of a run's method and ablation switches (and λ when show_lam); runs that differ only in their
    seed share a label (so seeds are averaged)."""
    cfg = run["config"]
    if cfg.get("label"):
        return cfg["label"]
    if not cfg.get("method"):
        return os.path.basename(run["dir"].rstrip("/"))
    extras = []
    if cfg.get("teacher_weights") == "frozen" and cfg["method"] in ("skill-sd", "opd"):
        extras.append("frozen teacher")
    if cfg.get("rollout_by") == "teacher":
        extras.append("teacher-owned rollouts")
    if cfg["method"] == "skill-sd" and cfg.get("teacher_context") == "ground-truth":
        extras.append("ground-truth teacher")
    if cfg.get("ref_kl"):
        extras.append(f"+ KL to base, β = {cfg['ref_kl']:g}")
    if cfg.get("sdl_mask", "all") != "all":
        extras.append(f"SDL on {cfg['sdl_mask']} turns")
    if cfg.get("lam_warmdown"):
        extras.append(f"λ → 0 at it. {cfg['lam_warmdown']}")
    if show_lam and cfg["method"] == "skill-sd" and "lam" in cfg:
        extras.append(f"λ = {cfg['lam']:g}")
    name = METHOD_NAMES.get(cfg["method"], cfg["method"])
    return name + (f" ({', '.join(extras)})" if extras else "")


def _mean_se(x) -> str:
    x = np.asarray(x, dtype=float)
    if len(x) == 0:
        return "–"
    if len(x) == 1:
        return f"{x[0]:.1f}"
    return f"{x.mean():.1f} ± {x.std(ddof=1) / math.sqrt(len(x)):.1f}"


def _signed(x) -> str:
    s = _mean_se(x)
    return s if s == "–" or s.startswith("-") else "+" + s


def compare_runs(run_dirs: list[str], out_prefix: str | None = None, reference: str = "Vanilla GRPO") -> str:
    """The results table of a set of runs, from their logs: one row per method (seeds averaged, mean ± s.e. over
    seeds), the base row from the runs' iteration-0 evaluations, differences paired by seed (runs of one seed share
    the base checkpoint, the evaluation seed and the task order), training-level success, and minutes per run.
    Writes <out_prefix>.md and <out_prefix>.png (curves) when out_prefix is given."""
    runs = [load_run(d) for d in run_dirs]
    show_lam = len({r["config"].get("lam") for r in runs if r["config"].get("method") == "skill-sd"}) > 1
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(run_label(r, show_lam), []).append(r)
    seed = lambda r: r["config"].get("seed", 0)  # noqa: E731
    base = {}                                    # seed -> the iteration-0 evaluation (identical across methods)
    for r in runs:
        if r["eval"] and r["eval"][0].get("iteration") == 0:
            base.setdefault(seed(r), r["eval"][0])
    done = lambda r: bool(r["eval"]) and r["eval"][-1].get("iteration", 0) >= r["config"].get("iterations", 1)  # noqa
    finals = {label: {seed(r): r["eval"][-1] for r in rs if done(r)} for label, rs in groups.items()}
    unfinished = [os.path.basename(r["dir"].rstrip("/")) for r in runs if not done(r)]
    ref = finals.get(reference, {})
    # pass@k: the largest k the evaluations report; −log π of the sampled tokens (an entropy estimate, loss.diagnostics)
    # averaged after the first quarter of training, when the runs have left the base's distribution
    ks = sorted({int(k[5:]) for r in runs for e in r["eval"][-1:] for k in e if k.startswith("pass@")})
    pass_k = f"pass@{ks[-1]}" if ks else None
    lines = [f"| method | seeds | Acc (%) | Δ Acc vs base | Δ Acc vs {reference.split()[-1]} (paired) | Comp (%) | "
             f"{pass_k or 'pass@k'} (%) | train success, last 10 it. (%) | −log π, after it. 1/4 | eval s.e. per run | "
             "min per run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    if base:
        b = list(base.values())
        lines.append(f"| Base model | {len(b)} | {_mean_se([100 * e['acc'] for e in b])} | – | – | "
                     f"{_mean_se([100 * e['comp'] for e in b])} | "
                     f"{_mean_se([100 * e[pass_k] for e in b if pass_k in e])} | – | – | "
                     f"{100 * np.mean([e.get('acc_se', float('nan')) for e in b]):.1f} | – |")
    for label, rs in groups.items():
        fin = finals[label]
        accs = [100 * f["acc"] for f in fin.values()]
        d_base = [100 * (f["acc"] - base[s]["acc"]) for s, f in fin.items() if s in base]
        d_ref = [100 * (f["acc"] - ref[s]["acc"]) for s, f in fin.items() if s in ref] if label != reference else []
        train = [100 * np.mean([t.get("acc", t.get("reward", 0.0)) for t in r["train"][-10:]]) for r in rs
                 if r["train"]]
        eval_se = [100 * f["acc_se"] for f in fin.values() if "acc_se" in f]
        passes = [100 * f[pass_k] for f in fin.values() if pass_k in f]
        entropy = []                             # per run: mean −log π after the first quarter of its iterations
        for r in rs:
            late = [t["entropy_proxy"] for t in r["train"][len(r["train"]) // 4:] if "entropy_proxy" in t]
            entropy += [np.mean(late)] if late else []
        minutes = [(sum(v for t in r["train"] for k, v in t.items() if k.startswith("time_"))
                    + sum(e.get("seconds", 0.0) for e in r["eval"])) / 60 for r in rs if r["train"]]
        lines.append(f"| {label} | {len(fin)} | {_mean_se(accs)} | {_signed(d_base)} | {_signed(d_ref)} | "
                     f"{_mean_se([100 * f['comp'] for f in fin.values()])} | {_mean_se(passes)} | {_mean_se(train)} | "
                     f"{f'{np.mean(entropy):.2f}' if entropy else '–'} | {f'{np.mean(eval_se):.1f}' if eval_se else '–'} | "
                     f"{f'{np.mean(minutes):.1f}' if minutes else '–'} |")
    table = "\n".join(lines)
    if unfinished:   # a run still going (or stopped early) has no final evaluation: its row counts only finished seeds
        table += f"\n\nNot finished, left out of Acc, Comp and the differences: {', '.join(unfinished)}"
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
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rs in groups.items():
        for key, ax in (("train", axes[0]), ("eval", axes[1])):
            curves = [[(row["iteration"], row.get("acc", row.get("reward", 0.0))) for row in r[key]]
                      for r in rs if r[key]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            xs = [curves[0][i][0] for i in range(n)]
            ys = 100 * np.array([[c[i][1] for i in range(n)] for c in curves])   # (seeds, points)
            if key == "train" and n >= 5:   # rollout success is noisy (16 tasks x 8): a 5-iteration moving average
                kernel = np.ones(5) / 5
                ys = np.stack([np.convolve(y, kernel, mode="valid") for y in ys])
                xs = xs[4:]
            line, = ax.plot(xs, ys.mean(0), label=f"{label} (n={len(curves)})", marker="o" if key == "eval" else None)
            if len(curves) > 1:
                s = ys.std(0, ddof=1) / math.sqrt(len(curves))
                ax.fill_between(xs, ys.mean(0) - s, ys.mean(0) + s, alpha=0.15, color=line.get_color())
    axes[0].set(title="training-level success (rollouts, 5-it. moving average)", xlabel="iteration", ylabel="%")
    axes[1].set(title="held-out Acc", xlabel="iteration", ylabel="%")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------------------------
# The paper's table at the tiny scale: launch the missing runs (train.py), then compare them

TABLE_ARMS = {   # run name -> train.py flags (method.md §9: main table and ablations)
    "grpo": ["--method", "grpo"],
    "opd": ["--method", "opd"],
    "skill-grpo": ["--method", "skill-grpo"],
    "skill-sd": ["--method", "skill-sd"],
    "skill-sd-frozen": ["--method", "skill-sd", "--teacher-weights", "frozen"],
    "skill-sd-teacher-rollouts": ["--method", "skill-sd", "--rollout-by", "teacher"],
}


def run_finished(run_dir: str) -> bool:
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path):
        return False
    evals = read_jsonl(os.path.join(run_dir, "eval.jsonl"))
    return bool(evals) and evals[-1].get("iteration") == json.load(open(cfg_path)).get("iterations")


def run_table(root: str, seeds: list[int], jobs: int, arms: list[str], extra: list[str]) -> str:
    """Every (arm, seed) run under root/<arm>-s<seed>, `jobs` at a time (one CPU thread each); finished runs are kept,
    interrupted ones resume from their checkpoint; then the table and curves (root/table.md, root/table.png)."""
    import subprocess
    import time
    unknown = [a for a in arms if a not in TABLE_ARMS]
    if unknown:
        raise SystemExit(f"--arms {unknown}: choose from {list(TABLE_ARMS)}")
    os.makedirs(root, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    if "--model" not in extra:   # build the tiny base once, before parallel runs would each build it
        subprocess.run([sys.executable, os.path.join(here, "tiny_base.py")], check=True)
    todo = []
    for seed in seeds:
        for arm in arms:
            d = os.path.join(root, f"{arm}-s{seed}")
            if run_finished(d):
                continue
            resume = os.path.exists(os.path.join(d, "ckpt", "trainer_state.pt"))
            cmd = [sys.executable, os.path.join(here, "train.py"), "--env", "sokoban", *TABLE_ARMS[arm],
                   "--seed", str(seed), *extra, "--run-dir", d] + (["--resume", d] if resume else [])
            todo.append((d, cmd))
    print(f"[table] {len(todo)} runs to do under {root}, {jobs} at a time")
    running, t0 = [], time.time()
    while todo or running:
        while todo and len(running) < jobs:
            d, cmd = todo.pop(0)
            os.makedirs(d, exist_ok=True)
            print(f"[table] start {os.path.basename(d)}  ({(time.time() - t0) / 60:.1f} min)")
            running.append((d, subprocess.Popen(cmd, stdout=open(os.path.join(d, "train.out"), "w"),
                                                stderr=subprocess.STDOUT)))
        time.sleep(2)
        for d, proc in list(running):
            if proc.poll() is not None:
                running.remove((d, proc))
                if proc.returncode != 0:
                    tail = open(os.path.join(d, "train.out")).read()[-2000:]
                    raise SystemExit(f"[table] {d} failed (exit {proc.returncode}); its output ends:\n{tail}")
                print(f"[table] done  {os.path.basename(d)}  ({(time.time() - t0) / 60:.1f} min)")
    dirs = [os.path.join(root, f"{a}-s{s}") for a in arms for s in seeds]
    return compare_runs(dirs, os.path.join(root, "table"))


# ----------------------------------------------------------------------------------------------------------------------
# Command line

def opt(default=None, help="", factory=None):  # a dataclass field that carries its argparse help text (train.py too)
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class EvalConfig:
    model: str = opt("tiny", "HF id, local path, a run's ckpt/model folder, or 'tiny' (built-in)")
    env: str = opt("sokoban", "sokoban | appworld")
    preset: str = opt("paper", "Sokoban level set: paper (6x6, 2 boxes, 64 test levels) | easy (1 box) | hard (the "
                               "easy rooms that need 5+ moves)")
    split: str = opt("test", "test | train (AppWorld: dev by default, as in the paper)")
    samples: int = opt(1, "episodes per task; paper: 1 (its Acc values are k/64 and k/57)")
    temperature: float = opt(0.0, "0 = greedy (paper's pass@1 evaluation, method.md §10)")
    max_turns: int = opt(40, "paper: 40 steps (Sokoban) / 40 turns (AppWorld); the tiny base plays 12")
    max_new_tokens: int = opt(256, "per turn; method.md §10")
    batch_size: int = opt(64, "episodes per batch; results do not depend on it (choice 1)")
    seed: int = opt(0, "sampling seed")
    with_skill: str = opt("", "path of a skill_bank.json: evaluate the teacher with each task's best skill")
    appworld_root: str = opt("", "$APPWORLD_ROOT with data/ (AppWorld only)")
    out: str = opt("", "write the metrics JSON here (with --compare: the prefix of the .md table and .png plot)")
    compare: list = opt(help="run dirs to compare instead of evaluating (globs allowed)", factory=list)
    paper_table: str = opt("", "a folder: run the paper's table on the tiny base there (arms x seeds), then compare")
    seeds: list = opt(help="--paper-table: seeds per arm (issue 8 asks for 3)", factory=lambda: [0, 1, 2])
    arms: list = opt(help="--paper-table: which arms (TABLE_ARMS)", factory=lambda: list(TABLE_ARMS))
    jobs: int = opt(2, "--paper-table: runs at a time (one CPU thread each; 2 on a 2-core machine)")
    train_args: str = opt("", "--paper-table: extra train.py flags for every run, e.g. --train-args='--iterations 20'")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(EvalConfig):
        if f.name == "compare":
            p.add_argument("--compare", nargs="+", default=[], help=f.metadata["help"])
            continue
        if f.name in ("seeds", "arms"):
            p.add_argument("--" + f.name, nargs="+", type=int if f.name == "seeds" else str,
                           default=f.default_factory(), help=f.metadata["help"] + f" (default {f.default_factory()})")
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f.metadata["help"] + f" (default {f.default!r})")
    args = p.parse_args(argv)
    cfg = EvalConfig(**vars(args))
    if cfg.paper_table:
        print(run_table(cfg.paper_table, cfg.seeds, cfg.jobs, cfg.arms, shlex.split(cfg.train_args)))
        return
    if cfg.compare:
        # rows in the order the patterns are given (each pattern's matches sorted), duplicates once
        dirs = list(dict.fromkeys(d for pat in cfg.compare for d in sorted(glob.glob(pat))))
        if not dirs:
            raise SystemExit(f"--compare: no run directories match {cfg.compare}")
        print(compare_runs(dirs, cfg.out or None))
        return
    if cfg.env == "sokoban" and cfg.preset not in env_sokoban.PRESETS:
        raise SystemExit(f"--preset {cfg.preset!r}: choose one of {tuple(env_sokoban.PRESETS)}")
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
