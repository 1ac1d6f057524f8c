"""Smoke runs of every method and ablation on the tiny model (CPU, a few iterations), resume equality, the loop's
invariants (ρ = 1 on the first mini-batch, which weights the teacher has, the student never sees a skill, the bandit
credit), and eval.py's independence from the batch size. These check the wiring of train.py numerically: logged losses
are finite, the SDL term is exactly zero where there is no teacher and positive where there is one, checkpoints load in
plain transformers, and an interrupted + resumed run equals an uninterrupted one bit for bit."""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch

import dist
import eval as eval_lib
import model as model_lib
import skills as skills_lib
import train
from common import make_env


SMALL = ["--env", "sokoban", "--preset", "easy", "--model", "tiny", "--tasks-per-iter", "2", "--group-size", "2",
         "--max-turns", "3", "--max-new-tokens", "6", "--eval-tasks", "4", "--eval-every", "0", "--lr", "1e-3",
         "--micro-batch-size", "3", "--train-tasks", "2", "--no-curriculum"]


def run(tmp_path, name, *extra, iterations=2):
    cfg = train.parse_args(SMALL + ["--iterations", str(iterations), "--run-dir", str(tmp_path / name), *extra])
    out = train.train(cfg)
    rows = [json.loads(l) for l in open(tmp_path / name / "log.jsonl")]
    return cfg, out, rows


def params(path):
    m, _ = model_lib.load(str(path))
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("extra", [
    ("--method", "skill-sd"),
    ("--method", "grpo"),
    ("--method", "opd"),
    ("--method", "skill-grpo"),
    ("--method", "skill-sd", "--teacher-weights", "frozen"),
    ("--method", "skill-sd", "--rollout-by", "teacher"),
    ("--method", "skill-sd", "--teacher-context", "ground-truth"),
    ("--method", "grpo", "--ref-kl", "0.5"),
    ("--method", "skill-sd", "--sdl-mask", "covered", "--lam-warmdown", "2"),
])
def test_every_method_runs(tmp_path, extra):
    cfg, out, rows = run(tmp_path, "r", *extra)
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss_grpo"]) and math.isfinite(r["loss_sdl"]) and r["skipped_steps"] == 0
        assert 0.0 <= r["reward"] <= 1.0 and r["groups"] == 2
    if cfg.ref_kl:
        # a KL estimate (its numbers: test_ref_kl_is_the_frozen_teacher_sdl_without_the_skill)
        assert all(math.isfinite(r["loss_ref_kl"]) and r["loss_ref_kl"] >= 0 for r in rows)
    else:
        assert all("loss_ref_kl" not in r for r in rows)
    if cfg.teacher_context == "none":
        assert all(r["loss_sdl"] == 0.0 and r["teacher_task_frac"] == 0.0 for r in rows)
    elif cfg.teacher_context == "ground-truth":
        # the privileged plan exists from iteration 1: every row has a teacher and a different prompt, so ℓ ≠ 0
        assert all(r["teacher_task_frac"] == 1.0 and r["loss_sdl"] > 0 for r in rows)
    else:
        # cold start: no skill in iteration 1 (banks are empty), skills summarised after it serve iteration 2
        assert rows[0]["teacher_task_frac"] == 0.0 and rows[0]["loss_sdl"] == 0.0
        assert rows[1]["teacher_task_frac"] == 1.0
        if cfg.sdl_mask == "all":   # covered turns: a random model's turns may all be uncovered (SDL value 0); the
            assert rows[1]["loss_sdl"] > 0      # variant's own numbers are test_sdl_mask_restricts_only_the_sdl_term
        # where the skill speaks vs elsewhere, logged for every skill teacher (random model: coverage is by chance)
        assert "covered_frac" in rows[1] and "ell_mean_uncovered" in rows[1]
        assert [r["lam"] for r in rows] == ([cfg.lam, cfg.lam / 2] if cfg.lam_warmdown else [cfg.lam] * 2)
    # the checkpoint is a plain HF folder
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "r" / "ckpt" / "model"))
    evals = [json.loads(l) for l in open(tmp_path / "r" / "eval.jsonl")]
    assert [e["iteration"] for e in evals] == [0, 2] and evals[0]["tasks"] == 4


