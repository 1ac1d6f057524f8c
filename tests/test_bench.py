"""bench.py's GPU measurement runs end to end on the CPU with a small shape (the script a lent GPU runs with `python
bench.py --gpu`): its predictions and measurements come out as numbers, and the iteration it times is a real
train.py iteration of the requested size, with and without gradient checkpointing. `--phases` runs its contenders
(valid train.py flags) end to end."""
import math

import bench

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=32)


def test_gpu_script_runs_on_cpu_with_a_small_shape():
    f = bench.bench_gpu(small=True, batch=8, prompt_tokens=20, new_tokens=4, turns=2, max_new_tokens=3, tasks=2,
                        group=2, shape=TINY)
    assert f["bound"] > 0 and set(f["decode"]) == {"ours", "compiled", "hf"}
    assert all(v > 0 for v in f["decode"].values())
    assert set(f["iteration"]) == {False, True}
    for row in f["iteration"].values():
        assert row["groups"] == 2 and row["episode_turns"] <= 2
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("time_rollout", "time_teacher", "time_update"))


def test_phase_benchmark_runs_every_contender_through_train_py():
    import train
    for flags in bench.PHASE_CONTENDERS.values():                       # each is a valid train.py command line
        train.parse_args(["--env", "sokoban", *flags])
    med = bench.bench_phases(iterations=2, reps=1, model="tiny", extra=(
        "--tasks-per-iter", "2", "--group-size", "2", "--max-turns", "2", "--max-new-tokens", "4"))
    assert list(med) == list(bench.PHASE_CONTENDERS)
    assert all(m["rollout"] > 0 and m["update"] > 0 and math.isfinite(m["teacher"]) for m in med.values())
