"""config.py — train.py's hyperparameters: one dataclass whose every default says where it comes from, the tiny
profiles of the built-in models, the flags a resume may change, and every check of a flag's value, all run before
any model is loaded (README, "When things go wrong").

Choice 4 of train.py: the built-in models get a "tiny profile" of defaults (TINY_PROFILES) unless a flag is given;
the paper's values apply to every other model. `python train.py --help` shows both.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch

import env_sokoban
import run_folder
from common import flag, parse_flags, require

DESCRIPTION = "train.py — Skill-SD: GRPO plus skill-conditioned self-distillation (the paper's Algorithm 1)"


# ----------------------------------------------------------------------------------------------------------------------
# Hyperparameters: one dataclass; every default says where it comes from

@dataclass
class TrainConfig:
    # what to run
    env: str = flag("sokoban", "sokoban | appworld")
    method: str = flag("skill-sd", "skill-sd | grpo | opd | skill-grpo (METHOD.md §8)")
    model: str = flag("", "HF id or local path; default: 'tiny-sokoban' (the built-in pretrained tiny base, "
                          "tiny_base.py) for sokoban, Qwen/Qwen3-4B-Instruct-2507 (paper) for appworld; 'tiny' = random")
    run_dir: str = flag("", "output folder; default runs/<method>-<env>-s<seed>")
    seed: int = flag(0, "seed of task order, sampling and summaries")
    iterations: int = flag(180, "training iterations; paper Sokoban ≈180, AppWorld ≈300 (curves, METHOD.md §9)")
    # tasks and rollouts
    preset: str = flag("paper", "Sokoban level set: paper (6x6, 2 boxes) | easy (6x6, 1 box) | hard (the easy rooms "
                                "that need 5+ moves)")
    tasks_per_iter: int = flag(8, "tasks per iteration (SDAR uses 16)")
    group_size: int = flag(8, "G rollouts per task; verl-agent, SDPO, TRL use 8")
    max_turns: int = flag(40, "turns per episode; paper: 40")
    temperature: float = flag(1.0, "sampling temperature in training; TRL/SDPO default 1.0")
    max_new_tokens: int = flag(256, "tokens per reply; METHOD.md §9 (Sokoban 256, AppWorld 512)")
    format_penalty: float = flag(0.0, "reward penalty per invalid turn; ours 0, RAGEN/verl-agent 0.1")
    reward: str = flag("completion", "completion | success | gym; paper trains on the completion rate")
    curriculum: bool = flag(True, "Sokoban: 3 difficulty buckets unlocked in order (ours, METHOD.md §9)")
    # optimisation
    lr: float = flag(1e-6, "AdamW learning rate; verl-agent / TRL GRPO scripts")
    weight_decay: float = flag(0.0, "AdamW weight decay; verl")
    grad_clip: float = flag(1.0, "global grad-norm clip; tiny-grpo, verl")
    mini_batches: int = flag(2, "optimizer steps per iteration (so ρ ≠ 1 on the second); PPO practice")
    epochs: int = flag(1, "passes over the rollouts per iteration; PPO practice")
    micro_batch_size: int = flag(0, "rows per forward (gradient accumulation; memory only, not the math), cut from "
                                    "the rows sorted by length so that they pad little; 0 = auto: 8 (16 with --pack)")
    old_logp: str = flag("auto", "where log π_θold comes from: rollout (the sampler's own log-probs, recorded by the "
                                 "rollout: no extra forward) | forward (a full forward after the rollout) | auto = "
                                 "rollout when the student samples in fp32 (the two agree ≤ 1e-5), else forward")
    compile: bool = flag(False, "rollouts and evaluations decode with a compiled step on a preallocated KV cache "
                                "(model.StaticDecoder; CUDA graphs on a GPU): the same tokens, faster where per-step "
                                "overhead dominates (`python bench.py` measures it)")
    pack: bool = flag(False, "each micro-batch's rows run as one packed row (no padding; per-sequence positions and "
                             "causal attention) in scoring and updates: equal log-probs, fewer forwards")
    clip_low: float = flag(0.2, "PPO ε_low; DAPO clip-higher")
    clip_high: float = flag(0.28, "PPO ε_high; DAPO clip-higher")
    lam: float = flag(1e-3, "λ, weight of L_SDL; paper Eq. 14")
    sdl_norm: str = flag("all", "L_SDL's token mean: all (the paper's letter: N = every trainable token of the "
                                "mini-batch, shared with L_GRPO) | teacher (N = the tokens that have a teacher)")
    grpo_norm: str = flag("all", "L_GRPO's token mean: all (the paper's letter: flat groups count in N) | drop-flat "
                                 "(N = the tokens of rows with a nonzero advantage)")
    # teacher and ablations
    teacher_weights: str = flag("dynamic", "dynamic (θ̄ = θ_old every iteration, paper) | frozen (θ₀)")
    rollout_by: str = flag("student", "student (paper) | teacher (off-policy ablation)")
    teacher_context: str = flag("", "skill | ground-truth | none; default from --method")
    # labelled variants: not the paper's method (METHOD.md §10)
    lam_warmdown: int = flag(0, "λ falls linearly to 0 at this iteration and stays 0 (0 = constant λ, the paper; "
                                "SDAR has an optional warm-down, off in its scripts)")
    ref_kl: float = flag(0.0, "β of KL(π_θ ‖ π_θ₀) under the plain prompt, the same ρ·k3 estimator as L_SDL; 0 = off "
                              "(paper: no KL-to-reference term)")
    sdl_mask: str = flag("all", "all (paper: L_SDL on every token that has a teacher) | covered (only on turns whose "
                                "state the skill speaks about; Sokoban, skill teachers)")
    collapse_guard: bool = flag(False, "when format errors reach --guard-format-rate or the collapse monitor fires, roll "
                                       "back to the last healthy checkpoint and go on at half the learning rate")
    guard_format_rate: float = flag(0.2, "--collapse-guard: the share of invalid turns in an iteration that trips it")
    # skills
    summarizer: str = flag("auto", "auto | rule | policy | model | http (choice 1)")
    summarizer_model: str = flag("", "HF id/path of a separate summariser model (--summarizer model)")
    summarizer_url: str = flag("", "OpenAI-compatible base URL (--summarizer http)")
    summarizer_name: str = flag("", "model name sent to the HTTP endpoint")
    async_summarizer: bool = flag(False, "summarise in a worker thread (choice 2)")
    skills_per_group: int = flag(0, "trajectories summarised per group; 0 = all G (paper)")
    skill_credit: str = flag("group", "group (the paper's letter: a pick is credited with the mean reward of the group "
                                      "it re-scored; untried skills first, the newest) | source (labelled variant: a "
                                      "skill enters with its source episode's reward as a prior, UCB ranks it at "
                                      "once, and a pick is credited at the task's next visit)")
    bank_capacity: int = flag(16, "skills kept per task, FIFO; ours (METHOD.md §4)")
    ucb_c: float = flag(math.sqrt(2), "UCB exploration constant; UCB1")
    # evaluation, logging, checkpoints
    eval_every: int = flag(20, "held-out evaluation every k iterations (0 = only at the start and end)")
    train_tasks: int = flag(0, "train on the first k training tasks only; 0 = all (paper: 96 Sokoban, 90 AppWorld)")
    eval_samples: int = flag(1, "episodes per test task; paper 1 (greedy)")
    eval_temperature: float = flag(0.0, "0 = greedy (paper); > 0 samples (use with --eval-samples for s.e.)")
    eval_tasks: int = flag(0, "evaluate on the first k test tasks; 0 = all (paper: 64 Sokoban, 57 AppWorld)")
    save_every: int = flag(20, "checkpoint every k iterations (and at the end)")
    resume: str = flag("", "run directory to continue from its last checkpoint (the same run: only the flags in "
                           "RESUMABLE may change)")
    overwrite: bool = flag(False, "start a new run in a --run-dir that holds another run's files (they are removed)")
    # devices
    device: str = flag("", "cpu | cuda | mps; default: best available")
    threads: int = flag(0, "torch CPU threads during the run (restored after); 0 = leave torch's setting (every "
                           "core; `eval.py --paper-table` gives each of its --jobs runs cores / jobs)")
    grad_checkpointing: bool = flag(False, "trade compute for activation memory (real models on a GPU)")
    autocast: str = flag("auto", "forward passes under bf16 autocast, the weights and AdamW staying fp32: auto (on "
                                 "CUDA only, choice 3) | bf16 (CPU too: faster where the CPU has bf16 units, "
                                 "`python bench.py --bf16` measures it) | fp32 (never)")
    fsdp: bool = flag(False, "under torchrun: shard weights, gradients and AdamW state over the ranks (FSDP2) instead "
                             "of replicating them (DDP); for models whose training state does not fit one GPU")
    dist_timeout: float = flag(600.0, "under torchrun: seconds a collective may wait for the other ranks before the "
                                      "run stops with an error (a rank that died or hangs)")
    appworld_root: str = flag("", "AppWorld: $APPWORLD_ROOT holding data/")
    appworld_slots: int = flag(0, "AppWorld: environment servers; 0 = tasks x G, one per live episode (no replays)")
    collapse_stop: bool = flag(False, "stop the run when a collapse is detected (it is always reported)")


# choice 4: defaults for the built-in models where the user gives no flag. "tiny-sokoban" is the pretrained tiny base
# (tiny_base.py: 6x6 one-box levels, episodes of 12 turns, one-token replies); λ = 0.1 because at this scale λ = 0.001
# moves nothing: on-policy ∇(λ·SDL) = λ·ℓ·∇log π with |ℓ| ≈ 0.1–0.5, against GRPO advantages of order 1 (METHOD.md
# §10). Held-out evaluation samples 8 episodes per level at T = 1 instead of the paper's one greedy episode: the weak
# student's greedy play walks into the same wall again and again, so greedy Acc hides much of what RL changes, and 8
# samples give each run a stated standard error (≈ 4-5 points over 64 levels). lr 5e-4: at 1e-3 runs drifted into
# invalid replies (RESULTS.md). "tiny" is the random-init model, for smoke runs only.
TINY_PROFILES = {
    "tiny-sokoban": dict(preset="easy", max_turns=12, max_new_tokens=4, iterations=40, lr=5e-4, lam=0.1,
                         tasks_per_iter=16, curriculum=False, eval_every=10, save_every=20,
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


# a resumed run is the same run: these flags may change (the run's length, where and how often it writes); any
# other flag that differs from the saved config is refused, because it would apply only to part of the run
RESUMABLE = {"iterations", "eval_every", "save_every", "device", "threads", "collapse_stop", "grad_checkpointing",
             "fsdp", "dist_timeout", "autocast", "pack", "compile",
             "async_summarizer", "appworld_root", "appworld_slots", "summarizer_url", "resume", "run_dir", "overwrite"}


def parse_args(argv=None) -> TrainConfig:
    """Flags -> a validated TrainConfig: the tiny profile under the given flags, or a resumed run's saved config with
    the RESUMABLE flags given now. Every check happens here, before any model is loaded."""
    notes = {k: f"tiny profile: {v!r}" for k, v in TINY_PROFILES["tiny-sokoban"].items()}
    given = parse_flags(TrainConfig, argv, description=DESCRIPTION, notes=notes)
    if given.get("resume"):
        saved = saved_config(given["resume"])
        saved.setdefault("old_logp", "forward")   # a run saved before --old-logp existed took log π_old by a forward
        changed = {k: v for k, v in given.items() if k in saved and saved[k] != v and k not in RESUMABLE}
        if changed:
            raise SystemExit(f"--resume {given['resume']}: " + ", ".join(
                f"--{k.replace('_', '-')} {v!r} (the run has {saved[k]!r})" for k, v in changed.items())
                + ": a resumed run keeps its method, model, environment and hyperparameters; only "
                + ", ".join(f"--{k.replace('_', '-')}" for k in sorted(RESUMABLE - {"resume", "run_dir", "overwrite"}))
                + " may change. Start a new run with --run-dir for other settings")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{**{k: v for k, v in saved.items() if k in known}, "overwrite": False, **given,
                             "run_dir": given["resume"]})
    else:
        given.setdefault("model", DEFAULT_MODEL.get(given.get("env", "sokoban"), ""))
        cfg = TrainConfig(**{**tiny_profile(given["model"]), **given})
    return validate(cfg)


def saved_config(run_dir: str) -> dict:
    """A run's config.json; when it is damaged, the copy every checkpoint's trainer_state.pt keeps (with a warning)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path) and not run_folder.checkpoints(run_dir):
        raise SystemExit(f"--resume {run_dir}: no run there (no config.json and no checkpoint)")
    try:
        with open(path) as f:
            saved = json.load(f)
        if isinstance(saved, dict):
            return saved
        problem = "it is not a JSON object"
    except (OSError, ValueError) as err:
        problem = f"{type(err).__name__}: {err}"
    for ckpt in run_folder.checkpoints(run_dir):
        try:
            saved = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)["config"]
            run_folder.warn(f"{path} cannot be read ({problem}); using the config saved in {ckpt}/trainer_state.pt")
            return saved
        except Exception:  # noqa: BLE001 - a damaged trainer state: try the older checkpoint
            continue
    raise SystemExit(f"--resume {run_dir}: {path} cannot be read ({problem}) and no checkpoint holds a config; "
                     f"start again with --overwrite")


