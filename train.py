"""train.py — Skill-SD: GRPO plus skill-conditioned self-distillation, one readable loop (the paper's Algorithm 1).

Paper: Skill-SD (Wang et al., 2026), Algorithm 1 and Eq. 10–14; METHOD.md is the spec this file follows. One
iteration, top to bottom (`train()` calls one function per phase, numbered the same):

  1. sync the teacher        θ̄ ← θ. The dynamic teacher needs no copy: its log-probs are taken with this iteration's
                             pre-update weights θ_old. The "frozen" ablation keeps θ₀ in a second model.
  2. pick tasks              a curriculum over the training levels (Sokoban), uniform otherwise.
  3. retrieve skills         one skill per task from its bank by UCB (skills.SkillBank); cold tasks get no teacher.
                             Algorithm 1 retrieves after sampling; nothing here depends on the rollouts, and two
                             ablations need the skill in the sampling prompt, so it comes first.
  4. roll out                G episodes per task by the student under the plain prompt (KV-cached, model.rollout).
  5. reward and advantage    completion rate per episode, group-normalised (loss.group_advantages).
  6. teacher re-scoring      the same network with the skill in its prompt scores the student's identical tokens;
                             log π_old by a full forward too (not sampling-time logits).
  7. update                  PPO-style mini-batch steps on L_GRPO + λ·L_SDL (loss.py), gradient accumulation.
  8. summarise and credit    completed trajectories → skills → the bank (from the next iteration on); the skill
                             each task used is credited with its group's mean reward (the UCB statistics).
  9. log                     one JSONL line per iteration; periodic held-out evaluation; atomic checkpoints.

Methods and ablations (METHOD.md §8) share every line above; `resolve_arm` turns the flags into one `Arm` (who
samples, what the teacher's context is, which weights it has, which loss terms are on) and nothing else reads them:
  --method skill-sd     student samples (plain); teacher = skill + θ_old; GRPO + λ·SDL          (the paper)
  --method grpo         student samples (plain); no teacher; GRPO                                (Vanilla GRPO)
  --method opd          student samples (plain); teacher = ground truth + θ_old; SDL only       (Vanilla OPD)
  --method skill-grpo   student samples WITH the skill in its prompt; GRPO; evaluated without    (Skill-augmented GRPO)
  --teacher-weights frozen     the teacher keeps the initial weights θ₀                          (ablation)
  --rollout-by teacher         the skill-conditioned teacher samples, ρ^off = π_θ / sg(π_teacher)   (ablation)
  --teacher-context ground-truth    the privileged block instead of a skill
Labelled variants, not the paper (one block of config.TrainConfig; METHOD.md §10): --ref-kl β (+ β·KL(π_θ ‖ π_θ₀) under the
plain prompt), --lam-warmdown K (λ linearly to 0 at iteration K), --sdl-mask covered (L_SDL only on the turns whose
state the skill speaks about; every skill-teacher run logs ℓ on covered and uncovered turns).

Deviations and choices (numbered; README refers to them):
  1. Skills are summarised by a deterministic rule-based summariser when the model is a built-in tiny one (it cannot
     write JSON), by the policy itself otherwise (the paper used an external model, Seed1.8); --summarizer.
  2. Summarisation is synchronous by default so that runs are reproducible and --resume is exact; a separate
     summariser model or HTTP endpoint can run in a worker thread (--async-summarizer).
  3. On CUDA the weights stay fp32 and forward passes run under bf16 autocast: AdamW steps of ~1e-6 vanish in bf16.
  4. The built-in models get a "tiny profile" of defaults (config.TINY_PROFILES: easy levels, short episodes,
     larger lr, λ = 0.1) unless a flag is given explicitly; the paper's values apply to every other model (`--help`
     shows both). config.py holds the hyperparameters and every check of them.
  5. Under torchrun each rank plays its share of the task groups and the update sums over ranks (dist.py); the
     loop reads the same for one process, where `run.ranks` is dist.Single and every collective is the identity.

Run:
  python train.py --env sokoban                          # Skill-SD on the built-in tiny base (tiny_base.py), CPU
  python train.py --env sokoban --method grpo --seed 1
  python train.py --env sokoban --model Qwen/Qwen3-4B-Instruct-2507 --run-dir runs/qwen3-4b
  python train.py --resume runs/skill-sd-sokoban-s0      # continue a run from its last checkpoint
  torchrun --nproc_per_node 2 train.py --env sokoban     # N ranks, equal to one process (dist.py, METHOD.md §12)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import dist as dist_lib
import eval as eval_lib
import loss as loss_lib
import model as model_lib
import report
import rule_skills
import run_folder
import skills as skills_lib
import tiny_base
from common import Env, append_jsonl, episode_failed, make_env, read_jsonl, task_key
from config import TrainConfig, parse_args, saved_config


# ----------------------------------------------------------------------------------------------------------------------
# The arm: what a method or ablation changes, resolved once

@dataclass(frozen=True)
class Arm:
    context: str               # the block retrieved per task: "none" | "skill" (the bank, UCB) | "ground-truth"
    teacher: bool              # a teacher scores the tokens with the block in its prompt (L_SDL on)
    frozen_teacher: bool       # the teacher's weights are θ₀ (a second copy), not this iteration's θ_old
    sampler: str               # "student" | "teacher" (off-policy ablation: the teacher's weights and prompt sample)
    sample_with_context: bool  # the sampling prompt carries the block (skill-grpo, teacher-owned rollouts)
    grpo: bool                 # L_GRPO on (off for OPD: distillation only)

    def sdl_weight(self, lam: float) -> float:
        """λ for a skill teacher next to GRPO (Eq. 14); 1 for distillation only (OPD); 0 without a teacher."""
        return 0.0 if not self.teacher else lam if self.grpo else 1.0


def resolve_arm(cfg: TrainConfig) -> Arm:
    """After validate(), the only reader of --method, --teacher-context, --teacher-weights and --rollout-by."""
    teacher = cfg.teacher_context != "none"
    context = cfg.teacher_context if teacher else "skill" if cfg.method == "skill-grpo" else "none"
    return Arm(context=context, teacher=teacher, frozen_teacher=teacher and cfg.teacher_weights == "frozen",
               sampler=cfg.rollout_by, sample_with_context=cfg.method == "skill-grpo" or cfg.rollout_by == "teacher",
               grpo=cfg.method != "opd")


def lam_at(cfg: TrainConfig, iteration: int) -> float:
    """λ at a 0-based iteration: the paper's constant, or with --lam-warmdown K (a labelled variant) λ·(1 − it/K),
    0 from iteration K on: the teacher's edge is largest before the student has learned the training tasks."""
    return cfg.lam if cfg.lam_warmdown <= 0 else cfg.lam * max(0.0, 1.0 - iteration / cfg.lam_warmdown)


# ----------------------------------------------------------------------------------------------------------------------
# Run state: everything one training run holds, built by setup() or restored from a checkpoint

