"""train.py — Skill-SD: GRPO plus skill-conditioned self-distillation, one readable loop.

Paper: Skill-SD (Wang et al., 2026), Algorithm 1 and Eq. 10–14; method.md §2 is the spec this file follows. One
iteration, top to bottom (the phase functions below carry the same numbers):

  1. sync the teacher        θ̄ ← θ. The dynamic teacher needs no copy: its log-probs are taken with this iteration's
                             pre-update weights (θ_old). The "frozen" ablation keeps θ₀ in a second model.
  2. pick tasks              a curriculum over the training levels (Sokoban), uniform otherwise.
  3. roll out                G episodes per task by the student under the plain prompt (KV-cached, model.rollout).
  4. reward and advantage    completion rate per episode, group-normalised (loss.group_advantages).
  5. retrieve skills         one skill per task from its bank by UCB (skills.SkillBank); cold tasks get no teacher.
  6. teacher re-scoring      the same network with the skill in its prompt scores the student's identical tokens.
  7. update                  PPO-style mini-batch steps on L_GRPO + λ·L_SDL (loss.py), gradient accumulation.
  8. summarise               completed trajectories → skills → the bank, available from the next iteration.
  9. log                     one JSONL line per iteration; periodic held-out evaluation; atomic checkpoints.

Methods and ablations (method.md §7) share every line above and differ only in who samples, what each prompt holds
and which loss terms are on:
  --method skill-sd     student samples (plain); teacher = skill + θ_old; GRPO + λ·SDL          (the paper)
  --method grpo         student samples (plain); no teacher; GRPO                                (Vanilla GRPO)
  --method opd          student samples (plain); teacher = ground truth + θ_old; SDL only       (Vanilla OPD)
  --method skill-grpo   student samples WITH the skill in its prompt; GRPO; evaluated without    (Skill-augmented GRPO)
  --teacher-weights frozen     the teacher keeps the initial weights θ₀                          (ablation)
  --rollout-by teacher         the skill-conditioned teacher samples, ρ^off = π_θ / sg(π_teacher)   (ablation)
  --teacher-context ground-truth    the privileged block instead of a skill
  --lam                        the SDL weight λ (paper: 0.001)
  --ref-kl β                   labelled variant, not the paper: + β·KL(π_θ ‖ π_θ₀) to the base under the plain prompt
                               (the PPO-RLHF regulariser), to tell a frozen teacher's regularising from its skill
  --lam-warmdown K             labelled variant, not the paper: λ falls linearly to 0 at iteration K
  --sdl-mask covered           labelled variant, not the paper: L_SDL only on turns whose state the skill speaks about
                               (Sokoban: the player's cell is one of the skill's keys); every skill-teacher run logs
                               ℓ on the covered and the uncovered turns (ell_mean_covered / _uncovered, covered_frac)

Deviations and choices (numbered; README refers to them):
  1. Skills are summarised by a deterministic rule-based summariser when the model is the built-in tiny one (it
     cannot write JSON), by the policy itself otherwise (the paper used an external model, Seed1.8); --summarizer.
  2. Summarisation is synchronous by default so that runs are reproducible and --resume is exact; a separate
     summariser model or HTTP endpoint can run in a worker thread (--async-summarizer).
  3. On CUDA the weights stay fp32 and forward passes run under bf16 autocast: AdamW steps of ~1e-6 vanish in bf16.
  4. The built-in models get a "tiny profile" of defaults (TINY_PROFILES: easy levels, short episodes, larger lr,
     λ = 0.1) unless a flag is given explicitly; the paper's values apply to every other model.

Run:
  python train.py --env sokoban                          # Skill-SD on the built-in tiny base (tiny_base.py), CPU
  python train.py --env sokoban --method grpo --seed 1
  python train.py --env sokoban --model Qwen/Qwen3-4B-Instruct-2507 --run-dir runs/qwen3-4b
  python train.py --resume runs/skill-sd-sokoban-s0      # continue a run from its last checkpoint
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import env_sokoban
import loss as loss_lib
import model as model_lib
import skills as skills_lib
from eval import Env, evaluate, make_env, opt, read_jsonl, task_key


# ----------------------------------------------------------------------------------------------------------------------
# Hyperparameters: one dataclass; every default says where it comes from

@dataclass
class TrainConfig:
    # what to run
    env: str = opt("sokoban", "sokoban | appworld")
    method: str = opt("skill-sd", "skill-sd | grpo | opd | skill-grpo (method.md §7)")
    model: str = opt("", "HF id or local path; default: 'tiny-sokoban' (the built-in pretrained tiny base, "
                         "tiny_base.py) for sokoban, Qwen/Qwen3-4B-Instruct-2507 (paper) for appworld; 'tiny' = random")
    run_dir: str = opt("", "output folder; default runs/<method>-<env>-s<seed>")
    seed: int = opt(0, "seed of task order, sampling and summaries")
    iterations: int = opt(180, "training iterations; paper Sokoban ≈180, AppWorld ≈300 (curves, method.md §8)")
    # tasks and rollouts
    preset: str = opt("paper", "Sokoban level set: paper (6x6, 2 boxes) | easy (6x6, 1 box) | hard (the easy rooms "
                               "that need 5+ moves)")
    tasks_per_iter: int = opt(8, "tasks per iteration; 8 x 8 = the paper preset of the GPU issue (SDAR uses 16)")
    group_size: int = opt(8, "G rollouts per task; verl-agent, SDPO, TRL use 8")
    max_turns: int = opt(40, "turns per episode; paper: 40")
    temperature: float = opt(1.0, "sampling temperature in training; TRL/SDPO default 1.0")
    max_new_tokens: int = opt(256, "tokens per reply; method.md §10 (Sokoban 256, AppWorld 512)")
    format_penalty: float = opt(0.0, "reward penalty per invalid turn; ours 0, RAGEN/verl-agent 0.1")
    reward: str = opt("completion", "completion | success | gym; paper trains on the completion rate")
    curriculum: bool = opt(True, "Sokoban: 3 difficulty buckets unlocked in order (ours, method.md §10)")
    # optimisation
    lr: float = opt(1e-6, "AdamW learning rate; verl-agent / TRL GRPO scripts")
    weight_decay: float = opt(0.0, "AdamW weight decay; verl")
    grad_clip: float = opt(1.0, "global grad-norm clip; tiny-grpo, verl")
    mini_batches: int = opt(2, "optimizer steps per iteration (so ρ ≠ 1 on the second); PPO practice")
    epochs: int = opt(1, "passes over the rollouts per iteration; PPO practice")
    micro_batch_size: int = opt(0, "rows per forward (gradient accumulation; memory only, not the math); 0 = auto: "
                                   "1 on CPU (no padding lets SDPA use its O(T)-memory causal kernel), 8 on GPU")
    clip_low: float = opt(0.2, "PPO ε_low; DAPO clip-higher")
    clip_high: float = opt(0.28, "PPO ε_high; DAPO clip-higher")
    lam: float = opt(1e-3, "λ, weight of L_SDL; paper Eq. 14")
    lam_warmdown: int = opt(0, "labelled variant: λ falls linearly to 0 at this iteration and stays 0 (0 = constant "
                               "λ, the paper; SDAR has an optional warm-down, off in its scripts)")
    ref_kl: float = opt(0.0, "β of a labelled variant's KL(π_θ ‖ π_θ₀) under the plain prompt, the same ρ·k3 "
                             "estimator as L_SDL; 0 = off (paper: no KL-to-reference term, method.md §5)")
    sdl_mask: str = opt("all", "all (paper: L_SDL on every token that has a teacher) | covered (labelled variant: only "
                               "on turns whose state the skill speaks about; Sokoban, skill teachers)")
    # teacher and ablations
    teacher_weights: str = opt("dynamic", "dynamic (θ̄ = θ_old every iteration, paper) | frozen (θ₀)")
    rollout_by: str = opt("student", "student (paper) | teacher (off-policy ablation)")
    teacher_context: str = opt("", "skill | ground-truth; default from --method")
    # skills
    summarizer: str = opt("auto", "auto | rule | policy | model | http (choice 1)")
    summarizer_model: str = opt("", "HF id/path of a separate summariser model (--summarizer model)")
    summarizer_url: str = opt("", "OpenAI-compatible base URL (--summarizer http)")
    summarizer_name: str = opt("", "model name sent to the HTTP endpoint")
    async_summarizer: bool = opt(False, "summarise in a worker thread (choice 2)")
    skills_per_group: int = opt(0, "trajectories summarised per group; 0 = all G (paper)")
    bank_capacity: int = opt(16, "skills kept per task, FIFO; ours (method.md §4.2)")
    ucb_c: float = opt(math.sqrt(2), "UCB exploration constant; UCB1")
    # evaluation, logging, checkpoints
    eval_every: int = opt(20, "held-out evaluation every k iterations (0 = only at the start and end)")
    train_tasks: int = opt(0, "train on the first k training tasks only; 0 = all (paper: 96 Sokoban, 90 AppWorld)")
    eval_samples: int = opt(1, "episodes per test task; paper 1 (greedy)")
    eval_temperature: float = opt(0.0, "0 = greedy (paper); > 0 samples (use with --eval-samples for s.e.)")
    eval_tasks: int = opt(0, "evaluate on the first k test tasks; 0 = all (paper: 64 Sokoban, 57 AppWorld)")
    save_every: int = opt(20, "checkpoint every k iterations (and at the end)")
    resume: str = opt("", "run directory to continue from its last checkpoint")
    # devices
    device: str = opt("", "cpu | cuda | mps; default: best available")
    threads: int = opt(0, "torch CPU threads; 0 = torch's default (the tiny profile uses 1: tiny matmuls on a "
                          "shared 2-core machine run faster on one thread)")
    grad_checkpointing: bool = opt(False, "trade compute for activation memory (real models on a GPU)")
    appworld_root: str = opt("", "AppWorld: $APPWORLD_ROOT holding data/")
    appworld_slots: int = opt(0, "AppWorld: environment servers; 0 = tasks x G, one per live episode (no replays)")
    collapse_stop: bool = opt(False, "stop the run when a collapse is detected (it is always reported)")


# choice 4: defaults for the built-in models where the user gives no flag. "tiny-sokoban" is the pretrained tiny base
# (tiny_base.py: 6x6 one-box levels, episodes of 12 turns, one-token replies); λ = 0.1 because at this scale λ = 0.001
# moves nothing: on-policy ∇(λ·SDL) = λ·ℓ·∇log π with |ℓ| ≈ 0.1–0.5, against GRPO advantages of order 1
# (notes/organism-probe.md). Held-out evaluation samples 8 episodes per level at T = 1 instead of the paper's one greedy
# episode: the weak student's greedy play walks into the same wall again and again, so greedy Acc hides much of what RL
# changes, and 8 samples give each run a stated standard error (≈ 4-5 points over 64 levels). lr 5e-4: at 1e-3
# single-seed pilots on an earlier tiny base drifted into invalid replies (20% of turns in one Skill-SD run; README).
# "tiny" is the random-init model, for smoke runs only.
TINY_PROFILES = {
    "tiny-sokoban": dict(preset="easy", max_turns=12, max_new_tokens=4, iterations=40, lr=5e-4, lam=0.1,
                         tasks_per_iter=16, curriculum=False, eval_every=10, save_every=20, threads=1,
                         eval_temperature=1.0, eval_samples=8),
    "tiny": dict(iterations=30, lr=1e-4, max_new_tokens=24, eval_every=10, save_every=10, threads=1),
}
DEFAULT_MODEL = {"sokoban": "tiny-sokoban", "appworld": "Qwen/Qwen3-4B-Instruct-2507"}
METHOD_CONTEXT = {"skill-sd": "skill", "opd": "ground-truth", "grpo": "none", "skill-grpo": "none"}


def tiny_profile(model: str) -> dict:
    """The tiny profile of a built-in model name, or of a tiny_base cache folder (a variant organism built with
    `tiny_base.py --recipe ...` lives in ~/.cache/skill-sd/tiny-sokoban-<hash>); {} for any other model."""
    if model in TINY_PROFILES:
        return TINY_PROFILES[model]
    return TINY_PROFILES["tiny-sokoban"] if os.path.basename(model.rstrip("/")).startswith("tiny-sokoban-") else {}


def parse_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        name = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(name, type=kind, default=None, help=f.metadata["help"] + f" (default {f.default})")
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if given.get("resume"):  # a resumed run takes its saved config; flags given now override it
        path = os.path.join(given["resume"], "config.json")
        if not os.path.exists(path):
            raise SystemExit(f"--resume {given['resume']}: no checkpoint found (no config.json there)")
        saved = json.load(open(path))
        cfg = TrainConfig(**{**saved, **given, "run_dir": given["resume"]})
    else:
        given.setdefault("model", DEFAULT_MODEL.get(given.get("env", "sokoban"), ""))
        cfg = TrainConfig(**{**tiny_profile(given["model"]), **given})
    return validate(cfg)


def validate(cfg: TrainConfig) -> TrainConfig:
    choices = {"env": ("sokoban", "appworld"), "method": tuple(METHOD_CONTEXT), "reward": ("completion", "success",
               "gym"), "teacher_weights": ("dynamic", "frozen"), "rollout_by": ("student", "teacher"),
               "teacher_context": ("", "skill", "ground-truth"),
               "summarizer": ("auto", "rule", "policy", "model", "http"), "preset": tuple(env_sokoban.PRESETS)}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key.replace('_', '-')} {getattr(cfg, key)!r}: choose one of {allowed}")
    if not cfg.teacher_context:
        cfg.teacher_context = METHOD_CONTEXT[cfg.method]
    if cfg.rollout_by == "teacher" and cfg.teacher_context == "none":
        raise SystemExit("--rollout-by teacher needs a teacher: use --method skill-sd or opd")
    if cfg.ref_kl < 0:
        raise SystemExit(f"--ref-kl {cfg.ref_kl}: β must be ≥ 0 (0 = off)")
    if cfg.ref_kl > 0 and cfg.rollout_by == "teacher":
        raise SystemExit("--ref-kl is defined for on-policy runs only (the student samples); drop --rollout-by teacher")
    if cfg.lam_warmdown < 0:
        raise SystemExit(f"--lam-warmdown {cfg.lam_warmdown}: give the iteration at which λ reaches 0 (0 = off)")
    if cfg.sdl_mask not in ("all", "covered"):
        raise SystemExit(f"--sdl-mask {cfg.sdl_mask!r}: choose one of ('all', 'covered')")
    if cfg.sdl_mask == "covered" and (cfg.env != "sokoban" or cfg.teacher_context != "skill"):
        raise SystemExit("--sdl-mask covered needs --env sokoban and a skill teacher (--method skill-sd): coverage is "
                         "read from the player's cell, which the Sokoban skills key their advice by")
    if cfg.group_size < 2:
        raise SystemExit("--group-size must be at least 2 (GRPO normalises within a group)")
    if cfg.micro_batch_size <= 0:
        cfg.micro_batch_size = 1 if model_lib.pick_device(cfg.device).type == "cpu" else 8
    if cfg.summarizer == "auto":
        # the built-in models cannot write a JSON skill: they use the rule-based summariser (choice 1)
        cfg.summarizer = "rule" if tiny_profile(cfg.model) else "policy"
    if not cfg.run_dir:
        cfg.run_dir = os.path.join("runs", f"{cfg.method}-{cfg.env}-s{cfg.seed}")
    return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Setup helpers

def autocast(device: torch.device):
    """bf16 autocast on CUDA with fp32 master weights (choice 3); plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


