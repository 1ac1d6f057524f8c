"""Tests for env_sokoban: generator parity (pinned rooms, the worked examples of the RAGEN generator), gym-sokoban step
semantics, BFS optimality against brute force, level sets, the parser under fuzzing, and the episode protocol.
The pinned grids were cross-checked against a line-by-line transcription of verl-agent's room_utils.py (identical to
RAGEN's generator) on thousands of seeds; any change here means seed s no longer gives the frameworks' room.
Run: python -m pytest -q tests/test_env_sokoban.py   (a few seconds)"""
import dataclasses
import hashlib
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

import env_sokoban as E

UP, DOWN, LEFT, RIGHT = 1, 2, 3, 4


def grid(fixed, state):
    return E.render(fixed, state, sep="")


def play(fixed, state, plan, max_steps=1000):
    game = E.SokobanGame(fixed, state, max_steps)
    return game, [game.step(a)[0] for a in plan]


# ---------------------------------------------------------------------------------------------------------------
# Generator: worked examples and pinned rooms

EXAMPLE_1 = "######\n#O####\n#__###\n#X_###\n#_P_##\n######"
EXAMPLE_2 = "######\n######\n##_O_#\n#_X__#\n#PX_O#\n######"


def test_worked_example_1_one_box_depth_300():
    fixed, state = E.generate_room((6, 6), 1, 300, seed=10000)
    assert grid(fixed, state) == EXAMPLE_1
    assert E.solve(fixed, state) == [LEFT, UP, UP]
    game, rewards = play(fixed, state, [LEFT, UP, UP])
    assert rewards == pytest.approx([-0.1, -0.1, 10.9]) and sum(rewards) == pytest.approx(10.7) and game.solved


def test_worked_example_2_two_boxes_depth_100_and_300():
    for depth in (100, 300):
        fixed, state = E.generate_room((6, 6), 2, depth, seed=10000)
        assert grid(fixed, state) == EXAMPLE_2
    plan = E.solve(fixed, state)
    assert plan == [UP, RIGHT, LEFT, DOWN, RIGHT, RIGHT, UP]
    game, rewards = play(fixed, state, plan)
    assert rewards == pytest.approx([-0.1] * 5 + [0.9, 10.9]) and sum(rewards) == pytest.approx(11.3) and game.solved


PINNED = {  # (dim_room, num_boxes, search_depth, seed) -> compact grid (None = the frameworks' generator raises)
    ((6, 6), 1, 300, 0): "######\n#____#\n##O_P#\n###X_#\n###__#\n######",
    ((6, 6), 1, 300, 1): "######\n#O_###\n#_####\n#X_###\n#P_###\n######",
    ((6, 6), 1, 300, 413): "######\n#____#\n#__S_#\n#_X_##\n#___##\n######",      # player starts on the target
    ((6, 6), 2, 100, 0): "######\n#____#\n##OX_#\n###X_#\n###S_#\n######",
    ((6, 6), 2, 100, 7): "######\n##__P#\n##OXX#\n###_O#\n###__#\n######",
    ((6, 6), 2, 100, 6): None,
    ((6, 6), 2, 100, 8): None,
    ((8, 8), 2, 30, 7): "########\n##_X__O#\n##__X__#\n###S___#\n###____#\n########\n########\n########",
    ((7, 5), 2, 60, 3): "#####\n##__#\n##XP#\n##_X#\n##__#\n#_OO#\n#####",
    ((6, 6), 3, 50, 2): "######\n#_P_##\n#_XX##\n#OX__#\n#__OO#\n######",
}


@pytest.mark.parametrize("key", list(PINNED))
def test_pinned_rooms(key):
    dim, boxes, depth, seed = key
    if PINNED[key] is None:
        with pytest.raises(E.SokobanGenerationError):
            E.generate_room(dim, boxes, depth, seed)
        return
    fixed, state = E.generate_room(dim, boxes, depth, seed)
    assert grid(fixed, state) == PINNED[key]
    assert fixed.dtype == state.dtype == np.int64 and set(np.unique(fixed)) <= {0, 1, 2}
    assert (state == E.PLAYER).sum() == 1 and np.isin(state, (3, 4)).sum() == boxes == (fixed == 2).sum()
    assert (state == E.BOX_ON_TARGET).sum() == 0                      # generated rooms start with no box placed