class Curriculum:
    """Sokoban levels sorted by optimal length into buckets; the next bucket unlocks when the training success rate
    reaches `threshold` or after `patience` iterations (METHOD.md §9, our choice)."""

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
    above 50% after having been below 20%); RAGEN's and SDPO's collapses looked like this (METHOD.md §6)."""

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

    def state(self) -> dict:
        return {"decay": self.decay, "ema": self.ema, "best": self.best, "best_format": self.best_format}

    def load(self, s: dict) -> None:
        self.decay, self.ema, self.best, self.best_format = s["decay"], s["ema"], s["best"], s["best_format"]


@dataclass
class Run:
    cfg: TrainConfig
    arm: Arm
    device: torch.device
    model: torch.nn.Module            # the student; also the dynamic teacher (θ_old) until its first update
    tokenizer: object
    base_model: torch.nn.Module | None   # θ₀: the frozen teacher, and the --ref-kl reference
    optimizer: torch.optim.Optimizer
    env: Env
    bank: skills_lib.SkillBank
    summarizer: skills_lib.AsyncSummarizer
    curriculum: Curriculum
    monitor: CollapseMonitor
    rng: np.random.Generator          # task order, mini-batch order, which trajectories are summarised
    sampling: model_lib.SamplingConfig
    ranks: dist_lib.Single            # this process's rank among torchrun's (dist.py); Single in a plain run
    scorer: torch.nn.Module           # log π of the update: model_lib.LogProbs(model), wrapped in DDP / FSDP2 by ranks
    policy: torch.nn.Module = None    # `model` whole for the passes without grad (rollouts, scoring, evaluation,
    #                                   summaries): `model` itself, or under FSDP2 a full copy, refreshed after updates
    start_it: int = 0
    changes: dict = None              # a resume: {flag: [saved, now]} for the flags it changed (history.jsonl)
    rollbacks: int = 0                # --collapse-guard: roll-backs so far
    pending_credit: dict = None       # --skill-credit source: task id -> the skill picked at its last visit
    skips_in_a_row: int = 0           # optimizer steps skipped one after another (the non-finite guard)
    decoders: list = None             # --compile: [(model, model_lib.StaticDecoder)], one per sampling model
    old_logp: str = "forward"         # where log π_old comes from: "rollout" or "forward" (resolve_old_logp)


def decoder_for(run: Run, model):
    """--compile: the model's StaticDecoder, made once and kept for the run (a shape then compiles once); else False."""
    if not run.cfg.compile:
        return False
    run.decoders = run.decoders or []
    for m, decoder in run.decoders:
        if m is model:
            return decoder
    run.decoders.append((model, model_lib.StaticDecoder(model)))
    return run.decoders[-1][1]


def make_summarizer(cfg: TrainConfig, policy, tokenizer) -> skills_lib.AsyncSummarizer:
    """policy() -> the policy's current weights (the policy summariser writes with the weights being trained)."""
    if cfg.summarizer == "rule":
        inner = rule_skills.rule_summarizer(cfg.env)
    elif cfg.summarizer in ("policy", "model"):
        if cfg.summarizer == "model":
            other, tokenizer = model_lib.load(tiny_base.resolve(cfg.summarizer_model))
            policy = lambda: other                                                      # noqa: E731
        greedy = model_lib.SamplingConfig(temperature=0.0, max_new_tokens=512)
        inner = skills_lib.LLMSummarizer(lambda chats: model_lib.complete(policy(), tokenizer, chats, greedy))
    else:
        http = skills_lib.HTTPSummarizer(cfg.summarizer_url, cfg.summarizer_name or "default")
        inner = skills_lib.FallbackSummarizer(http, rule_skills.rule_summarizer(cfg.env))   # a dead server loses none
    # the policy summariser shares the weights being trained, so it never runs in a thread (choice 2)
    synchronous = not cfg.async_summarizer or cfg.summarizer in ("rule", "policy")
    return skills_lib.AsyncSummarizer(inner, synchronous=synchronous)