class Curriculum:
    """Sokoban levels sorted by optimal length into buckets; the next bucket unlocks when the training success rate
    reaches `threshold` or after `patience` iterations (method.md §10, our choice)."""

    def __init__(self, tasks: list, buckets: int = 3, threshold: float = 0.6, patience: int = 60, enabled=True):
        self.tasks, self.threshold, self.patience = tasks, threshold, patience
        self.bucket_size = math.ceil(len(tasks) / buckets) if enabled else len(tasks)
        self.unlocked, self.since = self.bucket_size, 0

    def pool(self) -> list:
        return self.tasks[: self.unlocked]

    def update(self, success_rate: float) -> None:
        self.since += 1
        if self.unlocked < len(self.tasks) and (success_rate >= self.threshold or self.since >= self.patience):
            self.unlocked, self.since = min(len(self.tasks), self.unlocked + self.bucket_size), 0

    def state(self) -> dict:
        return {"unlocked": self.unlocked, "since": self.since}

    def load(self, s: dict) -> None:
        self.unlocked, self.since = s["unlocked"], s["since"]


class CollapseMonitor:
    """Flags a reward cliff (reward EMA below half its best after being ≥ 0.1) or a format-rate cliff (format errors
    above 50% after having been below 20%); RAGEN's and SDPO's collapses looked like this (method.md §11)."""

    def __init__(self, decay: float = 0.8):
        self.decay, self.ema, self.best, self.best_format = decay, None, 0.0, 1.0

    def update(self, reward: float, format_rate: float) -> str:
        self.ema = reward if self.ema is None else self.decay * self.ema + (1 - self.decay) * reward
        self.best, self.best_format = max(self.best, self.ema), min(self.best_format, format_rate)
        if self.best >= 0.1 and self.ema < 0.5 * self.best:
            return f"reward collapse: EMA {self.ema:.3f} vs best {self.best:.3f}"
        if self.best_format < 0.2 and format_rate > 0.5:
            return f"format collapse: {format_rate:.0%} invalid turns (best {self.best_format:.0%})"
        return ""


