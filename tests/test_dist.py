"""train.py under torchrun on CPU (gloo, one thread per rank): a 2-rank run equals the 1-process run with the same
settings, for skill-sd and grpo — identical rewards, evaluations and skill banks, losses and final weights within
float-reduction tolerance — with an uneven deal (3 task groups over 2 ranks: one rank pads its passes with zero-weight
work); a checkpoint resumes under another number of ranks and either wrapper (DDP, FSDP2); a rank that raises stops
every rank with its message instead of hanging; a plain run never initialises torch.distributed.

Tolerance: the 2-rank update sums each rank's gradient in a different order than one process does (DDP's
all-reduce), so gradients differ in the last float32 bits (~1e-7 relative) and AdamW carries that through its steps;
1e-5 absolute on the weights and 1e-5 relative on the loss sums is that noise with two orders of margin, far below
any real difference (one changed episode moves the weights by ~1e-3 at this learning rate)."""
import json
import os
import socket
import subprocess
import sys

import pytest

import dist
import model as model_lib

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a drastically reduced organism (tests/test_tiny_base.py's recipe, built in ~8 s): it plays, so rewards differ
# within groups and both loss terms move the weights (a random model's groups are all flat)
ORGANISM = dict(num_levels=16, steps=150, batch_size=4, warmup=5, lr=3e-3, vocab_size=420, hidden_size=64,
                num_hidden_layers=2, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
FLAGS = ["--env", "sokoban", "--preset", "easy", "--tasks-per-iter", "3", "--group-size", "4", "--max-turns", "6",
         "--max-new-tokens", "4", "--eval-tasks", "6", "--eval-every", "2", "--lr", "1e-3", "--lam", "0.1",
         "--train-tasks", "6", "--no-curriculum", "--threads", "1", "--dist-timeout", "60"]
SMALL = []   # FLAGS + --model <the organism>, filled by the organism fixture
EXACT = ("reward", "acc", "comp", "zero_var_groups", "groups", "format_error_rate", "teacher_task_frac",
         "episode_tokens", "truncated", "bank", "untried_picks", "exploit_picks", "picks")
CLOSE = ("loss_grpo", "loss_sdl", "grad_norm", "ratio_mean", "rho_mean")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, args: list, script: str = "train.py", timeout: int = 120) -> subprocess.CompletedProcess:
    """n = 1: a plain `python train.py` (torch.distributed untouched); n > 1: torchrun with n ranks on localhost."""
    head = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                                            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return subprocess.run(head + [os.path.join(HERE, script), *args], cwd=HERE, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def run(n: int, d: str, *extra: str) -> str:
    out = launch(n, SMALL + ["--run-dir", d, *extra])
    assert out.returncode == 0, out.stderr[-3000:]
    return d


def rows(d, name="log.jsonl"):
    return [json.loads(line) for line in open(os.path.join(d, name))]


def weights(d):
    return {k: v.clone() for k, v in model_lib.load(os.path.join(d, "ckpt", "model"))[0].state_dict().items()}


def assert_equivalent(a: str, b: str):
    """Rewards, picks, skills and evaluations identical; losses and weights within the reduction tolerance."""
    ra, rb = rows(a), rows(b)
    assert [r["iteration"] for r in ra] == [r["iteration"] for r in rb]
    for x, y in zip(ra, rb):
        assert {k: x.get(k) for k in EXACT} == {k: y.get(k) for k in EXACT}
        for k in CLOSE:
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-7, nan_ok=True), k
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    evals = {r["iteration"]: strip(r) for r in rows(b, "eval.jsonl")}      # a resumed run also has the first part's
    assert [strip(r) for r in rows(a, "eval.jsonl")] == [evals.get(r["iteration"]) for r in rows(a, "eval.jsonl")]
    bank = lambda d: json.load(open(os.path.join(d, "ckpt", "skill_bank.json")))  # noqa: E731
    assert bank(a) == bank(b)
    wa, wb = weights(a), weights(b)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5


@pytest.fixture(scope="module", autouse=True)
def organism(tmp_path_factory):
    """Built in a child process like the runs (inside pytest's process the same build ran up to 60x slower here)."""
    code = (f"import tiny_base; print(tiny_base.ensure_built({ORGANISM!r}, "
            f"cache_root={str(tmp_path_factory.mktemp('cache'))!r}, progress=False))")
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    SMALL[:] = FLAGS + ["--model", out.stdout.strip().splitlines()[-1]]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process runs (2 iterations), side by side (one thread each): method -> run folder."""
    root = tmp_path_factory.mktemp("single")
    procs = {m: subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *SMALL, "--run-dir", str(root / m),
                                  "--method", m, "--iterations", "2"], cwd=HERE, env=ENV, stdout=subprocess.DEVNULL,
                                 stderr=open(root / f"{m}.err", "w")) for m in ("skill-sd", "grpo")}
    for m, p in procs.items():
        assert p.wait(timeout=120) == 0, (root / f"{m}.err").read_text()[-3000:]
    return {m: str(root / m) for m in procs}


@pytest.mark.parametrize("method", ["skill-sd", "grpo"])
def test_two_ranks_equal_one_process(single, tmp_path, method):
    d = run(2, str(tmp_path / "two"), "--method", method, "--iterations", "2")
    log = rows(d)
    assert all(r["zero_var_groups"] < 3 for r in log) and all(r["loss_grpo"] != 0 for r in log)
    if method == "skill-sd":
        assert log[-1]["teacher_task_frac"] > 0     # the SDL term ran, with skills summarised on both ranks
    assert_equivalent(single[method], d)
    if method == "grpo":   # and the run learned: the weights moved from the base by far more than the tolerance
        base = model_lib.load(SMALL[-1])[0].state_dict()
        assert max(float((w - base[k]).abs().max()) for k, w in weights(d).items()) > 1e-3


@pytest.mark.parametrize("first, then", [((1,), (2, "--fsdp")), ((2, "--fsdp"), (1, "--no-fsdp"))],
                         ids=["1-to-fsdp2", "fsdp2-to-1"])
def test_resume_under_another_number_of_ranks(single, tmp_path, first, then):
    """A checkpoint has one format whatever wrote it (FSDP2 gathers its shards first), so a run resumes under any
    number of ranks and either wrapper, and ends where the uninterrupted one-process run ends."""
    d = run(first[0], str(tmp_path / "run"), "--method", "skill-sd", "--iterations", "1", *first[1:])
    out = launch(then[0], ["--resume", d, "--iterations", "2", *then[1:]])
    assert out.returncode == 0, out.stderr[-3000:]
    assert_equivalent(single["skill-sd"], d)


def test_a_rank_that_raises_stops_every_rank(tmp_path):
    """Rank 1 raises in its second update while rank 0 waits in a collective: torchrun stops rank 0, and the run
    ends with rank 1's message, well before the collective timeout."""
    out = launch(2, ["update", "2", "--", *SMALL, "--iterations", "3", "--run-dir", str(tmp_path / "run")],
                 script="tests/dist_fault_runner.py", timeout=90)
    assert out.returncode != 0
    assert "[rank 1 of 2] RuntimeError: injected fault" in out.stderr and "ChildFailedError" in out.stderr


def test_plain_run_does_not_touch_torch_distributed(tmp_path):
    import torch.distributed
    import train
    assert isinstance(dist.from_env(60, torch.device("cpu")), dist.Single)
    train.train(train.parse_args(SMALL + ["--iterations", "1", "--run-dir", str(tmp_path / "r")]))
    assert not torch.distributed.is_initialized()


def test_more_ranks_than_task_groups_and_fsdp_alone_are_refused(monkeypatch):
    import config
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit, match="torchrun started 4 processes, and each plays whole task groups"):
        config.parse_args(SMALL)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match="--fsdp shards the model over torchrun's processes"):
        config.parse_args(SMALL + ["--fsdp"])
