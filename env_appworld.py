"""AppWorld for Skill-SD: episodes played against the real `appworld serve environment` servers over HTTP.

Paper setup (METHOD.md §9): train on the 90 `train` tasks, evaluate on the 57 `dev` tasks, at most 40 turns; the
training reward is Comp (fraction of the task's unit tests passed), Acc = all tests passed. Sources: the appworld
package 0.1.3.post1 and its HTTP server, LOOP, verl-agent and AppWorld's official ReAct baseline.

AppWorld pins pydantic<2, freezes the whole process clock while a task is open, times out with SIGALRM and allows one
world per process, so this file never imports `appworld`: it starts `appworld serve environment` processes (usually
from a side venv, see tests/appworld_setup.sh) and talks to them with urllib. Stdlib only.

Choices and deviations (numbered; [C] = ours):
 1. [C] Slots. `num_slots` servers at most, started lazily on 127.0.0.1 free ports, each in its own process group (so
    a Ctrl-C in the terminal does not reach them and one killpg ends each). A world lives inside a server, and the
    trainer keeps B = tasks x G episodes alive at once, so an episode takes a server only for one turn (a lease) and
    prefers the server that still holds its world. With B <= num_slots every episode keeps its own server (no
    overhead); with more, a server is handed to another episode and the evicted episode's world is rebuilt later by
    re-initializing the task and replaying its executed code (correct because worlds are deterministic: frozen clock,
    fixed random_seed; it costs O(turns) extra executions per switch, and a warning says to raise num_slots).
 2. [C] Failures. Every HTTP call has a timeout. A server that dies, hangs past `http_timeout_s`, answers HTTP 500 or
    malformed JSON is killed, restarted and the episode's world replayed; the failed operation is retried once per
    episode. A second failure ends only that episode (result()["server_error"], reward 0: trainers may drop it);
    nothing else is lost. A server that cannot start at all raises AppWorldError (a set-up problem).
 3. Task text comes from `data/tasks/<id>/specs.json` (what GET /tasks/<id> returns), difficulty from
    ground_truth/metadata.json, splits from data/datasets/<split>.txt, privileged context (OPD teacher) from
    ground_truth/solution.py when present (full mode: train/dev), else None. The data is read at run time, never copied.
 4. [C] The prompt is ours (paraphrasing the official ReAct prompt and verl-agent's rules): supervisor identity, the
    api_docs discovery calls, one Python block per turn, complete_task. Code = the first ```python (or bare ```)
    fenced block, or <code>...</code> (verl-agent), whichever comes first; an unclosed final block counts (the official
    baseline stops generation at the closing fence). No code = a format-error turn: nothing runs, the turn counts,
    the observation says what to do; `format_penalty` per such turn (default 0) comes off the reward.
 5. Observations are the REPL output ("Execution failed. Traceback: ..." on errors, as AppWorld returns it), cut to
    `max_observation_chars` (4,000; head and tail kept, the official baseline allows 20,000 with a larger context).
 6. done = task_completed (complete_task called) or `max_turns` (40). Then POST /evaluate with suppress_errors=true
    (without it a failing test is an HTTP 500) and /close. reward = Comp = passes / num_tests (or success with
    reward="success"); abort() (context cap) evaluates the state so far but never counts as a success.
 7. Metrics (appworld_metrics): Acc and Comp (Skill-SD), TGC and SGC (AppWorld's evaluator.Metric: per-task success,
    and the share of scenarios = id prefix before '_' whose tasks all succeed; 1 decimal), per difficulty too.

Run: `python env_appworld.py --root $APPWORLD_ROOT [--task ID]` plays a task's ground-truth solution as the "model"
reply; tests: `python -m pytest -q tests/test_env_appworld.py` (real engine with APPWORLD_PYTHON set, see the test).
"""
import argparse
import atexit
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

log = logging.getLogger("env_appworld")
INSTALL_HINT = ("Install AppWorld in a side venv (it pins pydantic<2, so never in the trainer's venv):\n"
                "  python3.11 -m venv .aw && .aw/bin/pip install appworld && .aw/bin/appworld install\n"
                "(or `bash tests/appworld_setup.sh`), then pass appworld_bin=.aw/bin/appworld or set APPWORLD_BIN.")
DATA_HINT = "Download the task data (needs the internet): `.aw/bin/appworld download data --root {root}`."


