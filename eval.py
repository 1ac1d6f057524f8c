"""eval.py — evaluate a policy on held-out tasks, and measure the teacher gap the method rests on.

Paper: Skill-SD §8 (metrics), METHOD.md §9. Acc = pass@1 success rate, Comp = completion rate (Sokoban: boxes on
targets at the end over all boxes; AppWorld: the fraction of unit tests passed; AppWorld also gets its own TGC and
SGC). The student is always evaluated under the plain task prompt; `--with-skill` puts one skill per task in the
prompt instead, which measures the teacher. `teacher_gap` is the pre-RL diagnostic of METHOD.md §6: the student vs the
teacher with the student's own skill vs the teacher with another task's skill, on the same tasks.

Choices (numbered so the README can refer to them):
  1. Batch-size independence. Greedy decoding is deterministic per row. For sampled evaluation every episode gets its
     own torch.Generator seeded from (seed, task index, sample index), so a row's tokens do not depend on which other
     rows share its batch. (teacher_gap passes one generator for all episodes instead, as tiny_base.py always has.)
  2. pass@k uses the unbiased estimator of Chen et al. (2021): 1 − C(n−c, k)/C(n, k) per task, averaged.
  3. Standard errors are over tasks (levels), treating the samples of one task as one clustered observation.
  4. On a run's checkpoint (`--model runs/<run>/ckpt/model`), the environment and evaluation settings default to the
     run's own (its config.json: preset, turns, tokens per reply, samples, temperature), so the numbers match the
     run's final table; any flag given overrides them.

Run:
  python eval.py --model runs/skill-sd-sokoban-s0/ckpt/model                      # the run's own evaluation settings
  python eval.py --model runs/skill-sd-sokoban-s0/ckpt/model --samples 1 --temperature 0 --preset paper   # overrides
  python eval.py --model tiny --with-skill runs/skill-sd-sokoban-s0/ckpt/skill_bank.json   # the teacher, with skills
  python eval.py --compare runs/grpo-sokoban-s0 runs/skill-sd-sokoban-s0 --out report     # table + PNG (report.py)
  python eval.py --paper-table runs/table          # the paper's table on the tiny base: 6 arms x 3 seeds (report.py)
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import env_sokoban
import model as model_lib
import rule_skills
import skills as skills_lib
import tiny_base
from common import Env, flag, make_env, mean_se, parse_flags, require, task_key


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
def play_tasks(model, tokenizer, env: Env, tasks: list, samples: int, sampling: model_lib.SamplingConfig,
               batch_size: int = 64, generator=None, skill_for: Callable | None = None, progress: bool = False,
               only: list[int] | None = None, compile=False):
    """Play `samples` episodes per task -> (jobs [(task index, sample)], episodes). generator: a list with one per job
    (choice 1), one torch.Generator for all, or None (greedy). skill_for(task) -> skill text or None puts the skill
    block in that task's prompt (the teacher). only: play just these job indices (a rank's share; generator stays
    indexed by the full job list); compile: model.rollout's (a StaticDecoder, or True)."""
    every = [(ti, s) for ti in range(len(tasks)) for s in range(samples)]
    picked = list(range(len(every))) if only is None else list(only)
    jobs, episodes = [every[j] for j in picked], []
    was_training = model.training
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc="eval", leave=False)
    try:
        model.eval()
        for start in range(0, len(jobs), batch_size):
            chunk = picked[start: start + batch_size]                          # indices into the full job list
            batch = [env.new_episode(tasks[every[j][0]]) for j in chunk]
            prompts = []
            for j, ep in zip(chunk, batch):
                skill = skill_for(tasks[every[j][0]]) if skill_for is not None else None
                prompts.append(skills_lib.with_skill(ep.initial_messages(), skill) if skill else ep.initial_messages())
            gen = [generator[j] for j in chunk] if isinstance(generator, list) else generator
            model_lib.rollout(model, tokenizer, batch, sampling, generator=gen, prompts=prompts, step_fn=env.step_fn,
                              max_context=env.max_context, compile=compile)
            episodes += batch
            if bar is not None:
                bar.update(len(chunk))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return jobs, episodes