def make_summarizer(cfg: TrainConfig, model, tokenizer):
    if cfg.summarizer == "rule":
        inner = skills_lib.make_summarizer("rule", cfg.env)
    elif cfg.summarizer == "policy":
        inner = skills_lib.LLMSummarizer(model, tokenizer)
    elif cfg.summarizer == "model":
        if not cfg.summarizer_model:
            raise SystemExit("--summarizer model needs --summarizer-model <HF id or path>")
        inner = skills_lib.LLMSummarizer(*model_lib.load(cfg.summarizer_model))
    else:
        if not cfg.summarizer_url:
            raise SystemExit("--summarizer http needs --summarizer-url (an OpenAI-compatible base URL)")
        inner = skills_lib.HTTPSummarizer(cfg.summarizer_url, cfg.summarizer_name or "default")
    # the policy summariser shares the weights being trained, so it never runs in a thread (choice 2)
    synchronous = not cfg.async_summarizer or cfg.summarizer in ("rule", "policy")
    return skills_lib.AsyncSummarizer(inner, synchronous=synchronous)


# ----------------------------------------------------------------------------------------------------------------------
# Phases of one iteration

def pick_tasks(curriculum: Curriculum, n: int, rng: np.random.Generator) -> list:
    """Phase 2: n distinct tasks from the unlocked pool (with replacement only if the pool is smaller)."""
    pool = curriculum.pool()
    idx = rng.choice(len(pool), size=n, replace=len(pool) < n)
    return [pool[i] for i in idx]


