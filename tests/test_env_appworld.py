"""Tests of env_appworld.py: the real AppWorld engine on synthetic data, and a stdlib fake server for failures.

Real engine: needs the side venv (`bash tests/appworld_setup.sh`, then `export APPWORLD_PYTHON=$PWD/.aw/bin/python`).
The session builds a synthetic data folder with tests/appworld_synth/make_data.py (cached under ~/.cache by a hash of
the script and the appworld version, copied into a temp dir: nothing generated goes into the repo), then drives real
`appworld serve environment` servers through complete episodes. Without the side venv these tests skip, except when
CI=true, where they fail (CI must run them).

Fake server: a ~80-line http.server script standing in for the `appworld` executable. It misbehaves on demand (hang,
HTTP 500, malformed JSON, dying) when the executed code names a trigger and a marker file for it exists, which the
real server cannot do. Its world counts executions, so "ok N" after a restart proves the replay rebuilt the world.

Run: `python -m pytest -q tests/test_env_appworld.py`
"""
import hashlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import env_appworld as aw

HERE = os.path.dirname(os.path.abspath(__file__))
MAKE_DATA = os.path.join(HERE, "appworld_synth", "make_data.py")


def block(code, thought="Next step."):
    return f"{thought}\n```python\n{code}\n```"


# ----------------------------------------------------------------------------------------------------------------------
# Pure functions: parser, truncation, metrics

def test_extract_code_rules():
    assert aw.extract_code("x\n```python\nprint(1)\n```\nmore") == ("print(1)", 1)
    assert aw.extract_code("```\na = 2\n```") == ("a = 2", 1)                       # bare fence counts
    assert aw.extract_code("```py\nb=3\n```") == ("b=3", 1)
    assert aw.extract_code("<code>c = 4</code>") == ("c = 4", 1)                    # verl-agent tags
    assert aw.extract_code("<code>```python\nd = 5\n```</code>") == ("d = 5", 1)    # fence inside tags
    assert aw.extract_code("```python\ne = 6") == ("e = 6", 1)                     # cut at the stop sequence
    assert aw.extract_code("```python print(7)```") == ("print(7)", 1)             # one-line fence
    assert aw.extract_code('```json\n{"a": 1}\n```\n```python\nf = 8\n```') == ("f = 8", 1)  # json block skipped
    assert aw.extract_code("```python\ng = 9\n```\n```python\nh = 10\n```") == ("g = 9", 2)  # first of two
    assert aw.extract_code("<code>i = 1</code> ```python\nj = 2\n```") == ("i = 1", 2)       # earliest wins
    for no_code in ("", "just prose", "```python\n   \n```", "<code> </code>", "`x = 1`", "```json\n{}\n```"):
        assert aw.extract_code(no_code) == (None, 0), no_code


def test_truncate_bound_and_marker():
    assert aw.truncate("abc", 10) == "abc"
    text = "".join(chr(65 + i % 26) for i in range(10_000))
    out = aw.truncate(text, 4000)
    assert len(out) <= 4000 and "characters cut" in out
    head, tail = out.split("\n[... ")[0], out.split(" characters cut ...]\n")[1]
    assert text.startswith(head) and text.endswith(tail) and len(head) == 3 * (len(head) + len(tail)) // 4
    cut = int(out.split("\n[... ")[1].split(" ")[0])
    assert len(head) + len(tail) + cut == len(text)                                # the marker counts exactly
    assert aw.truncate(text, 5) == text[:5]                                        # limit below the marker size


def test_extract_code_fuzz_never_raises():
    rng = random.Random(0)
    pieces = ["```", "```python\n", "```py", "\n", "<code>", "</code>", "<CODE>", "print(", ")", "apis.", "\x00",
              "\ud800", "é", "`", " ", "complete_task(answer=1)", "```json\n", "x" * 50]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        code, n = aw.extract_code(text)
        assert (code is None) == (n == 0) and (code is None or code.strip())