def evaluate(model, tokenizer, env: Env, tasks: list, samples: int = 1, temperature: float = 0.0,
             max_new_tokens: int = 256, batch_size: int = 64, seed: int = 0,
             skill_for: Callable | None = None, progress: bool = False,
             shard: tuple[int, int] = (0, 1), gather: Callable | None = None, compile=False) -> dict:
    """Play `samples` episodes per task and return Acc, Comp, pass@k, mean turns and the format-error rate (and the
    environment's own metrics, e.g. AppWorld's TGC / SGC). shard=(rank, world) with gather(obj) -> [every rank's obj]
    (train.py under torchrun, dist.py): each rank plays every world-th episode and all return the same table, equal
    to one process's (choice 1 makes an episode's tokens independent of its batch). compile: model.rollout's."""
    sampling = model_lib.SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
    gens = per_episode_generators(seed, len(tasks), samples) if temperature > 0 else None
    rank, world = shard
    only = range(rank, len(tasks) * samples, world)
    _, episodes = play_tasks(model, tokenizer, env, tasks, samples, sampling, batch_size, gens, skill_for, progress,
                             only, compile)
    played = [(j, ep.result()) for j, ep in zip(only, episodes)]
    if world > 1:
        played = sorted((x for part in gather(played) for x in part), key=lambda x: x[0])
    jobs = [(ti, s) for ti in range(len(tasks)) for s in range(samples)]
    results = [r for _, r in played]
    out = summarize_results(tasks, jobs, results, samples)
    if env.metrics is not None:
        out.update(env.metrics([{**r, "task_id": task_key(tasks[ti])} for (ti, _), r in zip(jobs, results)]))
    return out


def summarize_results(tasks: list, jobs: list, results: list, samples: int) -> dict:
    """Aggregate episode results into the metrics table (per task first, then over tasks; choice 3)."""
    per_task_success = np.zeros((len(tasks), samples))
    per_task_comp = np.zeros((len(tasks), samples))
    turns, format_errors = [], []
    for (ti, s), r in zip(jobs, results):
        per_task_success[ti, s] = float(r["success"])
        per_task_comp[ti, s] = float(r["completion"])
        turns.append(r["turns"])
        format_errors.append(r["format_errors"])
    acc_t = per_task_success.mean(1)                       # (tasks,) success rate per task
    comp_t = per_task_comp.mean(1)
    (acc, acc_se), (comp, comp_se) = mean_se(acc_t), mean_se(comp_t)
    out = {
        "acc": acc, "acc_se": acc_se, "comp": comp, "comp_se": comp_se,
        "mean_turns": float(np.mean(turns)),
        "format_error_rate": float(np.sum(format_errors) / max(1, np.sum(turns))),
        "tasks": len(tasks), "samples": samples, "episodes": len(jobs),
        "per_task_success": {task_key(t): float(a) for t, a in zip(tasks, acc_t)},
    }
    for k in sorted({1, 2, 4, 8, samples} - {0}):
        if k <= samples:
            c = per_task_success.sum(1).astype(int)
            out[f"pass@{k}"] = float(np.mean([pass_at_k(samples, int(ci), k) for ci in c]))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The teacher gap: student vs teacher with its own skill vs teacher with another task's skill (METHOD.md §6)

def _pct(metrics: dict) -> tuple[float, float]:
    return 100 * metrics["acc"], 100 * metrics["acc_se"]


