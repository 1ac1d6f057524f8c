"""Tests for common.py and the episode-protocol default of model.py: one-by-one stepping, the dataclass-to-argparse
bridge, JSONL logs and mean ± s.e."""
import dataclasses
import json
import math

import pytest

import env_sokoban as E
from common import append_jsonl, flag, mean_se, parse_flags, read_jsonl
from model import step_one_by_one


def test_step_episodes_batches():
    eps = [E.SokobanEpisode(lv) for lv in E.load_levels("paper", "test")[:3]]
    replies = [f"<action>{E.ACTION_NAMES[ep.level.optimal_plan[0] - 1]}</action>" for ep in eps]
    out = step_one_by_one(eps, replies)
    assert len(out) == 3 and all(isinstance(o, str) and d in (True, False) for o, d in out)
    assert all(ep.game.steps == 1 for ep in eps)
    with pytest.raises(ValueError):
        step_one_by_one(eps, replies[:2])




@dataclasses.dataclass
class Demo:
    name: str = flag("a", "a name")
    rate: float = flag(0.5, "a rate")
    count: int = flag(3, "a count")
    fast: bool = flag(False, "a switch")
    seeds: list[int] = flag(help="seeds", factory=lambda: [0, 1])
    arms: list[str] = flag(help="arms", factory=list)


def test_parse_flags_returns_only_the_given_flags_with_their_types(capsys):
    assert parse_flags(Demo, []) == {}
    got = parse_flags(Demo, ["--rate", "0.25", "--count", "7", "--no-fast", "--seeds", "3", "4", "--arms", "x"])
    assert got == {"rate": 0.25, "count": 7, "fast": False, "seeds": [3, 4], "arms": ["x"]}
    assert Demo(**got).name == "a"
    with pytest.raises(SystemExit):
        parse_flags(Demo, ["--count", "many"])
    assert "--count: invalid int value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_flags(Demo, ["--help"], notes={"rate": "profile: 0.1"})
    out = capsys.readouterr().out
    assert "(default 0.5; profile: 0.1)" in out and "(default: None)" not in out


def test_jsonl_round_trip_skips_a_partial_last_line(tmp_path):
    path = str(tmp_path / "log.jsonl")
    assert read_jsonl(path) == []
    append_jsonl(path, {"iteration": 1})
    append_jsonl(path, {"iteration": 2, "x": [1.5]})
    with open(path, "a") as f:
        f.write('{"iteration": 3, "x"')                 # a run killed mid-write
    assert read_jsonl(path) == [{"iteration": 1}, {"iteration": 2, "x": [1.5]}]
    assert json.loads(open(path).readline()) == {"iteration": 1}


def test_mean_se():
    m, s = mean_se([1.0, 2.0, 3.0, 6.0])
    assert m == 3.0 and s == pytest.approx(math.sqrt(14 / 3) / 2, abs=1e-15)
    assert mean_se([4.0]) == (4.0, 0.0)
    m, s = mean_se([])
    assert math.isnan(m) and s == 0.0