def test_resume_matches_uninterrupted_run(tmp_path):
    _, _, full = run(tmp_path, "full", "--save-every", "2", iterations=4)
    run(tmp_path, "part", "--save-every", "2", iterations=2)
    cfg = train.parse_args(["--resume", str(tmp_path / "part"), "--iterations", "4"])
    train.train(cfg)
    resumed = [json.loads(l) for l in open(tmp_path / "part" / "log.jsonl")]
    # wall-clock times and the summariser's per-process job counters are the only fields allowed to differ
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time_") and k != "summarizer"}  # noqa: E731
    assert [strip(r) for r in resumed] == [strip(r) for r in full]
    a, b = params(tmp_path / "full" / "ckpt" / "model"), params(tmp_path / "part" / "ckpt" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert open(tmp_path / "full/ckpt/skill_bank.json").read() == open(tmp_path / "part/ckpt/skill_bank.json").read()


def test_a_run_saved_before_old_logp_existed_resumes_with_a_forward(tmp_path):
    """config.json without "old_logp" (written before the flag): --resume keeps that run's way, a full forward."""
    run(tmp_path, "old", "--save-every", "1", "--old-logp", "forward", iterations=1)
    path = tmp_path / "old" / "config.json"
    saved = json.load(open(path))
    del saved["old_logp"]
    json.dump(saved, open(path, "w"))
    cfg = train.parse_args(["--resume", str(tmp_path / "old"), "--iterations", "2"])
    assert cfg.old_logp == "forward"
    assert train.parse_args(SMALL).old_logp == "auto"          # a new run: auto


def four_rollouts():
    """Two training tasks x 2 episodes of the random tiny model -> (model, ledgers, their prompts, log π_old (B, T)):
    the input of the ppo_update tests."""
    torch.manual_seed(0)
    model, tok = model_lib.load("tiny")
    env = make_env("sokoban", "easy", max_turns=3)
    episodes = [env.new_episode(t) for t in env.train_tasks[:2] for _ in range(2)]
    ledgers = model_lib.rollout(model, tok, episodes, model_lib.SamplingConfig(max_new_tokens=6),
                                generator=torch.Generator().manual_seed(0), step_fn=env.step_fn)
    prompts = [l.ids[: l.prompt_len] for l in ledgers]
    with torch.no_grad():
        logp_old = model_lib.score_under_prompt(model, ledgers, prompts, trainable_only=True)    # (B, T)
    return model, ledgers, prompts, logp_old


def update(cfg, model, ledgers, prompts, adv, logp_old, teacher, has_teacher, logp_ref=None, sdl_tokens=None,
           lam=None):
    """One train.ppo_update of a copy of the model on this batch -> (stats, the updated weights)."""
    m = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
    run = train.Run(cfg, train.resolve_arm(cfg), torch.device("cpu"), m, None, None, optimizer, None, None, None,
                    None, None, np.random.default_rng(0), None, dist.Single(), model_lib.LogProbs(m))
    mask = model_lib.trainable_mask(ledgers)                                      # (B, T)
    sdl_mask = mask * has_teacher[:, None] * (1.0 if sdl_tokens is None else sdl_tokens)        # (B, T)
    B = len(ledgers)
    batch = train.Batch(0, [None] * B, list(range(B)), [None] * B, [], [], everyone=[{}] * B, ledgers=ledgers,
                        student_prompts=prompts, adv=adv,
                        has_teacher=has_teacher, mask=mask, sdl_mask=sdl_mask, logp_old=logp_old, logp_teacher=teacher,
                        logp_behaviour=logp_old, logp_ref=logp_ref)
    stats = train.ppo_update(run, batch, cfg.lam if lam is None else lam)
    return stats, {k: v.clone() for k, v in m.state_dict().items()}


def test_ref_kl_is_the_frozen_teacher_sdl_without_the_skill():
    """The labelled --ref-kl variant adds β·(ρ·k3 toward θ₀ under the plain prompt): one ppo_update of GRPO + β·KL with
    reference log-probs X must step the weights exactly as Skill-SD with λ = β and a teacher whose log-probs are X."""
    model, ledgers, prompts, logp_old = four_rollouts()
    reference = logp_old + 0.3 * torch.randn(logp_old.shape, generator=torch.Generator().manual_seed(1))  # (B, T)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    results = []
    for argv, teacher, has_teacher, ref in (
            (["--method", "grpo", "--ref-kl", "0.5"], logp_old, torch.zeros(4), reference),
            (["--method", "skill-sd", "--lam", "0.5"], reference, torch.ones(4), None)):
        cfg = train.parse_args(SMALL + argv)
        results.append(update(cfg, model, ledgers, prompts, adv, logp_old, teacher, has_teacher, logp_ref=ref))
    (a, wa), (b, wb) = results
    assert a["loss_ref_kl"] == pytest.approx(b["loss_sdl"], rel=1e-6) and a["loss_ref_kl"] > 0
    assert a["loss_grpo"] == pytest.approx(b["loss_grpo"], rel=1e-6)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-7) for k in wa)
    assert not all(torch.equal(wa[k], v) for k, v in model.state_dict().items())


def test_covered_tokens_mark_whole_turns_by_what_the_policy_read():
    """covered_tokens marks a turn's trainable run iff covers(skill, text read since the previous reply) is true; here
    covers reads the turn counter of the observation, so the expected mask is exactly each ledger's second turn."""
    import itertools
    torch.manual_seed(0)
    model, tok = model_lib.load("tiny")
    env = make_env("sokoban", "easy", max_turns=3)
    episodes = [env.new_episode(t) for t in env.train_tasks[:3]]
    ledgers = model_lib.rollout(model, tok, episodes, model_lib.SamplingConfig(max_new_tokens=6),
                                generator=torch.Generator().manual_seed(0), step_fn=env.step_fn)
    covers = lambda skill, text: skill == "s" and "Turn 2/3" in text
    got = train.covered_tokens(ledgers, tok, ["s", "s", ""], covers, torch.device("cpu"))
    assert got.shape == (3, max(len(l.ids) for l in ledgers))
    for b, l in enumerate(ledgers):
        runs, j = [], 0
        for flag, group in itertools.groupby(l.trainable):
            n = len(list(group))
            runs += [(j, j + n)] if flag else []
            j += n
        want = torch.zeros(got.shape[1])
        if b < 2 and len(runs) >= 2:
            want[runs[1][0]:runs[1][1]] = 1.0
        assert torch.equal(got[b], want), b
    assert got[:2].sum() > 0 and got[2].sum() == 0