def retrieve_skills(cfg, bank, env_tasks: list) -> dict:
    """Phase 5: one skill (or ground-truth block) per task: task_id -> (skill_id, text, header) or None."""
    chosen = {}
    for task, ep in env_tasks:
        tid = task_key(task)
        if cfg.teacher_context == "ground-truth":
            gt = ep.privileged_context()
            block = skills_lib.privileged_block(gt)
            chosen[tid] = (None, block, skills_lib.PRIVILEGED_HEADER) if block else None
        elif cfg.teacher_context == "skill" or cfg.method == "skill-grpo":
            hit = bank.retrieve(tid)
            chosen[tid] = (hit[0], hit[1].to_prompt(), skills_lib.SKILL_HEADER) if hit else None
        else:
            chosen[tid] = None
    return chosen


def ledger_tensors(ledgers, device) -> tuple[torch.Tensor, int]:
    """The trainable mask in the ledger frame (B, T); built from the ledger's flags, never from token ids."""
    T = max(len(l.ids) for l in ledgers)
    mask = torch.zeros(len(ledgers), T, device=device)                    # (B, T)
    for b, l in enumerate(ledgers):
        mask[b, : len(l.trainable)] = torch.tensor(l.trainable, dtype=torch.float32, device=device)
    return mask, T


def lam_at(cfg: TrainConfig, iteration: int) -> float:
    """λ at a 0-based iteration: the paper's constant, or with --lam-warmdown K (a labelled variant) λ·(1 − it/K),
    0 from iteration K on: the teacher's edge is largest before the student has learned the training tasks."""
    return cfg.lam if cfg.lam_warmdown <= 0 else cfg.lam * max(0.0, 1.0 - iteration / cfg.lam_warmdown)


