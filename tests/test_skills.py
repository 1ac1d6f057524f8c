"""Tests for skills.py: parsing (incl. fuzz), the skill cap, UCB order, bank caps/dedup/round trip, rule summaries on
scripted Sokoban and AppWorld trajectories, async == sync, the HTTP summarizer against a stdlib fake server, the LLM
summarizer on the tiny model, and that the teacher prompt is the student prompt plus one contiguous block."""
import http.server
import json
import math
import random
import threading

import numpy as np
import pytest

import env_sokoban as es
from skills import (FALLBACKS, MAX_SKILL_CHARS, PRIVILEGED_HEADER, SKILL_HEADER, AppWorldRuleSummarizer,
                    AsyncSummarizer, HTTPSummarizer, LLMSummarizer, RuleBasedSummarizer, Skill, SkillBank,
                    SokobanRuleSummarizer, SummaryRequest, make_summarizer, parse_skill, privileged_block,
                    summary_messages, teacher_prompt_ids, with_skill)

GOOD = {"success_analysis": "Pushing right worked.", "mistake_analysis": "Walked into the wall.",
        "golden_workflow": "1. left\n2. up\n3. right"}


# ---------------------------------------------------------------------------------------------------------------------
# parsing

@pytest.mark.parametrize("text", [
    json.dumps(GOOD),
    "Sure! Here is the skill:\n```json\n" + json.dumps(GOOD, indent=2) + "\n```\nHope this helps {not json}.",
    '{"success_analysis": "Pushing right worked.", "mistake_analysis": "Walked into the wall.",\n'
    ' "golden_workflow": "1. left\\n2. up\\n3. right",}',
    "{'success_analysis': 'Pushing right worked.', 'mistake_analysis': 'Walked into the wall.', "
    "'golden_workflow': '1. left\\n2. up\\n3. right',}",
    'noise {"a": 1} then {"skill": {"Success Analysis": "Pushing right worked.", "mistakes": "Walked into the wall.",'
    ' "golden_workflow": ["left", "up", "right"]}, "junk": [1, {"x": null}]}',
    "\u201csuccess_analysis\u201d ignored {\u201csuccess_analysis\u201d: \u201cPushing right worked.\u201d, "
    "\u201cmistake_analysis\u201d: \u201cWalked into the wall.\u201d, \u201cgolden_workflow\u201d: "
    "\u201c1. left\\n2. up\\n3. right\u201d}",
])
def test_parse_skill_variants(text):
    assert parse_skill(text) == Skill(**GOOD)


def test_parse_skill_missing_fields_truncation_and_rejects():
    s = parse_skill('{"golden_workflow": "1. push right", "success_analysis": ""}')
    assert s == Skill(FALLBACKS["success_analysis"], FALLBACKS["mistake_analysis"], "1. push right")
    cut = json.dumps(GOOD)[:-10]                       # generation stopped inside the last string
    s = parse_skill("```json\n" + cut)
    assert s.success_analysis == GOOD["success_analysis"] and s.mistake_analysis == GOOD["mistake_analysis"]
    assert s.golden_workflow.startswith("1. left")
    for bad in ["", "no json here", '{"answer": 42}', "{{{{", None, 17, ["x"], "[" * 10000, "{" * 10000,
                '{"success_analysis": ""}']:
        assert parse_skill(bad) is None, bad
    assert parse_skill(json.dumps(GOOD).encode()) == Skill(**GOOD)


def test_parse_skill_fuzz_never_raises():
    rng = random.Random(0)
    base = json.dumps(GOOD, indent=1)
    alphabet = list('{}[]"\':,\\\n `') + ["success_analysis", "golden_workflow", "null", "true", "```json", "\u201c"]
    found = 0
    for _ in range(600):
        kind = rng.random()
        if kind < 0.4:                                  # random token soup
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        elif kind < 0.8:                                # a valid skill with random edits
            chars = list(base)
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(chars) + 1)
                op = rng.random()
                if op < 0.4 and chars:
                    del chars[min(i, len(chars) - 1)]
                else:
                    chars.insert(i, rng.choice(alphabet))
            text = "".join(chars)
        else:                                           # truncated anywhere
            text = base[:rng.randrange(len(base))]
        s = parse_skill(text)
        assert s is None or (isinstance(s, Skill) and all(isinstance(v, str) and v for v in s.to_dict().values()))
        found += s is not None
    assert found > 200                                  # most edited skills still parse