def test_generation_leaves_global_rng_alone_and_is_repeatable():
    random.seed(123)
    np.random.seed(123)
    py_state, np_state = random.getstate(), np.random.get_state()
    a = E.generate_room((6, 6), 2, 100, seed=5)
    assert random.getstate() == py_state and np.array_equal(np.random.get_state()[1], np_state[1])
    b = E.generate_room((6, 6), 2, 100, seed=5)
    assert grid(*a) == grid(*b)


def test_determinism_across_processes():
    seeds = list(range(12))
    code = ("import env_sokoban as E\n"
            f"for s in {seeds}:\n"
            "    try: print(E.render(*E.generate_room((6, 6), 2, 100, s), sep='').replace(chr(10), '/'))\n"
            "    except E.SokobanGenerationError: print('fail')\n")
    env = dict(os.environ, PYTHONHASHSEED="random")                   # hash() salting must not matter
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    here = []
    for s in seeds:
        try:
            here.append(grid(*E.generate_room((6, 6), 2, 100, s)).replace("\n", "/"))
        except E.SokobanGenerationError:
            here.append("fail")
    assert out.stdout.split() == here and here.count("fail") == 3       # seeds 6, 8, 9 fail there too


def test_make_level_retries_with_derived_seed():
    with pytest.raises(E.SokobanGenerationError):
        E.generate_room((6, 6), 2, 100, seed=6)
    level = E.make_level(6, (6, 6), 2, 100)
    candidates = [(6 * 1_000_003 + k) % 2 ** 32 for k in range(1, 21)]
    assert level.seed == 6 and level.effective_seed in candidates and level.task_id == "sokoban-custom-6"
    for earlier in candidates[:candidates.index(level.effective_seed)]:  # the first derived seed that works
        with pytest.raises(E.SokobanGenerationError):
            E.generate_room((6, 6), 2, 100, earlier)
    assert grid(level.room_fixed, level.room_state) == grid(*E.generate_room((6, 6), 2, 100, level.effective_seed))
    assert E.make_level(7, (6, 6), 2, 100).effective_seed == 7
    with pytest.raises(ValueError):
        E.generate_room((6, 6), 1, 300, seed=-1)


# ---------------------------------------------------------------------------------------------------------------
# Step semantics (gym-sokoban)

def test_push_into_wall_and_into_second_box():
    game = E.SokobanGame(*E.room_from_text("#######\n#_PX#O#\n#__X_O#\n#######"), max_steps=10)
    reward, done, info = game.step(RIGHT)                               # box against the wall: nothing moves
    assert (reward, done, info["action.moved_player"], info["action.moved_box"]) == (pytest.approx(-0.1), False,
                                                                                      False, False)
    assert game.render() == "# # # # # # #\n# _ P X # O #\n# _ _ X _ O #\n# # # # # # #" and game.steps == 1
    room = "#######\n#PXX_O#\n#____O#\n#######"
    game = E.SokobanGame(*E.room_from_text(room), max_steps=10)
    reward, _, info = game.step(RIGHT)                                  # two boxes in a row: boxes never chain
    assert not info["action.moved_player"] and grid(game.room_fixed, game.room_state) == room
    assert reward == pytest.approx(-0.1) and game.player == (1, 1)


def test_box_on_off_target_rewards_and_finish():
    game = E.SokobanGame(*E.room_from_text("########\n#______#\n#PX_O__#\n#_X_O__#\n########"), max_steps=50)
    plan = [RIGHT, RIGHT, RIGHT,                                        # upper box onto its target, then off it
            UP, RIGHT, RIGHT, DOWN, LEFT,                               # round the box, push it back on
            UP, LEFT, LEFT, LEFT, LEFT, DOWN, DOWN, RIGHT, RIGHT]       # round to the lower box, push it on
    rewards = []
    for i, a in enumerate(plan):
        reward, done, info = game.step(a)
        rewards.append(reward)
        assert done == (i == len(plan) - 1)
        if i == 2:                                                      # the player stands on the vacated target
            assert game.render().splitlines()[2] == "# _ _ _ S X _ #" and game.boxes_on_target == 0
    assert rewards == pytest.approx([-0.1, 0.9, -1.1] + [-0.1] * 4 + [0.9] + [-0.1] * 8 + [10.9])
    assert info["all_boxes_on_target"] and not info["maxsteps_used"] and game.solved and game.steps == 17