def test_sdl_mask_restricts_only_the_sdl_term():
    """ppo_update's sdl_tokens (--sdl-mask covered): all zeros steps exactly like GRPO, all ones exactly like no mask,
    a partial mask like neither."""
    model, ledgers, prompts, logp_old = four_rollouts()
    teacher = logp_old + 0.5 * torch.randn(logp_old.shape, generator=torch.Generator().manual_seed(1))  # (B, T)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    half = model_lib.trainable_mask(ledgers)                                          # (B, T)
    half[:, ::2] = 0.0                                                     # every other trainable position only
    cfg = train.parse_args(SMALL + ["--method", "skill-sd", "--lam", "0.5"])
    weights = {}
    for name, tokens, has in (("grpo", None, torch.zeros(4)), ("zeros", torch.zeros(logp_old.shape), torch.ones(4)),
                              ("all", None, torch.ones(4)), ("ones", torch.ones(logp_old.shape), torch.ones(4)),
                              ("half", half, torch.ones(4)), ("lam0", None, torch.ones(4))):
        weights[name] = update(cfg, model, ledgers, prompts, adv, logp_old, teacher, has, sdl_tokens=tokens,
                               lam=0.0 if name == "lam0" else None)[1]
    same = lambda a, b: all(torch.allclose(weights[a][k], weights[b][k], atol=1e-7) for k in weights[a])
    assert same("zeros", "grpo") and same("ones", "all") and same("lam0", "grpo")
    assert not same("half", "grpo") and not same("half", "all") and not same("grpo", "all")


def test_lam_warmdown_schedule():
    """--lam-warmdown K: λ·(1 − it/K) for 0-based iterations, 0 from K on; 0 (the default) keeps the paper's constant."""
    cfg = train.parse_args(SMALL + ["--lam", "0.1", "--lam-warmdown", "20"])
    assert [train.lam_at(cfg, it) for it in (0, 5, 10, 19, 20, 39)] == pytest.approx([0.1, 0.075, 0.05, 0.005, 0, 0])
    assert train.lam_at(train.parse_args(SMALL + ["--lam", "0.1"]), 39) == 0.1