class AppWorldError(RuntimeError):
    """A set-up problem (not installed, no data, a server that cannot start): fatal, with a message saying the fix."""


class ServerError(RuntimeError):
    """A server died, hung or answered garbage: the server is restarted and the episode's operation retried once."""


@dataclasses.dataclass
class AppWorldConfig:
    root: str | None = None              # APPWORLD_ROOT holding data/; None = $APPWORLD_ROOT
    appworld_bin: str | None = None      # the `appworld` executable; None = $APPWORLD_BIN, then .aw/bin, then PATH
    num_slots: int = 4                   # servers (= live worlds) at most; >= live episodes avoids replays (choice 1)
    max_turns: int = 40                  # paper: 40 turns
    max_observation_chars: int = 4000    # bound on each observation (choice 5)
    format_penalty: float = 0.0          # subtracted from the reward per turn without code (LOOP/verl-agent style)
    reward: str = "completion"           # "completion" (Comp, the paper's training reward) | "success" (Acc)
    http_timeout_s: float = 180.0        # per request; longer than execute_timeout_s, so only a real hang trips it
    execute_timeout_s: int | None = 60   # AppWorld's own per-execute timeout (SIGALRM inside the server)
    startup_timeout_s: float = 120.0     # wait for a new server to answer GET /
    random_seed: int = 100               # AppWorld's default; access tokens depend on it (replays rely on it)
    ports: tuple | None = None           # fixed ports per slot instead of free ones
    recycle_every: int = 500             # restart a server after this many task initializations (memory growth)
    keep_outputs: bool = False           # keep experiments/outputs/<experiment> after an episode (64 KB each)
    experiment_prefix: str | None = None  # None = skillsd-<pid>-<unix time>
    handle_signals: bool = True          # turn SIGTERM/SIGHUP into SystemExit so atexit still stops the servers


# ----------------------------------------------------------------------------------------------------------------------
# Data folder: splits, task specs, difficulty, solutions

def task_dir(root, task_id):
    return os.path.join(root, "data", "tasks", task_id)


def load_task_ids(root, split):
    """Task ids of a split, one per line of data/datasets/<split>.txt (an optional ':tag' suffix is dropped)."""
    path = os.path.join(root, "data", "datasets", f"{split}.txt")
    if not os.path.exists(path):
        have = sorted(f[:-4] for f in os.listdir(os.path.dirname(path))) if os.path.isdir(os.path.dirname(path)) else []
        raise AppWorldError(f"no AppWorld split {split!r}: {path} does not exist (splits here: {have}). "
                            + DATA_HINT.format(root=root))
    with open(path) as f:
        lines = [line.split(":")[0].strip() for line in f]
    return [line for line in lines if line and not line.startswith("#")]


def load_task_info(root, task_id):
    """instruction, supervisor {first_name, last_name, email, phone_number}, datetime, difficulty of one task."""
    path = os.path.join(task_dir(root, task_id), "specs.json")
    if not os.path.exists(path):
        raise AppWorldError(f"unknown AppWorld task {task_id!r}: {path} does not exist")
    with open(path) as f:
        specs = json.load(f)
    meta_path = os.path.join(task_dir(root, task_id), "ground_truth", "metadata.json")
    difficulty = None
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            difficulty = json.load(f).get("difficulty")
    return {"task_id": task_id, "instruction": specs["instruction"], "supervisor": specs["supervisor"],
            "datetime": specs.get("datetime"), "difficulty": difficulty}


def load_solution(root, task_id):
    path = os.path.join(task_dir(root, task_id), "ground_truth", "solution.py")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


# ----------------------------------------------------------------------------------------------------------------------
# The prompt and the reply parser