def test_appworld_metrics_numbers():
    def r(task_id, success, completion, difficulty):
        return {"task_id": task_id, "success": success, "completion": completion, "difficulty": difficulty}
    results = [r("aaa_1", True, 1.0, 1), r("aaa_2", False, 0.5, 1), r("bbb_1", True, 1.0, 2), r("bbb_2", True, 1.0, 2),
               r("ccc_1", False, 0.0, 3), r("ccc_1", True, 1.0, 3)]   # two samples of ccc_1: averaged per task
    m = aw.appworld_metrics(results)
    assert m["num_tasks"] == 5 and m["num_episodes"] == 6 and m["num_scenarios"] == 3
    assert m["Acc"] == pytest.approx(100 * 3.5 / 5) and m["TGC"] == 70.0
    assert m["Comp"] == pytest.approx(100 * 4.0 / 5)
    assert m["SGC"] == pytest.approx(round(100 * (0 + 1 + 0.5) / 3, 1))           # aaa fails, bbb all, ccc half
    assert m["by_difficulty"][1] == {"num_tasks": 2, "num_scenarios": 1, "Acc": 50.0, "Comp": 75.0, "TGC": 50.0,
                                     "SGC": 0.0}
    assert m["by_difficulty"][2]["SGC"] == 100.0 and m["by_difficulty"][3]["Acc"] == 50.0
    assert aw.appworld_metrics([])["num_tasks"] == 0


# ----------------------------------------------------------------------------------------------------------------------
# The fake server (stands in for the `appworld` executable)

FAKE_SERVER = r'''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
args = sys.argv[1:]
assert args[:2] == ["serve", "environment"], args
port, root = int(args[args.index("--port") + 1]), args[args.index("--root") + 1]
if os.environ.get("FAKE_AW_STARTUP") == "fail":
    print("Exception: The appworld package is not fully installed; Run 'appworld install'", flush=True)
    sys.exit(1)
world = {}

def once(token):  # misbehave once per marker file the test created
    path = os.path.join(root, "once-" + token)
    if os.path.exists(path):
        os.remove(path)
        return True
    return False

class Handler(BaseHTTPRequestHandler):
    def reply(self, obj, status=200, raw=None):
        data = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.reply({"message": "fake AppWorld"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        code = body.get("code", "")
        if self.path == "/initialize":
            with open(os.path.join(root, "data", "tasks", body["task_id"], "specs.json")) as f:
                specs = json.load(f)
            world.clear()
            world.update(task_id=body["task_id"], executes=0, completed=False, answer=None)
            return self.reply({"output": {"task_id": body["task_id"], **specs}})
        if world.get("task_id") != body.get("task_id"):
            return self.reply({"detail": "wrong task"}, status=500)
        if self.path == "/execute":
            if "HANG" in code and once("HANG"):
                time.sleep(60)
            if "DIE" in code and once("DIE"):
                os._exit(3)
            if ("ERR500" in code and once("ERR500")) or "ALWAYS500" in code:
                return self.reply({"detail": "Internal Server Error"}, status=500)
            if "GARBAGE" in code and once("GARBAGE"):
                return self.reply(None, raw=b"{not json")
            if "SLEEP" in code:
                time.sleep(1.0)
            world["executes"] += 1
            if "complete_task" in code:
                world["completed"] = True
                world["answer"] = 42 if "answer=42" in code else None
            if "BIG" in code:
                return self.reply({"output": "y" * 20000})
            if "raise" in code:
                return self.reply({"output": "Execution failed. Traceback:\n  File x\nValueError: boom"})
            return self.reply({"output": "ok %d" % world["executes"]})
        if self.path == "/task_completed":
            return self.reply({"output": world["completed"]})
        if self.path == "/evaluate":
            passes = [{"requirement": "completed", "label": "no_op_fail"}] if world["completed"] else []
            failures = [] if world["answer"] == 42 else [{"requirement": "answer is 42", "trace": "", "label": ""}]
            if world["answer"] == 42:
                passes.append({"requirement": "answer is 42", "label": "no_op_fail"})
            if not world["completed"]:
                failures.append({"requirement": "completed", "trace": "", "label": ""})
            return self.reply({"output": {"success": not failures, "difficulty": 1, "num_tests": 2,
                                          "passes": passes, "failures": failures}})
        if self.path == "/close":
            world.clear()
            return self.reply({"output": None})
        self.reply({"detail": "not found"}, status=404)

    def log_message(self, *a):
        print(self.address_string(), self.path, flush=True)

HTTPServer(("0.0.0.0", port), Handler).serve_forever()
'''


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory):
    path = tmp_path_factory.mktemp("fakebin") / "appworld"
    path.write_text(f"#!{sys.executable}\n" + FAKE_SERVER)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def fake_root(tmp_path):
    for task_id, instruction, difficulty in [("abc1234_1", "Say 42.", 1), ("abc1234_2", "Say 42 again.", 2)]:
        d = tmp_path / "data" / "tasks" / task_id
        (d / "ground_truth").mkdir(parents=True)
        (d / "specs.json").write_text(json.dumps({
            "instruction": instruction, "datetime": "2023-05-18T12:00:00",
            "supervisor": {"first_name": "Ada", "last_name": "Byron", "email": "ada@example.com",
                           "phone_number": "5550000000"}}))
        (d / "ground_truth" / "metadata.json").write_text(json.dumps({"difficulty": difficulty}))
    (tmp_path / "data" / "tasks" / "abc1234_1" / "ground_truth" / "solution.py").write_text("answer = 42\n")
    (tmp_path / "data" / "datasets").mkdir()
    (tmp_path / "data" / "datasets" / "train.txt").write_text("abc1234_1\n\n# comment\nabc1234_2:tag\n")
    (tmp_path / "data" / "datasets" / "dev.txt").write_text("abc1234_2\n")
    return tmp_path