def test_player_on_target_renders_S_and_counts_as_uncovered():
    game = E.SokobanGame(*E.room_from_text("######\n#P_O_#\n#_X__#\n######"), max_steps=10)
    game.step(RIGHT)
    reward, _, _ = game.step(RIGHT)
    assert game.render().splitlines()[1] == "# _ _ S _ #" and reward == pytest.approx(-0.1)
    assert game.boxes_on_target == 0 and E.room_from_text(game.render())[1][1, 3] == E.PLAYER
    assert np.array_equal(E.room_from_text(game.render())[0], game.room_fixed)


def test_step_limit_noop_move_actions_and_bad_action():
    game = E.SokobanGame(*E.room_from_text("#####\n#PX_#\n#__O#\n#####"), max_steps=3)
    assert game.step(0)[:2] == (pytest.approx(-0.1), False)            # no-op counts as a step
    reward, done, info = game.step(8)                                   # move right: never pushes
    assert not info["action.moved_player"] and not done
    reward, done, info = game.step(UP)                                  # bump; third step hits the limit
    assert done and info["maxsteps_used"] and not info["all_boxes_on_target"] and game.steps == 3 and game.done
    for bad in (9, -1, 1.0, "up", None):
        with pytest.raises(ValueError):
            game.step(bad)


# ---------------------------------------------------------------------------------------------------------------
# Solver

def brute_force_optimum(fixed, state, limit):
    """Iterative deepening over every action sequence, simulated with SokobanGame (independent of solve)."""
    def solvable_in(game, depth):
        if game.solved:
            return True
        if depth == 0:
            return False
        for a in (UP, DOWN, LEFT, RIGHT):
            child = E.SokobanGame(game.room_fixed, game.room_state, 10 ** 6)
            child.step(a)
            if solvable_in(child, depth - 1):
                return True
        return False
    for depth in range(limit + 1):
        if solvable_in(E.SokobanGame(fixed, state, 10 ** 6), depth):
            return depth
    return None


def small_rooms():
    rooms = [E.room_from_text(EXAMPLE_2),
             E.room_from_text("######\n#P___#\n#_XX_#\n#_OO_#\n######"),      # 2 boxes, 2 pushes after a detour
             E.room_from_text("#####\n#O__#\n#_X_#\n#__P#\n#####")]            # needs to walk around the box
    for seed in range(40):                                                       # generated 1-box rooms, optimum <= 6
        fixed, state = E.generate_room((6, 6), 1, 300, seed)
        if len(E.solve(fixed, state)) <= 6:
            rooms.append((fixed, state))
    return rooms[:14]


def test_solver_is_optimal_against_brute_force():
    lengths = []
    for fixed, state in small_rooms():
        plan = E.solve(fixed, state)
        assert brute_force_optimum(fixed, state, len(plan)) == len(plan)
        game, _ = play(fixed, state, plan)
        assert game.solved
        lengths.append(len(plan))
    assert len(lengths) == 14 and max(lengths) == 7 and min(lengths) <= 2


def test_solver_edge_cases():
    solved = E.room_from_text("#####\n#P√_#\n#####")
    assert E.solve(*solved) == []
    stuck = E.room_from_text("#####\n#X__#\n#_P_#\n#__O#\n#####")               # box in a corner: dead square
    assert E.solve(*stuck) is None
    fixed, state = E.room_from_text(EXAMPLE_2)
    assert E.solve(fixed, state, max_depth=6) is None and len(E.solve(fixed, state, max_depth=7)) == 7


# ---------------------------------------------------------------------------------------------------------------
# Level sets

def digest(levels):
    return hashlib.sha256("|".join(grid(lv.room_fixed, lv.room_state) for lv in levels).encode()).hexdigest()[:16]