def covered_tokens(ledgers, tokenizer, skill_texts, covers, device) -> torch.Tensor:
    """(B, T) 1 on the trainable tokens of the turns whose state the row's skill speaks about (covers(skill, text) on
    the text the policy read since its previous reply: the first prompt, then each observation segment); 0 on every
    other token and on rows without a skill. A turn is one run of trainable tokens (reply + end-of-turn token)."""
    out = torch.zeros(len(ledgers), max(len(l.ids) for l in ledgers), device=device)     # (B, T)
    for b, (l, skill) in enumerate(zip(ledgers, skill_texts)):
        if not skill:
            continue
        seen_from, j = 0, 0
        while j < len(l.trainable):
            if not l.trainable[j]:
                j += 1
                continue
            end = j
            while end < len(l.trainable) and l.trainable[end]:
                end += 1
            if covers(skill, tokenizer.decode(l.ids[seen_from:j])):
                out[b, j:end] = 1.0
            seen_from, j = end, end
    return out


def ppo_update(cfg, model, optimizer, ledgers, student_prompts, adv, logp_old, logp_teacher, has_teacher, device,
               rng: np.random.Generator, logp_ref=None, sdl_tokens=None, lam=None) -> dict:
    """Phase 7: mini-batch steps on L_GRPO + λ·L_SDL (+ β·KL to θ₀ with --ref-kl) with gradient accumulation over
    micro-batches. sdl_tokens (B, T), if given, further restricts L_SDL to those tokens (--sdl-mask covered); lam
    overrides cfg.lam (--lam-warmdown).

    All per-token tensors live in the ledger frame (column j = ledger token j), whatever prompt each was scored under.
    """
    mask, T = ledger_tensors(ledgers, device)                              # (B, T)
    sdl_mask = mask * has_teacher[:, None]                                 # (B, T) tokens that have a teacher
    if sdl_tokens is not None:
        sdl_mask = sdl_mask * sdl_tokens                                   # (B, T) labelled variant: covered turns
    B = len(ledgers)
    stats = {"loss_grpo": [], "loss_sdl": [], "grad_norm": [], "skipped_steps": 0}
    if logp_ref is not None:
        stats["loss_ref_kl"] = []
    diag = []
    model.train()
    for _ in range(cfg.epochs):
        order = rng.permutation(B)
        for mb in np.array_split(order, cfg.mini_batches):
            n_tokens = float(mask[mb].sum())                              # N: the token-mean normaliser (verl)
            if n_tokens == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            sums, finite = {"grpo": 0.0, "sdl": 0.0, "ref_kl": 0.0}, True
            for start in range(0, len(mb), cfg.micro_batch_size):
                rows = mb[start: start + cfg.micro_batch_size]
                Tm = max(len(ledgers[i].ids) for i in rows)
                with autocast(device):
                    logp = model_lib.score_under_prompt(model, [ledgers[i] for i in rows],
                                                        [student_prompts[i] for i in rows], grad=True,
                                                        trainable_only=True)                   # (b, Tm)
                logp = logp.float()
                m, old, tea = mask[rows, :Tm], logp_old[rows, :Tm], logp_teacher[rows, :Tm]
                a, sm = adv[rows], sdl_mask[rows, :Tm]
                if cfg.rollout_by == "teacher":   # off-policy ablation: the teacher is the behaviour policy
                    l_grpo, l_sdl = loss_lib.offpolicy_losses(logp, tea, a, m, sm, cfg.clip_low, cfg.clip_high,
                                                              num_tokens=n_tokens)
                else:
                    l_grpo = loss_lib.grpo_loss(logp, old, a, m, cfg.clip_low, cfg.clip_high, num_tokens=n_tokens)
                    l_sdl = loss_lib.sdl_loss(logp, old, tea, sm, num_tokens=n_tokens)
                if cfg.method == "opd":
                    total = l_sdl                                          # distillation only (method.md §7)
                elif cfg.teacher_context == "none":
                    total = l_grpo
                else:
                    total = l_grpo + (cfg.lam if lam is None else lam) * l_sdl   # Eq. 14
                if logp_ref is not None:
                    # labelled variant: the same ρ·k3 estimator toward θ₀ under the plain prompt estimates the
                    # REVERSE KL(π_θ ‖ π_θ₀) (loss.kl_k3_loss, verl's form, would follow the forward KL's gradient);
                    # it is exactly the frozen-teacher ablation's SDL with the skill taken out of the teacher's prompt
                    l_ref = loss_lib.sdl_loss(logp, old, logp_ref[rows, :Tm], m, num_tokens=n_tokens)
                    total = total + cfg.ref_kl * l_ref
                    sums["ref_kl"] += l_ref.item()
                if not torch.isfinite(total):
                    finite = False
                    break
                total.backward()
                sums["grpo"] += l_grpo.item()
                sums["sdl"] += l_sdl.item()
                diag.append(loss_lib.diagnostics(logp.detach(), old, tea, m, cfg.clip_low, cfg.clip_high,
                                                 sdl_mask=sm))
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not finite or not torch.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)                      # guard: skip the step, log it
                stats["skipped_steps"] += 1
                continue
            optimizer.step()
            stats["loss_grpo"].append(sums["grpo"])
            stats["loss_sdl"].append(sums["sdl"])
            if logp_ref is not None:
                stats["loss_ref_kl"].append(sums["ref_kl"])
            stats["grad_norm"].append(float(grad_norm))
    out = {k: (float(np.mean(v)) if v else float("nan")) if isinstance(v, list) else v for k, v in stats.items()}
    for key in (diag[0] if diag else {}):
        vals = [d[key] for d in diag if d.get(key) is not None and not math.isnan(d[key])]
        out[key] = max(vals) if key.endswith("max") else (float(np.mean(vals)) if vals else float("nan"))
    return out


