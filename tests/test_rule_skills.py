"""Tests for rule_skills.py: the rule summaries of scripted Sokoban and AppWorld trajectories (exact texts), and the
readers of the Sokoban cell keys against the writer's own text."""
import numpy as np
import pytest

import env_sokoban as es
from rule_skills import (AppWorldRuleSummarizer, SokobanRuleSummarizer, blocked_moves, rule_summarizer, skill_covers,
                         workflow_moves, workflow_sequence)
from skills import Skill, SummaryRequest

ROOM = """
# # # # # #
# _ _ _ _ #
# _ X _ O #
# _ _ P _ #
# # # # # #
"""


def _episode(room_text, replies):
    fixed, state = es.room_from_text(room_text)
    level = es.Level("sokoban-test-0", 0, 0, fixed.shape, int(np.isin(state, (3, 4)).sum()), 0, fixed, state,
                     tuple(es.solve(fixed, state)), 40)
    ep = es.SokobanEpisode(level, max_turns=40)
    for r in replies:
        ep.step(r if r.startswith("<") or r == "" else f"<think>x</think><action>{r}</action>")
    return ep


def test_sokoban_rule_summary_success_with_bump_and_loop():
    ep = _episode(ROOM, ["down", "left", "right", "left", "left", "up", "right", "right"])
    assert ep.result()["success"]
    req = SummaryRequest.from_episode("sokoban", ep)
    s = SokobanRuleSummarizer().summarize([req])[0]
    # each move keyed by the cell it is made from, in the observation's words ("You are at (row 3, col 3).")
    assert s.golden_workflow == ("Moves from the start (loops and bumps removed):\n1. at (row 3, col 3): left\n"
                                 "2. at (row 3, col 2): left\n3. at (row 3, col 1): up\n"
                                 "4. at (row 2, col 1): right (push the box)\n"
                                 "5. at (row 2, col 2): right (push the box)")
    assert "You are at (row 3, col 3)." in es.SokobanEpisode(ep.level).initial_messages()[1]["content"]
    assert "Turn 1: at (row 3, col 3), down walked into a wall (nothing moved)." in s.mistake_analysis
    assert "Turns 1-3: loop, back to the position of the start" in s.mistake_analysis
    assert s.success_analysis.startswith("Solved in 8 turns (7 moves); the plan below needs 5 moves.")
    assert "turn(s) 8" in s.success_analysis
    assert SokobanRuleSummarizer().summarize([req])[0] == s           # deterministic


def test_sokoban_rule_summary_corner_deadlock_and_format_error():
    ep = _episode(ROOM, ["left", "up", "I will go right", "right", "up", "left"])
    s = SokobanRuleSummarizer().summarize([SummaryRequest.from_episode("sokoban", ep)])[0]
    assert ("Turn 6: pushed a box left into the corner at (row 1, col 1), not a target: deadlock"
            in s.mistake_analysis)
    assert "1 turn(s) with an invalid reply (turns 3;" in s.mistake_analysis
    assert s.golden_workflow.startswith("No successful workflow yet. No move sequence placed a box")
    assert s.success_analysis.startswith("Not solved: 0/1 boxes on targets at the end after 5 moves in 6 turns.")


def test_sokoban_rule_summary_best_prefix_on_failure():
    room = "######\n######\n##_O_#\n#_X__#\n#PX_O#\n######"       # the generator's worked example 2
    ep = _episode(room, ["right", "right", "right", "up", "down"])
    s = SokobanRuleSummarizer().summarize([SummaryRequest.from_episode("sokoban", ep)])[0]
    assert s.golden_workflow == ("No successful workflow yet. Best prefix so far (1/2 boxes on targets):\n"
                                 "1. at (row 4, col 1): right (push the box)\n"
                                 "2. at (row 4, col 2): right (push the box)")
    assert "Turn 3: at (row 4, col 3), right pushed a box that cannot move (nothing moved)." in s.mistake_analysis
    assert "Turns 3-5: loop, back to the position after turn 2" in s.mistake_analysis
    # without the initial room only the trajectory's own flags are used (no replay), still deterministic
    req = SummaryRequest.from_episode("sokoban", ep)
    req.extra = {}
    s2 = SokobanRuleSummarizer().summarize([req])[0]
    assert "Turn 3: right" in s2.mistake_analysis and s2.golden_workflow.startswith("No successful workflow yet.")


APPWORLD_TRAJ = [
    {"reply": "look", "code": "print(apis.api_docs.show_api_descriptions(app_name='spotify'))",
     "observation": '[{"name": "login"}]', "valid": True, "error": None},
    {"reply": "login", "code": "token = apis.spotify.login(username='a', password='b')",
     "observation": "Execution failed. Traceback:\n  File \"<python-input>\", line 1\n"
                    "Exception: Response status code is 401: Invalid credentials\n", "valid": True, "error": None},
    {"reply": "thinking only", "code": None, "observation": "No code found.", "valid": False, "error": "no code"},
    {"reply": "login", "code": "pw = apis.supervisor.show_account_passwords()\n"
                               "token = apis.spotify.login(username='a', password=pw[0]['password'])",
     "observation": "Execution successful.", "valid": True, "error": None},
    {"reply": "done", "code": "apis.supervisor.complete_task(answer=3)", "observation": "Execution successful.",
     "valid": True, "error": None},
]