@torch.no_grad()
def teacher_gap(model, tokenizer, env: Env, tasks: list, samples: int = 8, temperature: float = 1.0,
                max_new_tokens: int = 8, seed: int = 0, batch_size: int = 128, make_skill: Callable | None = None):
    """Pre-RL measurements on the same tasks, ± = s.e. over tasks, in %: student Acc (sampled and greedy) and format
    errors; then on the tasks where a student sample succeeded, with fresh samples: student, teacher with its own
    skill (the summary of its shortest successful sample), teacher with another task's skill (the control), and their
    paired difference. make_skill(episode) -> Skill defaults to the environment's rule summariser.

    -> (measurements, tasks with a skill, their skills). Every call draws from one generator seeded with seed, seed+1,
    ... per condition, so the numbers are reproducible (and depend on batch_size; choice 1)."""
    if make_skill is None:
        summarizer = rule_skills.rule_summarizer(env.name)
        make_skill = lambda ep: summarizer.summarize_one(skills_lib.SummaryRequest.from_episode(env.name, ep))  # noqa
    sampled = model_lib.SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)
    greedy = model_lib.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)

    def run(subset, k, sampling, s, skill_for=None):
        jobs, eps = play_tasks(model, tokenizer, env, subset, k, sampling, batch_size,
                               torch.Generator().manual_seed(s), skill_for)
        return summarize_results(subset, jobs, [ep.result() for ep in eps], k), eps

    student, eps = run(tasks, samples, sampled, seed)
    student_greedy, _ = run(tasks, 1, greedy, seed)
    out = {"levels": len(tasks), "samples": samples, "student_acc": _pct(student),
           "student_greedy": _pct(student_greedy), "student_format_error_pct": 100 * student["format_error_rate"]}
    own = {}                        # task index -> the skill of its shortest successful student sample
    for i in range(len(tasks)):
        wins = [ep for ep in eps[i * samples:(i + 1) * samples] if ep.result()["success"]]
        if wins:
            own[i] = make_skill(min(wins, key=lambda e: e.result()["turns"]))
    have = sorted(own)
    out["levels_with_skill"] = len(have)
    if len(have) < 2:
        return out, [], []
    sub = [tasks[i] for i in have]
    text = {task_key(tasks[i]): own[i].to_prompt() for i in have}
    other = {task_key(tasks[i]): own[have[(k + 1) % len(have)]].to_prompt() for k, i in enumerate(have)}
    fresh, _ = run(sub, samples, sampled, seed + 1)
    t_own, _ = run(sub, samples, sampled, seed + 2, lambda t: text[task_key(t)])
    t_mis, _ = run(sub, samples, sampled, seed + 3, lambda t: other[task_key(t)])
    g_own, _ = run(sub, 1, greedy, seed, lambda t: text[task_key(t)])
    g_student, _ = run(sub, 1, greedy, seed)
    keys = [task_key(t) for t in sub]
    diff = [t_own["per_task_success"][k] - fresh["per_task_success"][k] for k in keys]
    gap, gap_se = mean_se(diff)
    out.update({"student_acc_same_levels": _pct(fresh), "teacher_own_acc": _pct(t_own),
                "teacher_mismatched_acc": _pct(t_mis), "teacher_gap": (100 * gap, 100 * gap_se),
                "student_greedy_same_levels": _pct(g_student), "teacher_own_greedy": _pct(g_own),
                "teacher_format_error_pct": 100 * t_own["format_error_rate"]})
    out["trainer_pick"] = trainer_pick_gap(run, tasks, eps, samples, sampled, seed, make_skill)
    return out, sub, [own[i] for i in have]


def trainer_pick_gap(run, tasks, eps, samples, sampled, seed, make_skill) -> dict:
    """The teacher the trainer actually uses: each task's `samples` episodes summarised into its bank in order (one
    training visit), one retrieval by the bank's rule, the teacher with that skill vs fresh student samples, paired by
    task, overall and by whether the picked skill's episode succeeded; for both --skill-credit rules."""
    student, _ = run(tasks, samples, sampled, seed + 4)
    out = {}
    for k, credit in enumerate(("group", "source")):
        bank = skills_lib.SkillBank(prior_from_source=credit == "source")
        for i, task in enumerate(tasks):
            for ep in eps[i * samples:(i + 1) * samples]:
                r = ep.result()
                bank.add(task_key(task), make_skill(ep), {"reward": r["reward"], "success": r["success"]})
        picks = {task_key(t): bank.retrieve(task_key(t)) for t in tasks}
        picked = [t for t in tasks if picks[task_key(t)]]
        teacher, _ = run(picked, samples, sampled, seed + 5 + k, lambda t: picks[task_key(t)][1].to_prompt())
        diff = {task_key(t): teacher["per_task_success"][task_key(t)] - student["per_task_success"][task_key(t)]
                for t in picked}
        won = {key: bank.entry(key, hit[0]).get("source_success") for key, hit in picks.items() if hit}
        gap = mean_se(list(diff.values()))
        row = {"tasks": len(picked), "teacher_acc": _pct(teacher), "gap": (100 * gap[0], 100 * gap[1]),
               "from_success": float(sum(won.values()) / max(1, len(won)))}
        for name, success in (("success", True), ("failure", False)):
            part = [d for key, d in diff.items() if won[key] == success]
            row[f"gap_{name}"] = (*(100 * x for x in mean_se(part)), len(part))
        out[credit] = row
    out["student_acc"] = _pct(student)
    return out