SYSTEM_PROMPT = """You are an autonomous agent that carries out everyday tasks for your supervisor by writing Python \
code against the APIs of their apps (amazon, phone, file_system, spotify, venmo, gmail, splitwise, simple_note, \
todoist), plus `supervisor` (their profile, addresses, payment cards and account passwords) and `api_docs`.

How each turn works:
- Reply with a brief thought, then exactly ONE Python code block:
```python
print(apis.api_docs.show_app_descriptions())
```
- The code runs in a persistent Python session: variables stay defined for later turns. Whatever you print comes back \
as the next message, so print what you need to see. Only the first code block of a reply is run.

Using the apps:
- Call an API as `apis.<app_name>.<api_name>(**arguments)`. You do not know the APIs in advance; look them up: \
`apis.api_docs.show_api_descriptions(app_name="spotify")` lists an app's APIs and \
`apis.api_docs.show_api_doc(app_name="spotify", api_name="login")` shows one API's parameters and response.
- Most apps need a login; get the supervisor's passwords from `apis.supervisor.show_account_passwords()` and pass the \
returned access_token to later calls.
- Results often come in pages: increase page_index until a page comes back empty.
- Do only what the task asks, use only `apis` (no files, no network), and look values up instead of guessing them.

Finishing:
- Call `apis.supervisor.complete_task(answer=...)` with the bare answer (a number or a few words) when the task asks a \
question, or `apis.supervisor.complete_task()` when it asks for an action. If it cannot be done, call \
`apis.supervisor.complete_task(status="fail")`.
- The episode ends when complete_task is called, or after {max_turns} turns."""

USER_PROMPT = """Supervisor: {first_name} {last_name} (email {email}, phone {phone_number})
Current date and time: {datetime}
Task: {instruction}"""

FORMAT_ERROR = ("No Python code was found in your reply, so nothing was run. Reply with a short thought and exactly "
                "one code block:\n```python\n# your code here\n```\nFinish with apis.supervisor.complete_task(...).")

_FENCE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.S)      # ```lang \n body ``` (or unclosed at the end)
_INLINE_FENCE = re.compile(r"```(?:python|py)?[ \t]+([^\n`]+?)```")  # ```python x = 1``` on one line
_CODE_TAG = re.compile(r"<code>(.*?)(?:</code>|\Z)", re.S | re.I)
_PY_TAGS = ("", "python", "py", "python3", "ipython")


def extract_code(reply):
    """(code, number of code blocks found) from a model reply; code is None when there is none (choice 4).

    >>> extract_code("I list the apps.\\n```python\\nprint(apis.api_docs.show_app_descriptions())\\n```")
    ('print(apis.api_docs.show_app_descriptions())', 1)
    """
    tags = [(m.start(), m.end(), m.group(1)) for m in _CODE_TAG.finditer(reply)]
    found = []  # (start index, code)
    for start, _, inner in tags:
        fenced = _FENCE.search(inner)  # models sometimes fence inside the tags
        found.append((start, fenced.group(2) if fenced else inner))
    in_tag = lambda i: any(a <= i < b for a, b, _ in tags)  # noqa: E731
    found += [(m.start(), m.group(2)) for m in _FENCE.finditer(reply)
              if m.group(1).strip().lower() in _PY_TAGS and not in_tag(m.start())]
    found += [(m.start(), m.group(1)) for m in _INLINE_FENCE.finditer(reply) if not in_tag(m.start())]
    found = sorted((start, code) for start, code in found if code.strip())
    return (found[0][1].strip("\n"), len(found)) if found else (None, 0)


def truncate(text, limit):
    """Cut text to at most `limit` characters, keeping the head (3/4) and the tail, with a marker in between."""
    if limit is None or len(text) <= limit:
        return text
    marker = "\n[... {} characters cut ...]\n"
    keep = limit - len(marker.format(len(text)))
    if keep <= 0:
        return text[:limit]
    head = keep * 3 // 4
    return text[:head] + marker.format(len(text) - keep) + text[len(text) - (keep - head):]


# ----------------------------------------------------------------------------------------------------------------------
# One `appworld serve environment` process