def test_to_prompt_is_compact_json_and_capped():
    s = Skill(**GOOD)
    assert s.to_prompt() == json.dumps(GOOD, ensure_ascii=False)
    assert Skill.from_dict(s.to_dict()) == s
    long = Skill("a" * 100, 'b"\n' * 3000, "c" * 5000)       # escapes make the JSON longer than the raw text
    text = long.to_prompt()
    d = json.loads(text)
    assert len(text) <= MAX_SKILL_CHARS and set(d) == set(GOOD)
    assert d["success_analysis"] == "a" * 100                # the short field is kept whole (water-filling)
    assert d["golden_workflow"].endswith("...") and d["mistake_analysis"].endswith("...")


# ---------------------------------------------------------------------------------------------------------------------
# bank

def _skill(i):
    return Skill(f"s{i}", f"m{i}", f"w{i}")


def test_ucb_exact_order():
    bank = SkillBank(capacity=16, c=math.sqrt(2))
    for i in range(3):
        assert bank.add("t", _skill(i))
    picks = []
    rewards = {0: 0.0, 1: 1.0, 2: 0.5}
    for _ in range(6):
        sid, skill = bank.retrieve("t")
        picks.append(sid)
        bank.update("t", sid, rewards[sid])
    # untried first, newest first: 2, 1, 0. Then N=4, all n=1: UCB = mean + sqrt2*sqrt(ln4) -> skill 1 (mean 1).
    # N=5: s0 0+1.794=1.794, s1 1+sqrt2*sqrt(ln5/2)=2.269, s2 0.5+1.794=2.294 -> skill 2.
    # N=6: s0 0+1.893=1.893, s1 1+1.339=2.339, s2 0.5+1.339=1.839 -> skill 1.
    assert picks == [2, 1, 0, 1, 2, 1]
    assert bank.add("t", _skill(3))                    # a new skill is untried: it goes next
    assert bank.retrieve("t")[0] == 3
    st = bank.stats()
    assert st["retrievals"] == 7 and st["untried_picks"] == 4
    assert abs(st["untried_pick_rate"] - 4 / 7) < 1e-12
    assert bank.best("t") == _skill(1)                 # exploitation: mean 1.0 beats 0.5 and 0.0


def test_ucb_ties_go_to_lowest_index_and_empty_bank():
    bank = SkillBank(c=0.0)
    assert bank.retrieve("t") is None
    for i in range(3):
        bank.add("t", _skill(i))
    for _ in range(3):
        sid, _ = bank.retrieve("t")
        bank.update("t", sid, 0.5)
    assert [bank.retrieve("t")[0] for _ in range(2)] == [0, 0]


def test_bank_cap_fifo_dedup_and_late_update():
    bank = SkillBank(capacity=2)
    assert bank.add("t", _skill(0)) and bank.add("t", _skill(1))
    assert not bank.add("t", Skill("s1", "m1", "w1"))        # exact duplicate of the prompt text
    assert not bank.add("t", None)
    assert bank.add("t", _skill(2))                           # evicts skill 0 (oldest)
    assert [sid for sid, _ in bank.skills("t")] == [1, 2]
    assert bank.update("t", 0, 1.0) is False                  # a late credit for an evicted skill is a no-op
    assert bank.add("t", _skill(0))                           # no longer a duplicate once evicted; new id 3
    assert [sid for sid, _ in bank.skills("t")] == [2, 3]
    assert bank.add("u", _skill(0))                           # banks are per task
    st = bank.stats()
    assert st["duplicates"] == 1 and st["evicted"] == 2 and st["tasks"] == 2
    assert st["size_max"] == 2 and st["skills"] == 3
    assert bank.best("u") == _skill(0) and bank.best("nope") is None     # nothing credited: the newest


def test_bank_json_round_trip_preserves_retrieval_order(tmp_path):
    rng = random.Random(1)

    def drive(bank, steps):
        out = []
        for k in range(steps):
            task = f"t{k % 3}"
            if k % 4 == 0:
                bank.add(task, _skill(k))
            got = bank.retrieve(task)
            if got:
                out.append((task, got[0]))
                bank.update(task, got[0], round(rng.random(), 3))
        return out

    bank = SkillBank(capacity=3)
    drive(bank, 40)
    path = tmp_path / "bank.json"
    bank.save(path)
    assert not (tmp_path / "bank.json.tmp").exists()
    loaded = SkillBank.load(path)
    assert loaded.to_json() == bank.to_json()
    state = rng.getstate()
    a = drive(bank, 30)
    rng.setstate(state)
    b = drive(loaded, 30)
    assert a == b and len(a) > 20


# ---------------------------------------------------------------------------------------------------------------------
# rule summarizers

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
    assert RuleBasedSummarizer().summarize([req])[0] == s


