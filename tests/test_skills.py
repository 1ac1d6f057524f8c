"""Tests for skills.py: parsing (incl. fuzz), the skill cap, UCB order, bank caps/dedup/round trip, async == sync, the
HTTP summarizer against a stdlib fake server (and a closed port, and a socket that never answers: the fallback
summarises every trajectory), the LLM summarizer on the tiny model, and that the teacher prompt is the
student prompt plus one contiguous block. The rule summarisers are tested in test_rule_skills.py."""
import http.server
import json
import math
import random
import socket
import threading
import time

import pytest

from rule_skills import AppWorldRuleSummarizer
from skills import (FALLBACKS, MAX_SKILL_CHARS, PRIVILEGED_HEADER, SKILL_HEADER, AsyncSummarizer, FallbackSummarizer,
                    HTTPSummarizer, LLMSummarizer, Skill, SkillBank, SummaryRequest, parse_skill, privileged_block,
                    summary_messages, with_skill)
from test_rule_skills import APPWORLD_TRAJ, ROOM, _episode

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
# async

def _requests():
    out = [SummaryRequest(f"aw-{i}", "appworld", "x", APPWORLD_TRAJ[:i + 1], {"success": i == 4}) for i in range(5)]
    out.append(SummaryRequest("zz", "appworld", "x", [{"code": 5}], {}))  # the summariser fails: dropped, counted
    return out


def test_async_returns_the_same_skills_as_sync():
    reqs = _requests()
    sync = AsyncSummarizer(AppWorldRuleSummarizer(), synchronous=True)
    sync.submit(0, reqs[:3])
    sync.submit(1, reqs[3:])
    want = sync.collect()
    assert len(want) == 5 and sync.collect() == []
    with AsyncSummarizer(AppWorldRuleSummarizer()) as worker:
        worker.submit(0, reqs[:3])
        worker.submit(1, reqs[3:])
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
    assert worker.collect() == [("a", _skill(0), {"reward": 0.0, "success": False, "order": ()})]
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
    assert dead.summarize([req, req]) == [None, None]
    assert dead.num_errors + dead.num_unsent == 2 and dead.num_failed == 2   # no reminder retry on a dead server


