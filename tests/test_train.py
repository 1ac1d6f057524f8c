"""Smoke runs of every method and ablation on the tiny model (CPU, a few iterations), resume equality, and eval.py's
independence from the batch size. These check the wiring of train.py numerically: logged losses are finite, the SDL
term is exactly zero where there is no teacher and positive where there is one, checkpoints load in plain
transformers, and an interrupted + resumed run equals an uninterrupted one bit for bit."""
import copy
import json
import math
import os

import pytest
import torch

import eval as eval_lib
import model as model_lib
import train

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine run far slower with 2 threads than with 1 (contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
        # (with --sdl-mask covered a random model's turns may all be uncovered, so its SDL value may be 0)
        assert rows[1]["teacher_task_frac"] == 1.0 and (rows[1]["loss_sdl"] > 0 or cfg.sdl_mask == "covered")
        # where the skill speaks vs elsewhere, logged for every skill teacher (random model: coverage is by chance)
        assert 0.0 <= rows[1]["covered_frac"] <= 1.0 and "ell_mean_uncovered" in rows[1]
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


def four_rollouts():
    """Two training tasks x 2 episodes of the random tiny model -> (model, ledgers, their prompts, log π_old (B, T)):
    the input of the ppo_update tests."""
    torch.manual_seed(0)
    model, tok = model_lib.load("tiny")
    env = eval_lib.make_env("sokoban", "easy", max_turns=3)
    episodes = [env.new_episode(t) for t in env.train_tasks[:2] for _ in range(2)]
    ledgers = model_lib.rollout(model, tok, episodes, model_lib.SamplingConfig(max_new_tokens=6),
                                generator=torch.Generator().manual_seed(0), step_fn=env.step_fn)
    prompts = [l.ids[: l.prompt_len] for l in ledgers]
    with torch.no_grad():
        logp_old = model_lib.score_under_prompt(model, ledgers, prompts, trainable_only=True)    # (B, T)
    return model, ledgers, prompts, logp_old


def test_ref_kl_is_the_frozen_teacher_sdl_without_the_skill():
    """The labelled --ref-kl variant adds β·(ρ·k3 toward θ₀ under the plain prompt): one ppo_update of GRPO + β·KL with
    reference log-probs X must step the weights exactly as Skill-SD with λ = β and a teacher whose log-probs are X."""
    import numpy as np
    model, ledgers, prompts, logp_old = four_rollouts()
    reference = logp_old + 0.3 * torch.randn(logp_old.shape, generator=torch.Generator().manual_seed(1))  # (B, T)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    results = []
    for argv, teacher, has_teacher, ref in (
            (["--method", "grpo", "--ref-kl", "0.5"], logp_old, torch.zeros(4), reference),
            (["--method", "skill-sd", "--lam", "0.5"], reference, torch.ones(4), None)):
        cfg = train.parse_args(SMALL + argv)
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        stats = train.ppo_update(cfg, m, opt, ledgers, prompts, adv, logp_old, teacher, has_teacher,
                                 torch.device("cpu"), np.random.default_rng(0), logp_ref=ref)
        results.append((stats, {k: v.clone() for k, v in m.state_dict().items()}))
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
    env = eval_lib.make_env("sokoban", "easy", max_turns=3)
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
    import numpy as np
    model, ledgers, prompts, logp_old = four_rollouts()
    teacher = logp_old + 0.5 * torch.randn(logp_old.shape, generator=torch.Generator().manual_seed(1))  # (B, T)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    half = train.ledger_tensors(ledgers, torch.device("cpu"))[0]                                   # (B, T)
    half[:, ::2] = 0.0                                                     # every other trainable position only
    cfg = train.parse_args(SMALL + ["--method", "skill-sd", "--lam", "0.5"])
    weights = {}
    for name, tokens, has in (("grpo", None, torch.zeros(4)), ("zeros", torch.zeros(logp_old.shape), torch.ones(4)),
                              ("all", None, torch.ones(4)), ("ones", torch.ones(logp_old.shape), torch.ones(4)),
                              ("half", half, torch.ones(4)), ("lam0", None, torch.ones(4))):
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        train.ppo_update(cfg, m, opt, ledgers, prompts, adv, logp_old, teacher, has, torch.device("cpu"),
                         np.random.default_rng(0), sdl_tokens=tokens, lam=0.0 if name == "lam0" else None)
        weights[name] = {k: v.clone() for k, v in m.state_dict().items()}
    same = lambda a, b: all(torch.allclose(weights[a][k], weights[b][k], atol=1e-7) for k in weights[a])
    assert same("zeros", "grpo") and same("ones", "all") and same("lam0", "grpo")
    assert not same("half", "grpo") and not same("half", "all") and not same("grpo", "all")


def test_lam_warmdown_schedule():
    """--lam-warmdown K: λ·(1 − it/K) for 0-based iterations, 0 from K on; 0 (the default) keeps the paper's constant."""
    cfg = train.parse_args(SMALL + ["--lam", "0.1", "--lam-warmdown", "20"])
    assert [train.lam_at(cfg, it) for it in (0, 5, 10, 19, 20, 39)] == pytest.approx([0.1, 0.075, 0.05, 0.005, 0, 0])
    assert train.lam_at(train.parse_args(SMALL + ["--lam", "0.1"]), 39) == 0.1


def test_bad_flags_give_clear_errors():
    with pytest.raises(SystemExit, match="--method"):
        train.parse_args(["--method", "ppo"])
    with pytest.raises(SystemExit, match="ref-kl"):
        train.parse_args(["--ref-kl", "-1"])
    with pytest.raises(SystemExit, match="on-policy"):
        train.parse_args(["--ref-kl", "0.1", "--rollout-by", "teacher"])
    with pytest.raises(SystemExit, match="lam-warmdown"):
        train.parse_args(["--lam-warmdown", "-5"])
    with pytest.raises(SystemExit, match="sdl-mask"):
        train.parse_args(["--sdl-mask", "some"])
    with pytest.raises(SystemExit, match="skill teacher"):
        train.parse_args(["--sdl-mask", "covered", "--method", "grpo"])
    with pytest.raises(SystemExit, match="--preset 'medium'"):
        eval_lib.main(["--model", "tiny", "--preset", "medium"])
    with pytest.raises(SystemExit, match="--preset"):
        train.parse_args(["--preset", "medium"])
    with pytest.raises(SystemExit, match="group-size"):
        train.parse_args(["--group-size", "1"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.train(train.parse_args(["--resume", os.devnull + "-missing-run"]))


def test_eval_is_independent_of_batch_size():
    torch.manual_seed(0)
    model, tok = model_lib.load("tiny")
    env = eval_lib.make_env("sokoban", "easy", max_turns=3)
    tasks = env.test_tasks[:3]
    kw = dict(samples=2, temperature=1.0, max_new_tokens=6, seed=5)
    a = eval_lib.evaluate(model, tok, env, tasks, batch_size=6, **kw)
    b = eval_lib.evaluate(model, tok, env, tasks, batch_size=1, **kw)
    assert a == b
    assert a["episodes"] == 6 and 0 <= a["acc"] <= a["pass@2"] <= 1


def test_compare_runs_table(tmp_path, capsys):
    """Seeds of one method are averaged (mean ± s.e.), ablations get their own row under the paper's names, the base
    row comes from the iteration-0 evaluations, differences are paired by seed; written even without matplotlib."""
    runs = (("a0", {"method": "grpo", "seed": 0}, 0.25), ("a1", {"method": "grpo", "seed": 1}, 0.75),
            ("b0", {"method": "skill-sd", "seed": 0}, 0.5),
            ("c0", {"method": "skill-sd", "seed": 0, "teacher_weights": "frozen"}, 0.125),
            ("d1", {"method": "skill-sd", "seed": 1, "rollout_by": "teacher"}, 0.625),
            ("e0", {"method": "skill-sd", "seed": 0, "lam": 0.5}, 0.375),
            ("f0", {"method": "skill-sd", "seed": 0, "sdl_mask": "covered", "lam_warmdown": 20}, 0.25))
    for name, cfg, acc in runs:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "log.jsonl").write_text("".join(json.dumps({"iteration": i, "acc": 0.1 * i, "time_update": 30.0,
                                                         "entropy_proxy": 0.1 * i}) + "\n" for i in (1, 2)))
        base = 0.0 if cfg["seed"] == 0 else 0.5
        (d / "eval.jsonl").write_text(json.dumps({"iteration": 0, "acc": base, "comp": base, "seconds": 60}) + "\n"
                                      + json.dumps({"iteration": 2, "acc": acc, "comp": acc / 2, "acc_se": 0.03,
                                                    "pass@2": min(1.0, 1.5 * acc)})
                                      + "\n{broken")
    table = eval_lib.compare_runs([str(tmp_path / n) for n, _, _ in runs], str(tmp_path / "report"))
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    assert rows["Base model"][:2] == ["2", "25.0 ± 25.0"]
    assert table.splitlines()[0].count("|") == 12 and "pass@2 (%)" in table.splitlines()[0]
    # pass@2 of the two seeds: 37.5 and 100; −log π: the mean of iterations 1–2 (a quarter of 2 drops none): 0.15
    assert rows["Vanilla GRPO"] == ["2", "50.0 ± 25.0", "+25.0 ± 0.0", "–", "25.0 ± 12.5", "68.8 ± 31.2",
                                    "15.0 ± 0.0", "0.15", "3.0", "2.0"]
    assert rows["Skill-SD"][:5] == ["1", "50.0", "+50.0", "+25.0", "25.0"]   # λ shown only once two differ
    assert rows["Skill-SD (λ = 0.5)"][:4] == ["1", "37.5", "+37.5", "+12.5"]
    assert rows["Skill-SD (frozen teacher)"][:4] == ["1", "12.5", "+12.5", "-12.5"]
    assert rows["Skill-SD (teacher-owned rollouts)"][:4] == ["1", "62.5", "+12.5", "-12.5"]
    assert rows["Skill-SD (SDL on covered turns, λ → 0 at it. 20)"][:4] == ["1", "25.0", "+25.0", "+0.0"]
    assert (tmp_path / "report.md").read_text().strip() == table


def test_paper_table_keeps_finished_runs_and_reports_a_failed_one(tmp_path):
    """--paper-table: finished runs are not re-run (the table comes from their logs); a run that fails stops the
    sweep with its output; unknown arms are refused."""
    root = tmp_path / "table"
    for arm, acc in (("grpo", 0.25), ("skill-sd", 0.5)):
        d = root / f"{arm}-s0"
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"method": arm, "seed": 0, "iterations": 2}))
        (d / "log.jsonl").write_text(json.dumps({"iteration": 2, "acc": acc}) + "\n")
        (d / "eval.jsonl").write_text(json.dumps({"iteration": 0, "acc": 0.1, "comp": 0.1}) + "\n"
                                      + json.dumps({"iteration": 2, "acc": acc, "comp": acc}) + "\n")
    table = eval_lib.run_table(str(root), [0], 2, ["grpo", "skill-sd"], ["--model", "unused"])
    assert "| Skill-SD | 1 | 50.0 | +40.0 | +25.0 | 50.0 |" in table
    assert (root / "table.md").read_text().strip() == table
    assert eval_lib.run_finished(str(root / "grpo-s0")) and not eval_lib.run_finished(str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="failed"):   # seed 1 is not there: train.py starts and cannot load the model
        eval_lib.run_table(str(root), [1], 1, ["grpo"], ["--model", str(tmp_path / "no-such-model")])
    assert "no-such-model" in (root / "grpo-s1" / "train.out").read_text()
    with pytest.raises(SystemExit, match="choose from"):
        eval_lib.run_table(str(root), [0], 1, ["nope"], [])