def test_paper_preset_pinned():
    train, test = E.load_levels("paper", "train"), E.load_levels("paper", "test")
    assert len(train) == 96 and len(test) == 64
    assert sorted(lv.seed for lv in train) == [s for s in range(10_000, 10_101)
                                               if s not in (10027, 10054, 10061, 10071, 10088)]
    assert [lv.seed for lv in test] == [s for s in range(1_000_000, 1_000_069)
                                        if s not in (1000004, 1000025, 1000027, 1000028, 1000065)]
    assert digest(sorted(train, key=lambda lv: lv.seed)) == "4996a2b9d06b7d6e" and digest(test) == "b9d54d0eee378e2e"
    assert sum(lv.optimal_length for lv in train) == 756 and sum(lv.optimal_length for lv in test) == 562
    assert [lv.optimal_length for lv in train] == sorted(lv.optimal_length for lv in train)  # curriculum order
    assert train[0].task_id == "sokoban-paper-10083" and all(lv.max_steps == 40 for lv in train + test)


@pytest.mark.parametrize("preset", ["paper", "easy", "hard"])
def test_every_preset_level_is_solvable_and_splits_are_disjoint(preset):
    cfg = E.PRESETS[preset]
    train, test = E.load_levels(preset, "train"), E.load_levels(preset, "test")
    assert (len(train), len(test)) == (cfg.num_train, cfg.num_test)
    assert not {lv.seed for lv in train} & {lv.seed for lv in test}
    train_rooms = {grid(lv.room_fixed, lv.room_state) for lv in train}
    test_rooms = [grid(lv.room_fixed, lv.room_state) for lv in test]
    assert not train_rooms & set(test_rooms) and len(set(test_rooms)) == len(test_rooms)
    for lv in train + test:
        assert lv.effective_seed == lv.seed and lv.num_boxes == cfg.num_boxes
        assert lv.task_id == f"sokoban-{preset}-{lv.seed}"
        plan = E.solve(lv.room_fixed, lv.room_state)
        assert cfg.min_optimal_length <= len(plan) == lv.optimal_length <= lv.max_steps
        game, _ = play(lv.room_fixed, lv.room_state, lv.optimal_plan, lv.max_steps)
        assert game.solved
        assert grid(lv.room_fixed, lv.room_state) == grid(*E.generate_room(cfg.dim_room, cfg.num_boxes,
                                                                           cfg.search_depth, lv.seed))
    with pytest.raises(ValueError):
        lv.room_state[0, 0] = 1                                         # shared levels are read-only
    if preset == "easy":                                                # seed 1000026 repeats training seed 10069
        assert 1000026 not in {lv.seed for lv in test} and 10069 in {lv.seed for lv in train}
    if preset == "hard":    # every skipped seed in the test range failed, needs < 5 moves, or repeats a training room
        kept = {lv.seed for lv in test}
        for seed in range(cfg.test_seed_start, test[-1].seed + 1):
            if seed in kept:
                continue
            try:
                lv = E.make_level_unchecked("hard", seed, seed, cfg.dim_room, cfg.num_boxes, cfg.search_depth, cfg.max_steps)
            except E.SokobanGenerationError:
                continue
            assert lv.optimal_length < 5 or grid(lv.room_fixed, lv.room_state) in train_rooms, seed


def test_load_levels_bad_arguments():
    for preset, split in (("medium", "train"), ("paper", "dev")):
        with pytest.raises(ValueError):
            E.load_levels(preset, split)


# ---------------------------------------------------------------------------------------------------------------
# Parser fuzzing

def reference_single(text):
    """The §5 rule as a regex; only for short texts (the lazy regex is quadratic on "<action>" * 10**5)."""
    m = re.search(r"<action>(.*?)</action>", text.lower(), re.S)
    word = m.group(1).strip() if m else None
    return E.ACTION_NAMES.index(word) + 1 if word in E.ACTION_NAMES else None


PIECES = ["<action>", "</action>", "<answer>", "</answer>", "<think>", "</think>", "up", "Down", " LEFT ", "right",
          "still", "||", " ", "\n", "\t", "\x00", "é", "\ud800", "√", "<", ">", "/", "<act", "ion>", "İ", "\u2028"]


def random_replies(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 10 == 0:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(40))))   # binary junk
        elif i % 10 == 1:
            out.append("".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(60))))
        else:
            junk = ["".join(rng.choice(PIECES) if rng.random() < 0.7 else chr(rng.randrange(32, 127))
                            for _ in range(rng.randrange(12))) for _ in range(2)]
            word = rng.choice(["up", "Down", " LEFT ", "right\n", "upp", "", "still", "left right", rng.choice(PIECES)])
            out.append(junk[0] + (f"<action>{word}</action>" if i % 3 else "") + junk[1])
    return out