def _closed_port():
    with socket.socket() as s:              # bound, then closed: nothing listens there now
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server():
    """A socket that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    srv.close()


def _sokoban_requests(n):
    return [SummaryRequest(f"level-{i}", "sokoban", "Push the box.", [{"reply": "<action>up</action>",
                                                                        "observation": "# P #", "valid": True}],
                           {"success": False, "reward": 0.0}) for i in range(n)]


class _Fixed:
    def __init__(self, skill):
        self.skill, self.seen = skill, []

    def summarize(self, requests):
        self.seen += [r.task_id for r in requests]
        return [self.skill for _ in requests]


@pytest.mark.parametrize("where", ["closed port", "silent server"])
def test_unreachable_server_loses_no_trajectory(where, silent_server, caplog):
    url = f"http://127.0.0.1:{_closed_port()}" if where == "closed port" else silent_server
    reqs = _sokoban_requests(5)
    fallback = _Fixed(Skill(**GOOD))
    summ = FallbackSummarizer(HTTPSummarizer(url, "m", timeout=0.5, max_workers=1), fallback)
    t0 = time.time()
    with caplog.at_level("WARNING", logger="skills"):
        out = summ.summarize(reqs)
    assert time.time() - t0 < 3                        # one timeout for the batch, not one (or two) per trajectory
    assert out == [Skill(**GOOD)] * 5 and fallback.seen == [r.task_id for r in reqs]   # every one, in order
    assert summ.stats() == {"http_errors": 1, "http_unsent": 4, "http_no_skill": 5, "skills_primary": 0,
                            "skills_fallback": 5}
    why = "refused the connection" if where == "closed port" else "did not answer in time"
    assert any(why in r.getMessage() and url in r.getMessage() for r in caplog.records)
    assert any("5 of 5 trajectories got no skill" in r.getMessage() for r in caplog.records)
    with AsyncSummarizer(summ, synchronous=True) as worker:     # the count reaches train.py's log line
        worker.submit(0, reqs[:2])
        assert len(worker.collect()) == 2 and worker.stats()["skills_fallback"] == 7


def test_fallback_fills_only_the_gaps_and_survives_a_raising_primary():
    reqs = _sokoban_requests(3)
    good, other = Skill(**GOOD), Skill("a", "b", "c")

    class Gappy:
        def summarize(self, requests):
            return [good, None, good]

    class Raising:
        def summarize(self, requests):
            raise RuntimeError("boom")

    summ = FallbackSummarizer(Gappy(), _Fixed(other))
    assert summ.summarize(reqs) == [good, other, good] and (summ.num_primary, summ.num_fallback) == (2, 1)
    summ = FallbackSummarizer(Raising(), _Fixed(other))
    assert summ.summarize(reqs) == [other] * 3 and summ.num_fallback == 3


def test_summary_messages_truncate_and_report_outcome():
    traj = [{"reply": f"<action>up</action> {i}", "observation": "grid " * 200, "valid": True} for i in range(40)]
    req = SummaryRequest("s", "sokoban", "Push the boxes.", traj, {"success": False, "completion": 0.5,
                                                                   "reward": 0.5})
    user = summary_messages(req, max_chars=3000)[1]["content"]
    assert "Push the boxes." in user and "chars cut]" in user and "turns omitted) ..." in user
    assert "Turn 1 action" in user and "Turn 40 observation" in user
    assert "Outcome: success=no, completion=0.50, reward=0.50, turns=40" in user
    assert len(user) < 3000 + 2500


# ---------------------------------------------------------------------------------------------------------------------
# tiny model: LLM summarizer and teacher prompts

def test_llm_summarizer_on_tiny_model(tiny):
    from model import SamplingConfig, complete
    model, tok = tiny
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    summ = LLMSummarizer(lambda chats: complete(model, tok, chats, greedy, batch_size=2))
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
        t_ids = encode_prompt(tok, with_skill(msgs, text, header=header))
        k = len(t_ids) - len(student)
        splits = [a for a in range(len(student) + 1) if t_ids[:a] == student[:a] and t_ids[a + k:] == student[a:]]
        assert splits and k > 0                                        # student = A + C, teacher = A + S + C
        assert f"{header}\n{text}\n\n" in [tok.decode(t_ids[a:a + k]) for a in splits]
    assert privileged_block(None) is None and privileged_block("  ") is None
    with pytest.raises(ValueError):
        with_skill([{"role": "system", "content": "x"}], skill)


def test_a_skill_cut_inside_an_escaped_surrogate_is_valid_text(tiny, tmp_path):
    """A real model's summary can end inside an escaped emoji ("\\ud83d" without its low half): the parsed skill holds
    valid text (the half becomes U+FFFD, a complete pair its character), so the bank saves and reloads it and the
    teacher prompt tokenizes."""
    from model import encode_prompt
    cut = '{"success_analysis": "pushed right \\ud83d", "mistake_analysis": "ok \\ud83d\\ude00", "golden_workflow": "1. up'
    skill = parse_skill(cut)
    assert skill.success_analysis == "pushed right \ufffd" and skill.mistake_analysis == "ok \U0001F600"
    raw = Skill("a \ud83d", "b", "c")                      # a Skill built by hand with a lone half
    bank = SkillBank()
    assert bank.add("t", skill) and bank.add("t", raw)
    bank.save(str(tmp_path / "bank.json"))
    again = SkillBank.load(str(tmp_path / "bank.json"))
    assert [s.to_prompt() for _, s in again.skills("t")] == [s.to_prompt() for _, s in bank.skills("t")]
    assert again.skills("t")[1][1].success_analysis == "a \ufffd"
    _, tok = tiny
    ids = encode_prompt(tok, with_skill([{"role": "user", "content": "play"}], again.skills("t")[1][1].to_prompt()))
    assert "\ufffd" in tok.decode(ids)
    long = Skill("x" * 3000 + "\U0001F600" * 500, "y", "z").to_prompt()       # the cap never splits a character
    assert len(long) <= MAX_SKILL_CHARS and long.encode("utf-8")