def make_fake_env(fake_bin, fake_root, **kw):
    return aw.AppWorldEnv(root=str(fake_root), appworld_bin=fake_bin, **{"num_slots": 1, "http_timeout_s": 5, **kw})


def test_fake_episode_protocol(fake_bin, fake_root):
    with make_fake_env(fake_bin, fake_root, format_penalty=0.1) as env:
        assert env.task_ids("train") == ["abc1234_1", "abc1234_2"] and env.task_ids("dev") == ["abc1234_2"]
        ep = env.episode("abc1234_1")
        msgs = ep.initial_messages()
        assert [m["role"] for m in msgs] == ["system", "user"]
        assert "Ada Byron" in msgs[1]["content"] and "Say 42." in msgs[1]["content"]
        assert ep.privileged_context() == "answer = 42\n" and env.episode("abc1234_2").privileged_context() is None
        assert "Say 42." in ep.task_text()
        assert ep.step("no code here") == (aw.FORMAT_ERROR, False)
        assert ep.step(block("raise ValueError('boom')"))[0].startswith("Execution failed")
        obs = ep.step(block("BIG"))[0]
        assert len(obs) <= 4000 and obs.startswith("yyy") and "characters cut" in obs
        obs, done = ep.step(block("apis.supervisor.complete_task(answer=42)"))
        assert (obs, done) == ("ok 3", True) and ep.done and ep.step("more") == ("", True)
        res = ep.result()
        assert res["success"] and res["completion"] == 1.0 and res["turns"] == 4 and res["format_errors"] == 1
        assert res["reward"] == pytest.approx(0.9) and res["exec_errors"] == 1 and res["difficulty"] == 1
        assert (res["num_tests"], res["passes"], res["retries"], res["replays"]) == (2, 2, 0, 0)
        t = ep.trajectory
        assert [e["valid"] for e in t] == [False, True, True, True] and t[0]["code"] is None
        assert t[0]["error"].startswith("format") and t[1]["error"] == "ValueError: boom" and t[3]["error"] is None
        assert all({"reply", "code", "observation", "valid", "error"} <= set(e) for e in t)