def test_sokoban_rule_summary_corner_deadlock_and_format_error():
    ep = _episode(ROOM, ["left", "up", "I will go right", "right", "up", "left"])
    s = SokobanRuleSummarizer().summarize([SummaryRequest.from_episode("sokoban", ep)])[0]
    assert ("Turn 6: pushed a box left into the corner at (row 1, col 1), not a target: deadlock"
            in s.mistake_analysis)
    assert "1 turn(s) with an invalid reply (turns 3;" in s.mistake_analysis
    assert s.golden_workflow.startswith("No successful workflow yet. No move sequence placed a box")
    assert s.success_analysis.startswith("Not solved: 0/1 boxes on targets at the end after 5 moves in 6 turns.")


def test_sokoban_rule_summary_best_prefix_on_failure():
    room = "######\n######\n##_O_#\n#_X__#\n#PX_O#\n######"       # sokoban.md example 2
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
    s = RuleBasedSummarizer().summarize([failed])[0]
    assert s.golden_workflow == ("No successful workflow yet. Calls that worked so far:\n"
                                 "1. apis.api_docs.show_api_descriptions")
    assert s.success_analysis.startswith("Not completed (completion 0.50).")
    # garbage turns never crash the summarizers: a bad trajectory costs its skill and is counted
    junk = SummaryRequest("aw-2", "appworld", "x", [{"code": 5}], {})
    summ = AppWorldRuleSummarizer()
    assert summ.summarize([junk]) == [None] and summ.num_errors == 1


# ---------------------------------------------------------------------------------------------------------------------
# async

def _requests():
    out = [SummaryRequest(f"aw-{i}", "appworld", "x", APPWORLD_TRAJ[:i + 1], {"success": i == 4}) for i in range(5)]
    out.append(SummaryRequest("zz", "unknown-env", "x", [], {}))        # dropped (None), counted
    return out


def test_async_returns_the_same_skills_as_sync():
    reqs = _requests()
    sync = AsyncSummarizer(RuleBasedSummarizer(), synchronous=True)
    sync.submit(0, reqs[:3])
    sync.submit(1, reqs[3:])
    want = sync.collect()
    assert len(want) == 5 and sync.collect() == []
    with AsyncSummarizer(RuleBasedSummarizer()) as worker:
        worker.submit(0, reqs[:3])
        worker.submit(reqs[3:])                                       # design.md's one-argument form
        assert worker.collect(wait=True) == want
        assert worker.stats()["summaries_dropped"] == 1 and worker.stats()["summary_pending"] == 0


def test_async_skills_arrive_later_and_errors_are_counted():
    gate = threading.Event()

    class Slow:
        def summarize(self, requests):
            gate.wait(5)
            if requests[0].task_id == "boom":
                raise RuntimeError("summarizer crashed")
            return [_skill(0) for _ in requests]

    worker = AsyncSummarizer(Slow())
    worker.submit(0, [SummaryRequest("a", "appworld", "x", [], {})])
    worker.submit(0, [SummaryRequest("boom", "appworld", "x", [], {})])
    assert worker.collect() == [] and worker.pending == 2            # not ready within this iteration
    gate.set()
    worker.wait()
    assert worker.collect() == [("a", _skill(0))]
    assert worker.num_errors == 1
    worker.close()
    with pytest.raises(RuntimeError):
        worker.submit(1, [])


# ---------------------------------------------------------------------------------------------------------------------
# HTTP summarizer against a fake OpenAI-compatible server

class _FakeChat(http.server.BaseHTTPRequestHandler):
    replies = []          # consumed in order; an int = HTTP error status
    seen = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        reply = type(self).replies.pop(0) if type(self).replies else "no json"
        if isinstance(reply, int):
            self.send_error(reply)
            return
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server():
    _FakeChat.replies, _FakeChat.seen = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_summarizer(fake_server):
    req = SummaryRequest("aw-1", "appworld", "Count my playlists.", APPWORLD_TRAJ, {"success": True})
    _FakeChat.replies = ["```json\n" + json.dumps(GOOD) + "\n```", "sorry, no", json.dumps(GOOD), 500, 500]
    summ = HTTPSummarizer(fake_server + "/v1", "judge", api_key="k", max_workers=1)
    assert summ.summarize([req]) == [Skill(**GOOD)]
    assert summ.summarize([req]) == [Skill(**GOOD)]                  # bad reply, then the retry with a reminder
    assert summ.summarize([req]) == [None] and summ.num_errors == 2  # HTTP 500 twice: None, no exception
    path, auth, body = _FakeChat.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k" and body["model"] == "judge"
    assert "Count my playlists." in body["messages"][1]["content"]
    assert "not a valid JSON" in _FakeChat.seen[2][2]["messages"][1]["content"]
    dead = HTTPSummarizer("http://127.0.0.1:9", "m", timeout=2)       # nothing listens there
    assert dead.summarize([req, req]) == [None, None] and dead.num_errors == 4