def _port_is_free(port):
    with socket.socket() as s:  # the server binds all interfaces (fixed in the package), so test those
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppWorldServer:
    """A server process plus the client side of its one world: who owns it (`owner`) and whether it is leased."""

    def __init__(self, appworld_bin, root, slot, log_path, port=None, http_timeout_s=180.0, startup_timeout_s=120.0):
        self.bin, self.root, self.slot, self.log_path = appworld_bin, root, slot, log_path
        self.fixed_port, self.port, self.proc = port, None, None
        self.http_timeout_s, self.startup_timeout_s = http_timeout_s, startup_timeout_s
        self.owner = None      # the episode whose world is open on this server (None: no world of a live episode)
        self.busy = False      # leased for one episode operation
        self.last_used = 0     # lease counter value at the last lease (eviction picks the least recent)
        self.inits = 0         # task initializations since the last (re)start (recycling)
        self.retired = False   # set by AppWorldEnv.close(): never start again
        self._lock = threading.Lock()  # orders a start in a worker thread against close() in the main thread
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send 127.0.0.1 via a proxy

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def describe(self):
        return f"slot {self.slot} (pid {self.proc.pid if self.proc else None}, port {self.port})"

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        for _ in range(1 if self.fixed_port else 3):  # a free port can be taken between the probe and the bind
            port = self.fixed_port or _free_port()
            if not _port_is_free(port):
                if self.fixed_port:
                    raise AppWorldError(f"port {port} (slot {self.slot}) is already in use: stop what listens there "
                                        "or leave `ports` unset to use free ports")
                continue
            self.port = port
            cmd = [self.bin, "serve", "environment", "--port", str(port), "--root", self.root, "--no-show-usage"]
            os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
            with self._lock, open(self.log_path, "ab") as log_file:  # appended: a crashed server's log survives
                if self.retired:
                    raise ServerError("the AppWorld environment was closed")
                log_file.write(f"\n==== {' '.join(cmd)}\n".encode())
                log_file.flush()
                self.proc = subprocess.Popen(cmd, cwd=self.root, stdin=subprocess.DEVNULL, stdout=log_file,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if self._wait_ready(cmd):
                self.owner, self.inits = None, 0
                log.info("AppWorld server %s started", self.describe())
                return
        raise AppWorldError(f"no free port found for AppWorld server slot {self.slot} after 3 tries")

    def _wait_ready(self, cmd):
        """True when GET / answers; False when the port was taken meanwhile; AppWorldError otherwise."""
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self.proc.poll() is not None:
                if self.retired:
                    raise ServerError("the AppWorld environment was closed")
                tail = self.log_tail()
                if "address already in use" in tail.lower() and not self.fixed_port:
                    return False
                raise AppWorldError(f"the AppWorld server exited with code {self.proc.returncode} while starting: "
                                    f"{' '.join(cmd)}\nlast lines of its log {self.log_path}:\n{tail}"
                                    + _startup_hint(tail, self.bin, self.root))
            try:
                self.request("GET", "/", timeout=2.0)
                if self.alive():  # the answer came from our process, not from something else on the port
                    return True
            except ServerError:
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise AppWorldError(f"the AppWorld server {self.describe()} did not answer within "
                                    f"{self.startup_timeout_s:.0f} s; last lines of {self.log_path}:\n{tail}")
            time.sleep(0.1)

    def log_tail(self, lines=20):
        try:
            with open(self.log_path, "rb") as f:
                return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, retire=False):
        """Kill the server's process group. SIGKILL at once: the server keeps no state we need (AppWorld writes its
        outputs after every execute) and its SIGTERM shutdown can take seconds."""
        with self._lock:
            self.retired = self.retired or retire
            proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("AppWorld server %s did not exit after SIGKILL", self.describe())
        self.owner = None

    def restart(self):
        self.stop()
        self.start()

    def request(self, method, path, body=None, timeout=None):
        """The `output` of one JSON call; ServerError on any transport, HTTP or JSON problem."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(req, timeout=timeout or self.http_timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            try:
                detail = err.read()[:300].decode("utf-8", "replace")
            except Exception:  # the body of a failing server can itself be broken
                detail = ""
            raise ServerError(f"{path}: HTTP {err.code} from AppWorld server {self.describe()}: {detail}") from None
        except Exception as err:  # refused, reset, timeout (a hang), incomplete read, ...
            raise ServerError(f"{path}: no answer from AppWorld server {self.describe()}: "
                              f"{type(err).__name__}: {err}") from None
        try:
            payload = json.loads(raw)
        except ValueError:
            raise ServerError(f"{path}: malformed JSON from AppWorld server {self.describe()}: {raw[:200]!r}") from None
        if path == "/":
            return payload
        if not isinstance(payload, dict) or "output" not in payload:
            raise ServerError(f"{path}: reply without 'output' from AppWorld server {self.describe()}: {raw[:200]!r}")
        return payload["output"]


def _startup_hint(tail, appworld_bin, root):
    if "not fully installed" in tail:
        return f"\nRun `{appworld_bin} install` (decrypts the apps; offline)."
    if "Did not find any ./data" in tail:
        return "\n" + DATA_HINT.format(root=root)
    return ""


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)  # unwinds the main thread, so `with` blocks and atexit stop the servers


# ----------------------------------------------------------------------------------------------------------------------
# The pool of servers and the episode factory

class AppWorldEnv:
    """Servers (up to num_slots) plus the episode factory. Use as a context manager or call close(); atexit and
    SIGTERM/SIGHUP also stop every server. Example: `with AppWorldEnv(root=R, num_slots=8) as env: ep = env.episode(t)`.
    """

    def __init__(self, config=None, **overrides):
        cfg = dataclasses.replace(config or AppWorldConfig(), **overrides)
        if not (cfg.root or os.environ.get("APPWORLD_ROOT")):
            raise AppWorldError("no AppWorld root: pass root=... (the folder holding data/) or set APPWORLD_ROOT")
        cfg.root = os.path.abspath(cfg.root or os.environ["APPWORLD_ROOT"])
        if not os.path.isdir(os.path.join(cfg.root, "data", "tasks")):
            raise AppWorldError(f"no AppWorld data in {cfg.root}/data. " + DATA_HINT.format(root=cfg.root))
        if cfg.reward not in ("completion", "success"):
            raise ValueError(f"reward must be 'completion' or 'success', not {cfg.reward!r}")
        if cfg.ports is not None and len(cfg.ports) < cfg.num_slots:
            raise ValueError(f"ports has {len(cfg.ports)} entries for {cfg.num_slots} slots")
        self.config, self.bin = cfg, resolve_appworld_bin(cfg.appworld_bin)
        self.prefix = cfg.experiment_prefix or f"skillsd-{os.getpid()}-{int(time.time())}"
        self.servers = []                 # AppWorldServer, created lazily up to num_slots
        self.closed = False
        self._cond = threading.Condition()
        self._leases = 0                  # lease counter (LRU eviction)
        self._episodes = 0                # episode counter (experiment names)
        self._warned_eviction = False
        atexit.register(self.close)
        self._signals = {}                # the handlers this env installed, restored by close()
        if cfg.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) is signal.SIG_DFL:
                    self._signals[sig] = signal.signal(sig, _exit_on_signal)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def task_ids(self, split):
        return load_task_ids(self.config.root, split)

    def episode(self, task_id, max_turns=None):
        """A new episode. No server is touched until its first step (the world opens inside the parallel step)."""
        with self._cond:
            self._episodes += 1
            name = f"{self.prefix}-{self._episodes:06d}"
        return AppWorldEpisode(self, task_id, name, max_turns or self.config.max_turns)

    def start(self):
        """Start all num_slots servers now, in parallel (otherwise they start on first use)."""
        with self._cond:
            new = [self._new_server() for _ in range(self.config.num_slots - len(self.servers))]
        with ThreadPoolExecutor(max(1, len(new))) as pool:
            list(pool.map(AppWorldServer.start, new))
        return self

    def close(self):
        """Stop every server (idempotent). Episodes still running end with a server error."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
        for server in self.servers:
            server.stop(retire=True)
        atexit.unregister(self.close)
        if threading.current_thread() is threading.main_thread():
            for sig, before in self._signals.items():   # scoped: the process's handlers as they were
                if signal.getsignal(sig) is _exit_on_signal:
                    signal.signal(sig, before)
            self._signals = {}

    def _new_server(self):
        slot = len(self.servers)
        port = self.config.ports[slot] if self.config.ports else None
        log_path = os.path.join(self.config.root, "experiments", "servers", self.prefix, f"slot{slot}.log")
        server = AppWorldServer(self.bin, self.config.root, slot, log_path, port, self.config.http_timeout_s,
                                self.config.startup_timeout_s)
        self.servers.append(server)
        return server

    def _pick(self, episode):
        """Under the lock: the free server to lease to `episode`, or None (choice 1)."""
        free = [s for s in self.servers if not s.busy]
        for s in free:
            if s.owner is episode:
                return s
        for s in free:
            if s.owner is None or s.owner.done:
                return s
        if len(self.servers) < self.config.num_slots:
            return self._new_server()
        if free:
            if not self._warned_eviction:
                self._warned_eviction = True
                log.warning("more live AppWorld episodes than num_slots=%d: worlds are swapped and replayed; "
                            "raise num_slots to the number of episodes alive at once to avoid it",
                            self.config.num_slots)
            return min(free, key=lambda s: s.last_used)
        return None

    @contextmanager
    def lease(self, episode):
        """A running server for one operation of `episode` (its world may need loading: see AppWorldEpisode)."""
        with self._cond:
            while True:
                if self.closed:  # a ServerError: the episodes still running end, nothing raises
                    raise ServerError("the AppWorld environment was closed")
                server = self._pick(episode)
                if server is not None:
                    break
                self._cond.wait()
            server.busy, self._leases = True, self._leases + 1
            server.last_used = self._leases
        try:
            if server.proc is None:
                server.start()
            elif not server.alive():
                log.warning("AppWorld server %s had exited (code %s); restarting it (its world is replayed)",
                            server.describe(), server.proc.returncode)
                server.restart()
            elif server.inits >= self.config.recycle_every and server.owner is not episode:
                server.restart()  # bound the memory growth of long-lived servers (LOOP recycles by RSS)
            yield server
        finally:
            with self._cond:
                server.busy = False
                self._cond.notify_all()

    def restart(self, server):
        if self.closed:
            raise ServerError("the AppWorld environment was closed")
        log.warning("restarting AppWorld server %s", server.describe())
        server.restart()


