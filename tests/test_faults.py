"""Fault injection: a run killed with SIGKILL at several points (a rollout, an update, half-way through a checkpoint,
between the checkpoint renames) resumes to exactly the uninterrupted run (every iteration logged once, torch.equal
weights); damaged checkpoint, bank, config and log files; one run per folder (refusal, --overwrite, a live and a stale
lock); --resume keeps the run (changed flags refused, a finished run left alone); the non-finite guard; no global side
effects. CPU, the random tiny model, a few seconds per case."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import model as model_lib
import run_folder
import train

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--env", "sokoban", "--preset", "easy", "--model", "tiny", "--tasks-per-iter", "2", "--group-size", "2",
         "--max-turns", "3", "--max-new-tokens", "6", "--eval-tasks", "4", "--eval-every", "2", "--lr", "1e-3",
         "--micro-batch-size", "3", "--train-tasks", "2", "--no-curriculum", "--iterations", "4", "--save-every", "1"]
strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time_") and k not in ("summarizer", "seconds")}  # noqa


def rows(run_dir, name="log.jsonl"):
    return [json.loads(line) for line in open(os.path.join(run_dir, name))]


def weights(run_dir):
    m, _ = model_lib.load(os.path.join(run_dir, "ckpt", "model"))
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its log, evaluations and final weights."""
    d = str(tmp_path_factory.mktemp("ref") / "run")
    train.train(train.parse_args(SMALL + ["--run-dir", d]))
    return d


def assert_same_as(reference, d):
    assert [r["iteration"] for r in rows(d)] == [1, 2, 3, 4]                 # every iteration exactly once
    assert [strip(r) for r in rows(d)] == [strip(r) for r in rows(reference)]
    assert [strip(r) for r in rows(d, "eval.jsonl")] == [strip(r) for r in rows(reference, "eval.jsonl")]
    a, b = weights(reference), weights(d)
    assert all(torch.equal(a[k], b[k]) for k in a)


