"""Tests for report.py: the comparison table from run logs (labels, seeds averaged, paired differences, the base row,
unfinished runs listed), and the --paper-table launcher (finished runs kept, a failed run reported)."""
import json

import pytest

import report


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
    table = report.compare_runs([str(tmp_path / n) for n, _, _ in runs], str(tmp_path / "report"))
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
    table = report.run_table(str(root), [0], 2, ["grpo", "skill-sd"], ["--model", "unused"])
    assert "| Skill-SD | 1 | 50.0 | +40.0 | +25.0 | 50.0 |" in table
    assert (root / "table.md").read_text().strip() == table
    assert report.run_finished(report.load_run(str(root / "grpo-s0")))
    assert not report.run_finished(report.load_run(str(tmp_path / "missing")))
    with pytest.raises(SystemExit, match="failed"):   # seed 1 is not there: train.py starts and cannot load the model
        report.run_table(str(root), [1], 1, ["grpo"], ["--model", str(tmp_path / "no-such-model")])
    assert "no-such-model" in (root / "grpo-s1" / "train.out").read_text()
    with pytest.raises(SystemExit, match="choose from"):
        report.run_table(str(root), [0], 1, ["nope"], [])


def test_paired_statistics_by_exact_enumeration():
    """The sign test is the exact binomial tail (ties dropped), two-sided; the interval uses Student's t."""
    assert report.sign_test(0, 5) == pytest.approx(2 / 32)              # all 5 seeds one way: 2 * 1/32
    assert report.sign_test(3, 7) == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)
    assert report.sign_test(5, 5) == 1.0 and report.sign_test(0, 0) == 1.0
    p = report.paired_summary([-1.0, -2.0, -3.0, -4.0, -5.0, 0.0])
    se = (sum((x + 2.5) ** 2 for x in (-1, -2, -3, -4, -5, 0)) / 5) ** 0.5 / 6 ** 0.5   # sample s.d. / sqrt(n)
    assert (p["n"], p["wins"], p["losses"]) == (6, 0, 5) and p["mean"] == pytest.approx(-2.5)
    assert p["se"] == pytest.approx(se) and p["lo"] == pytest.approx(-2.5 - 2.571 * se)
    assert p["p_sign"] == pytest.approx(2 / 32)
    line = report.paired_lines([{"base": False, "label": "Skill-SD", "d_ref": [-1.0, -2.0, -3.0, -4.0, -5.0, 0.0]}],
                               "Vanilla GRPO")
    assert line.startswith("Skill-SD − Vanilla GRPO, Acc paired over 6 seeds: -2.5 ± ")
    assert "better on 0 of 6 seeds, sign test p = 0.062" in line


def test_paper_table_runs_share_the_cores_out(tmp_path, monkeypatch):
    """Each of --jobs runs gets cores // jobs torch threads (never below 1): two 2-thread runs on 2 cores would slow
    each other far more than 2x. A --threads in --train-args wins (it comes later on the command line)."""
    import train
    captured = []
    monkeypatch.setattr(report, "_run_all", lambda todo, running, jobs: captured.extend(todo))
    monkeypatch.setattr(report, "compare_runs", lambda dirs, out: "")
    monkeypatch.setattr(report.os, "cpu_count", lambda: 8)
    for jobs, extra, want in ((2, [], 4), (3, [], 2), (16, [], 1), (2, ["--threads", "3"], 3)):
        captured.clear()
        report.run_table(str(tmp_path / f"t{jobs}"), [0], jobs, ["grpo"], ["--model", "unused", *extra])
        (_, cmd), = captured
        assert train.parse_args(cmd[2:]).threads == want, (jobs, extra)