def test_fake_turn_limit_and_abort(fake_bin, fake_root):
    with make_fake_env(fake_bin, fake_root) as env:
        ep = env.episode("abc1234_2", max_turns=3)
        assert [ep.step("nothing")[1] for _ in range(3)] == [False, False, True]
        res = ep.result()
        assert res["turns"] == 3 and res["format_errors"] == 3 and not res["success"] and res["completion"] == 0.0
        ep3 = env.episode("abc1234_1")
        ep3.step(block("a = 1"))
        ep3.abort("context cap")
        assert ep3.done and ep3.result()["aborted"] == "context cap" and not ep3.result()["success"]


@pytest.mark.parametrize("trigger", ["HANG", "ERR500", "GARBAGE", "DIE"])
def test_fake_server_failure_restarts_and_replays(fake_bin, fake_root, trigger):
    with make_fake_env(fake_bin, fake_root, http_timeout_s=1.0) as env:
        ep = env.episode("abc1234_1")
        assert ep.step(block("a = 1")) == ("ok 1", False)
        pid = env.servers[0].proc.pid
        (fake_root / f"once-{trigger}").write_text("")
        t0 = time.monotonic()
        assert ep.step(block(f"{trigger}; b = a")) == ("ok 2", False)   # world rebuilt: replayed 1 + retried 1
        assert time.monotonic() - t0 < 5
        assert env.servers[0].proc.pid != pid and ep.retries == 1 and ep.replays == 1
        assert ep.step(block("apis.supervisor.complete_task(answer=42)")) == ("ok 3", True)
        assert ep.result()["success"] and ep.result()["server_error"] is None


def test_fake_second_failure_ends_only_that_episode(fake_bin, fake_root):
    with make_fake_env(fake_bin, fake_root) as env:
        ep = env.episode("abc1234_1")
        obs, done = ep.step(block("ALWAYS500"))
        assert done and obs.startswith("Environment error") and "HTTP 500" in obs
        res = ep.result()
        assert res["server_error"] and res["reward"] == 0.0 and not res["success"] and res["retries"] == 1
        ep2 = env.episode("abc1234_1")  # the pool goes on
        assert ep2.step(block("apis.supervisor.complete_task(answer=42)")) == ("ok 1", True)
        assert ep2.result()["success"]


def test_fake_closed_env_ends_episodes_quietly(fake_bin, fake_root):
    env = make_fake_env(fake_bin, fake_root)
    ep, fresh = env.episode("abc1234_1"), env.episode("abc1234_2")
    assert ep.step(block("a = 1")) == ("ok 1", False)
    env.close()
    assert not env.servers[0].alive()
    obs, done = ep.step(block("b = 2"))
    assert done and "closed" in obs and ep.result()["server_error"]
    fresh.abort("shutting down")   # no exception after close either
    assert fresh.done and not fresh.result()["success"]
    env.close()                    # idempotent


def test_fake_parallel_slots_overlap(fake_bin, fake_root):
    with make_fake_env(fake_bin, fake_root, num_slots=2).start() as env:
        eps = [env.episode("abc1234_1"), env.episode("abc1234_2")]
        aw.step_episodes(eps, [block("a = 0")] * 2)   # warm up: each episode opens its world on its own server
        t0 = time.monotonic()
        out = aw.step_episodes(eps, [block("SLEEP")] * 2)
        assert time.monotonic() - t0 < 1.8          # two 1 s executions ran at the same time
        assert out == [("ok 2", False)] * 2
        assert {ep.last_server for ep in eps} == {s.describe() for s in env.servers} and len(env.servers) == 2
        assert all(ep.replays == 0 for ep in eps)
        with pytest.raises(ValueError):
            aw.step_episodes(eps, ["x"])


