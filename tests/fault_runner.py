"""Run train.py in this process and SIGKILL it at a chosen point, for tests/test_faults.py.

    python tests/fault_runner.py POINT N -- <train.py flags>

POINT is where the N-th call (counted from 1) kills the process: rollout (model.rollout: training and evaluation
rollouts), update (ppo_update), bank-save (SkillBank.save, inside a checkpoint write: ckpt.tmp is half written), rename
(the rename of ckpt.tmp to ckpt, after ckpt was moved to ckpt.prev: for a moment no ckpt/ exists).
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_folder  # noqa: E402
import skills  # noqa: E402
import train  # noqa: E402


def kill_on_call(fn, n, when=lambda *a, **k: True):
    count = [0]

    def wrapped(*args, **kwargs):
        if when(*args, **kwargs):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapped


if __name__ == "__main__":
    point, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[4:]
    if point == "rollout":
        train.model_lib.rollout = kill_on_call(train.model_lib.rollout, n)
    elif point == "update":
        train.ppo_update = kill_on_call(train.ppo_update, n)
    elif point == "bank-save":
        skills.SkillBank.save = kill_on_call(skills.SkillBank.save, n)
    elif point == "rename":
        run_folder.os.replace = kill_on_call(os.replace, n, lambda src, dst: src.endswith("ckpt.tmp"))
    else:
        raise SystemExit(f"unknown point {point!r}")
    train.train(train.parse_args(argv))
