"""Run train.py as one torchrun rank and make rank 1 raise at a chosen point, for tests/test_dist.py.

    torchrun --nproc_per_node 2 tests/dist_fault_runner.py POINT N -- <train.py flags>

POINT: update (the N-th call of train.ppo_update on rank 1 raises RuntimeError("injected fault")).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402


def raise_on_call(fn, n):
    count = [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] == n and os.environ.get("RANK") == "1":
            raise RuntimeError("injected fault")
        return fn(*args, **kwargs)
    return wrapped


if __name__ == "__main__":
    point, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[4:]
    if point != "update":
        raise SystemExit(f"unknown point {point!r}")
    train.ppo_update = raise_on_call(train.ppo_update, n)
    train.train(train.parse_args(argv))
