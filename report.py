"""report.py — results tables and curves from training runs' logs, and the launcher of the paper's table.

Everything here reads the files a run writes (config.json, log.jsonl, eval.jsonl) and never a model, so a table can be
rebuilt at any time from finished or unfinished runs:
  1. `compare_runs`: one row per method (the paper's names, METHOD.md §8), seeds averaged (mean ± s.e. over
     seeds), the base row from the runs' iteration-0 evaluations, differences paired by seed (runs of one seed share
     the base checkpoint, the evaluation seed and the task order); runs without a final evaluation are listed, not
     averaged.
  2. `run_table`: every (arm, seed) of the paper's table as train.py subprocesses, `jobs` at a time, one CPU thread
     each; finished runs are kept, interrupted ones resume from their checkpoint.
  3. `final_table`: the small table train.py prints at the end of a run.

Run: `python eval.py --compare 'runs/*' --out report` (report.md + report.png), `python eval.py --paper-table
runs/table`; `python -m pytest -q tests/test_report.py`.
"""
from __future__ import annotations

import glob
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

import numpy as np

import run_folder
from common import mean_se, read_jsonl

METHOD_NAMES = {"grpo": "Vanilla GRPO", "opd": "Vanilla OPD", "skill-grpo": "Skill-augmented GRPO",
                "skill-sd": "Skill-SD"}   # the paper's names (METHOD.md §8)


# ----------------------------------------------------------------------------------------------------------------------
# Runs and their labels

def load_run(run_dir: str) -> dict:
    """A run's config and logs: {dir, config, train (log.jsonl rows), eval (eval.jsonl rows)}."""
    cfg_path = os.path.join(run_dir, "config.json")
    cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
    return {"dir": run_dir, "config": cfg, "train": read_jsonl(os.path.join(run_dir, "log.jsonl")),
            "eval": read_jsonl(os.path.join(run_dir, "eval.jsonl"))}


def run_finished(run: dict) -> bool:
    """A run is finished when its last evaluation is at its last iteration."""
    return bool(run["eval"]) and run["eval"][-1].get("iteration", 0) >= run["config"].get("iterations", 1)


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
    if cfg.get("skill_credit", "group") != "group":
        extras.append(f"{cfg['skill_credit']}-reward skill credit")
    if cfg.get("sdl_norm", "all") != "all":
        extras.append(f"SDL mean over {cfg['sdl_norm']} tokens")
    if cfg.get("grpo_norm", "all") != "all":
        extras.append(f"GRPO {cfg['grpo_norm']}")
    if cfg.get("collapse_guard"):
        extras.append("collapse guard")
    if show_lam and cfg["method"] == "skill-sd" and "lam" in cfg:
        extras.append(f"λ = {cfg['lam']:g}")
    name = METHOD_NAMES.get(cfg["method"], cfg["method"])
    return name + (f" ({', '.join(extras)})" if extras else "")


# ----------------------------------------------------------------------------------------------------------------------
# The comparison table: numbers first (table_rows), then strings (format_table)

def _ms(x) -> str:
    if len(x) == 0:
        return "–"
    m, s = mean_se(x)
    return f"{m:.1f}" if len(x) == 1 else f"{m:.1f} ± {s:.1f}"


def _signed(x) -> str:
    s = _ms(x)
    return s if s == "–" or s.startswith("-") else "+" + s


def _minutes(run: dict) -> float:
    return (sum(v for t in run["train"] for k, v in t.items() if k.startswith("time_"))
            + sum(e.get("seconds", 0.0) for e in run["eval"])) / 60