CRAFTED = ["", None, b"", b"\xff\xfe\x00", "<action>", "</action>", "<action>up", "up</action>", "<action></action>",
           "</action><action>", "<ACTION> UP </ACTION>", "<action>up</action><action>down</action>",
           "<action>upup</action>", "<action>up down</action>", "<action>\nleft\n</action>", "<action>still</action>",
           "<think>a</think>", "<answer>Up || Left</answer>", "<answer>||||</answer>", "<answer>Up||</answer>",
           "<answer>" + " || ".join(["Up"] * 9) + "</answer>", "<action>" + "a" * 1_000_000 + "</action>",
           "x" * 2_000_000, "<action>" * 100_000, "<answer>" + "||" * 100_000 + "</answer>", "\x00" * 1000, 12345,
           "<action>Right</action>"]


def unsolvable_level(max_steps=10 ** 6):
    fixed, state = E.room_from_text("######\n#X___#\n#_P__#\n#___O#\n######")
    return E.Level("sokoban-test-0", 0, 0, (5, 6), 1, 0, fixed, state, (), max_steps)


def test_parser_matches_rule_and_never_raises():
    replies = random_replies(2000) + CRAFTED
    n_valid = 0
    for reply in replies:
        action, error = E.parse_action(reply)
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else "" if reply is None else str(reply)
        assert len(text) > 10_000 or action == reference_single(text)
        assert (action is None) == (error is not None)
        assert error is None or len(error) < 200
        n_valid += action is not None
        actions, error = E.parse_actions(reply)
        assert len(actions) <= 5 and all(a in (1, 2, 3, 4) for a in actions)
    assert 300 < n_valid < 1500                                         # the fuzz hits both kinds
    assert E.parse_action("<ACTION> UP </ACTION>") == (UP, None)
    assert E.parse_action("<action>up</action><action>down</action>") == (UP, None)
    assert E.parse_actions("<answer>Up || left</answer>") == ([UP, LEFT], None)
    assert E.parse_actions("<answer>Up || jump || Down</answer>")[0] == [UP, DOWN]
    assert E.parse_actions("<answer>" + " || ".join(["Up"] * 9) + "</answer>")[0] == [UP] * 5


@pytest.mark.parametrize("style", ["single", "multi"])
def test_episode_never_raises_on_any_reply(style):
    ep = E.SokobanEpisode(unsolvable_level(), max_turns=10 ** 6, action_style=style, format_penalty=0.1)
    replies = random_replies(2000, seed=1) + CRAFTED
    for reply in replies:
        obs, done = ep.step(reply)
        assert isinstance(obs, str) and len(obs) < 400 and done is False
    res = ep.result()
    assert res["turns"] == len(replies) == len(ep.trajectory) and 0 < res["format_errors"] < len(replies)
    assert res["reward"] == pytest.approx(-0.1 * res["format_errors"])
    assert all(t["valid"] == (t["error"] is None) for t in ep.trajectory)


# ---------------------------------------------------------------------------------------------------------------
# Episode protocol

def example_2_level(**kw):
    fixed, state = E.generate_room((6, 6), 2, 100, 10000)
    level = E.Level("sokoban-paper-10000", 10000, 10000, (6, 6), 2, 100, fixed, state,
                    tuple(E.solve(fixed, state)), 40)
    return dataclasses.replace(level, **kw)


def test_initial_messages_and_observation_text():
    ep = E.SokobanEpisode(example_2_level())
    msgs = ep.initial_messages()
    assert [m["role"] for m in msgs] == ["system", "user"]
    first_obs = ("Turn 1/40. Boxes on target: 0/2.\nYou are at (row 4, col 1).\n"
                 + E.render(ep.level.room_fixed, ep.level.room_state))
    assert msgs[1]["content"].endswith("\n\n" + first_obs) and "<action>" in msgs[1]["content"]
    assert "40 turns, one action per turn" in msgs[1]["content"]
    obs, done = ep.step("<think>push the upper box</think><action>up</action>")
    assert obs == ("You moved up.\nTurn 2/40. Boxes on target: 0/2.\nYou are at (row 3, col 1).\n"
                   "# # # # # #\n# # # # # #\n# # _ O _ #\n# P X _ _ #\n# _ X _ O #\n# # # # # #") and not done
    assert ep.privileged_context() == ("A shortest solution from the initial state (7 moves): "
                                       "up, right, left, down, right, right, up")
    assert "sokoban-paper-10000" in ep.task_text() and E.render(ep.level.room_fixed, ep.level.room_state) in \
        ep.task_text()
    multi = E.SokobanEpisode(example_2_level(), action_style="multi").initial_messages()[1]["content"]
    assert "<answer>" in multi and "||" in multi