def test_fake_more_episodes_than_slots_replay(fake_bin, fake_root):
    with make_fake_env(fake_bin, fake_root, num_slots=1) as env:
        eps = [env.episode("abc1234_1") for _ in range(3)]
        for turn in (1, 2):   # interleaved: each turn finds the one server holding another episode's world
            assert [ep.step(block(f"x = {turn}")) for ep in eps] == [(f"ok {turn}", False)] * 3
        assert [ep.replays for ep in eps] == [1, 1, 1]
        assert aw.step_episodes(eps, [block("x = 3")] * 3) == [("ok 3", False)] * 3   # threads wait for the lease
        assert sum(ep.replays for ep in eps) >= 5 and len({ep.experiment_name for ep in eps}) == 3


def test_fake_startup_failure_shows_log(fake_bin, fake_root, monkeypatch):
    monkeypatch.setenv("FAKE_AW_STARTUP", "fail")
    with make_fake_env(fake_bin, fake_root) as env:
        with pytest.raises(aw.AppWorldError, match="(?s)exited with code 1.*not fully installed.*appworld.* install"):
            env.episode("abc1234_1").step(block("a = 1"))


def test_setup_errors(fake_bin, fake_root, tmp_path_factory, monkeypatch):
    with pytest.raises(aw.AppWorldError, match="pip install appworld"):
        aw.AppWorldEnv(root=str(fake_root), appworld_bin="/nonexistent/appworld")
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(aw.AppWorldError, match="appworld download data --root"):
        aw.AppWorldEnv(root=str(empty), appworld_bin=fake_bin)
    monkeypatch.delenv("APPWORLD_ROOT", raising=False)
    with pytest.raises(aw.AppWorldError, match="no AppWorld root"):
        aw.AppWorldEnv(appworld_bin=fake_bin)
    with pytest.raises(aw.AppWorldError, match="no AppWorld split 'nope'"):
        aw.load_task_ids(str(fake_root), "nope")
    with make_fake_env(fake_bin, fake_root) as env, pytest.raises(aw.AppWorldError, match="unknown AppWorld task"):
        env.episode("zzz_1")
    monkeypatch.setenv("APPWORLD_BIN", "/nonexistent/appworld")
    with pytest.raises(aw.AppWorldError, match="venv"):
        aw.resolve_appworld_bin()


def test_port_in_use(fake_bin, fake_root):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with make_fake_env(fake_bin, fake_root, ports=(port,)) as env:
            with pytest.raises(aw.AppWorldError, match=f"port {port} .*already in use"):
                env.episode("abc1234_1").step(block("a = 1"))


SIGNAL_SCRIPT = """
import os, sys, time, signal
signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal: `cmd &` in a script starts it ignored
sys.path.insert(0, {repo!r})
import env_appworld as aw
env = aw.AppWorldEnv(root={root!r}, appworld_bin={bin!r}, num_slots=2).start()
print(" ".join(str(s.proc.pid) for s in env.servers), flush=True)
if {mode!r} == "exit":
    sys.stdin.readline()
    sys.exit(0)   # no close(): atexit must stop them
time.sleep(30)
"""


@pytest.mark.parametrize("mode", ["exit", "SIGINT", "SIGTERM"])
def test_servers_stopped_on_exit_and_signals(fake_bin, fake_root, mode):
    script = SIGNAL_SCRIPT.format(repo=os.path.dirname(HERE), root=str(fake_root), bin=fake_bin, mode=mode)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    if mode == "exit":
        proc.stdin.write("\n")
        proc.stdin.flush()
    else:
        proc.send_signal(getattr(signal, mode))
    proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids), proc.stderr.read()


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:   # a zombie (exited, not yet reaped by init) counts as gone
        return f.read().split(") ")[1][0] != "Z"


# ----------------------------------------------------------------------------------------------------------------------
# The real engine on synthetic data

ENABLE = ("bash tests/appworld_setup.sh && export APPWORLD_PYTHON=$PWD/.aw/bin/python  (creates the side venv .aw; "
          "offline: pip install appworld && appworld install)")