BAD_TRAIN_FLAGS = [   # (flags, the flag the one-line message must name)
    (["--method", "ppo"], "--method"), (["--env", "chess"], "--env"), (["--preset", "medium"], "--preset"),
    (["--reward", "x"], "--reward"), (["--teacher-weights", "x"], "--teacher-weights"),
    (["--rollout-by", "x"], "--rollout-by"), (["--teacher-context", "x"], "--teacher-context"),
    (["--sdl-mask", "some"], "--sdl-mask"), (["--summarizer", "x"], "--summarizer"),
    (["--iterations", "0"], "--iterations"), (["--tasks-per-iter", "0"], "--tasks-per-iter"),
    (["--group-size", "1"], "--group-size"), (["--max-turns", "0"], "--max-turns"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"), (["--format-penalty", "-0.1"], "--format-penalty"),
    (["--lr", "0"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--weight-decay", "-1"], "--weight-decay"), (["--grad-clip", "0"], "--grad-clip"),
    (["--mini-batches", "0"], "--mini-batches"), (["--epochs", "0"], "--epochs"),
    (["--micro-batch-size", "-1"], "--micro-batch-size"), (["--clip-low", "1"], "--clip-low"),
    (["--clip-high", "-0.1"], "--clip-high"), (["--lam", "-1"], "--lam"), (["--lam", "nan"], "--lam"),
    (["--lam-warmdown", "-5"], "--lam-warmdown"), (["--ref-kl", "-1"], "--ref-kl"),
    (["--skills-per-group", "-1"], "--skills-per-group"), (["--skills-per-group", "9"], "--skills-per-group"),
    (["--bank-capacity", "0"], "--bank-capacity"), (["--ucb-c", "-1"], "--ucb-c"),
    (["--eval-every", "-1"], "--eval-every"), (["--train-tasks", "-1"], "--train-tasks"),
    (["--eval-samples", "0"], "--eval-samples"), (["--eval-temperature", "-1"], "--eval-temperature"),
    (["--eval-tasks", "-1"], "--eval-tasks"), (["--save-every", "-1"], "--save-every"), (["--seed", "-1"], "--seed"),
    (["--threads", "-1"], "--threads"), (["--appworld-slots", "-1"], "--appworld-slots"),
    (["--tasks-per-iter", "100000"], "--tasks-per-iter"),
    (["--method", "grpo", "--teacher-weights", "frozen"], "--teacher-weights"),
    (["--summarizer", "http"], "--summarizer-url"), (["--summarizer", "model"], "--summarizer-model"),
    (["--ref-kl", "0.1", "--rollout-by", "teacher"], "--ref-kl"), (["--rollout-by", "teacher", "--method", "grpo"],
                                                                   "--rollout-by"),
    (["--sdl-mask", "covered", "--method", "grpo"], "--sdl-mask"), (["--resume", "x", "--overwrite"], "--resume"),
    (["--old-logp", "x"], "--old-logp"), (["--old-logp", "rollout", "--rollout-by", "teacher"], "--old-logp"),
]


@pytest.mark.parametrize("flags, named", BAD_TRAIN_FLAGS, ids=[" ".join(f) for f, _ in BAD_TRAIN_FLAGS])
def test_bad_flags_give_one_clear_line_before_any_model_loads(flags, named, monkeypatch, tmp_path):
    """Each bad value or combination ends in SystemExit with a one-line message that names the flag (exit status 1),
    from parse_args alone: nothing is loaded or written."""
    monkeypatch.setattr(train.model_lib, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    if flags[:2] == ["--resume", "x"]:
        flags = ["--resume", str(tmp_path), "--overwrite"]
        (tmp_path / "config.json").write_text(json.dumps({"method": "skill-sd"}))
    with pytest.raises(SystemExit) as info:
        train.parse_args(flags)
    message = info.value.code
    assert isinstance(message, str) and named in message and "\n" not in message, message


def test_bad_flags_give_clear_errors():
    with pytest.raises(SystemExit, match="--preset 'medium'"):
        eval_lib.main(["--model", "tiny", "--preset", "medium"])
    with pytest.raises(SystemExit, match="no run there"):
        train.parse_args(["--resume", os.devnull + "-missing-run"])


BAD_EVAL_FLAGS = [(["--samples", "0"], "--samples"), (["--split", "foo"], "--split"), (["--env", "x"], "--env"),
                  (["--temperature", "-1"], "--temperature"), (["--max-turns", "0"], "--max-turns"),
                  (["--max-new-tokens", "0"], "--max-new-tokens"), (["--batch-size", "0"], "--batch-size"),
                  (["--seed", "-1"], "--seed"), (["--with-skill", "/no/bank.json"], "--with-skill")]


@pytest.mark.parametrize("flags, named", BAD_EVAL_FLAGS, ids=[" ".join(f) for f, _ in BAD_EVAL_FLAGS])
def test_eval_refuses_bad_flags_before_loading(flags, named, monkeypatch):
    monkeypatch.setattr(eval_lib.model_lib, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit) as info:
        eval_lib.main(["--model", "tiny", *flags])
    assert isinstance(info.value.code, str) and named in info.value.code


def test_eval_is_independent_of_batch_size():
    torch.manual_seed(0)
    model, tok = model_lib.load("tiny")
    env = make_env("sokoban", "easy", max_turns=3)
    tasks = env.test_tasks[:3]
    kw = dict(samples=2, temperature=1.0, max_new_tokens=6, seed=5)
    a = eval_lib.evaluate(model, tok, env, tasks, batch_size=6, **kw)
    b = eval_lib.evaluate(model, tok, env, tasks, batch_size=1, **kw)
    assert a == b
    assert a["episodes"] == 6 and 0 <= a["acc"] <= a["pass@2"] <= 1


def test_rho_is_one_on_the_first_mini_batch_inside_the_update():
    """log π_old comes from one batched forward (one padding), the update recomputes log π_θ with grad in permuted
    micro-batches of 3 (other padding): with a single mini-batch every micro-batch runs before the step, so the PPO
    ratio and ρ must be 1 to float precision there."""
    model, ledgers, prompts, logp_old = four_rollouts()
    teacher = logp_old + 0.5 * torch.randn(logp_old.shape, generator=torch.Generator().manual_seed(1))  # (B, T)
    cfg = train.parse_args(SMALL + ["--method", "skill-sd", "--lam", "0.5", "--mini-batches", "1"])
    stats, _ = update(cfg, model, ledgers, prompts, torch.tensor([1.0, -1.0, 0.5, -0.5]), logp_old, teacher,
                      torch.ones(4))
    for key in ("ratio_max", "ratio_min", "ratio_mean", "rho_max", "rho_mean"):
        assert abs(stats[key] - 1.0) < 1e-5, (key, stats[key])
    cfg2 = train.parse_args(SMALL + ["--method", "skill-sd", "--lam", "0.5", "--mini-batches", "2"])
    stats2, _ = update(cfg2, model, ledgers, prompts, torch.tensor([1.0, -1.0, 0.5, -0.5]), logp_old, teacher,
                       torch.ones(4))
    assert stats2["ratio_max"] - 1.0 > 1e-4          # the second mini-batch sees θ ≠ θ_old: the check can fail


@pytest.mark.parametrize("old_logp", ["forward", "rollout"])
def test_rho_is_one_on_the_first_mini_batch_at_temperature_0_7(tmp_path, monkeypatch, old_logp):
    """A run sampling at T = 0.7 scores log π_old, the teacher and the update's log π_θ at the same temperature: on the
    first of one mini-batch per iteration the PPO ratio and ρ are 1, and log π_old equals the sampler's own
    log-probs recorded in the ledger (an untempered score would miss them by far more). With --old-logp rollout
    log π_old *is* the recorded one, so ratio = 1 checks the update's forward against the cached decode."""
    seen, real = [], train.ppo_update

    def spy(run, batch, lam, **kw):
        assert run.old_logp == old_logp
        stats = real(run, batch, lam, **kw)
        seen.append((batch, stats))
        return stats

    monkeypatch.setattr(train, "ppo_update", spy)
    run(tmp_path, "t07", "--temperature", "0.7", "--mini-batches", "1", "--old-logp", old_logp, iterations=2)
    for batch, stats in seen:
        assert abs(stats["ratio_max"] - 1) < 1e-5 and abs(stats["ratio_min"] - 1) < 1e-5
        for b, L in enumerate(batch.ledgers):
            t = torch.tensor(L.trainable).bool()
            assert (batch.logp_old[b, :len(L.ids)][t] - torch.tensor(L.logprobs)[t]).abs().max() < 1e-4
    assert abs(seen[1][1]["rho_max"] - 1) < 1e-5


def test_old_logp_auto_takes_the_rollouts_log_probs_only_where_they_are_the_forwards():
    """auto: the recorded log-probs in fp32 when the student samples; a full forward under bf16 autocast (on CUDA by
    default, or asked for) and when the teacher samples (its tokens' student log-probs were never recorded)."""
    def source(flags, device="cpu"):
        cfg = train.parse_args(SMALL + flags)
        return train.resolve_old_logp(cfg, train.resolve_arm(cfg), torch.device(device))

    assert train.parse_args(SMALL).old_logp == "auto" and source([]) == "rollout"
    assert source([], "cuda") == "forward"                                      # auto autocast: bf16 on CUDA
    assert source(["--autocast", "bf16"]) == "forward"
    assert source(["--autocast", "fp32"], "cuda") == "rollout"
    assert source(["--method", "skill-sd", "--rollout-by", "teacher"]) == "forward"
    assert source(["--old-logp", "forward"]) == "forward"


def test_bf16_autocast_on_cpu_keeps_rho_at_one(tmp_path, monkeypatch):
    """--autocast bf16: log π_old, the teacher and the update's log π_θ all run under bf16 autocast (fp32 weights), so
    with one row per forward (the CPU default) the first of one mini-batch still has ρ = ratio = 1; and log π_old
    really is bf16's (off the fp32 score by more than float noise), so the check can fail. (With 3 rows per forward
    the update's permuted micro-batches pad differently from the scoring pass, and bf16 rounds the two apart: the
    ratio then lies 5e-4 from 1 on the first mini-batch, where fp32 stays within 1e-6.)"""
    seen, real = [], train.ppo_update

    def spy(run, batch, lam, **kw):
        with torch.no_grad():
            fp32 = model_lib.score_under_prompt(run.model, batch.ledgers, batch.student_prompts, trainable_only=True)
        stats = real(run, batch, lam, **kw)
        seen.append((batch, stats, fp32))
        return stats

    monkeypatch.setattr(train, "ppo_update", spy)
    run(tmp_path, "bf16", "--autocast", "bf16", "--mini-batches", "1", "--micro-batch-size", "1", iterations=2)
    for batch, stats, fp32 in seen:
        assert abs(stats["ratio_max"] - 1) < 1e-5 and abs(stats["ratio_min"] - 1) < 1e-5
        assert (batch.logp_old - fp32)[batch.mask.bool()].abs().max() > 1e-4
    assert abs(seen[1][1]["rho_max"] - 1) < 1e-5


def assert_trains_alike(logs_a, logs_b):
    """Two runs' log rows: the same rewards, evaluations and banks, losses and grad norms within float noise."""
    for a, b in zip(logs_a, logs_b):
        assert (a["reward"], a["acc"], a["bank"]) == (b["reward"], b["acc"], b["bank"])
        for k in ("loss_grpo", "loss_sdl", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), k


def test_packed_micro_batches_train_as_padded_ones(tmp_path):
    """--pack runs each micro-batch of 3 rows as one packed row in scoring and updates: the same rewards and draws,
    losses within float noise, the same weights to 1e-5 (model.score's parity test bounds the log-probs)."""
    _, _, plain = run(tmp_path, "padded", iterations=2)
    _, _, packed = run(tmp_path, "packed", "--pack", iterations=2)
    assert_trains_alike(plain, packed)
    wa, wb = params(tmp_path / "padded" / "ckpt" / "model"), params(tmp_path / "packed" / "ckpt" / "model")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5


def test_compiled_decoding_trains_as_the_dynamic_path(tmp_path):
    """--compile decodes rollouts and evaluations with model.StaticDecoder (inductor on the CPU): the same draws
    (the logits agree to ~1e-6, so every sampled token is the same), rewards, evaluations and losses."""
    _, _, plain = run(tmp_path, "dynamic", iterations=2)
    _, _, compiled = run(tmp_path, "compiled", "--compile", iterations=2)
    assert_trains_alike(plain, compiled)


def spy_run(tmp_path, monkeypatch, name, *extra, iterations=3):
    """A SMALL run that records, at every update, the batch and the teacher's expected log-probs scored afresh:
    with the current weights (θ_old) and with θ₀ (a freshly built "tiny" model), under the skill prompt."""
    seen = []
    real = train.ppo_update
    theta0 = model_lib.load("tiny", device="cpu")[0]

    def spy(run, batch, lam, **kw):
        prompts = [model_lib.encode_prompt(run.tokenizer, skills_lib.with_skill(m, c.text, header=c.header) if c else m)
                   for m, c in zip(batch.plain, batch.contexts)]
        with torch.no_grad():
            now = model_lib.score_under_prompt(run.model, batch.ledgers, prompts, trainable_only=True)    # (B, T)
            base = model_lib.score_under_prompt(theta0, batch.ledgers, prompts, trainable_only=True)      # (B, T)
        seen.append((batch, now, base))
        return real(run, batch, lam, **kw)

    monkeypatch.setattr(train, "ppo_update", spy)
    run(tmp_path, name, *extra, iterations=iterations)
    return seen


@pytest.mark.parametrize("weights", ["dynamic", "frozen"])
def test_the_teacher_is_theta_old_or_theta_0(tmp_path, monkeypatch, weights):
    """Dynamic: iteration k's teacher log-probs are the current (pre-update) weights under the skill prompt, and differ
    from θ₀ once training has moved the weights; frozen: they are θ₀'s, and differ from the current weights."""
    seen = spy_run(tmp_path, monkeypatch, weights, "--method", "skill-sd", "--teacher-weights", weights)
    for it, (batch, now, base) in enumerate(seen):
        rows = batch.has_teacher.bool()
        if not rows.any():
            assert it == 0                            # cold start only
            continue
        m = batch.sdl_mask.bool()
        want, other = (now, base) if weights == "dynamic" else (base, now)
        assert (batch.logp_teacher - want)[m].abs().max() < 1e-5
        # a row without a teacher is not scored by one: it keeps log π_old (and is out of L_SDL)
        assert torch.equal(batch.logp_teacher[~rows], batch.logp_old[~rows])
    # iteration 1 has no teacher and (random model, all rewards 0) flat groups: no step; iteration 2's SDL moves the
    # weights, so at iteration 3 θ_old and θ₀ differ and the teacher is the one it should be
    assert sum(b.has_teacher.bool().any() for b, _, _ in seen) == 2
    batch, now, base = seen[-1]
    m = batch.sdl_mask.bool()
    assert (now - base)[m].abs().max() > 1e-3
    assert (batch.logp_teacher - (base if weights == "dynamic" else now))[m].abs().max() > 1e-3


def test_the_student_never_sees_a_skill(tmp_path, monkeypatch):
    """Every prompt the student samples under (training and evaluation) is plain in Skill-SD; in skill-augmented GRPO
    the training prompts carry the skill from iteration 2 on and the evaluation prompts never do."""
    for method in ("skill-sd", "skill-grpo"):
        calls, in_eval = [], []
        real_rollout, real_evaluate = model_lib.rollout, eval_lib.evaluate

        def rollout(model, tok, episodes, sampling, prompts=None, **kw):
            calls.append((bool(in_eval), [m[-1]["content"] for m in prompts]))
            return real_rollout(model, tok, episodes, sampling, prompts=prompts, **kw)

        def evaluate(*a, **kw):
            in_eval.append(1)
            try:
                return real_evaluate(*a, **kw)
            finally:
                in_eval.pop()

        monkeypatch.setattr(model_lib, "rollout", rollout)
        monkeypatch.setattr(eval_lib, "evaluate", evaluate)
        run(tmp_path, method, "--method", method, iterations=3)
        monkeypatch.undo()
        header = lambda texts: [skills_lib.SKILL_HEADER in t for t in texts]  # noqa: E731
        evals = [header(t) for e, t in calls if e]
        training = [header(t) for e, t in calls if not e]
        assert len(evals) == 2 and not any(any(h) for h in evals)
        assert len(training) == 3 and not any(training[0])
        assert all(any(h) for h in training[1:]) if method == "skill-grpo" else not any(any(h) for h in training)


def test_the_bandit_credits_the_retrieved_skill_with_its_group_reward(tmp_path, monkeypatch):
    """After iteration 2 (the first with skills) each retrieved skill has one pick, one update and reward_sum = the
    mean reward of its task's rollouts; the checkpoint's bank says so."""
    credited = []
    real = train.summarise_and_credit

    def spy(run, batch, chosen, it):
        credited.append({tid: (c.skill_id, float(np.mean([r for t, r in zip(batch.tasks, batch.rewards.tolist())
                                                          if t.task_id == tid]))) for tid, c in chosen.items() if c})
        return real(run, batch, chosen, it)

    monkeypatch.setattr(train, "summarise_and_credit", spy)
    monkeypatch.setattr(train.loss_lib, "group_advantages", train.loss_lib.group_advantages)
    run(tmp_path, "credit", "--method", "skill-sd", iterations=2)
    assert credited[0] == {} and len(credited[1]) == 2
    bank = skills_lib.SkillBank.load(str(tmp_path / "credit" / "ckpt" / "skill_bank.json"))
    for tid, (skill_id, mean) in credited[1].items():
        entry = next(e for e in bank.tasks[tid]["entries"] if e["id"] == skill_id)
        assert (entry["picks"], entry["updates"]) == (1, 1) and entry["reward_sum"] == pytest.approx(mean, abs=1e-12)
        assert sum(e["picks"] for e in bank.tasks[tid]["entries"]) == 1


def test_train_restores_the_thread_count(tmp_path):
    torch.set_num_threads(2)
    try:
        run(tmp_path, "threads", "--threads", "1", iterations=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_help_shows_the_defaults_that_apply(capsys):
    """--help names the paper's default and, where the tiny base's profile replaces it, that value too."""
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default 0.001; tiny profile: 0.1)" in out and "(default 40; tiny profile: 12)" in out
    assert "(default: None)" not in out


def test_eval_on_a_run_checkpoint_uses_the_runs_settings(tmp_path, capsys):
    """eval.py --model <run>/ckpt/model evaluates with the run's own preset, turns, tokens, samples and temperature
    (its config.json) unless a flag says otherwise: the numbers then match the run's own final evaluation."""
    cfg, out, _ = run(tmp_path, "ev", "--eval-samples", "2", "--eval-temperature", "1.0", iterations=1)
    model_dir = str(tmp_path / "ev" / "ckpt" / "model")
    assert eval_lib.run_defaults(model_dir) == {"env": "sokoban", "preset": "easy", "max_turns": 3,
                                                "max_new_tokens": 6, "samples": 2, "temperature": 1.0, "seed": 0}
    assert eval_lib.run_defaults(str(tmp_path)) == {}
    capsys.readouterr()
    eval_lib.main(["--model", model_dir, "--out", str(tmp_path / "m.json")])
    got = json.load(open(tmp_path / "m.json"))
    # the run evaluated its first 4 test levels (--eval-tasks 4); this is all 64 with the run's settings and per-episode
    # generators, so its first 4 levels reproduce the run's own final evaluation exactly
    final = [json.loads(l) for l in open(tmp_path / "ev" / "eval.jsonl")][-1]
    assert got["samples"] == 2 and got["tasks"] == 64 and final["tasks"] == 4
    assert sum(list(got["per_task_success"].values())[:4]) / 4 == pytest.approx(final["acc"], abs=1e-12)
    eval_lib.main(["--model", model_dir, "--samples", "1", "--out", str(tmp_path / "g.json")])
    assert json.load(open(tmp_path / "g.json"))["samples"] == 1                  # a flag given wins


def test_logged_clip_fraction_uses_the_advantages_and_the_behaviour_policy(monkeypatch):
    """diagnostics gets each micro-batch's advantages (so clip_frac counts only where the clip binds: r > 1 + ε_h with
    A > 0, r < 1 − ε_l with A < 0) and the same denominator as the loss (log π_old on-policy)."""
    model, ledgers, prompts, logp_old = four_rollouts()
    seen, real = [], train.loss_lib.diagnostics

    def spy(logp, behaviour, teacher, mask, clip_low, clip_high, advantages=None, sdl_mask=None):
        seen.append((behaviour.clone(), advantages.clone(), mask.clone()))
        return real(logp, behaviour, teacher, mask, clip_low, clip_high, advantages=advantages, sdl_mask=sdl_mask)

    monkeypatch.setattr(train.loss_lib, "diagnostics", spy)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    cfg = train.parse_args(SMALL + ["--method", "grpo"])
    update(cfg, model, ledgers, prompts, adv, logp_old, logp_old, torch.zeros(4))
    assert sorted(round(float(x), 2) for _, a, _ in seen for x in a) == sorted(adv.tolist())   # every row once
    for behaviour, a, mask in seen:
        row = [int(torch.nonzero((adv == v)).flatten()[0]) for v in a]
        T = behaviour.shape[1]
        assert torch.equal(behaviour, logp_old[row, :T])


def test_normalisation_options_change_only_their_terms_denominator():
    """One mini-batch at θ_old: --sdl-norm teacher divides L_SDL by the tokens that have a teacher instead of all,
    --grpo-norm drop-flat divides L_GRPO by the tokens of rows with a nonzero advantage: the values scale by exactly
    the ratio of the counts, and the other term is untouched."""
    model, ledgers, prompts, logp_old = four_rollouts()
    teacher = logp_old + 0.5 * torch.randn(logp_old.shape, generator=torch.Generator().manual_seed(1))  # (B, T)
    adv, has = torch.tensor([1.0, -1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    mask = model_lib.trainable_mask(ledgers)
    n_all, n_teacher = float(mask.sum()), float((mask * has[:, None]).sum())
    n_live = float(mask[:2].sum())
    base = ["--method", "skill-sd", "--lam", "0.5", "--mini-batches", "1"]
    stats = {name: update(train.parse_args(SMALL + base + flags), model, ledgers, prompts, adv, logp_old, teacher,
                          has)[0] for name, flags in (("all", []), ("teacher", ["--sdl-norm", "teacher"]),
                                                      ("drop", ["--grpo-norm", "drop-flat"]))}
    assert stats["teacher"]["loss_sdl"] == pytest.approx(stats["all"]["loss_sdl"] * n_all / n_teacher, rel=1e-6)
    assert stats["teacher"]["loss_grpo"] == pytest.approx(stats["all"]["loss_grpo"], rel=1e-9)
    assert stats["drop"]["loss_grpo"] == pytest.approx(stats["all"]["loss_grpo"] * n_all / n_live, rel=1e-6)
    assert stats["drop"]["loss_sdl"] == pytest.approx(stats["all"]["loss_sdl"], rel=1e-9)
    assert n_teacher < n_all and n_live < n_all                       # the check can fail


def test_the_gradient_ratio_proxy_is_the_norm_ratio_at_the_loss_input():
    """At θ_old (one mini-batch) ∂(λ·L_SDL)/∂log π = λ·ℓ/N on tokens with a teacher and ∂L_GRPO/∂log π = −A/N on all
    trainable tokens, so the logged ratio is ‖λ·ℓ‖ / ‖A‖ over those tokens."""
    model, ledgers, prompts, logp_old = four_rollouts()
    teacher = logp_old + 0.5 * torch.randn(logp_old.shape, generator=torch.Generator().manual_seed(1))  # (B, T)
    adv, has = torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.tensor([1.0, 1.0, 0.0, 1.0])
    cfg = train.parse_args(SMALL + ["--method", "skill-sd", "--lam", "0.5", "--mini-batches", "1"])
    stats, _ = update(cfg, model, ledgers, prompts, adv, logp_old, teacher, has)
    mask = model_lib.trainable_mask(ledgers).bool()
    ell = (logp_old - teacher)[mask & has.bool()[:, None]]                                       # (N',)
    a = adv[:, None].expand_as(mask)[mask]                                                       # (N,)
    assert stats["grad_ratio_sdl_grpo"] == pytest.approx(float((0.5 * ell).norm() / a.norm()), rel=1e-4)
    flat, _ = update(cfg, model, ledgers, prompts, torch.zeros(4), logp_old, teacher, has)
    assert flat["grad_ratio_sdl_grpo"] == math.inf                    # no GRPO signal at all: SDL alone moves


def test_skill_credit_source_ranks_skills_by_their_episode_and_credits_the_next_visit(tmp_path):
    """--skill-credit source: a bank that seeds each skill with its source episode's reward picks a success's skill
    over a newer failure's; in a run, the skill picked at a visit is credited at the task's next visit."""
    bank = skills_lib.SkillBank(prior_from_source=True)
    win, loss = skills_lib.Skill("won", "-", "1. up"), skills_lib.Skill("lost", "-", "none")
    bank.add("t", win, {"reward": 1.0, "success": True})
    bank.add("t", loss, {"reward": 0.0, "success": False})
    assert bank.retrieve("t")[1] == win and not bank.last_untried
    plain = skills_lib.SkillBank()
    plain.add("t", win, {"reward": 1.0, "success": True})
    plain.add("t", loss, {"reward": 0.0, "success": False})
    assert plain.retrieve("t")[1] == loss and plain.last_untried     # the paper's letter: the newest untried
    cfg, _, rows = run(tmp_path, "src", "--method", "skill-sd", "--skill-credit", "source", iterations=3)
    assert [r["picks"] for r in rows] == [0, 2, 2] and all(r["untried_picks"] == 0 for r in rows)
    state = torch.load(str(tmp_path / "src" / "ckpt" / "trainer_state.pt"), weights_only=False)
    bank = skills_lib.SkillBank.load(str(tmp_path / "src" / "ckpt" / "skill_bank.json"))
    assert set(state["pending_credit"]) == {t.task_id for t in make_env("sokoban", "easy").train_tasks[:2]}
    for tid, entries in bank.tasks.items():
        picked = [e for e in entries["entries"] if e["picks"]]
        # picked at iteration 2 (credited at 3: prior + 1 update) and at 3 (pending: prior only), or once twice
        assert sum(e["updates"] - e["prior"] for e in picked) == 1
    g, _, grows = run(tmp_path, "grp", "--method", "skill-sd", iterations=3)
    assert grows[1]["untried_picks"] == 2 and grows[1]["exploit_picks"] == 0          # per iteration, not cumulative
    assert all(r["untried_picks"] + r["exploit_picks"] == r["picks"] for r in grows)


def test_logged_update_diagnostics_do_not_depend_on_the_micro_batches():
    """update_stats combines the micro-batches' loss.diagnostics as one pass over all their tokens: token-weighted
    means (the teacher's over the tokens that have one), maxima, minima and summed counts equal diagnostics() of the
    whole batch; an unweighted mean of micro-batch means (the check can fail) does not."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    mask = (torch.rand(B, T, generator=g) < 0.6).float()
    mask[0] = 0.0                                                          # a row with no trainable token
    mask[1, :8] = 1.0                                                      # rows of very different lengths
    logp = -torch.rand(B, T, generator=g) * 3
    old = logp + 0.2 * torch.randn(B, T, generator=g)
    tea = logp + 0.5 * torch.randn(B, T, generator=g) + 90.0 * (torch.rand(B, T, generator=g) < 0.15)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0])
    sdl = mask * torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])[:, None]
    whole = train.loss_lib.diagnostics(logp, old, tea, mask, advantages=adv, sdl_mask=sdl)
    parts = [train.loss_lib.diagnostics(logp[r], old[r], tea[r], mask[r], advantages=adv[r], sdl_mask=sdl[r])
             for r in ([0, 2], [1], [3, 4, 5])]
    out = train.update_stats({}, {"grpo": 1.0, "sdl": 1.0}, parts, dist.Single())
    for key in ("tokens", "clip_frac", "clip_frac_high", "ratio_mean", "ratio_max", "ratio_min", "logp_mean",
                "teacher_frac", "ell_mean", "k3_mean", "rho_mean", "rho_max", "guard_exp_neg_ell", "guard_log_rho"):
        assert out[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-12), key
    assert whole["guard_exp_neg_ell"] > 0 and whole["tokens"] > 0
    naive = float(np.mean([p["ratio_mean"] for p in parts]))
    assert abs(naive - whole["ratio_mean"]) > 1e-3


@pytest.mark.parametrize("method, adv, has", [
    ("grpo", [1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),        # a flat group: its 2 rows run forward only
    ("skill-sd", [0.0, 0.0, 0.5, -0.5], [1.0, 0.0, 0.0, 0.0]),    # row 1: flat and untaught
    ("grpo", [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),         # nothing moves: AdamW steps on the zero gradient
])
def test_rows_without_gradient_run_forward_only_and_the_step_is_the_same(monkeypatch, method, adv, has):
    """Rows with a zero advantage and no teacher add exactly 0 to the gradient: ppo_update runs them without a
    backward (after the others' forward+backward passes are cut), and the weights after the update, the losses and
    the logged diagnostics equal an update that runs every row with a backward (rows_with_gradient -> every row)."""
    model, ledgers, prompts, logp_old = four_rollouts()
    teacher = logp_old + 0.5 * torch.randn(logp_old.shape, generator=torch.Generator().manual_seed(1))  # (B, T)
    adv, has = torch.tensor(adv), torch.tensor(has)
    cfg = train.parse_args(SMALL + ["--method", method, "--lam", "0.5", "--micro-batch-size", "1"])
    calls, inner = [], train.micro_batch_losses

    def spy(run, batch, rows, norms, weights, grad=True):
        calls.append((tuple(rows), grad))
        return inner(run, batch, rows, norms, weights, grad=grad)

    monkeypatch.setattr(train, "micro_batch_losses", spy)
    skipped, w_skipped = update(cfg, model, ledgers, prompts, adv, logp_old, teacher, has)
    still = {b for b in range(4) if adv[b] == 0 and has[b] == 0}
    assert {rows for rows, grad in calls if not grad} == {(b,) for b in still} and still
    assert all(grad == (rows[0] not in still) for rows, grad in calls)
    calls.clear()
    monkeypatch.setattr(train, "rows_with_gradient", lambda run, batch: set(range(len(batch.everyone))))
    every, w_every = update(cfg, model, ledgers, prompts, adv, logp_old, teacher, has)
    assert all(grad for _, grad in calls) and len(calls) == 4
    for k in w_every:
        assert torch.allclose(w_skipped[k], w_every[k], atol=1e-7), k
    assert not all(torch.equal(w_every[k], v) for k, v in model.state_dict().items())   # the update moved
    for key in ("loss_grpo", "loss_sdl", "grad_norm", "tokens", "ratio_mean", "logp_mean", "clip_frac"):
        assert skipped[key] == pytest.approx(every[key], rel=1e-6, abs=1e-9), key