KILLS = [("rollout", 3), ("update", 3), ("bank-save", 2), ("rename", 2)]


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The runs killed at each point, started side by side (one thread each): point -> (run folder, returncode)."""
    root = tmp_path_factory.mktemp("killed")
    procs = {point: (str(root / point), subprocess.Popen(
        [sys.executable, os.path.join(HERE, "tests", "fault_runner.py"), point, str(n), "--", *SMALL, "--run-dir",
         str(root / point)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)) for point, n in KILLS}
    return {point: (d, proc.wait(timeout=300), proc.stderr.read()) for point, (d, proc) in procs.items()}


@pytest.mark.parametrize("point", [p for p, _ in KILLS])
def test_killed_run_resumes_to_the_uninterrupted_run(reference, killed, point):
    d, returncode, stderr = killed[point]
    assert returncode == -signal.SIGKILL, stderr[-2000:]
    assert os.path.exists(os.path.join(d, ".lock"))                          # the dead process's lock is left behind
    train.train(train.parse_args(["--resume", d]))                           # ... and taken over
    assert_same_as(reference, d)
    assert [h["event"] for h in rows(d, "history.jsonl")] == ["start", "resume"]


@pytest.mark.parametrize("damage", ["weights", "bank", "trainer-state"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, capsys, damage):
    d = str(tmp_path / "run")
    train.train(train.parse_args(SMALL + ["--run-dir", d, "--iterations", "3"]))
    path, named = {"weights": ("ckpt/model/model.safetensors", "ckpt/model/"),
                   "bank": ("ckpt/skill_bank.json", "skill_bank.json"),
                   "trainer-state": ("ckpt/trainer_state.pt", "trainer_state.pt")}[damage]
    with open(os.path.join(d, path), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(d, path)) // 3)
    capsys.readouterr()
    train.train(train.parse_args(["--resume", d, "--iterations", "4"]))
    err = capsys.readouterr().err
    assert named in err and "ckpt.prev" in err and "iteration 2" in err
    assert_same_as(reference, d)
    history = rows(d, "history.jsonl")
    assert history[-1]["event"] == "resume" and history[-1]["changed"] == {"iterations": [3, 4]}


def test_no_loadable_checkpoint_and_a_damaged_config_say_which_file(tmp_path, capsys):
    d = str(tmp_path / "run")
    train.train(train.parse_args(SMALL + ["--run-dir", d, "--iterations", "2"]))
    with open(os.path.join(d, "config.json"), "w") as f:
        f.write("{not json")
    capsys.readouterr()
    cfg = train.parse_args(["--resume", d, "--iterations", "3"])             # recovered from trainer_state.pt
    assert cfg.method == "skill-sd" and cfg.iterations == 3 and "config.json cannot be read" in capsys.readouterr().err
    for name in ("ckpt", "ckpt.prev"):
        with open(os.path.join(d, name, "skill_bank.json"), "w") as f:
            f.write("[garbage")
    with pytest.raises(SystemExit, match=r"no checkpoint can be loaded.*skill_bank.json.*--overwrite"):
        train.train(cfg)


def test_a_partial_last_log_line_is_dropped_on_resume(reference, tmp_path):
    d = str(tmp_path / "run")
    train.train(train.parse_args(SMALL + ["--run-dir", d, "--iterations", "3"]))
    with open(os.path.join(d, "log.jsonl"), "a") as f:
        f.write('{"iteration": 4, "rew')                                     # killed mid-write
    train.train(train.parse_args(["--resume", d, "--iterations", "4"]))
    assert [strip(r) for r in rows(d)] == [strip(r) for r in rows(reference)]
    # extending a finished run keeps the evaluation its end made (iteration 3) next to the new end's
    assert [e["iteration"] for e in rows(d, "eval.jsonl")] == [0, 2, 3, 4]
    a, b = weights(reference), weights(d)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_belongs_to_one_run(tmp_path, capsys):
    d = str(tmp_path / "run")
    argv = SMALL + ["--run-dir", d, "--iterations", "1"]
    train.train(train.parse_args(argv))
    with pytest.raises(SystemExit, match=r"holds another run \(config.json.*--resume .*--overwrite"):
        train.train(train.parse_args(argv))
    assert len(rows(d)) == 1                                                 # nothing was appended
    train.train(train.parse_args(argv + ["--overwrite"]))
    assert len(rows(d)) == 1 and [h["event"] for h in rows(d, "history.jsonl")] == ["start"]
    # a live writer: a process that holds the lock
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(os.path.join(d, ".lock"), "w") as f:
            json.dump({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}, f)
        with pytest.raises(SystemExit, match=f"being written by process {holder.pid}"):
            train.train(train.parse_args(["--resume", d, "--iterations", "2"]))
    finally:
        holder.kill()
        holder.wait()
    train.train(train.parse_args(["--resume", d, "--iterations", "2"]))     # its process is gone: a stale lock
    assert "stale lock" in capsys.readouterr().err and [r["iteration"] for r in rows(d)] == [1, 2]
    assert not os.path.exists(os.path.join(d, ".lock"))                     # released at the end


def test_resume_is_the_same_run(tmp_path, capsys):
    d = str(tmp_path / "run")
    train.train(train.parse_args(SMALL + ["--run-dir", d, "--iterations", "2"]))
    for flags, named in ((["--method", "grpo"], "--method 'grpo'"), (["--lr", "0.01"], "--lr 0.01"),
                         (["--model", "Qwen/Qwen3-4B"], "--model")):
        with pytest.raises(SystemExit, match=named):
            train.parse_args(["--resume", d, *flags])
    before = open(os.path.join(d, "log.jsonl")).read(), open(os.path.join(d, "eval.jsonl")).read()
    capsys.readouterr()
    out = train.train(train.parse_args(["--resume", d]))                     # finished: nothing to do
    assert "is finished (2 of 2 iterations): nothing to do" in capsys.readouterr().out
    assert (open(os.path.join(d, "log.jsonl")).read(), open(os.path.join(d, "eval.jsonl")).read()) == before
    assert out["eval"]["iteration"] == 2 and len(rows(d, "history.jsonl")) == 1
    assert rows(d, "history.jsonl")[0]["config"]["iterations"] == 2            # the original config is kept


def test_non_finite_losses_are_skipped_loudly_and_stop_the_run(tmp_path, monkeypatch, capsys):
    d = str(tmp_path / "run")
    monkeypatch.setattr(train.loss_lib, "sdl_loss", lambda logp, *a, **k: logp.sum() * float("nan"))
    with pytest.raises(SystemExit, match="3 optimizer steps in a row were skipped .*non-finite loss"):
        train.train(train.parse_args(SMALL + ["--run-dir", d]))
    assert "[guard] iteration 1: optimizer step skipped: non-finite loss" in capsys.readouterr().out
    first = rows(d)[0]
    assert first["skipped_steps"] == 2 and all("non-finite loss" in c for c in first["skip_causes"])
    assert not os.path.exists(os.path.join(d, ".lock"))


def test_non_finite_weights_after_a_step_are_undone(tmp_path, monkeypatch):
    d = str(tmp_path / "run")
    real, calls = torch.optim.AdamW.step, []

    def step(self, *a, **k):
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:                                                  # iteration 2's first step
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train.train(train.parse_args(SMALL + ["--run-dir", d, "--iterations", "3"]))
    log = rows(d)
    assert [r["skipped_steps"] for r in log] == [0, 1, 0]
    assert "non-finite weights after the step" in log[1]["skip_causes"][0]
    assert train.weights_finite(model_lib.load(os.path.join(d, "ckpt", "model"))[0])


def test_train_leaves_the_global_rng_and_threads_as_they_were(tmp_path):
    torch.manual_seed(123)
    before, threads = torch.get_rng_state(), torch.get_num_threads()
    train.train(train.parse_args(SMALL + ["--run-dir", str(tmp_path / "run"), "--iterations", "1"]))
    assert torch.equal(torch.get_rng_state(), before) and torch.get_num_threads() == threads


def test_the_paper_table_ends_its_children_on_sigterm(tmp_path):
    """--paper-table's children (here stand-ins that sleep) are ended when the table process gets SIGTERM."""
    root = tmp_path / "table"
    script = f"""
import os, sys, time
sys.path.insert(0, {HERE!r})
import report
def child(here, arm, seed, extra, d, threads=1):
    return [sys.executable, "-c", "import os, time; open(os.path.join({str(root)!r}, '%s-%d.pid'), 'w').write(str(os.getpid())); time.sleep(120)" % (arm, seed)]
report.run_command = child
report.run_table({str(root)!r}, [0], 2, ["grpo", "skill-sd"], ["--model", "unused"])
"""
    table = subprocess.Popen([sys.executable, "-c", script])
    try:
        pids = []
        for _ in range(200):
            pids = [int(open(root / f).read()) for f in ("grpo-0.pid", "skill-sd-0.pid") if (root / f).exists()
                    and (root / f).read_text()]
            if len(pids) == 2:
                break
            time.sleep(0.1)
        assert len(pids) == 2
        table.send_signal(signal.SIGTERM)
        table.wait(timeout=60)
        time.sleep(0.5)
        assert not any(run_folder._alive(p) for p in pids)
    finally:
        table.kill()