@pytest.fixture(scope="session")
def appworld_python():
    """The side venv's python, or skip (fail under CI=true) saying how to enable the real-engine tests."""
    py = os.environ.get("APPWORLD_PYTHON")
    problem = None
    if not py:
        problem = "APPWORLD_PYTHON is not set"
    else:
        try:
            out = subprocess.run([py, "-c", "import appworld.apps.spotify, importlib.metadata as m; "
                                  "print(m.version('appworld'))"], capture_output=True, text=True, timeout=120)
            last = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
            problem = None if out.returncode == 0 else f"`{py} -c 'import appworld.apps.spotify'` failed: {last}"
        except OSError as err:
            problem = f"cannot run {py}: {err}"
    if problem:
        msg = f"real AppWorld engine tests need the side venv: {problem}. Enable: {ENABLE}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + "  (CI=true: these tests must not be skipped)")
        pytest.skip(msg)
    return py, out.stdout.strip()


@pytest.fixture(scope="session")
def aw_root(appworld_python, tmp_path_factory):
    """A temp APPWORLD_ROOT with the synthetic data/, built once per (make_data.py, appworld version) and cached."""
    py, version = appworld_python
    with open(MAKE_DATA, "rb") as f:
        key = hashlib.sha256(f.read() + version.encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "skill-sd",
                         f"appworld-synth-{key}")
    if not os.path.isdir(os.path.join(cache, "data")):
        build = f"{cache}.tmp{os.getpid()}"
        shutil.rmtree(build, ignore_errors=True)
        subprocess.run([py, MAKE_DATA, build], check=True, timeout=300, capture_output=True)
        try:
            os.rename(build, cache)   # atomic: a concurrent session never sees half a folder
        except OSError:
            shutil.rmtree(build, ignore_errors=True)
    root = tmp_path_factory.mktemp("appworld_root")
    shutil.copytree(os.path.join(cache, "data"), root / "data")
    return str(root)


@pytest.fixture(scope="module")
def real_env(appworld_python, aw_root):
    bin_ = os.path.join(os.path.dirname(appworld_python[0]), "appworld")
    with aw.AppWorldEnv(root=aw_root, appworld_bin=bin_, num_slots=2, http_timeout_s=60) as env:
        warm = [env.episode("a1b2c3d_1"), env.episode("a1b2c3d_2")]   # a server's first /initialize imports the
        aw.step_episodes(warm, [block("pass")] * 2)                      # apps (~3-5 s): pay it on both in parallel
        for ep in warm:
            ep.abort("warm-up")
        yield env
    assert not any(s.alive() for s in env.servers)   # close() stopped them


LOGIN = textwrap.dedent("""\
    passwords = {p["account_name"]: p["password"] for p in apis.supervisor.show_account_passwords()}
    email = apis.supervisor.show_profile()["email"]
    token = apis.spotify.login(username=email, password=passwords["spotify"])["access_token"]
    """)
COUNT = LOGIN + "n = len(apis.spotify.show_playlist_library(access_token=token))\nprint(n)"


def test_real_data_splits_and_context(aw_root):
    assert aw.load_task_ids(aw_root, "train") == ["a1b2c3d_1", "a1b2c3d_2", "a1b2c3d_3", "b2c3d4e_1"]
    assert aw.load_task_ids(aw_root, "dev") == ["e4f5a6b_1", "e4f5a6b_2", "f5a6b7c_1"]
    assert aw.load_task_ids(aw_root, "test_normal") == []
    assert aw.load_task_info(aw_root, "f5a6b7c_1")["difficulty"] == 3
    assert "def solution(apis, requester)" in aw.load_solution(aw_root, "e4f5a6b_1")
    assert aw.load_solution(aw_root, "f5a6b7c_1") is None                         # minimal mode