@pytest.mark.parametrize("reward,expected", [("completion", 1.0), ("success", 1.0), ("gym", 11.3)])
def test_optimal_play_and_reward_modes(reward, expected):
    ep = E.SokobanEpisode(example_2_level(), reward=reward)
    for i, a in enumerate(ep.level.optimal_plan):
        obs, done = ep.step(f"<think>step {i}</think><action>{E.ACTION_NAMES[a - 1]}</action>")
    assert done and ep.done and obs.startswith("You pushed a box up.\nSolved")
    res = ep.result()
    assert res["reward"] == pytest.approx(expected) and res["success"] and res["completion"] == 1.0
    assert (res["turns"], res["steps"], res["format_errors"], res["optimal_steps"]) == (7, 7, 0, 7)
    assert res["gym_return"] == pytest.approx(11.3)
    assert [t["action"] for t in ep.trajectory] == list(ep.level.optimal_plan)
    assert [t["box_moved"] for t in ep.trajectory] == [False, True, False, False, True, True, True]
    assert [t["reward"] for t in ep.trajectory] == pytest.approx([-0.1] * 5 + [0.9, 10.9])
    assert ep.step("<action>up</action>") == ("", True) and len(ep.trajectory) == 7


def test_invalid_turn_consumes_turn_without_env_step():
    ep = E.SokobanEpisode(example_2_level(), format_penalty=0.1)
    obs, done = ep.step("I will go <action>north</action>")
    t = ep.trajectory[-1]
    assert not done and ep.game.steps == 0 and ep.turns == 1 and "Turn 2/40" in obs
    assert obs.startswith("Invalid reply: 'north' is not one of up, down, left, right")
    assert (t["valid"], t["action"], t["moved"], t["reward"]) == (False, None, False, pytest.approx(-0.1))
    obs, _ = ep.step("<action>up")
    assert "not closed" in obs and ep.result()["format_errors"] == 2
    assert ep.result()["reward"] == pytest.approx(0.0 - 0.2)


def test_turn_limit_step_limit_abort_and_partial_completion():
    ep = E.SokobanEpisode(example_2_level())
    for _ in range(39):
        assert ep.step("no idea")[1] is False
    obs, done = ep.step("no idea")
    assert done and "Episode over" in obs and ep.result()["turns"] == 40 and not ep.result()["success"]
    ep = E.SokobanEpisode(example_2_level(max_steps=5), max_turns=40)   # env step limit below the turn limit
    assert "at most 5 actions in total" in ep.initial_messages()[1]["content"]
    dones = [ep.step("<action>down</action>")[1] for _ in range(5)]
    assert dones == [False] * 4 + [True] and ep.result()["steps"] == 5
    ep = E.SokobanEpisode(example_2_level())
    for a in ep.level.optimal_plan[:6]:                                 # one box placed, then the context cap hits
        ep.step(f"<action>{E.ACTION_NAMES[a - 1]}</action>")
    ep.abort("context cap")
    res = ep.result()
    assert ep.done and res["completion"] == 0.5 and res["reward"] == 0.5 and not res["success"]
    assert res["aborted"] == "context cap" and ep.step("<action>up</action>") == ("", True)


def test_multi_action_style():
    ep = E.SokobanEpisode(example_2_level(), action_style="multi")
    obs, done = ep.step("<think>x</think><answer>Up || Right || jump || Left</answer>")
    t = ep.trajectory[-1]
    assert t["actions"] == [UP, RIGHT, LEFT] and not t["valid"] and ep.game.steps == 3 and "'jump'" in obs
    obs, done = ep.step("<answer>Down || Right || Right || Up</answer>")
    assert done and ep.result()["success"] and ep.result()["turns"] == 2 and ep.result()["format_errors"] == 1