def resolve_appworld_bin(appworld_bin=None):
    """The `appworld` executable: the argument, $APPWORLD_BIN, the sibling of $APPWORLD_PYTHON, ./.aw/bin, PATH."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [appworld_bin, os.environ.get("APPWORLD_BIN")]
    if os.environ.get("APPWORLD_PYTHON"):
        candidates.append(os.path.join(os.path.dirname(os.environ["APPWORLD_PYTHON"]), "appworld"))
    candidates += [os.path.join(here, ".aw", "bin", "appworld"), shutil.which("appworld")]
    for i, cand in enumerate(candidates):
        if not cand:
            continue
        path = shutil.which(cand) if os.sep not in cand else cand
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
        if i < 2:  # an explicit choice that does not work is an error, not a reason to look elsewhere
            raise AppWorldError(f"the appworld executable {cand!r} was not found or is not executable.\n"
                                + INSTALL_HINT)
    raise AppWorldError("the `appworld` executable was not found.\n" + INSTALL_HINT)


# ----------------------------------------------------------------------------------------------------------------------
# The episode (the episode protocol, METHOD.md §11)

class AppWorldEpisode:
    def __init__(self, env, task_id, experiment_name, max_turns=40):
        self.env, self.task_id, self.experiment_name, self.max_turns = env, task_id, experiment_name, max_turns
        self.info = load_task_info(env.config.root, task_id)
        self.trajectory = []
        self.done = False
        self.turns = self.format_errors = self.retries = self.replays = 0
        self.codes = []              # code executed so far in this world, replayed to rebuild it (choices 1, 2)
        self.completed = False       # complete_task was called
        self.evaluation = None       # the /evaluate output
        self.aborted = None          # abort reason
        self.server_error = None     # why the episode ended early on a server failure
        self.last_server = None

    # -- protocol ------------------------------------------------------------------------------------------------------
    def initial_messages(self):
        user = USER_PROMPT.format(instruction=self.info["instruction"], datetime=self.info["datetime"],
                                  **self.info["supervisor"])
        return [{"role": "system", "content": SYSTEM_PROMPT.format(max_turns=self.max_turns)},
                {"role": "user", "content": user}]

    def task_text(self):
        sup = self.info["supervisor"]
        return f"{self.info['instruction']} (AppWorld task {self.task_id}; supervisor {sup['first_name']} " \
               f"{sup['last_name']})"

    def privileged_context(self):
        return load_solution(self.env.config.root, self.task_id)

    def step(self, reply):
        """Run the first code block of `reply`; (observation, done). Never raises on any reply."""
        if self.done:
            return "", True
        reply = reply if isinstance(reply, str) else ("" if reply is None else str(reply))
        reply = reply.encode("utf-8", "replace").decode("utf-8")  # lone surrogates would break the server's JSON/IO
        self.turns += 1
        code, blocks = extract_code(reply)
        entry = {"turn": self.turns, "reply": reply, "code": code, "observation": "", "valid": code is not None,
                 "error": None}
        self.trajectory.append(entry)
        last_turn = self.turns >= self.max_turns
        if code is None:
            self.format_errors += 1
            entry["error"] = "format: no python code block"
            entry["observation"] = FORMAT_ERROR
            if last_turn:
                self._finish()
            return entry["observation"], self.done
        try:
            output, evaluation = self._with_world(self._turn_op(code, last_turn))
        except ServerError as err:
            entry["error"] = f"server: {err}"
            entry["observation"] = f"Environment error: {err}"
            self._end_on_server_error(err)
            return entry["observation"], True
        note = "\n[Only the first code block was run.]" if blocks > 1 else ""
        entry["observation"] = truncate(output, self.env.config.max_observation_chars - len(note)) + note
        if output.startswith("Execution failed"):
            entry["error"] = output.strip().splitlines()[-1][:300]
        if evaluation is not None:
            self._finish(evaluation)
        return entry["observation"], self.done

    def abort(self, reason):
        """End now (context cap, ...): the state so far is evaluated, but it never counts as a success."""
        if not self.done:
            self.aborted = str(reason)
            self._finish()

    def result(self):
        ev = self.evaluation or {}
        num_tests = int(ev.get("num_tests") or 0)
        passes = len(ev.get("passes") or [])
        completion = passes / num_tests if num_tests else float(bool(ev.get("success")))
        success = bool(ev.get("success")) and self.aborted is None
        reward = float(success) if self.env.config.reward == "success" else completion
        reward = max(0.0, reward - self.env.config.format_penalty * self.format_errors)
        return {"task_id": self.task_id, "reward": reward, "success": success, "completion": completion,
                "turns": self.turns, "format_errors": self.format_errors,
                "exec_errors": sum(1 for t in self.trajectory if t["observation"].startswith("Execution failed")),
                "difficulty": ev.get("difficulty", self.info["difficulty"]), "num_tests": num_tests,
                "passes": passes, "failures": [f.get("requirement") for f in ev.get("failures") or []],
                "task_completed": self.completed, "aborted": self.aborted, "server_error": self.server_error,
                "retries": self.retries, "replays": self.replays, "experiment_name": self.experiment_name,
                "server": self.last_server}

    # -- world handling ------------------------------------------------------------------------------------------------
    def _turn_op(self, code, last_turn):
        """One turn on the server: execute, task_completed and, when the episode ends, evaluate (same lease)."""
        state = {}  # survives the retry: code that already ran is not run twice (the replay re-creates its effect)

        def op(server):
            if "output" not in state:
                state["output"] = str(self._post(server, "execute", code=code))
                self.codes.append(code)
            self.completed = bool(self._post(server, "task_completed"))
            evaluation = self._evaluate_op(server) if self.completed or last_turn else None
            return state["output"], evaluation
        return op

    def _evaluate_op(self, server):
        """Evaluate (suppress_errors, else a failing test is an HTTP 500) and close the world."""
        output = self._post(server, "evaluate", suppress_errors=True)
        if not isinstance(output, dict) or "num_tests" not in output:
            raise ServerError(f"/evaluate: unexpected output {str(output)[:200]!r}")
        try:
            self._post(server, "close")
        except ServerError:
            pass  # the evaluation is in hand; the next user of this server initializes its own world anyway
        server.owner = None
        return output

    def _with_world(self, op):
        """op(server) on a server holding this episode's world; on a ServerError restart, replay, retry once."""
        with self.env.lease(self) as server:
            for attempt in (0, 1):
                try:
                    if attempt:
                        self.env.restart(server)  # AppWorldError (fatal) if it cannot start
                    self.last_server = server.describe()
                    self._load_world(server)
                    return op(server)
                except ServerError as err:
                    if attempt or self.retries >= 1:
                        server.stop()  # dead or hung: the next lease starts it afresh
                        raise
                    self.retries += 1
                    log.warning("AppWorld episode %s (%s): %s; restarting the server and replaying %d turns",
                                self.task_id, self.experiment_name, err, len(self.codes))

    def _load_world(self, server):
        """Make `server` hold this episode's world: initialize the task and replay the code run so far."""
        if server.owner is self:
            return
        if self.codes or self.replays:
            self.replays += 1
        server.owner = None
        self._post(server, "initialize", experiment_name=self.experiment_name,
                   max_interactions=self.max_turns + 10, random_seed=self.env.config.random_seed,
                   timeout_seconds=self.env.config.execute_timeout_s)
        server.inits += 1
        for code in self.codes:
            self._post(server, "execute", code=code)
        server.owner = self

    def _post(self, server, endpoint, **body):
        return server.request("POST", "/" + endpoint, {"task_id": self.task_id, **body})

    def _finish(self, evaluation=None):
        """End the episode: evaluate now unless the last turn already did, free the server, drop the outputs."""
        self.done = True
        if evaluation is None:
            try:
                evaluation = self._with_world(self._evaluate_op)
            except ServerError as err:
                return self._end_on_server_error(err)
        self.evaluation = evaluation
        self._drop_outputs()

    def _end_on_server_error(self, err):
        log.warning("AppWorld episode %s (%s) ends on a server failure: %s",
                    self.task_id, self.experiment_name, err)
        self.done, self.server_error, self.evaluation = True, str(err), None
        self._drop_outputs()

    def _drop_outputs(self):
        if not self.env.config.keep_outputs:
            shutil.rmtree(os.path.join(self.env.config.root, "experiments", "outputs", self.experiment_name),
                          ignore_errors=True)