def test_appworld_rule_summary():
    req = SummaryRequest("aw-1", "appworld", "Count my playlists.", APPWORLD_TRAJ,
                         {"success": True, "completion": 1.0, "reward": 1.0})
    s = AppWorldRuleSummarizer().summarize([req])[0]
    assert s.golden_workflow == ("API calls in order:\n1. apis.api_docs.show_api_descriptions\n"
                                 "2. apis.supervisor.show_account_passwords\n3. apis.spotify.login\n"
                                 "4. apis.supervisor.complete_task")
    assert ("Turn 2: spotify.login failed: Exception: Response status code is 401: Invalid credentials"
            in s.mistake_analysis)
    assert "1 turn(s) without a code block (turns 3)." in s.mistake_analysis
    assert s.success_analysis.startswith("Task completed. API calls that ran without error: api_docs.show_api_desc")
    failed = SummaryRequest("aw-1", "appworld", "x", APPWORLD_TRAJ[:3], {"success": False, "completion": 0.5})
    s = AppWorldRuleSummarizer().summarize([failed])[0]
    assert s.golden_workflow == ("No successful workflow yet. Calls that worked so far:\n"
                                 "1. apis.api_docs.show_api_descriptions")
    assert s.success_analysis.startswith("Not completed (completion 0.50).")
    # garbage turns never crash the summarizers: a bad trajectory costs its skill and is counted
    junk = SummaryRequest("aw-2", "appworld", "x", [{"code": 5}], {})
    summ = AppWorldRuleSummarizer()
    assert summ.summarize([junk]) == [None] and summ.num_errors == 1




def test_sokoban_rule_summary_lists_each_blocked_move_once_with_its_cell():
    ep = _episode(ROOM, ["down", "down", "left", "down"])
    s = SokobanRuleSummarizer().summarize([SummaryRequest.from_episode("sokoban", ep)])[0]
    bumps = [line for line in s.mistake_analysis.splitlines() if "walked into a wall" in line]
    assert bumps == ["Turn 1: at (row 3, col 3), down walked into a wall (nothing moved).",
                     "Turn 4: at (row 3, col 2), down walked into a wall (nothing moved)."]


def test_rule_summarizer_by_env():
    assert isinstance(rule_summarizer("sokoban"), SokobanRuleSummarizer)
    assert isinstance(rule_summarizer("appworld"), AppWorldRuleSummarizer)
    with pytest.raises(ValueError, match="no rule summariser"):
        rule_summarizer("chess")


def test_cell_key_readers_parse_the_summariser_text():
    """workflow_sequence keeps every move in order, workflow_moves the first per cell, blocked_moves every blocked
    (cell, move); on a real summary of the writer they give back its own moves and bumps."""
    skill = Skill("", "Turn 1: at (row 2, col 3), up walked into a wall (nothing moved).\n"
                      "Turn 4: at (row 1, col 1), left pushed a box that cannot move (nothing moved).",
                  "Moves from the start (loops and bumps removed):\n1. at (row 2, col 3): left\n"
                  "2. at (row 2, col 2): up (push the box)\n3. at (row 2, col 3): down")
    assert workflow_sequence(skill) == [((2, 3), 3), ((2, 2), 1), ((2, 3), 2)]
    assert workflow_moves(skill) == {(2, 3): 3, (2, 2): 1}            # the first entry of a cell wins
    assert blocked_moves(skill) == {((2, 3), 1), ((1, 1), 3)}
    assert workflow_moves(Skill("", "", "No successful workflow yet.")) == {} and workflow_sequence(None) == []
    ep = _episode(ROOM, ["down", "left", "right", "left", "left", "up", "right", "right"])
    s = SokobanRuleSummarizer().summarize([SummaryRequest.from_episode("sokoban", ep)])[0]
    assert workflow_sequence(s) == [((3, 3), 3), ((3, 2), 3), ((3, 1), 1), ((2, 1), 4), ((2, 2), 4)]
    assert blocked_moves(s) == {((3, 3), 2)}


def test_skill_covers_reads_the_players_cell():
    """A skill covers a state when the observation's (last) player cell is one of the skill's keys "at (row r, col c)"."""
    skill = ("Turn 2: at (row 1, col 3), up walked into a wall (nothing moved).\n"
             "Moves from the start:\n1. at (row 2, col 1): right\n2. at (row 2, col 2): right (push the box)")
    obs = lambda cell: f"Turn 3/12. Boxes on target: 0/1.\nYou are at {es.position_text(cell)}.\n# # #"
    assert skill_covers(skill, obs((2, 1))) and skill_covers(skill, obs((1, 3)))
    assert not skill_covers(skill, obs((1, 2))) and not skill_covers(skill, obs((3, 1)))
    assert skill_covers(skill, obs((3, 3)) + "\n" + obs((2, 2)))       # the latest position counts
    assert not skill_covers(skill, obs((3, 3)) + "\n" + obs((1, 1)))
    assert not skill_covers(skill, "Solved: every box is on a target.")
    assert not skill_covers("No successful workflow yet.", obs((2, 1)))
    # the real observation's wording
    level = es.load_levels("easy", "test")[0]
    ep = es.SokobanEpisode(level, max_turns=12)
    text = ep.initial_messages()[-1]["content"]
    assert skill_covers(f"1. at {es.position_text(ep.game.player)}: up", text)