def format_teacher_gap(m: dict) -> str:
    pm = lambda v: f"{v[0]:5.1f} ± {v[1]:.1f}"  # noqa: E731
    lines = [f"held-out levels: {m['levels']} x {m['samples']} samples (T=1); ± = s.e. over levels",
             f"student Acc T=1            {pm(m['student_acc'])}   greedy {pm(m['student_greedy'])}   "
             f"format errors {m['student_format_error_pct']:.2f}% of turns"]
    if "teacher_own_acc" in m:
        lines += [f"on the {m['levels_with_skill']} levels where a student sample succeeded (fresh samples):",
                  f"  student                  {pm(m['student_acc_same_levels'])}   greedy "
                  f"{pm(m['student_greedy_same_levels'])}",
                  f"  teacher, own skill       {pm(m['teacher_own_acc'])}   greedy {pm(m['teacher_own_greedy'])}   "
                  f"format errors {m['teacher_format_error_pct']:.2f}%",
                  f"  teacher, mismatched skill {pm(m['teacher_mismatched_acc'])}   (control)",
                  f"  teacher gap (own - student, paired by level) {pm(m['teacher_gap'])}"]
    if "trainer_pick" in m:
        t = m["trainer_pick"]
        lines.append(f"the teacher the trainer uses (a visit's samples summarised into the bank, one retrieval), all "
                     f"levels, student {pm(t['student_acc'])}:")
        for credit, what in (("group", "newest untried, the paper's letter"), ("source", "source-reward prior")):
            r = t[credit]
            lines.append(f"  --skill-credit {credit:6s} ({what}): teacher {pm(r['teacher_acc'])}, gap {pm(r['gap'])}; "
                         f"picks from a success {100 * r['from_success']:.0f}% (gap {pm(r['gap_success'][:2])} on "
                         f"{r['gap_success'][2]}), from a failure (gap {pm(r['gap_failure'][:2])} on "
                         f"{r['gap_failure'][2]})")
    if "copy_rate" in m:
        lines.append(f"  along the own skill's workflow, P(the workflow's move): teacher {m['copy_rate'][0]:.1f}%, "
                     f"student {m['copy_rate'][1]:.1f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Command line

@dataclass
class EvalConfig:
    model: str = flag("tiny", "HF id, local path, a run's ckpt/model folder, 'tiny' (random, built in) or "
                              "'tiny-sokoban' (the built-in pretrained base)")
    env: str = flag("sokoban", "sokoban | appworld")
    preset: str = flag("paper", "Sokoban level set: paper (6x6, 2 boxes, 64 test levels) | easy (1 box) | hard (the "
                                "easy rooms that need 5+ moves)")
    split: str = flag("test", "test | train (AppWorld: dev by default, as in the paper)")
    samples: int = flag(1, "episodes per task; paper: 1 (its Acc values are k/64 and k/57)")
    temperature: float = flag(0.0, "0 = greedy (paper's pass@1 evaluation, METHOD.md §9)")
    max_turns: int = flag(40, "paper: 40 steps (Sokoban) / 40 turns (AppWorld); the tiny base plays 12")
    max_new_tokens: int = flag(256, "per turn; METHOD.md §9")
    batch_size: int = flag(64, "episodes per batch; results do not depend on it (choice 1)")
    compile: bool = flag(False, "decode with a compiled step on a preallocated KV cache (model.StaticDecoder): same "
                                "tokens, faster where per-step overhead dominates (`python bench.py`)")
    seed: int = flag(0, "sampling seed")
    with_skill: str = flag("", "path of a skill_bank.json: evaluate the teacher with each task's best skill")
    appworld_root: str = flag("", "$APPWORLD_ROOT with data/ (AppWorld only)")
    out: str = flag("", "write the metrics JSON here (with --compare: the prefix of the .md table and .png plot)")
    compare: list[str] = flag(help="run dirs to compare instead of evaluating (globs allowed; report.py)",
                              factory=list)
    paper_table: str = flag("", "a folder: run the paper's table on the tiny base there (arms x seeds), then compare "
                                "(report.py)")
    seeds: list[int] = flag(help="--paper-table: seeds per arm", factory=lambda: [0, 1, 2])
    arms: list[str] = flag(help="--paper-table: which arms (report.TABLE_ARMS)",
                           factory=lambda: ["grpo", "opd", "skill-grpo", "skill-sd", "skill-sd-frozen",
                                            "skill-sd-teacher-rollouts"])
    jobs: int = flag(2, "--paper-table: runs at a time (one CPU thread each; 2 on a 2-core machine)")
    train_args: str = flag("", "--paper-table: extra train.py flags for every run, e.g. --train-args='--iterations 20'")


def best_skill_of(bank: skills_lib.SkillBank) -> Callable:
    """task -> the prompt text of its best skill in the bank (exploitation only), or None."""
    def skill_for(task):
        best = bank.best(task_key(task))
        return best.to_prompt() if best else None
    return skill_for


RUN_SETTINGS = {"env": "env", "preset": "preset", "max_turns": "max_turns", "max_new_tokens": "max_new_tokens",
                "samples": "eval_samples", "temperature": "eval_temperature", "seed": "seed"}


def run_defaults(model_path: str) -> dict:
    """For a run's checkpoint folder (<run>/ckpt/model or <run>/ckpt.old/model), the run's own environment and
    evaluation settings from <run>/config.json (choice 4); {} for anything else."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(model_path))), "config.json")
    if os.path.basename(os.path.dirname(os.path.abspath(model_path))) not in ("ckpt", "ckpt.old") \
            or not os.path.exists(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    return {ours: saved[theirs] for ours, theirs in RUN_SETTINGS.items() if theirs in saved}


EVAL_RANGES = {
    "samples": (lambda v: v >= 1, ">= 1"), "max_turns": (lambda v: v >= 1, ">= 1"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"), "batch_size": (lambda v: v >= 1, ">= 1"),
    "seed": (lambda v: v >= 0, ">= 0"), "jobs": (lambda v: v >= 1, ">= 1"),
    "temperature": (lambda v: 0 <= v < math.inf, "a finite number >= 0 (0 = greedy)"),
}


def validate(cfg: EvalConfig) -> EvalConfig:
    """One clear line for a bad value, before any model is loaded."""
    for name, allowed in (("env", ("sokoban", "appworld")), ("split", ("test", "train", "dev")),
                          ("preset", tuple(env_sokoban.PRESETS))):
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"--{name} {getattr(cfg, name)!r}: choose one of {allowed}")
    require(cfg, EVAL_RANGES)
    if cfg.with_skill and not os.path.exists(cfg.with_skill):
        raise SystemExit(f"--with-skill {cfg.with_skill}: no such file (a run's bank is <run>/ckpt/skill_bank.json)")
    return cfg


def main(argv=None):
    given = parse_flags(EvalConfig, argv, description=__doc__)
    if given.get("paper_table") or given.get("compare"):
        import report      # run reports live in report.py; the commands stay here
        return report.main(EvalConfig(**given))
    defaults = run_defaults(given["model"]) if given.get("model") else {}
    if defaults:
        print(f"[eval] {given['model']} is a run's checkpoint: its settings apply unless a flag says otherwise: "
              + ", ".join(f"{k}={v}" for k, v in defaults.items() if k not in given))
    cfg = validate(EvalConfig(**{**defaults, **given}))
    torch.manual_seed(cfg.seed)
    model, tokenizer = model_lib.load(tiny_base.resolve(cfg.model))
    split = cfg.split if not (cfg.env == "appworld" and cfg.split == "test") else "dev"
    env = make_env(cfg.env, cfg.preset, cfg.max_turns, appworld_root=cfg.appworld_root or None, test_split=split)
    try:
        tasks = env.train_tasks if split == "train" else env.test_tasks
        skill_for = best_skill_of(skills_lib.SkillBank.load(cfg.with_skill)) if cfg.with_skill else None
        metrics = evaluate(model, tokenizer, env, tasks, cfg.samples, cfg.temperature, cfg.max_new_tokens,
                           cfg.batch_size, cfg.seed, skill_for=skill_for, progress=True,
                           compile=model_lib.StaticDecoder(model) if cfg.compile else False)
    except KeyboardInterrupt:
        raise SystemExit("[eval] interrupted: nothing was written") from None
    finally:
        env.close()
    shown = {k: v for k, v in metrics.items() if k != "per_task_success"}
    print(json.dumps(shown, indent=2))
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(metrics, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