def step_episodes(episodes, replies):
    """Step many episodes at once (one thread per episode; each turn leases a server). [(observation, done)]."""
    if len(episodes) != len(replies):
        raise ValueError(f"{len(episodes)} episodes but {len(replies)} replies")
    if len(episodes) <= 1:
        return [ep.step(r) for ep, r in zip(episodes, replies)]
    with ThreadPoolExecutor(max_workers=min(len(episodes), 128)) as pool:
        futures = [pool.submit(ep.step, r) for ep, r in zip(episodes, replies)]
        try:
            return [f.result() for f in futures]
        except (KeyboardInterrupt, SystemExit):
            for env in {id(ep.env): ep.env for ep in episodes}.values():
                env.close()  # kill the servers so no worker thread waits for an HTTP timeout
            raise


# ----------------------------------------------------------------------------------------------------------------------
# Metrics

def appworld_metrics(results):
    """Acc, Comp, TGC, SGC (percent) over episode results, overall and per difficulty (choice 7).

    Several results of one task (samples) are averaged per task first, as AppWorld keys its metric by task id.
    """
    per_task = {}
    for r in results:
        per_task.setdefault(r["task_id"], []).append(r)

    def table(task_ids):
        if not task_ids:
            return {"num_tasks": 0, "num_scenarios": 0, "Acc": 0.0, "Comp": 0.0, "TGC": 0.0, "SGC": 0.0}
        success = {t: sum(float(r["success"]) for r in per_task[t]) / len(per_task[t]) for t in task_ids}
        comp = {t: sum(float(r["completion"]) for r in per_task[t]) / len(per_task[t]) for t in task_ids}
        scenarios = {}
        for t in task_ids:
            scenarios.setdefault(t.split("_")[0], []).append(success[t])
        acc = 100 * sum(success.values()) / len(task_ids)
        sgc = 100 * sum(min(v) for v in scenarios.values()) / len(scenarios)
        return {"num_tasks": len(task_ids), "num_scenarios": len(scenarios), "Acc": acc,
                "Comp": 100 * sum(comp.values()) / len(task_ids), "TGC": round(acc, 1), "SGC": round(sgc, 1)}

    out = table(sorted(per_task))
    out["num_episodes"] = len(results)
    by_difficulty = {}
    for t, rs in per_task.items():
        by_difficulty.setdefault(rs[0].get("difficulty"), []).append(t)
    out["by_difficulty"] = {d: table(sorted(ts)) for d, ts in sorted(by_difficulty.items(), key=lambda kv: str(kv[0]))}
    return out