def summary_requests(cfg, env_name, tasks_eps, rng) -> list:
    """Phase 8 input: completed trajectories (up to skills_per_group per group), success or failure alike."""
    k = cfg.skills_per_group or cfg.group_size
    reqs = []
    for g in range(0, len(tasks_eps), cfg.group_size):
        group = tasks_eps[g: g + cfg.group_size]
        for i in sorted(rng.choice(len(group), size=min(k, len(group)), replace=False)):
            task, ep = group[i]
            reqs.append(skills_lib.SummaryRequest.from_episode(env_name, ep))
    return reqs


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: HF weights + optimizer + skill bank + RNG states + iteration, written atomically

def save_checkpoint(run_dir, model, tokenizer, optimizer, bank, state: dict) -> None:
    final, tmp, old = (os.path.join(run_dir, n) for n in ("ckpt", "ckpt.tmp", "ckpt.old"))
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(os.path.join(tmp, "model"))        # loadable by plain AutoModelForCausalLM
    tokenizer.save_pretrained(os.path.join(tmp, "model"))
    bank.save(os.path.join(tmp, "skill_bank.json"))
    torch.save({"optimizer": optimizer.state_dict(), **state}, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)            # the last good checkpoint survives a crash between these two renames
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(run_dir: str) -> str:
    for name in ("ckpt", "ckpt.old"):
        path = os.path.join(run_dir, name)
        if os.path.exists(os.path.join(path, "trainer_state.pt")):
            return path
    raise SystemExit(f"--resume {run_dir}: no checkpoint found (expected {run_dir}/ckpt/trainer_state.pt)")