def test_real_gold_solution_succeeds(real_env):
    ep = real_env.episode("e4f5a6b_1")
    system, user = (m["content"] for m in ep.initial_messages())
    assert "apis.api_docs.show_api_descriptions" in system and "apis.supervisor.complete_task" in system
    assert "Alice Walker" in user and 'playlist titled "Road Trip"' in user
    obs, done = ep.step(block(ep.privileged_context() + "\nsolution(apis, requester)", "I run the solution."))
    assert (obs, done) == ("Execution successful.", True)
    res = ep.result()
    assert (res["success"], res["completion"], res["reward"], res["turns"]) == (True, 1.0, 1.0, 1)
    assert (res["difficulty"], res["num_tests"], res["passes"], res["failures"]) == (2, 3, 3, [])


def test_real_multi_turn_with_format_error(real_env):
    ep = real_env.episode("a1b2c3d_1")
    assert ep.step("I should count the playlists, then answer.") == (aw.FORMAT_ERROR, False)
    assert ep.step(block(COUNT)) == ("3\n", False)
    assert ep.step(block("apis.supervisor.complete_task(answer=n)")) == ("Execution successful.", True)
    res = ep.result()
    assert res["success"] and res["completion"] == 1.0 and res["format_errors"] == 1 and res["turns"] == 3
    assert [t["valid"] for t in ep.trajectory] == [False, True, True]


def test_real_wrong_answer_and_public_playlist_partial(real_env):
    ep = real_env.episode("a1b2c3d_2")
    ep.step(block("apis.supervisor.complete_task(answer=5)"))
    res = ep.result()
    assert (res["success"], res["completion"], res["passes"], res["num_tests"]) == (False, 0.5, 1, 2)
    assert res["failures"] == ["assert answers match."]
    ep = real_env.episode("e4f5a6b_1")
    ep.step(block(LOGIN + "apis.spotify.create_playlist(access_token=token, title='Road Trip', is_public=True)\n"
                  "apis.supervisor.complete_task()"))
    res = ep.result()
    assert (res["success"], res["passes"], res["num_tests"]) == (False, 2, 3)
    assert res["completion"] == pytest.approx(2 / 3) and res["failures"] == ["assert the new playlist is private."]


def test_real_errors_truncation_and_abort(real_env):
    ep = real_env.episode("f5a6b7c_1")
    assert ep.privileged_context() is None
    obs, _ = ep.step(block("print(1/0)"))
    assert obs.startswith("Execution failed") and ep.trajectory[-1]["error"] == "ZeroDivisionError: division by zero"
    obs, _ = ep.step(block("print('A' * 100000)"))
    assert len(obs) <= 4000 and obs.startswith("AAAA") and "characters cut" in obs
    obs, _ = ep.step(block("print('one')") + "\n" + block("print('two')"))
    assert obs == "one\n\n[Only the first code block was run.]"
    ep.abort("context cap")
    res = ep.result()
    assert ep.done and res["aborted"] == "context cap" and not res["success"] and res["completion"] == 0.5
    assert res["exec_errors"] == 1 and res["turns"] == 3


def test_real_forty_turn_exhaustion(real_env):
    ep = real_env.episode("a1b2c3d_3")
    dones = [ep.step(block(f"x = {i}"))[1] for i in range(40)]
    assert dones == [False] * 39 + [True]
    res = ep.result()
    assert res["turns"] == 40 and not res["task_completed"] and not res["success"] and res["completion"] == 0.5


def test_real_parallel_slots_and_replay(real_env):
    answers = {"a1b2c3d_1": 3, "a1b2c3d_2": 2, "a1b2c3d_3": 4}
    eps = [real_env.episode(t) for t in answers]
    # 3 live episodes on 2 servers: worlds are swapped and rebuilt by replay, results stay exact
    assert aw.step_episodes(eps, [block(COUNT)] * 3) == [(f"{n}\n", False) for n in answers.values()]
    assert aw.step_episodes(eps, [block("apis.supervisor.complete_task(answer=n)")] * 3) == \
        [("Execution successful.", True)] * 3
    assert all(ep.result()["success"] for ep in eps) and sum(ep.replays for ep in eps) >= 1
    # 2 live episodes on 2 servers: each keeps its own server, no replay
    eps = [real_env.episode("a1b2c3d_1"), real_env.episode("e4f5a6b_2")]
    aw.step_episodes(eps, [block(COUNT)] * 2)
    aw.step_episodes(eps, [block("apis.supervisor.complete_task(answer=n)")] * 2)
    assert [ep.result()["success"] for ep in eps] == [True, True] and [ep.replays for ep in eps] == [0, 0]
    assert len({ep.last_server for ep in eps}) == 2