# ----------------------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Play an AppWorld task with its ground-truth solution as the reply.")
    parser.add_argument("--root", default=os.environ.get("APPWORLD_ROOT"), help="folder holding data/")
    parser.add_argument("--appworld-bin", default=None, help="the appworld executable (default: see README)")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--task", default=None, help="task id (default: the first of --split with a solution)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        with AppWorldEnv(root=args.root, appworld_bin=args.appworld_bin, num_slots=1) as env:
            ids = [args.task] if args.task else env.task_ids(args.split)
            task = next((t for t in ids if load_solution(env.config.root, t)), ids[0])
            ep = env.episode(task)
            for m in ep.initial_messages():
                print(f"--- {m['role']} ---\n{m['content']}\n")
            solution = ep.privileged_context()
            reply = (f"I run the reference solution.\n```python\n{solution}\nsolution(apis, requester)\n```"
                     if solution else "```python\napis.supervisor.complete_task(status='fail')\n```")
            obs, done = ep.step(reply)
            print(f"--- observation (done={done}) ---\n{obs}\n\n--- result ---\n{json.dumps(ep.result(), indent=1)}")
            print(f"--- metrics ---\n{json.dumps(appworld_metrics([ep.result()]), indent=1)}")
    except AppWorldError as err:
        sys.exit(f"env_appworld: {err}")