def _at_least(lo):
    return lambda v: v >= lo, f">= {lo}"


# flag -> (test, what it must be): every numeric flag's valid range (NaN fails every test)
RANGES = {
    "iterations": _at_least(1), "tasks_per_iter": _at_least(1), "group_size": (lambda v: v >= 2, ">= 2 (GRPO "
    "normalises within a group)"), "max_turns": _at_least(1), "max_new_tokens": _at_least(1),
    "temperature": (lambda v: 0 < v < math.inf, "a finite number > 0 (GRPO needs G different samples; every "
                    "log-prob is taken at this temperature)"),
    "format_penalty": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "lr": (lambda v: 0 < v < math.inf, "a finite number > 0"), "weight_decay": (lambda v: 0 <= v < math.inf, ">= 0"),
    "grad_clip": (lambda v: 0 < v < math.inf, "a finite number > 0"), "mini_batches": _at_least(1),
    "epochs": _at_least(1), "micro_batch_size": _at_least(0),
    "dist_timeout": (lambda v: 0 < v < math.inf, "a finite number of seconds > 0"),
    "clip_low": (lambda v: 0 <= v < 1, "in [0, 1)"), "clip_high": (lambda v: 0 <= v < math.inf, ">= 0"),
    "lam": (lambda v: 0 <= v < math.inf, "a finite number >= 0 (a negative λ pushes away from the teacher)"),
    "lam_warmdown": (lambda v: v >= 0, ">= 0: the iteration at which λ reaches 0 (0 = off)"),
    "ref_kl": (lambda v: 0 <= v < math.inf, "a finite β >= 0 (0 = off)"), "skills_per_group": _at_least(0),
    "bank_capacity": _at_least(1), "ucb_c": (lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    "eval_every": _at_least(0), "train_tasks": _at_least(0), "eval_samples": _at_least(1),
    "eval_temperature": (lambda v: 0 <= v < math.inf, "a finite number >= 0 (0 = greedy)"),
    "eval_tasks": _at_least(0), "save_every": _at_least(0), "seed": _at_least(0), "threads": _at_least(0),
    "appworld_slots": _at_least(0),
}
MAX_EPISODES_PER_ITERATION = 4096   # tasks x G live in memory at once (episodes and ledgers): refuse a typo early


def validate(cfg: TrainConfig) -> TrainConfig:
    """Refuse bad values and combinations with one line each; fill the defaults that depend on other flags
    (teacher context, micro-batch size, summariser, run folder)."""
    choices = {"autocast": ("auto", "bf16", "fp32"), "old_logp": ("auto", "rollout", "forward"),
               "env": ("sokoban", "appworld"), "method": tuple(METHOD_CONTEXT), "reward": ("completion", "success",
               "gym"), "teacher_weights": ("dynamic", "frozen"), "rollout_by": ("student", "teacher"),
               "teacher_context": ("", "skill", "ground-truth", "none"), "sdl_mask": ("all", "covered"),
               "sdl_norm": ("all", "teacher"), "grpo_norm": ("all", "drop-flat"), "skill_credit": ("group", "source"),
               "summarizer": ("auto", "rule", "policy", "model", "http"), "preset": tuple(env_sokoban.PRESETS)}
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise SystemExit(f"--{key.replace('_', '-')} {getattr(cfg, key)!r}: choose one of {allowed}")
    require(cfg, RANGES)
    if cfg.tasks_per_iter * cfg.group_size > MAX_EPISODES_PER_ITERATION:
        raise SystemExit(f"--tasks-per-iter {cfg.tasks_per_iter} x --group-size {cfg.group_size} = "
                         f"{cfg.tasks_per_iter * cfg.group_size} episodes per iteration: at most "
                         f"{MAX_EPISODES_PER_ITERATION} (all of them are in memory at once)")
    world = int(os.environ.get("WORLD_SIZE", "1"))         # torchrun's process count (dist.py)
    if cfg.tasks_per_iter < world:
        raise SystemExit(f"--tasks-per-iter {cfg.tasks_per_iter}: torchrun started {world} processes, and each plays "
                         f"whole task groups: use at least {world} tasks per iteration, or fewer processes")
    if cfg.fsdp and world == 1:
        raise SystemExit("--fsdp shards the model over torchrun's processes: launch with `torchrun --nproc_per_node "
                         "N train.py ...` (N > 1), or drop --fsdp" + (" (this run was saved with it: --resume ... "
                         "--no-fsdp continues it in one process)" if cfg.resume else ""))
    if cfg.skills_per_group > cfg.group_size:
        raise SystemExit(f"--skills-per-group {cfg.skills_per_group}: at most --group-size ({cfg.group_size})")
    if cfg.teacher_weights == "frozen" and (cfg.teacher_context or METHOD_CONTEXT[cfg.method]) == "none":
        raise SystemExit(f"--teacher-weights frozen: --method {cfg.method} has no teacher, so a frozen one would "
                         f"change nothing; drop the flag or use --method skill-sd / opd")
    if cfg.summarizer == "http" and not cfg.summarizer_url:
        raise SystemExit("--summarizer http needs --summarizer-url (an OpenAI-compatible base URL)")
    if cfg.summarizer == "model" and not cfg.summarizer_model:
        raise SystemExit("--summarizer model needs --summarizer-model <HF id or path>")
    if cfg.resume and cfg.overwrite:
        raise SystemExit("--resume continues a run and --overwrite replaces it: give one of them")
    if not cfg.teacher_context:
        cfg.teacher_context = METHOD_CONTEXT[cfg.method]
    if cfg.rollout_by == "teacher" and (cfg.teacher_context == "none" or cfg.method == "skill-grpo"):
        raise SystemExit("--rollout-by teacher needs a teacher that samples: use --method skill-sd or opd")
    if cfg.old_logp == "rollout" and cfg.rollout_by == "teacher":
        raise SystemExit("--old-logp rollout: with --rollout-by teacher the rollout records the teacher's log-probs, "
                         "not the student's; use --old-logp forward (or auto)")
    if cfg.ref_kl > 0 and cfg.rollout_by == "teacher":
        raise SystemExit("--ref-kl is defined for on-policy runs only (the student samples); drop --rollout-by teacher")
    if cfg.sdl_mask == "covered" and (cfg.env != "sokoban" or cfg.teacher_context != "skill"):
        raise SystemExit("--sdl-mask covered needs --env sokoban and a skill teacher (--method skill-sd): coverage is "
                         "read from the player's cell, which the Sokoban skills key their advice by")
    if cfg.micro_batch_size <= 0:
        cfg.micro_batch_size = 16 if cfg.pack else 8
    if cfg.summarizer == "auto":
        # the built-in models cannot write a JSON skill: they use the rule-based summariser (choice 1)
        cfg.summarizer = "rule" if tiny_profile(cfg.model) else "policy"
    if not cfg.run_dir:
        cfg.run_dir = os.path.join("runs", f"{cfg.method}-{cfg.env}-s{cfg.seed}")
    return cfg