def rng_state(rng, gen) -> dict:
    return {"numpy": rng.bit_generator.state, "sampling": gen.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(rng, gen, s: dict) -> None:
    rng.bit_generator.state = s["numpy"]
    gen.set_state(s["sampling"])
    torch.set_rng_state(s["torch"])


# ----------------------------------------------------------------------------------------------------------------------
# The loop

def train(cfg: TrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = model_lib.pick_device(cfg.device)
    os.makedirs(cfg.run_dir, exist_ok=True)
    ckpt = checkpoint_dir(cfg.run_dir) if cfg.resume else None
    model, tokenizer = model_lib.load(os.path.join(ckpt, "model") if ckpt else cfg.model, device=device,
                                      dtype=torch.float32)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    # θ₀ for the frozen-teacher ablation and the --ref-kl variant: a second copy, reloaded from the base model (not
    # from the checkpoint); both uses share it
    frozen_teacher = cfg.teacher_weights == "frozen" and cfg.teacher_context != "none"
    base_model = model_lib.load(cfg.model, device=device, dtype=torch.float32)[0].eval() \
        if frozen_teacher or cfg.ref_kl > 0 else None
    frozen = base_model if frozen_teacher else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    env: Env = make_env(cfg.env, cfg.preset, cfg.max_turns, cfg.format_penalty, cfg.reward,
                        appworld_root=cfg.appworld_root or None,
                        appworld_slots=cfg.appworld_slots or cfg.tasks_per_iter * cfg.group_size)
    bank = skills_lib.SkillBank(capacity=cfg.bank_capacity, c=cfg.ucb_c)
    summarizer = make_summarizer(cfg, model, tokenizer)
    train_pool = env.train_tasks[: cfg.train_tasks] if cfg.train_tasks else env.train_tasks
    curriculum = Curriculum(train_pool, enabled=cfg.curriculum and cfg.env == "sokoban")
    monitor = CollapseMonitor()
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    sampling = model_lib.SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
    start_it = 0
    if ckpt:
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        bank = skills_lib.SkillBank.load(os.path.join(ckpt, "skill_bank.json"))
        curriculum.load(state["curriculum"])
        set_rng_state(rng, gen, state["rng"])
        monitor.__dict__.update(state["monitor"])
        start_it = state["iteration"]
        for name in ("log.jsonl", "eval.jsonl"):   # drop log lines written after the checkpoint (a crashed tail)
            path = os.path.join(cfg.run_dir, name)
            rows = [r for r in read_jsonl(path) if r["iteration"] <= start_it]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[train] {cfg.method} on {cfg.env} | model {cfg.model} ({n_params / 1e6:.2f}M params) on {device} | "
          f"{cfg.tasks_per_iter} tasks x G={cfg.group_size} | λ={cfg.lam} | run dir {cfg.run_dir}")

    def run_eval(iteration: int):
        t0 = time.time()
        tasks = env.test_tasks[: cfg.eval_tasks] if cfg.eval_tasks else env.test_tasks
        m = evaluate(model, tokenizer, env, tasks, samples=cfg.eval_samples, temperature=cfg.eval_temperature,
                     max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        row = {"iteration": iteration, **{k: v for k, v in m.items() if k != "per_task_success"},
               "seconds": time.time() - t0}
        with open(os.path.join(cfg.run_dir, "eval.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    if start_it == 0:
        base = run_eval(0)
        print(f"[eval] base: Acc {100 * base['acc']:.1f}%  Comp {100 * base['comp']:.1f}%")
    bar = tqdm(range(start_it, cfg.iterations), initial=start_it, total=cfg.iterations, desc=cfg.method)
    last, collapse = {}, ""
    for it in bar:
        times = {}
        # 1. sync the teacher: the dynamic teacher IS `model` until this iteration's first optimizer step
        teacher = frozen if frozen is not None else model
        # 2. pick tasks
        tasks = pick_tasks(curriculum, cfg.tasks_per_iter, rng)
        tasks_eps = [(t, env.new_episode(t)) for t in tasks for _ in range(cfg.group_size)]   # B = tasks x G
        episodes = [ep for _, ep in tasks_eps]
        plain = [ep.initial_messages() for ep in episodes]
        # 5 (before sampling, because skill-grpo and teacher-owned rollouts put the skill in the sampling prompt)
        for new in summarizer.collect():            # skills summarised earlier become available now
            bank.add(*new)
        chosen = retrieve_skills(cfg, bank, tasks_eps[:: cfg.group_size])
        block = [chosen[task_key(t)] for t, _ in tasks_eps]                # (skill_id, text, header) or None
        with_skill = [skills_lib.with_skill(m, c[1], header=c[2]) if c else m for m, c in zip(plain, block)]
        # 3. roll out (who samples, under which prompt, is the only difference between the ablations here)
        t0 = time.time()
        if cfg.method == "skill-grpo":
            sample_prompts, sampler = with_skill, model
        elif cfg.rollout_by == "teacher":
            sample_prompts, sampler = with_skill, teacher
        else:
            sample_prompts, sampler = plain, model
        sampler.eval()
        with torch.no_grad(), autocast(device):
            ledgers = model_lib.rollout(sampler, tokenizer, episodes, sampling, generator=gen, prompts=sample_prompts,
                                        step_fn=env.step_fn, max_context=env.max_context)
        times["rollout"] = time.time() - t0
        # 4. rewards and group advantages
        results = [ep.result() for ep in episodes]
        rewards = torch.tensor([r["reward"] for r in results], dtype=torch.float32)          # (B,)
        adv, zero_var = loss_lib.group_advantages(rewards, cfg.group_size)                  # (B,), int
        adv = adv.to(device)
        # 6. teacher re-scoring of the identical tokens, and log π_old by a full forward (not sampling-time logits)
        t0 = time.time()
        # on-policy the student's prompt is the one it sampled under, already tokenised in the ledger
        student_prompts = [l.ids[: l.prompt_len] for l in ledgers] if cfg.rollout_by == "student" else \
            [model_lib.encode_prompt(tokenizer, m) for m in plain]
        teacher_prompts = [model_lib.encode_prompt(tokenizer, m) for m in with_skill]
        has_teacher = torch.tensor([c is not None and cfg.teacher_context != "none" for c in block],
                                   dtype=torch.float32, device=device)                           # (B,)
        model.eval()
        with torch.no_grad(), autocast(device):
            logp_old = model_lib.score_under_prompt(model, ledgers, student_prompts, trainable_only=True,
                                                    micro_batch_size=cfg.micro_batch_size).float()  # (B, T)
            if cfg.teacher_context != "none" and (has_teacher.any() or cfg.rollout_by == "teacher"):
                logp_teacher = model_lib.score_under_prompt(teacher, ledgers, teacher_prompts, trainable_only=True,
                                                            micro_batch_size=cfg.micro_batch_size).float()  # (B, T)
            else:
                logp_teacher = logp_old.clone()
            # labelled variant: θ₀ under the student's own (plain) prompt, the reference of the KL term
            logp_ref = model_lib.score_under_prompt(base_model, ledgers, student_prompts, trainable_only=True,
                                                    micro_batch_size=cfg.micro_batch_size).float() \
                if cfg.ref_kl > 0 else None                                                     # (B, T)
        # where the skill speaks (Sokoban: the player's cell is in it) vs elsewhere: ℓ at θ_old on each part, logged
        # for every skill teacher; the labelled variant --sdl-mask covered keeps L_SDL on the covered part only
        coverage, covered = {}, None
        if env.skill_covers and cfg.teacher_context == "skill" and has_teacher.any():
            covered = covered_tokens(ledgers, tokenizer, [c[1] if c else "" for c in block], env.skill_covers,
                                     device)                                                       # (B, T)
            taught = ledger_tensors(ledgers, device)[0] * has_teacher[:, None]                    # (B, T)
            ell = logp_old - logp_teacher                                                          # (B, T)
            for name, part in (("covered", taught * covered), ("uncovered", taught * (1 - covered))):
                n = float(part.sum())
                coverage[f"ell_mean_{name}"] = float((ell * part).sum()) / n if n else float("nan")
            coverage["covered_frac"] = float((taught * covered).sum()) / max(1.0, float(taught.sum()))
        times["teacher"] = time.time() - t0
        # 7. update
        t0 = time.time()
        upd = ppo_update(cfg, model, optimizer, ledgers, student_prompts, adv, logp_old, logp_teacher, has_teacher,
                         device, rng, logp_ref, sdl_tokens=covered if cfg.sdl_mask == "covered" else None,
                         lam=lam_at(cfg, it))
        times["update"] = time.time() - t0
        # 8. summarise completed trajectories (skills reach the bank from the next iteration) + bandit update
        t0 = time.time()
        summarizer.submit(it, summary_requests(cfg, cfg.env, tasks_eps, rng))
        for tid, hit in chosen.items():             # credit each retrieved skill with its group's mean reward
            if hit and hit[0] is not None:
                group = [r for (tt, _), r in zip(tasks_eps, rewards.tolist()) if task_key(tt) == tid]
                bank.update(tid, hit[0], float(np.mean(group)))
        times["summarize"] = time.time() - t0
        # 9. log
        success = float(np.mean([r["success"] for r in results]))
        turns = sum(r["turns"] for r in results)
        fmt_rate = sum(r["format_errors"] for r in results) / max(1, turns)
        curriculum.update(success)
        collapse = monitor.update(float(rewards.mean()), fmt_rate)
        n_trainable = [sum(l.trainable) for l in ledgers]
        row = {"iteration": it + 1, "reward": float(rewards.mean()), "acc": success,
               "comp": float(np.mean([r["completion"] for r in results])), **upd, **coverage, "lam": lam_at(cfg, it),
               "zero_var_groups": zero_var, "groups": len(tasks), "format_error_rate": fmt_rate,
               "teacher_task_frac": float(has_teacher.mean()),
               "skill_in_prompt_frac": float(np.mean([c is not None for c in block])) if cfg.method == "skill-grpo"
               else 0.0, "episode_turns": turns / len(results),
               "episode_tokens": float(np.mean([len(l.ids) for l in ledgers])),
               "reply_tokens_per_turn": sum(n_trainable) / max(1, turns),
               "truncated": sum(l.truncated for l in ledgers), "bank": bank.stats(), "summarizer": summarizer.stats(),
               "curriculum_unlocked": curriculum.unlocked, "collapse": collapse,
               **{f"time_{k}": v for k, v in times.items()}}
        if cfg.eval_every and (it + 1) % cfg.eval_every == 0 and it + 1 < cfg.iterations:
            row["eval_acc"] = run_eval(it + 1)["acc"]
        with open(os.path.join(cfg.run_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(R=f"{row['reward']:.2f}", acc=f"{success:.2f}", sdl=f"{upd['loss_sdl']:.3g}",
                        bank=row["bank"].get("skills", 0))
        if collapse:
            tqdm.write(f"[collapse] iteration {it + 1}: {collapse}")
        if (cfg.save_every and (it + 1) % cfg.save_every == 0) or it + 1 == cfg.iterations:
            for new in summarizer.collect(wait=True):   # pending skills belong in the checkpoint
                bank.add(*new)
            save_checkpoint(cfg.run_dir, model, tokenizer, optimizer, bank,
                            {"iteration": it + 1, "rng": rng_state(rng, gen), "curriculum": curriculum.state(),
                             "monitor": dict(monitor.__dict__), "config": dataclasses.asdict(cfg)})
        last = row
        if collapse and cfg.collapse_stop:
            tqdm.write("[collapse] stopping (--collapse-stop)")
            break
    final = run_eval(cfg.iterations if not (collapse and cfg.collapse_stop) else last.get("iteration", 0))
    summarizer.close()
    env.close()
    print(final_table(cfg))
    return {"train": last, "eval": final}


def final_table(cfg: TrainConfig) -> str:
    """The run's result as a small table, from its logs: held-out Acc / Comp at every evaluation (± s.e. over tasks)
    and the training-level rollout success over the first and last 5 iterations."""
    evals, train_rows = (read_jsonl(os.path.join(cfg.run_dir, n)) for n in ("eval.jsonl", "log.jsonl"))
    how = "greedy" if cfg.eval_temperature == 0 else f"T = {cfg.eval_temperature:g}, {cfg.eval_samples} samples/task"
    lines = [f"\n[result] {cfg.method}, seed {cfg.seed}: held-out tasks ({how}); ± = s.e. over tasks",
             "| iteration | Acc (%) | Comp (%) |", "|---:|---:|---:|"]
    lines += [f"| {e['iteration']} | {100 * e['acc']:.1f} ± {100 * e.get('acc_se', 0):.1f} | "
              f"{100 * e['comp']:.1f} ± {100 * e.get('comp_se', 0):.1f} |" for e in evals]
    if len(evals) >= 2:
        lines.append(f"held-out Acc {100 * evals[0]['acc']:.1f} -> {100 * evals[-1]['acc']:.1f} "
                     f"({100 * (evals[-1]['acc'] - evals[0]['acc']):+.1f} points)")
    if train_rows:
        first, last = (100 * np.mean([r["acc"] for r in rows]) for rows in (train_rows[:5], train_rows[-5:]))
        lines.append(f"training-level success (rollouts): first 5 iterations {first:.1f}%, last 5 {last:.1f}%")
    return "\n".join(lines + [f"logs and checkpoint: {cfg.run_dir}"])


if __name__ == "__main__":
    train(parse_args(sys.argv[1:]))