def test_real_killed_server_restarts_and_retries(real_env):
    ep = real_env.episode("a1b2c3d_3")
    assert ep.step(block(COUNT)) == ("4\n", False)
    server = next(s for s in real_env.servers if s.owner is ep)
    old_pid = server.proc.pid
    os.killpg(old_pid, signal.SIGKILL)
    server.proc.wait()
    obs, done = ep.step(block("apis.supervisor.complete_task(answer=n)"))  # `n` exists again only by replay
    assert (obs, done) == ("Execution successful.", True)
    res = ep.result()
    assert res["success"] and res["replays"] == 1 and server.proc.pid != old_pid


def test_real_malformed_replies_never_raise(real_env):
    rng = random.Random(1)
    pieces = ["```python\n", "```", "<code>", "</code>", "print(", "'", ")", "\n", "apis.spotify.", "import os\n",
              "os.system('true')\n", "\x00", "\ud800", "input()\n", "é", "x" * 200, "#", "1/0",
              "exit()\n", "raise SystemExit\n"]
    ep = real_env.episode("a1b2c3d_1", max_turns=12)
    while not ep.done:
        obs, done = ep.step("".join(rng.choice(pieces) for _ in range(rng.randint(0, 10))))
        assert isinstance(obs, str) and len(obs) <= 4000
    res = ep.result()
    assert res["server_error"] is None and 0.0 <= res["completion"] <= 1.0 and res["turns"] <= 12


def test_train_runs_two_iterations_on_the_fake_server(fake_bin, fake_root, tmp_path, monkeypatch):
    """train.py --env appworld end to end on the fake server: two iterations of Skill-SD with the random tiny model,
    rule-based AppWorld skills of iteration 1 serving iteration 2 (one training task), and evaluations that carry TGC and SGC."""
    import json as json_lib

    import train
    monkeypatch.setenv("APPWORLD_BIN", fake_bin)
    run_dir = tmp_path / "aw-run"
    cfg = train.parse_args(["--env", "appworld", "--model", "tiny", "--appworld-root", str(fake_root), "--iterations",
                            "2", "--tasks-per-iter", "1", "--group-size", "2", "--max-turns", "2", "--max-new-tokens",
                            "8", "--eval-every", "0", "--appworld-slots", "2", "--train-tasks", "1", "--run-dir",
                            str(run_dir)])
    assert cfg.summarizer == "rule"
    train.train(cfg)
    rows = [json_lib.loads(line) for line in open(run_dir / "log.jsonl")]
    evals = [json_lib.loads(line) for line in open(run_dir / "eval.jsonl")]
    assert [r["iteration"] for r in rows] == [1, 2] and [e["iteration"] for e in evals] == [0, 2]
    assert rows[0]["teacher_task_frac"] == 0.0 and rows[1]["teacher_task_frac"] == 1.0
    assert rows[1]["bank"]["skills"] >= 1 and all(math.isfinite(r["loss_grpo"]) for r in rows)
    assert all(e["tasks"] == 1 and {"TGC", "SGC", "by_difficulty"} <= set(e) for e in evals)
    assert evals[-1]["TGC"] == 100 * evals[-1]["acc"]            # one dev task: TGC is its success, in percent


def test_the_env_restores_the_signal_handlers_it_installed(fake_bin, fake_root):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    env = make_fake_env(fake_bin, fake_root)
    assert all(signal.getsignal(sig) is aw._exit_on_signal for sig, h in before.items() if h is signal.SIG_DFL)
    env.close()
    assert {sig: signal.getsignal(sig) for sig in before} == before