def test_the_collapse_guard_rolls_back_at_half_the_lr_and_gives_up_after_three(tmp_path, capsys):
    """--collapse-guard (labelled variant): the random model's replies are all invalid, so every iteration trips a 50%
    threshold: each trip restores the healthy checkpoint (the base, iteration 0) at half the learning rate, the log
    keeps one line per iteration, and the third roll-back is the last."""
    d = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="after 3 roll-backs"):
        train.train(train.parse_args(SMALL + ["--run-dir", d, "--collapse-guard", "--guard-format-rate", "0.5"]))
    guards = [h for h in rows(d, "history.jsonl") if h["event"] == "guard"]
    assert [g["lr"] for g in guards] == [[1e-3, 5e-4], [5e-4, 2.5e-4], [2.5e-4, 1.25e-4]]
    assert all(g["back_to"] == 0 and "format errors 100%" in g["reason"] for g in guards)
    assert [(r["iteration"], r["lr"]) for r in rows(d)] == [(1, 1.25e-4)]
    assert "rolled back to iteration 0, lr 0.001 -> 0.0005" in capsys.readouterr().out
    plain = str(tmp_path / "plain")                                  # off by default: no healthy copy, no roll-back
    train.train(train.parse_args(SMALL + ["--run-dir", plain, "--iterations", "2"]))
    assert not os.path.exists(os.path.join(plain, "ckpt.healthy")) and len(rows(plain)) == 2


def test_ctrl_c_says_how_to_continue_and_evaluate_restores_the_training_mode(tmp_path, monkeypatch):
    d = str(tmp_path / "run")
    real, calls = train.ppo_update, []

    def interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "ppo_update", interrupt)
    with pytest.raises(SystemExit, match=f"--resume {d}"):
        train.train(train.parse_args(SMALL + ["--run-dir", d]))
    assert not os.path.exists(os.path.join(d, ".lock"))
    monkeypatch.undo()
    import eval as eval_lib
    from common import make_env
    policy, tok = model_lib.load("tiny")
    policy.train()
    monkeypatch.setattr(eval_lib.model_lib, "rollout", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        env = make_env("sokoban", "easy", max_turns=3)
        eval_lib.evaluate(policy, tok, env, env.test_tasks[:2])
    assert policy.training                                                   # restored although the rollout raised