def test_summary_messages_truncate_and_report_outcome():
    traj = [{"reply": f"<action>up</action> {i}", "observation": "grid " * 200, "valid": True} for i in range(40)]
    req = SummaryRequest("s", "sokoban", "Push the boxes.", traj, {"success": False, "completion": 0.5,
                                                                   "reward": 0.5})
    user = summary_messages(req, max_chars=3000)[1]["content"]
    assert "Push the boxes." in user and "chars cut]" in user and "turns omitted) ..." in user
    assert "Turn 1 action" in user and "Turn 40 observation" in user
    assert "Outcome: success=no, completion=0.50, reward=0.50, turns=40" in user
    assert len(user) < 3000 + 2500


def test_make_summarizer():
    assert isinstance(make_summarizer("rule", "sokoban"), SokobanRuleSummarizer)
    assert isinstance(make_summarizer("rule"), RuleBasedSummarizer)
    assert isinstance(make_summarizer("http", base_url="http://x", http_model="m"), HTTPSummarizer)
    for bad in (dict(kind="llm"), dict(kind="http"), dict(kind="oracle")):
        with pytest.raises(ValueError):
            make_summarizer(**bad)


# ---------------------------------------------------------------------------------------------------------------------
# tiny model: LLM summarizer and teacher prompt ids

@pytest.fixture(scope="module")
def tiny():
    import torch
    from model import load
    torch.manual_seed(0)
    return load("tiny", device="cpu")


def test_llm_summarizer_on_tiny_model(tiny):
    from model import SamplingConfig
    model, tok = tiny
    summ = LLMSummarizer(model, tok, sampling=SamplingConfig(temperature=0.0, max_new_tokens=8), batch_size=2)
    reqs = _requests()[:3]
    out = summ.summarize(reqs)                    # a random model writes no JSON: one retry each, then None
    assert out == [None, None, None] and summ.num_generated == 6 and summ.num_failed == 3
    scripted = iter(["garbage", json.dumps(GOOD), "{'success_analysis': 'x'}", json.dumps(GOOD)])
    summ._generate = lambda msgs: [next(scripted) for _ in msgs]
    # first pass: junk, a skill, a partial skill (fallbacks); the retry (1 prompt, with the reminder) fixes the junk
    assert summ.summarize(reqs) == [Skill(**GOOD), Skill(**GOOD), Skill("x", FALLBACKS["mistake_analysis"],
                                                                        FALLBACKS["golden_workflow"])]


def test_teacher_prompt_is_student_prompt_plus_one_block(tiny):
    _, tok = tiny
    from model import encode_prompt
    ep = _episode(ROOM, [])
    msgs = ep.initial_messages()
    skill = Skill('Pushed "right" twice.', "Bumped a wall;\nlooped.", "1. left\n2. up\n3. right").to_prompt()
    teacher = with_skill(msgs, skill)
    assert msgs == ep.initial_messages()                               # the input is not mutated
    assert teacher[0] == msgs[0] and teacher[1]["content"] == f"{SKILL_HEADER}\n{skill}\n\n{msgs[1]['content']}"
    assert with_skill(msgs, None) == msgs
    for header, text in ((SKILL_HEADER, skill), (PRIVILEGED_HEADER, privileged_block(ep.privileged_context()))):
        student = encode_prompt(tok, msgs)
        t_ids = teacher_prompt_ids(tok, msgs, text, header=header)
        k = len(t_ids) - len(student)
        splits = [a for a in range(len(student) + 1) if t_ids[:a] == student[:a] and t_ids[a + k:] == student[a:]]
        assert splits and k > 0                                        # student = A + C, teacher = A + S + C
        assert f"{header}\n{text}\n\n" in [tok.decode(t_ids[a:a + k]) for a in splits]
    assert privileged_block(None) is None and privileged_block("  ") is None
    with pytest.raises(ValueError):
        with_skill([{"role": "system", "content": "x"}], skill)


def test_sokoban_rule_summary_lists_each_blocked_move_once_with_its_cell():
    ep = _episode(ROOM, ["down", "down", "left", "down"])
    s = SokobanRuleSummarizer().summarize([SummaryRequest.from_episode("sokoban", ep)])[0]
    bumps = [line for line in s.mistake_analysis.splitlines() if "walked into a wall" in line]
    assert bumps == ["Turn 1: at (row 3, col 3), down walked into a wall (nothing moved).",
                     "Turn 4: at (row 3, col 2), down walked into a wall (nothing moved)."]