def setup(cfg: TrainConfig, arm: Arm, ranks: dist_lib.Single, device: torch.device) -> Run:
    """Model, θ₀ copy when needed, optimizer, environment, bank, summariser and RNGs; restored from the last
    checkpoint with --resume (log lines written after it are dropped). Every rank builds the same state."""
    torch.manual_seed(cfg.seed)
    base_path = tiny_base.resolve(cfg.model)
    if cfg.resume:
        model, tokenizer, state, bank = latest_checkpoint(cfg.run_dir, device)
    else:
        (model, tokenizer), state, bank = model_lib.load(base_path, device=device, dtype=torch.float32), None, None
    if cfg.grad_checkpointing:   # renamed activation_checkpointing_enable in transformers 5.2x; both exist there
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    # θ₀, reloaded from the base model (not from the checkpoint): the frozen teacher and the --ref-kl reference
    base_model = model_lib.load(base_path, device=device, dtype=torch.float32)[0].eval() \
        if arm.frozen_teacher or cfg.ref_kl > 0 else None
    env = make_env(cfg.env, cfg.preset, cfg.max_turns, cfg.format_penalty, cfg.reward,
                   appworld_root=cfg.appworld_root or None,
                   appworld_slots=cfg.appworld_slots or cfg.tasks_per_iter * cfg.group_size)
    train_pool = env.train_tasks[: cfg.train_tasks] if cfg.train_tasks else env.train_tasks
    scorer = ranks.wrap(model_lib.LogProbs(model), fsdp=cfg.fsdp)   # the update's forward; DDP / FSDP2 on N ranks
    run = Run(cfg, arm, device, model, tokenizer, base_model,
              torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay),
              env, bank or skills_lib.SkillBank(capacity=cfg.bank_capacity, c=cfg.ucb_c,
                                                prior_from_source=cfg.skill_credit == "source"),
              None,
              Curriculum(train_pool, enabled=cfg.curriculum and cfg.env == "sokoban"), CollapseMonitor(),
              np.random.default_rng(cfg.seed),
              model_lib.SamplingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens), ranks, scorer)
    run.summarizer = make_summarizer(cfg, lambda: run.policy, tokenizer)
    run.old_logp = resolve_old_logp(cfg, arm, device)
    if state is not None:
        restore_state(run, state)
        saved = saved_config(cfg.run_dir)
        run.changes = {k: [saved.get(k), v] for k, v in dataclasses.asdict(cfg).items()
                       if saved.get(k) != v and k not in ("resume", "overwrite")}
    run.policy = ranks.gathered(model)
    if ranks.main:
        tmp = os.path.join(cfg.run_dir, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        os.replace(tmp, os.path.join(cfg.run_dir, "config.json"))
    return run


def resolve_old_logp(cfg: TrainConfig, arm: Arm, device: torch.device) -> str:
    """--old-logp auto: the rollout's recorded log-probs where they are the forward's (the student sampled, in fp32:
    equal ≤ 1e-5, tests/test_train.py), else a full forward: bf16 rounds the cached decode and the full forward
    apart (ρ would start ≠ 1), and off-policy the student's log-probs of the teacher's tokens were never recorded."""
    if cfg.old_logp != "auto":
        return cfg.old_logp
    bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    return "rollout" if arm.sampler == "student" and not bf16 else "forward"


def autocast(run: Run):
    """bf16 autocast with fp32 master weights on CUDA (choice 3), or anywhere with --autocast bf16; else fp32."""
    on = run.cfg.autocast == "bf16" or (run.cfg.autocast == "auto" and run.device.type == "cuda")
    return torch.autocast(run.device.type, dtype=torch.bfloat16) if on else nullcontext()


@contextmanager
def cpu_threads(n: int):
    """torch's CPU thread count set to n for the block (n = 0: unchanged), restored after it."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------------------
# Phases of one iteration

class TeacherContext(NamedTuple):
    """One task's block in the teacher's prompt."""
    skill_id: int | None              # the bank's id of the skill (credited after the update); None: ground truth
    text: str
    header: str


@dataclass
class Batch:
    """One iteration's episodes, filled phase by phase: one row per episode (B = tasks x G). Per-token tensors are
    (B, T) in the ledger frame (column j = ledger token j), whatever prompt each was scored under. Under torchrun a
    rank holds only the rows of its task groups (dist.py); `groups` and `everyone` describe the whole iteration."""
    iteration: int                    # 0-based
    groups: list                      # the iteration's tasks, one per group, on every rank
    rows: list                        # per row: its index in the whole iteration (group g holds g*G .. g*G + G - 1)
    tasks: list                       # per row: its task (each task G times in a row)
    episodes: list
    plain: list                       # per row: the plain prompt (chat messages), taken before any play
    contexts: list = None             # per row: TeacherContext | None (phase 3)
    ledgers: list = None              # phase 4
    student_prompts: list = None      # per row: the token ids the student is scored under
    rewards: torch.Tensor = None      # (B,) phase 5
    adv: torch.Tensor = None          # (B,)
    zero_var: int = 0                 # groups whose rewards are all equal
    failed: list = None               # per row: the environment failed to play it (dropped from the update)
    retrieval: dict = dataclasses.field(default_factory=dict)   # this iteration's picks: untried / exploit / source
    has_teacher: torch.Tensor = None  # (B,) 1 where a teacher scores the row
    mask: torch.Tensor = None         # (B, T) trainable (policy-sampled) tokens
    sdl_mask: torch.Tensor = None     # (B, T) trainable tokens that have a teacher (and, --sdl-mask covered, a cover)
    logp_old: torch.Tensor = None     # (B, T) log π_θold under the student's prompt
    logp_teacher: torch.Tensor = None  # (B, T) log π_teacher under the prompt with the block
    logp_behaviour: torch.Tensor = None  # (B, T) the sampler's log-probs: logp_old, or logp_teacher off-policy
    logp_ref: torch.Tensor | None = None  # (B, T) θ₀ under the plain prompt (--ref-kl)
    coverage: dict = dataclasses.field(default_factory=dict)
    everyone: list = None             # per row of the whole iteration: its outcome (row_outcome), on every rank


def pick_tasks(run: Run, it: int) -> Batch:
    """Phase 2: n distinct tasks from the unlocked pool (with replacement only if the pool is smaller), G new
    episodes each (of this rank's task groups: every rank draws the same tasks)."""
    pool, G = run.curriculum.pool(), run.cfg.group_size
    idx = run.rng.choice(len(pool), size=run.cfg.tasks_per_iter, replace=len(pool) < run.cfg.tasks_per_iter)
    groups, mine = [pool[i] for i in idx], run.ranks.mine(len(idx))
    tasks = [groups[g] for g in mine for _ in range(G)]                                   # B = tasks x G
    episodes = [run.env.new_episode(t) for t in tasks]
    return Batch(it, groups, [g * G + i for g in mine for i in range(G)], tasks, episodes,
                 [ep.initial_messages() for ep in episodes])


def retrieve_contexts(run: Run, batch: Batch) -> dict:
    """Phase 3: one block per task, shared by its G rows: task id -> TeacherContext, or None (a cold bank, no ground
    truth); skills summarised in earlier iterations enter the bank first. Every rank retrieves for every task, so
    the banks' pick counts stay equal."""
    collect_skills(run)
    chosen, untried, success = {}, 0, []
    local = {ep.task_id: ep for ep in batch.episodes}
    for task in batch.groups:
        tid = task_key(task)
        if run.arm.context == "ground-truth":
            block = skills_lib.privileged_block(local[tid].privileged_context()) if tid in local else None
            chosen[tid] = TeacherContext(None, block, skills_lib.PRIVILEGED_HEADER) if block else None
        elif run.arm.context == "skill":
            hit = run.bank.retrieve(tid)
            chosen[tid] = TeacherContext(hit[0], hit[1].to_prompt(), skills_lib.SKILL_HEADER) if hit else None
            if hit:
                untried += run.bank.last_untried
                source = run.bank.entry(tid, hit[0]).get("source_success")
                success += [] if source is None else [source]
        else:
            chosen[tid] = None
    batch.contexts = [chosen[ep.task_id] for ep in batch.episodes]
    picks = sum(c is not None and c.skill_id is not None for c in chosen.values())
    batch.retrieval = {"picks": picks, "untried_picks": untried, "exploit_picks": picks - untried,
                       "success_skill_frac": float(np.mean(success)) if success else float("nan")}
    return chosen


def collect_skills(run: Run, wait: bool = False) -> None:
    """Finished summaries into the bank; under torchrun every rank's, in the order one process would add them."""
    mine = run.summarizer.collect(wait=wait)
    if run.ranks.world > 1:
        mine = sorted((x for part in run.ranks.gather(mine) for x in part), key=lambda x: x[2].get("order", ()))
    for new in mine:
        run.bank.add(*new)


def episode_generators(seed: int, iteration: int, rows: list, device) -> list[torch.Generator]:
    """One sampling stream per episode, seeded from (seed, iteration, row of the iteration): an episode's tokens do
    not depend on which rank plays it or which other episodes share its batch (dist.py)."""
    gens = []
    for r in rows:
        state = np.random.SeedSequence([seed, iteration, r]).generate_state(2, np.uint32)
        gens.append(torch.Generator(device=device).manual_seed(int(state[0]) << 31 ^ int(state[1])))
    return gens


def row_outcome(result: dict, ledger, failed: bool, context) -> dict:
    """What the whole iteration needs to know of one episode (credit, curriculum, logs): small and picklable."""
    return {"reward": float(result["reward"]), "success": float(result["success"]), "context": context is not None,
            "completion": float(result["completion"]), "turns": result["turns"],
            "format_errors": result["format_errors"], "failed": failed, "trainable": sum(ledger.trainable),
            "tokens": len(ledger.ids), "truncated": ledger.truncated}


def roll_out(run: Run, batch: Batch) -> None:
    """Phases 4-5: G episodes per task by the arm's sampler, then rewards and group advantages (a group is never
    split over ranks), and every episode's outcome shared with every rank."""
    prompts = [skills_lib.with_skill(m, c.text, header=c.header) if c and run.arm.sample_with_context else m
               for m, c in zip(batch.plain, batch.contexts)]
    sampler = run.base_model if run.arm.sampler == "teacher" and run.arm.frozen_teacher else run.policy
    sampler.eval()
    with torch.no_grad(), autocast(run):
        gens = episode_generators(run.cfg.seed, batch.iteration, batch.rows, run.device)
        batch.ledgers = model_lib.rollout(sampler, run.tokenizer, batch.episodes, run.sampling, generator=gens,
                                          prompts=prompts, step_fn=run.env.step_fn, max_context=run.env.max_context,
                                          compile=decoder_for(run, sampler))
    # the student is scored under the prompt it sampled under (in the ledger), or the plain one off-policy
    batch.student_prompts = [l.ids[: l.prompt_len] for l in batch.ledgers] if run.arm.sampler == "student" else \
        [model_lib.encode_prompt(run.tokenizer, m) for m in batch.plain]
    results = [ep.result() for ep in batch.episodes]
    batch.rewards = torch.tensor([r["reward"] for r in results], dtype=torch.float32)                # (B,)
    batch.failed = [episode_failed(r) for r in results]
    adv, zero_var = loss_lib.group_advantages(batch.rewards, run.cfg.group_size,
                                              valid=[not f for f in batch.failed])               # (B,), int
    batch.adv = adv.to(run.device)
    mine = [(r, row_outcome(res, l, f, c)) for r, res, l, f, c in
            zip(batch.rows, results, batch.ledgers, batch.failed, batch.contexts)]
    batch.everyone = [o for _, o in sorted((x for part in run.ranks.gather(mine) for x in part), key=lambda x: x[0])]
    batch.zero_var = int(run.ranks.sum([zero_var])[0])


def score_teacher(run: Run, batch: Batch) -> None:
    """Phase 6: log π_old of the student (the rollout's own log-probs, or a full forward: --old-logp), and the
    teacher's log-probs of the identical tokens under the prompt with the block (θ_old, or θ₀ frozen), computed for
    the rows that have a block; the others keep logp_old and are masked out of L_SDL."""
    cfg, arm, model, ledgers = run.cfg, run.arm, run.policy, batch.ledgers
    teacher = run.base_model if arm.frozen_teacher else model          # phase 1: θ̄ = θ_old is `model` itself
    batch.has_teacher = torch.tensor([c is not None and arm.teacher and not f for c, f in
                                      zip(batch.contexts, batch.failed)], dtype=torch.float32, device=run.device)
    batch.mask = model_lib.trainable_mask(ledgers, run.device)                                # (B, T)
    batch.mask[[b for b, f in enumerate(batch.failed) if f]] = 0.0   # failed episodes: dropped from the update
    batch.sdl_mask = batch.mask * batch.has_teacher[:, None]                                  # (B, T)
    # every log-prob is the sampler's distribution at the training temperature, softmax(logits / T) (METHOD.md §6)
    kw = dict(trainable_only=True, micro_batch_size=cfg.micro_batch_size, temperature=cfg.temperature, pack=cfg.pack)
    model.eval()
    with torch.no_grad(), autocast(run):
        if run.old_logp == "rollout":   # the sampler was the student under these very prompts (resolve_old_logp)
            batch.logp_old = model_lib.recorded_logprobs(ledgers, run.device)                 # (B, T)
        else:
            batch.logp_old = model_lib.score_under_prompt(model, ledgers, batch.student_prompts, **kw).float()
        batch.logp_teacher = batch.logp_old.clone()                                           # (B, T)
        # the rows with a block; off-policy every row (the teacher's log-probs are each row's behaviour log-probs)
        taught = list(range(len(ledgers))) if arm.sampler == "teacher" else \
            [b for b in range(len(ledgers)) if batch.has_teacher[b] > 0]
        if taught:
            with_block = [(batch.plain[b], batch.contexts[b]) for b in taught]
            prompts = [model_lib.encode_prompt(run.tokenizer, skills_lib.with_skill(m, c.text, header=c.header)
                                               if c else m) for m, c in with_block]
            scored = model_lib.score_under_prompt(teacher, [ledgers[b] for b in taught], prompts, **kw).float()
            batch.logp_teacher[taught, :scored.shape[1]] = scored                             # (b, T')
        if cfg.ref_kl > 0:   # labelled variant: θ₀ under the student's own (plain) prompt, the KL's reference
            batch.logp_ref = model_lib.score_under_prompt(run.base_model, ledgers, batch.student_prompts,
                                                          **kw).float()                       # (B, T)
    # off-policy the teacher sampled: its log-probs are the denominator of the PPO ratio and of ρ (loss.py, choice 7)
    batch.logp_behaviour = batch.logp_teacher if arm.sampler == "teacher" else batch.logp_old
    taught_anywhere = run.ranks.sum([float(batch.has_teacher.sum())])[0] > 0           # on any rank
    if run.env.skill_covers and arm.context == "skill" and arm.teacher and taught_anywhere:
        coverage_stats(run, batch)


def coverage_stats(run: Run, batch: Batch) -> None:
    """Where the skill speaks (Sokoban: the player's cell is in it) vs elsewhere: ℓ at θ_old on each part, logged for
    every skill teacher; the labelled variant --sdl-mask covered keeps L_SDL on the covered part only."""
    covered = covered_tokens(batch.ledgers, run.tokenizer, [c.text if c else "" for c in batch.contexts],
                             run.env.skill_covers, run.device)                                 # (B, T)
    taught = batch.sdl_mask                                                                    # (B, T)
    ell = batch.logp_old - batch.logp_teacher                                                  # (B, T)
    parts = (taught * covered, taught * (1 - covered))
    sums = run.ranks.sum([float((ell * p).sum()) for p in parts] + [float(p.sum()) for p in parts])  # every rank's
    for name, total, n in zip(("covered", "uncovered"), sums[:2], sums[2:]):
        batch.coverage[f"ell_mean_{name}"] = total / n if n else float("nan")
    batch.coverage["covered_frac"] = sums[2] / max(1.0, sums[2] + sums[3])
    if run.cfg.sdl_mask == "covered":
        batch.sdl_mask = batch.sdl_mask * covered


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


MAX_SKIPS_IN_A_ROW = 3   # the non-finite guard stops the run after this many skipped optimizer steps in a row


def ppo_update(run: Run, batch: Batch, lam: float, iteration: int | None = None) -> dict:
    """Phase 7: mini-batch steps on w_grpo·L_GRPO + w_sdl·L_SDL (+ β·KL to θ₀ with --ref-kl), gradient accumulation
    over micro-batches; both terms share the token-mean normaliser N of the mini-batch (loss.py, choice 1). The
    non-finite guard skips a step whose loss or gradient is not finite, undoes one that left non-finite weights, says
    so, and stops the run after MAX_SKIPS_IN_A_ROW skips in a row. --sdl-norm / --grpo-norm change a term's N.
    grad_ratio_sdl_grpo = ‖∂(w_sdl·L_SDL)/∂log π‖ / ‖∂(w_grpo·L_GRPO)/∂log π‖ over the iteration, the balance of the
    two terms at the loss's input (a cheap proxy of the parameter-gradient ratio: no extra backward pass).
    Under torchrun the mini-batches are those of one process (rows of the whole iteration); each rank runs its rows
    of one, N and the loss sums are summed over ranks, and the wrapper sums the gradients (dist.py)."""
    cfg, model, optimizer, ranks = run.cfg, run.model, run.optimizer, run.ranks
    weights = (1.0 if run.arm.grpo else 0.0, run.arm.sdl_weight(lam))
    stats = {"loss_grpo": [], "loss_sdl": [], "grad_norm": [], "skipped_steps": 0, "skip_causes": []}
    grad_sq = {"grpo": 0.0, "sdl": 0.0}
    if batch.logp_ref is not None:
        stats["loss_ref_kl"] = []
    diag, local = [], {r: b for b, r in enumerate(batch.rows)}                # global row -> this rank's row
    moving = rows_with_gradient(run, batch)                                   # global rows; the rest add exactly 0
    model.train()
    for _ in range(cfg.epochs):
        for mb in np.array_split(run.rng.permutation(len(batch.everyone)), cfg.mini_batches):
            # this rank's rows of the mini-batch, by length: a padded micro-batch then pads little (the sum is the same)
            mine = sorted((local[r] for r in mb if r in local), key=lambda b: len(batch.ledgers[b].ids))
            norms = normalisers(cfg, batch, mine, ranks)                      # N: the token-mean normalisers (verl)
            if norms["tokens"] == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            sums, cause = {"grpo": 0.0, "sdl": 0.0, "ref_kl": 0.0}, None
            passes = update_passes(run, batch, mb, mine, moving)              # [(rows, with gradient)]
            if not any(grad for _, grad in passes):   # no row moves: AdamW steps on the zero gradient, as it would
                for p in model.parameters():
                    p.grad = torch.zeros_like(p)
            last = max((k for k, (_, grad) in enumerate(passes) if grad), default=-1)
            for k, (rows, grad) in enumerate(passes):
                real = bool(rows)    # a rank out of rows repeats one at weight 0: every rank runs the same passes
                with ranks.accumulate(run.scorer, last=k == last):
                    terms, d, logp = micro_batch_losses(run, batch, rows or [0], norms, weights, grad=grad)
                    total = sum(w * l for w, l in terms.values() if w)    # Eq. 14 (weights from the arm)
                    if real:
                        if grad:
                            balance_proxy(terms, logp, grad_sq)
                        if cause is None and not torch.isfinite(total):
                            cause = "non-finite loss (" + ", ".join(f"{n} {l.item():.3g}"
                                                                    for n, (_, l) in terms.items()) + ")"
                        for name, (_, l) in terms.items():
                            sums[name] += l.item()
                        diag.append(d)
                    if grad:   # ×world: the wrapper averages gradients over ranks, the loss wants their sum
                        (total * (ranks.world if real else 0.0)).backward()
            *loss_sums, failed = ranks.sum([sums["grpo"], sums["sdl"], sums["ref_kl"], cause is not None])
            cause = cause or ("non-finite loss on another rank" if failed else None)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm   # FSDP2
            if cause is None and not torch.isfinite(grad_norm):
                cause = f"non-finite gradient norm ({float(grad_norm)})"
            if cause is None:
                optimizer.step()
                if not weights_finite(model, ranks):
                    cause = "non-finite weights after the step (undone: the last checkpoint's weights are restored)"
                    restore_weights(run)
            if cause is not None:
                optimizer.zero_grad(set_to_none=True)
                skip_step(run, stats, cause, iteration)
                continue
            run.skips_in_a_row = 0
            for name, total in zip(("grpo", "sdl", "ref_kl"), loss_sums):
                if f"loss_{name}" in stats:
                    stats[f"loss_{name}"].append(total)
            stats["grad_norm"].append(float(grad_norm))
    run.policy = ranks.gathered(model)             # FSDP2: the full copy follows the new weights
    return update_stats(stats, grad_sq, diag, ranks)


def rows_with_gradient(run: Run, batch: Batch) -> set:
    """The iteration's rows (global indices, the same set on every rank) whose loss has a gradient: a nonzero
    advantage, a token with a teacher (L_SDL), or --ref-kl. Any other row (a flat group's row with no skill, a failed
    episode) adds exactly 0 to every gradient (GRPO's surrogate is ratio·A = 0 at A = 0), so the update runs no
    backward for it (a forward only, for the logs); its tokens still count in the normaliser N: the step is the same.
    """
    if batch.logp_ref is not None:
        return set(range(len(batch.everyone)))
    mine = [r for b, r in enumerate(batch.rows)
            if batch.mask[b].any() and (batch.adv[b] != 0 or batch.sdl_mask[b].any())]
    return {r for part in run.ranks.gather(mine) for r in part}


def update_passes(run: Run, batch: Batch, mb, mine: list, moving: set) -> list:
    """A mini-batch's forward passes as (this rank's rows, with gradient): first forward-only micro-batches of the
    rows that add exactly 0 to the gradient (rows_with_gradient; run only for the logged diagnostics, which stay
    over every row), then forward+backward ones of the others. Every rank runs as many of each as the rank with most
    such rows (micro_steps); a rank out of rows gets [] and repeats a row at weight 0."""
    mbs, passes = run.cfg.micro_batch_size, []
    for grad in (False, True):
        rows = [b for b in mine if (batch.rows[b] in moving) == grad]
        steps = micro_steps(run, [r for r in mb if (int(r) in moving) == grad])
        passes += [(rows[k * mbs:(k + 1) * mbs], grad) for k in range(steps)]
    return passes


def micro_steps(run: Run, mb) -> int:
    """Forward/backward passes of one mini-batch: enough for the rank holding most of its rows (the same on every
    rank, computed from the deal, without communication)."""
    G, mbs = run.cfg.group_size, run.cfg.micro_batch_size
    per_rank = np.bincount([run.ranks.owner(int(r) // G) for r in mb], minlength=run.ranks.world)
    return int(max(math.ceil(n / mbs) for n in per_rank))


def balance_proxy(terms: dict, logp: torch.Tensor, grad_sq: dict) -> None:
    """Add ‖∂(w·L)/∂log π‖² of the GRPO and SDL terms (grad_ratio_sdl_grpo in the log)."""
    for name in grad_sq:
        w, l = terms[name]
        if w and l.requires_grad:
            g, = torch.autograd.grad(w * l, logp, retain_graph=True, allow_unused=True)
            grad_sq[name] += 0.0 if g is None else float((g.double() ** 2).sum())


TEACHER_STATS = ("ell_", "k3_", "rho_")   # loss.diagnostics keys over the tokens that have a teacher


def update_stats(stats: dict, grad_sq: dict, diag: list, ranks) -> dict:
    """The update's log entries: means over optimizer steps, the balance proxy, and the loss diagnostics over every
    micro-batch of every rank, combined as one pass over all their tokens would give them (so they do not depend on
    how rows are cut into micro-batches or ranks): token-weighted means (teacher statistics weighted by the tokens that
    have a teacher; the ℓ quantiles so too, an approximation), maxima for *_max, minima for *_min, sums for the
    token and guard counts."""
    out = {k: (float(np.mean(v)) if v else float("nan")) if isinstance(v, list) and k != "skip_causes" else v
           for k, v in stats.items()}
    sq_grpo, sq_sdl = ranks.sum([grad_sq["grpo"], grad_sq["sdl"]])
    out["grad_ratio_sdl_grpo"] = math.sqrt(sq_sdl / sq_grpo) if sq_grpo else (math.inf if sq_sdl else float("nan"))
    if ranks.world > 1:
        diag = [d for part in ranks.gather(diag) for d in part]
    for key in (diag[0] if diag else {}):
        taught = key.startswith(TEACHER_STATS)
        pairs = [(d[key], d["tokens"] * (d.get("teacher_frac", 1.0) if taught else 1.0)) for d in diag
                 if d.get(key) is not None and not math.isnan(d[key])]
        pairs = [(v, w) for v, w in pairs if w > 0]                          # a micro-batch without such tokens
        if key == "tokens" or key.startswith("guard_"):
            out[key] = float(sum(d[key] for d in diag))
        elif key.endswith(("max", "min")):
            out[key] = (max if key.endswith("max") else min)(v for v, _ in pairs) if pairs else float("nan")
        else:
            out[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else float("nan")
    return out


def skip_step(run: Run, stats: dict, cause: str, iteration: int | None) -> None:
    """The guard's bookkeeping: count, say and log a skipped step; stop after MAX_SKIPS_IN_A_ROW in a row."""
    stats["skipped_steps"] += 1
    stats["skip_causes"].append(cause)
    run.skips_in_a_row += 1
    if run.ranks.main:
        tqdm.write(f"[guard] iteration {iteration}: optimizer step skipped: {cause}")
    if run.skips_in_a_row >= MAX_SKIPS_IN_A_ROW:
        raise SystemExit(f"[guard] {run.skips_in_a_row} optimizer steps in a row were skipped (last: {cause}); the "
                         f"run stops at iteration {iteration}. Its last checkpoint is intact: lower --lr or --lam and "
                         f"start again, or --resume {run.cfg.run_dir} if the cause was transient")


def weights_finite(model, ranks=dist_lib.Single()) -> bool:
    """On every rank (under FSDP2 each holds a shard, so the answer is summed)."""
    local = all(bool(torch.isfinite(getattr(p, "_local_tensor", p)).all()) for p in model.parameters())
    return ranks.sum([not local])[0] == 0


def restore_weights(run: Run) -> None:
    """Undo a step that left non-finite weights: the weights and optimizer state of the last checkpoint, or the base
    weights and a fresh optimizer state when there is none yet (no extra copy of the weights is kept in memory)."""
    for ckpt in run_folder.checkpoints(run.cfg.run_dir):
        try:
            model, _, state, _ = read_checkpoint(ckpt, run.device)
        except ValueError:
            continue
        run.ranks.load_weights(run.model, model.state_dict())
        run.ranks.load_optimizer(run.model, run.optimizer, state["optimizer"])
        return
    run.ranks.load_weights(run.model, model_lib.load(tiny_base.resolve(run.cfg.model), device=run.device,
                                                     dtype=torch.float32)[0].state_dict())
    run.optimizer.state.clear()


def normalisers(cfg: TrainConfig, batch: Batch, rows: list, ranks) -> dict:
    """Each term's N for one mini-batch, summed over ranks: the shared token count (the paper's letter), or with
    --sdl-norm teacher the tokens that have a teacher, with --grpo-norm drop-flat those of rows with a nonzero
    advantage (never below 1). "tokens" is the shared count (0: nothing to train on)."""
    m = batch.mask[rows]                                                                       # (b, T)
    tokens, taught, moving = ranks.sum([float(m.sum()), float(batch.sdl_mask[rows].sum()),
                                        float((m * (batch.adv[rows] != 0)[:, None]).sum())])
    n = {"tokens": tokens, "grpo": tokens, "sdl": tokens, "ref_kl": tokens}
    if cfg.sdl_norm == "teacher":
        n["sdl"] = max(1.0, taught)
    if cfg.grpo_norm == "drop-flat":
        n["grpo"] = max(1.0, moving)
    return n


def micro_batch_losses(run: Run, batch: Batch, rows, norms: dict, weights: tuple,
                       grad: bool = True) -> tuple[dict, dict, torch.Tensor]:
    """The loss terms of some rows (grad: with the graph) -> ({name: (weight, loss)}, diagnostics, log π (b, T)).
    log π is recomputed under the student's prompt; ρ and the PPO ratio divide by the behaviour log-probs (θ_old,
    or the teacher off-policy)."""
    Tm = max(len(batch.ledgers[i].ids) for i in rows)
    with autocast(run):
        logp = model_lib.score_under_prompt(run.scorer, [batch.ledgers[i] for i in rows],
                                            [batch.student_prompts[i] for i in rows], grad=grad,
                                            trainable_only=True, temperature=run.cfg.temperature,
                                            pack=run.cfg.pack)                                      # (b, Tm)
    logp = logp.float()
    m, behaviour, tea = batch.mask[rows, :Tm], batch.logp_behaviour[rows, :Tm], batch.logp_teacher[rows, :Tm]
    a, sm, cfg = batch.adv[rows], batch.sdl_mask[rows, :Tm], run.cfg
    terms = {"grpo": (weights[0], loss_lib.grpo_loss(logp, behaviour, a, m, cfg.clip_low, cfg.clip_high,
                                                     num_tokens=norms["grpo"])),
             "sdl": (weights[1], loss_lib.sdl_loss(logp, behaviour, tea, sm, num_tokens=norms["sdl"]))}
    if batch.logp_ref is not None:
        # labelled variant: the same ρ·k3 estimator toward θ₀ under the plain prompt estimates the REVERSE
        # KL(π_θ ‖ π_θ₀); it is exactly the frozen-teacher ablation's SDL with the skill taken out of the prompt
        terms["ref_kl"] = (cfg.ref_kl, loss_lib.sdl_loss(logp, batch.logp_old[rows, :Tm], batch.logp_ref[rows, :Tm],
                                                         m, num_tokens=norms["ref_kl"]))
    # the loss's own ratio and ρ (behaviour denominator), and clip_frac where the clip binds given the advantage's sign
    d = loss_lib.diagnostics(logp.detach(), behaviour, tea, m, cfg.clip_low, cfg.clip_high, advantages=a, sdl_mask=sm)
    return terms, d, logp


def summary_requests(run: Run, batch: Batch) -> list:
    """Phase 8 input: completed trajectories (up to skills_per_group per group), success or failure alike; under
    torchrun those of this rank's groups (every rank draws the choice for every group: the RNG stays in step)."""
    G = run.cfg.group_size
    k = run.cfg.skills_per_group or G
    local, reqs = {r: b for b, r in enumerate(batch.rows)}, []
    for g in range(len(batch.groups)):
        for i in sorted(run.rng.choice(G, size=min(k, G), replace=False)):
            b = local.get(g * G + i)
            if b is not None and not batch.failed[b]:     # a failed episode's trajectory is not the policy's
                req = skills_lib.SummaryRequest.from_episode(run.cfg.env, batch.episodes[b])
                req.order = (batch.iteration, g * G + int(i))
                reqs.append(req)
    return reqs


def summarise_and_credit(run: Run, batch: Batch, chosen: dict, it: int) -> None:
    """Phase 8: queue the summaries (skills reach the bank from the next iteration), then credit the UCB statistic
    R̄(e) with the mean reward of the task's rollouts: the skill just retrieved (--skill-credit group, the paper's
    letter), or the one retrieved at the task's previous visit, whose distillation could have changed these rollouts
    (--skill-credit source). Every rank credits every task (rewards of the whole iteration), so the banks agree."""
    run.summarizer.submit(it, summary_requests(run, batch))
    lagged, G = run.cfg.skill_credit == "source", run.cfg.group_size
    if run.pending_credit is None:
        run.pending_credit = {}
    for tid, hit in chosen.items():
        group = [o["reward"] for r, o in enumerate(batch.everyone)
                 if task_key(batch.groups[r // G]) == tid and not o["failed"]]
        credited = run.pending_credit.pop(tid, None) if lagged else (hit.skill_id if hit else None)
        if credited is not None and group:
            run.bank.update(tid, credited, float(np.mean(group)))
        if lagged and hit and hit.skill_id is not None:
            run.pending_credit[tid] = hit.skill_id


def log_iteration(run: Run, batch: Batch, upd: dict, it: int, lam: float, times: dict) -> dict:
    """Phase 9: curriculum and collapse monitor, the held-out evaluation when due, and the iteration's line of
    log.jsonl (returned; written by rank 0). Every number is over the whole iteration (every rank's episodes)."""
    cfg, rows = run.cfg, batch.everyone
    turns = sum(o["turns"] for o in rows)
    success, fmt_rate = float(np.mean([o["success"] for o in rows])), sum(o["format_errors"] for o in rows) / \
        max(1, turns)
    reward = float(np.mean([o["reward"] for o in rows]))
    run.curriculum.update(success)
    collapse = run.monitor.update(reward, fmt_rate)
    if collapse and run.ranks.main:
        tqdm.write(f"[collapse] iteration {it + 1}: {collapse}")
    in_prompt = run.arm.sample_with_context and run.arm.sampler == "student"   # the student sees the block
    row = {"iteration": it + 1, "reward": reward, "acc": success,
           "comp": float(np.mean([o["completion"] for o in rows])), **upd, **batch.coverage,
           **batch.retrieval, "lam": lam,
           "lr": run.optimizer.param_groups[0]["lr"],
           "zero_var_groups": batch.zero_var, "groups": len(batch.groups),
           "dropped_episodes": sum(o["failed"] for o in rows),
           "format_error_rate": fmt_rate,
           "teacher_task_frac": float(np.mean([o["context"] and run.arm.teacher and not o["failed"] for o in rows])),
           "skill_in_prompt_frac": float(np.mean([o["context"] for o in rows])) if in_prompt else 0.0,
           "episode_turns": turns / len(rows), "episode_tokens": float(np.mean([o["tokens"] for o in rows])),
           "reply_tokens_per_turn": sum(o["trainable"] for o in rows) / max(1, turns),
           "truncated": sum(o["truncated"] for o in rows), "bank": run.bank.stats(),
           "summarizer": summarizer_stats(run), "curriculum_unlocked": run.curriculum.unlocked,
           "collapse": collapse, **{f"time_{k}": v for k, v in times.items()}}
    if cfg.eval_every and (it + 1) % cfg.eval_every == 0 and it + 1 < cfg.iterations:
        row["eval_acc"] = run_eval(run, it + 1)["acc"]
    if run.ranks.main:
        append_jsonl(os.path.join(cfg.run_dir, "log.jsonl"), row)
    return row


def summarizer_stats(run: Run) -> dict:
    """The summariser's counters, summed over ranks (each rank summarises its own groups)."""
    mine = run.summarizer.stats()
    return dict(zip(mine, (int(v) for v in run.ranks.sum(list(mine.values())))))


def run_eval(run: Run, iteration: int) -> dict:
    """Held-out evaluation of the student under the plain prompt, appended to eval.jsonl (episodes shared out over
    the ranks, the table gathered on every rank)."""
    cfg, t0 = run.cfg, time.time()
    tasks = run.env.test_tasks[: cfg.eval_tasks] if cfg.eval_tasks else run.env.test_tasks
    m = eval_lib.evaluate(run.policy, run.tokenizer, run.env, tasks, samples=cfg.eval_samples,
                          temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                          shard=(run.ranks.rank, run.ranks.world), gather=run.ranks.gather,
                          compile=decoder_for(run, run.policy))
    row = {"iteration": iteration, **{k: v for k, v in m.items() if k != "per_task_success"},
           "seconds": time.time() - t0}
    if run.ranks.main:
        append_jsonl(os.path.join(cfg.run_dir, "eval.jsonl"), row)
    return row


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: HF weights + optimizer + skill bank + RNG states + iteration, written atomically (run_folder.py)

def save_checkpoint(run: Run, iteration: int) -> None:
    """Written once, by rank 0, in the format of a one-process run (so it resumes under any number of ranks); under
    FSDP2 the weights and optimizer state are first gathered from every rank."""
    collect_skills(run, wait=True)                    # pending skills belong in the checkpoint
    state = {"iteration": iteration, "rng": rng_state(run.rng), "curriculum": run.curriculum.state(),
             "monitor": run.monitor.state(), "config": dataclasses.asdict(run.cfg), "rollbacks": run.rollbacks,
             "pending_credit": run.pending_credit or {}}
    weights, optimizer = run.ranks.full_state(run.model, run.optimizer)

    def fill(folder):
        # loadable by plain AutoModelForCausalLM
        run.model.save_pretrained(os.path.join(folder, "model"), state_dict=weights)
        run.tokenizer.save_pretrained(os.path.join(folder, "model"))
        run.bank.save(os.path.join(folder, "skill_bank.json"))
        torch.save({"optimizer": optimizer, **state}, os.path.join(folder, "trainer_state.pt"))
    if run.ranks.main:
        run_folder.write_checkpoint(run.cfg.run_dir, fill)
    run.ranks.barrier()                               # no rank reads a checkpoint before it is complete


def read_checkpoint(ckpt: str, device) -> tuple:
    """(model, tokenizer, trainer state, bank) of one checkpoint folder; an error names the file that failed."""
    try:
        model, tokenizer = model_lib.load(os.path.join(ckpt, "model"), device=device, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"model/: {str(err).splitlines()[0]}") from None
    try:
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)
        state["optimizer"], state["iteration"], state["rng"]                         # noqa: B018 - the keys exist
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"trainer_state.pt: {type(err).__name__}: {err}") from None
    try:
        bank = skills_lib.SkillBank.load(os.path.join(ckpt, "skill_bank.json"))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"skill_bank.json: {type(err).__name__}: {err}") from None
    return model, tokenizer, state, bank


def latest_checkpoint(run_dir: str, device) -> tuple:
    """The newest checkpoint that loads (ckpt/, else ckpt.prev/ with a warning that says what was wrong)."""
    problems = []
    for ckpt in run_folder.checkpoints(run_dir):
        try:
            loaded = read_checkpoint(ckpt, device)
        except ValueError as err:
            problems.append(f"{ckpt}/{err}")
            continue
        if problems:
            run_folder.warn(f"{'; '.join(problems)}: resuming from {ckpt} (iteration {loaded[2]['iteration']}) "
                            f"instead; the iterations after it are run again")
        return loaded
    raise SystemExit(f"--resume {run_dir}: no checkpoint can be loaded"
                     + (f" ({'; '.join(problems)})" if problems else f" (no {run_dir}/ckpt/trainer_state.pt)")
                     + "; start again with --overwrite")


def restore_state(run: Run, state: dict) -> None:
    run.ranks.load_optimizer(run.model, run.optimizer, state["optimizer"])
    run.curriculum.load(state["curriculum"])
    set_rng_state(run.rng, state["rng"])
    run.monitor.load(state["monitor"])
    run.start_it, run.rollbacks = state["iteration"], state.get("rollbacks", 0)
    run.pending_credit = dict(state.get("pending_credit", {}))
    for name in ("log.jsonl", "eval.jsonl") if run.ranks.main else ():   # drop lines after the checkpoint
        path = os.path.join(run.cfg.run_dir, name)
        rows = [r for r in read_jsonl(path) if r["iteration"] <= run.start_it]
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def rng_state(rng) -> dict:
    """The run's random state (sampling needs none: each episode's stream is seeded afresh, episode_generators)."""
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}


def set_rng_state(rng, s: dict) -> None:
    rng.bit_generator.state = s["numpy"]
    torch.set_rng_state(s["torch"])


# ----------------------------------------------------------------------------------------------------------------------
# The loop (Algorithm 1)

def train(cfg: TrainConfig) -> dict:
    arm = resolve_arm(cfg)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    device = dist_lib.rank_device(model_lib.pick_device(cfg.device))
    ranks = dist_lib.from_env(cfg.dist_timeout, device)          # Single unless torchrun started several processes
    # rank 0 owns the run folder (claimed, or cleared with --overwrite, before any rank reads it)
    claim = run_folder.claim(cfg.run_dir, resume=bool(cfg.resume), overwrite=cfg.overwrite) if ranks.main else \
        nullcontext()
    # the run seeds torch's global RNG: inside fork_rng, so the caller's RNG state (a notebook's) is left as it was
    try:
        with cpu_threads(cfg.threads), torch.random.fork_rng(devices=devices), claim:
            ranks.barrier()
            run = setup(cfg, arm, ranks, device)
            try:
                return train_loop(run)
            except KeyboardInterrupt:
                done = run_folder.checkpoints(cfg.run_dir)
                raise SystemExit("[train] interrupted; " + (f"continue from the last checkpoint with `python train.py "
                                 f"--resume {cfg.run_dir}`" if done else "no checkpoint was written yet: start again "
                                 "with --overwrite")) from None
            finally:
                run.summarizer.close()
                run.env.close()
                run.scorer = None   # the DDP reducer goes before its process group (else gloo can hang at exit)
    except Exception as err:
        if ranks.world > 1:   # torchrun then stops the other ranks; say which rank failed and why, first
            print(f"[rank {ranks.rank} of {ranks.world}] {type(err).__name__}: {err} (torchrun stops the other ranks)",
                  file=sys.stderr, flush=True)
        raise
    finally:
        ranks.close()


def train_loop(run: Run) -> dict:
    cfg, say = run.cfg, print if run.ranks.main else (lambda *a, **k: None)   # rank 0 speaks
    if run.start_it >= cfg.iterations:
        say(f"[train] {cfg.run_dir} is finished ({run.start_it} of {cfg.iterations} iterations): nothing to do; "
              f"--resume {cfg.run_dir} --iterations N with N > {cfg.iterations} trains it further")
        evals = read_jsonl(os.path.join(cfg.run_dir, "eval.jsonl"))
        return {"train": {}, "eval": evals[-1] if evals else {}}
    if run.ranks.main:
        run_folder.record(cfg.run_dir, "resume" if cfg.resume else "start", iteration=run.start_it,
                          ranks=run.ranks.world,
                          **({"changed": run.changes} if cfg.resume else {"config": dataclasses.asdict(cfg)}))
    n_params = sum(p.numel() for p in run.policy.parameters())
    ranks = f" | {run.ranks.world} ranks ({'FSDP2' if cfg.fsdp else 'DDP'})" if run.ranks.world > 1 else ""
    say(f"[train] {cfg.method} on {cfg.env} | model {cfg.model} ({n_params / 1e6:.2f}M params) on {run.device}"
        f"{ranks} | {cfg.tasks_per_iter} tasks x G={cfg.group_size} | λ={cfg.lam} | run dir {cfg.run_dir}")
    if run.start_it == 0:
        base = run_eval(run, 0)
        say(f"[eval] base: Acc {100 * base['acc']:.1f}%  Comp {100 * base['comp']:.1f}%")
    if cfg.collapse_guard and not run_folder.checkpoints(cfg.run_dir):
        save_checkpoint(run, run.start_it)                      # the first healthy checkpoint: the base itself
        keep_healthy(run)
    bar = tqdm(total=cfg.iterations, initial=run.start_it, desc=cfg.method, disable=not run.ranks.main)
    last, collapse, it = {}, "", run.start_it
    while it < cfg.iterations:
        times, lam = {}, lam_at(cfg, it)
        # 1. sync the teacher: the dynamic teacher IS `model` (run.policy) until this iteration's first optimizer step
        batch = pick_tasks(run, it)                                                          # 2. tasks
        chosen = retrieve_contexts(run, batch)                                               # 3. skills
        with timed(times, "rollout"):
            roll_out(run, batch)                                                             # 4-5. rollouts
        with timed(times, "teacher"):
            score_teacher(run, batch)                                                        # 6. teacher
        with timed(times, "update"):
            upd = ppo_update(run, batch, lam, iteration=it + 1)                              # 7. update
        with timed(times, "summarize"):
            summarise_and_credit(run, batch, chosen, it)                                     # 8. skills
        last = log_iteration(run, batch, upd, it, lam, times)                                # 9. log
        bar.update(1)
        bar.set_postfix(R=f"{last['reward']:.2f}", acc=f"{last['acc']:.2f}", sdl=f"{upd['loss_sdl']:.3g}",
                        bank=last["bank"].get("skills", 0))
        collapse, it = last["collapse"], it + 1
        if cfg.collapse_guard and guard_trips(cfg, last):      # labelled variant: back to health, half the lr
            it = roll_back(run, last)
            bar.n = it
            continue
        if (cfg.save_every and it % cfg.save_every == 0) or it == cfg.iterations:
            save_checkpoint(run, it)
            if cfg.collapse_guard:
                keep_healthy(run)
        if collapse and cfg.collapse_stop:
            say("[collapse] stopping (--collapse-stop)")
            break
    bar.close()
    final = run_eval(run, cfg.iterations if not (collapse and cfg.collapse_stop) else last.get("iteration", 0))
    if run.ranks.main:
        print(report.final_table(cfg.run_dir))
    return {"train": last, "eval": final}


# ----------------------------------------------------------------------------------------------------------------------
# The collapse guard (labelled variant, not the paper: METHOD.md §10)

MAX_ROLLBACKS = 3


def guard_trips(cfg: TrainConfig, row: dict) -> str:
    """Why this iteration's log row trips the guard ("" if it does not)."""
    if row["format_error_rate"] >= cfg.guard_format_rate:
        return f"format errors {row['format_error_rate']:.0%} of turns (threshold {cfg.guard_format_rate:.0%})"
    return row["collapse"]


def keep_healthy(run: Run) -> None:
    """Copy the checkpoint just written to ckpt.healthy (the guard's roll-back target) when the run is healthy: the
    last MAX(5, save_every) iterations did not trip the guard. Rank 0's work; the others wait for it."""
    if run.ranks.main:
        copy_if_healthy(run)
    run.ranks.barrier()


def copy_if_healthy(run: Run) -> None:
    rows = read_jsonl(os.path.join(run.cfg.run_dir, "log.jsonl"))[-max(5, run.cfg.save_every):]
    if any(guard_trips(run.cfg, r) for r in rows):
        return
    src, dst = os.path.join(run.cfg.run_dir, "ckpt"), os.path.join(run.cfg.run_dir, "ckpt.healthy")
    shutil.rmtree(dst + ".tmp", ignore_errors=True)
    shutil.copytree(src, dst + ".tmp")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(dst + ".tmp", dst)


def roll_back(run: Run, row: dict) -> int:
    """Restore the healthy checkpoint (weights, optimizer, bank, RNGs, logs after it dropped) and halve the learning
    rate; return the iteration to go on from. The run stops after MAX_ROLLBACKS roll-backs."""
    cfg, why = run.cfg, guard_trips(run.cfg, row)
    if run.rollbacks >= MAX_ROLLBACKS:
        raise SystemExit(f"[guard] iteration {row['iteration']}: {why}, after {run.rollbacks} roll-backs already; "
                         f"the run stops (its checkpoints are intact)")
    lr = run.optimizer.param_groups[0]["lr"]
    model, _, state, bank = read_checkpoint(os.path.join(cfg.run_dir, "ckpt.healthy"), run.device)
    run.ranks.load_weights(run.model, model.state_dict())
    run.policy = run.ranks.gathered(run.model)
    run.bank = bank
    rollbacks = run.rollbacks + 1
    restore_state(run, state)
    run.rollbacks = rollbacks
    for group in run.optimizer.param_groups:
        group["lr"] = lr / 2
    if run.ranks.main:
        tqdm.write(f"[guard] iteration {row['iteration']}: {why}: rolled back to iteration {run.start_it}, lr {lr:g} "
                   f"-> {lr / 2:g} (roll-back {rollbacks} of at most {MAX_ROLLBACKS})")
        run_folder.record(cfg.run_dir, "guard", iteration=row["iteration"], back_to=run.start_it, reason=why,
                          lr=[lr, lr / 2])
    return run.start_it


@contextmanager
def timed(times: dict, name: str):
    t0 = time.time()
    yield
    times[name] = time.time() - t0


if __name__ == "__main__":
    train(parse_args(sys.argv[1:]))