def table_rows(runs: list[dict], groups: dict, reference: str, pass_k: str | None) -> list[dict]:
    """Per label the numbers of one table row (lists over seeds, in %); the base row first when there is one."""
    seed = lambda r: r["config"].get("seed", 0)  # noqa: E731
    base = {}                                    # seed -> the iteration-0 evaluation (identical across methods)
    for r in runs:
        if r["eval"] and r["eval"][0].get("iteration") == 0:
            base.setdefault(seed(r), r["eval"][0])
    finals = {label: {seed(r): r["eval"][-1] for r in rs if run_finished(r)} for label, rs in groups.items()}
    ref = finals.get(reference, {})
    rows = []
    if base:
        b = list(base.values())
        rows.append({"label": "Base model", "seeds": len(b), "acc": [100 * e["acc"] for e in b],
                     "comp": [100 * e["comp"] for e in b], "pass": [100 * e[pass_k] for e in b if pass_k in e],
                     "eval_se": [100 * np.mean([e.get("acc_se", float("nan")) for e in b])], "base": True})
    for label, rs in groups.items():
        fin = finals[label]
        entropy = []                             # per run: mean −log π after the first quarter of its iterations
        for r in rs:
            late = [t["entropy_proxy"] for t in r["train"][len(r["train"]) // 4:] if "entropy_proxy" in t]
            entropy += [np.mean(late)] if late else []
        rows.append({
            "label": label, "seeds": len(fin), "acc": [100 * f["acc"] for f in fin.values()],
            "d_base": [100 * (f["acc"] - base[s]["acc"]) for s, f in fin.items() if s in base],
            "d_ref": [100 * (f["acc"] - ref[s]["acc"]) for s, f in fin.items() if s in ref] if label != reference
            else [],
            "comp": [100 * f["comp"] for f in fin.values()],
            "pass": [100 * f[pass_k] for f in fin.values() if pass_k in f],
            "train": [100 * np.mean([t.get("acc", t.get("reward", 0.0)) for t in r["train"][-10:]]) for r in rs
                      if r["train"]],
            "entropy": entropy, "eval_se": [100 * f["acc_se"] for f in fin.values() if "acc_se" in f],
            "minutes": [_minutes(r) for r in rs if r["train"]], "base": False})
    return rows


def format_table(rows: list[dict], reference: str, pass_k: str | None) -> str:
    mean_or_dash = lambda x, f: f.format(np.mean(x)) if x else "–"  # noqa: E731
    lines = [f"| method | seeds | Acc (%) | Δ Acc vs base | Δ Acc vs {reference.split()[-1]} (paired) | Comp (%) | "
             f"{pass_k or 'pass@k'} (%) | train success, last 10 it. (%) | −log π, after it. 1/4 | eval s.e. per run | "
             "min per run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["base"]:
            lines.append(f"| {r['label']} | {r['seeds']} | {_ms(r['acc'])} | – | – | {_ms(r['comp'])} | "
                         f"{_ms(r['pass'])} | – | – | {r['eval_se'][0]:.1f} | – |")
        else:
            lines.append(f"| {r['label']} | {r['seeds']} | {_ms(r['acc'])} | {_signed(r['d_base'])} | "
                         f"{_signed(r['d_ref'])} | {_ms(r['comp'])} | {_ms(r['pass'])} | {_ms(r['train'])} | "
                         f"{mean_or_dash(r['entropy'], '{:.2f}')} | {mean_or_dash(r['eval_se'], '{:.1f}')} | "
                         f"{mean_or_dash(r['minutes'], '{:.1f}')} |")
    return "\n".join(lines)


# two-sided 95% quantiles of Student's t by degrees of freedom (df > 30: the normal's 1.96 is within 2%)
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test p-value (ties dropped): P(a split at least this uneven | a fair coin)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_summary(diffs: list[float]) -> dict:
    """Per-seed paired differences -> mean, s.e., a 95% t-interval, wins / losses, the sign test's p."""
    d = np.asarray(diffs, dtype=float)
    m, se = mean_se(d)
    t = T975[len(d) - 2] if 2 <= len(d) <= 31 else 1.96
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    return {"n": len(d), "mean": m, "se": se, "lo": m - t * se, "hi": m + t * se, "wins": wins, "losses": losses,
            "p_sign": sign_test(wins, losses)}


def paired_lines(rows: list[dict], reference: str) -> str:
    """One line per method with at least 2 seeds paired with the reference: the difference and its uncertainty."""
    out = []
    for r in rows:
        if not r["base"] and len(r.get("d_ref", [])) >= 2:
            p = paired_summary(r["d_ref"])
            out.append(f"{r['label']} − {reference}, Acc paired over {p['n']} seeds: {p['mean']:+.1f} ± {p['se']:.1f} "
                       f"points, 95% CI [{p['lo']:+.1f}, {p['hi']:+.1f}], better on {p['wins']} of {p['n']} seeds, "
                       f"sign test p = {p['p_sign']:.3f}")
    return "\n".join(out)


def compare_runs(run_dirs: list[str], out_prefix: str | None = None, reference: str = "Vanilla GRPO") -> str:
    """The results table of a set of runs, from their logs (choice 1); pass@k is the largest k the evaluations report,
    −log π the mean entropy estimate of the sampled tokens (loss.diagnostics) after the first quarter of training.
    Writes <out_prefix>.md and <out_prefix>.png (curves) when out_prefix is given."""
    runs = [load_run(d) for d in run_dirs]
    show_lam = len({r["config"].get("lam") for r in runs if r["config"].get("method") == "skill-sd"}) > 1
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(run_label(r, show_lam), []).append(r)
    ks = sorted({int(k[5:]) for r in runs for e in r["eval"][-1:] for k in e if k.startswith("pass@")})
    pass_k = f"pass@{ks[-1]}" if ks else None
    rows = table_rows(runs, groups, reference, pass_k)
    table, paired = format_table(rows, reference, pass_k), paired_lines(rows, reference)
    table += f"\n\n{paired}" if paired else ""
    unfinished = [os.path.basename(r["dir"].rstrip("/")) for r in runs if not run_finished(r)]
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
# The end-of-run table train.py prints

def final_table(run_dir: str) -> str:
    """A run's result from its logs: held-out Acc / Comp at every evaluation (± s.e. over tasks) and the
    training-level rollout success over the first and last 5 iterations."""
    run = load_run(run_dir)
    cfg, evals, train_rows = run["config"], run["eval"], run["train"]
    temperature, samples = cfg.get("eval_temperature", 0.0), cfg.get("eval_samples", 1)
    how = "greedy" if temperature == 0 else f"T = {temperature:g}, {samples} samples/task"
    lines = [f"\n[result] {cfg.get('method')}, seed {cfg.get('seed')}: held-out tasks ({how}); ± = s.e. over tasks",
             "| iteration | Acc (%) | Comp (%) |", "|---:|---:|---:|"]
    extra = [k for k in ("TGC", "SGC") if evals and k in evals[0]]      # AppWorld's own metrics, in percent
    if extra:
        lines[1:3] = ["| iteration | Acc (%) | Comp (%) | " + " | ".join(f"{k} (%)" for k in extra) + " |",
                      "|---:|---:|---:|" + "---:|" * len(extra)]
    lines += [f"| {e['iteration']} | {100 * e['acc']:.1f} ± {100 * e.get('acc_se', 0):.1f} | "
              f"{100 * e['comp']:.1f} ± {100 * e.get('comp_se', 0):.1f} |"
              + "".join(f" {e.get(k, float('nan')):.1f} |" for k in extra) for e in evals]
    if len(evals) >= 2:
        lines.append(f"held-out Acc {100 * evals[0]['acc']:.1f} -> {100 * evals[-1]['acc']:.1f} "
                     f"({100 * (evals[-1]['acc'] - evals[0]['acc']):+.1f} points)")
    if train_rows:
        first, last = (100 * np.mean([r["acc"] for r in rows]) for rows in (train_rows[:5], train_rows[-5:]))
        lines.append(f"training-level success (rollouts): first 5 iterations {first:.1f}%, last 5 {last:.1f}%")
    return "\n".join(lines + [f"logs and checkpoint: {run_dir}"])


# ----------------------------------------------------------------------------------------------------------------------
# The paper's table at the tiny scale: launch the missing runs (train.py), then compare them

TABLE_ARMS = {   # run name -> train.py flags (METHOD.md §8: main table and ablations)
    "grpo": ["--method", "grpo"],
    "opd": ["--method", "opd"],
    "skill-grpo": ["--method", "skill-grpo"],
    "skill-sd": ["--method", "skill-sd"],
    "skill-sd-frozen": ["--method", "skill-sd", "--teacher-weights", "frozen"],
    "skill-sd-teacher-rollouts": ["--method", "skill-sd", "--rollout-by", "teacher"],
}


def run_table(root: str, seeds: list[int], jobs: int, arms: list[str], extra: list[str]) -> str:
    """Every (arm, seed) run under root/<arm>-s<seed> (choice 2); then the table and curves (root/table.md, .png)."""
    unknown = [a for a in arms if a not in TABLE_ARMS]
    if unknown:
        raise SystemExit(f"--arms {unknown}: choose from {list(TABLE_ARMS)}")
    os.makedirs(root, exist_ok=True)
    here = os.path.dirname(os.path.abspath(__file__))
    if "--model" not in extra:   # build the tiny base once, before parallel runs would each build it
        subprocess.run([sys.executable, os.path.join(here, "tiny_base.py")], check=True)
    # the cores shared out: 2 jobs of 2 threads each on 2 cores run far slower than 2 of one thread
    todo, threads = [], max(1, (os.cpu_count() or 1) // jobs)
    for seed in seeds:
        for arm in arms:
            d = os.path.join(root, f"{arm}-s{seed}")
            if os.path.exists(os.path.join(d, "config.json")) and run_finished(load_run(d)):
                continue
            todo.append((d, run_command(here, arm, seed, extra, d, threads)))
    print(f"[table] {len(todo)} runs to do under {root}, {jobs} at a time")
    running = []
    try:
        _run_all(todo, running, jobs)
    except BaseException:     # Ctrl-C, SIGTERM (see below), a failed run: no child outlives the table
        for d, proc in running:
            proc.terminate()
        for d, proc in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        raise
    dirs = [os.path.join(root, f"{a}-s{s}") for a in arms for s in seeds]
    return compare_runs(dirs, os.path.join(root, "table"))


def run_command(here: str, arm: str, seed: int, extra: list[str], d: str, threads: int = 1) -> list[str]:
    """train.py for one (arm, seed): --resume when it has a checkpoint; --overwrite when it holds only what a run
    stopped before its first checkpoint left (that run starts again from scratch, its partial log removed)."""
    cmd = [sys.executable, os.path.join(here, "train.py"), "--env", "sokoban", *TABLE_ARMS[arm], "--seed", str(seed),
           "--threads", str(threads), *extra, "--run-dir", d]      # a --threads in extra comes later and wins
    if run_folder.checkpoints(d):
        return cmd + ["--resume", d]
    return cmd + (["--overwrite"] if run_folder.run_files(d) else [])


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _run_all(todo: list, running: list, jobs: int) -> None:
    """Start the runs `jobs` at a time and wait for them all; meanwhile SIGTERM raises KeyboardInterrupt, so that
    run_table ends its children on either signal."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    t0 = time.time()
    try:
        while todo or running:
            while todo and len(running) < jobs:
                d, cmd = todo.pop(0)
                os.makedirs(d, exist_ok=True)
                print(f"[table] start {os.path.basename(d)}  ({(time.time() - t0) / 60:.1f} min)", flush=True)
                running.append((d, subprocess.Popen(cmd, stdout=open(os.path.join(d, "train.out"), "w"),
                                                    stderr=subprocess.STDOUT)))
            time.sleep(2)
            for d, proc in list(running):
                if proc.poll() is not None:
                    running.remove((d, proc))
                    if proc.returncode != 0:
                        tail = open(os.path.join(d, "train.out")).read()[-2000:]
                        raise SystemExit(f"[table] {d} failed (exit {proc.returncode}); its output ends:\n{tail}")
                    print(f"[table] done  {os.path.basename(d)}  ({(time.time() - t0) / 60:.1f} min)", flush=True)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def main(cfg) -> None:
    """eval.py --paper-table / --compare (cfg: eval.EvalConfig)."""
    if cfg.paper_table:
        print(run_table(cfg.paper_table, cfg.seeds, cfg.jobs, cfg.arms, shlex.split(cfg.train_args)))
        return
    # rows in the order the patterns are given (each pattern's matches sorted), duplicates once
    dirs = list(dict.fromkeys(d for pat in cfg.compare for d in sorted(glob.glob(pat)) if os.path.isdir(d)))
    if not dirs:
        raise SystemExit(f"--compare: no run directories match {cfg.compare}")
    print(compare_runs(dirs, cfg.out or None))
