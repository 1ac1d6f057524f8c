"""The LLM and HTTP summarisers on a real model: SmolLM2-135M-Instruct (smollm2.py) writes skills for real Sokoban
trajectories, in-process (LLMSummarizer through model.complete) and behind `transformers serve`, an OpenAI-compatible
server started on a free localhost port (HTTPSummarizer); then the same server timing out and dead. Every request gets
a valid Skill (FallbackSummarizer: the rule summariser writes what the model could not). Skipped, saying why, without
the wheel or `transformers[serving]`; .ci/run installs both. About 50 s on one CPU thread."""
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest
import torch

import env_sokoban as es
import model as model_lib
import rule_skills
import skills as skills_lib
import smollm2
import tiny_base

pytestmark = pytest.mark.skipif(not smollm2.available(),
                                reason=f"SmolLM2 wheel not installed (`{smollm2.INSTALL}`; CI installs it)")
SERVE = os.path.join(os.path.dirname(sys.executable), "transformers")
SERVING = os.path.exists(SERVE) and all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn"))
MAX_TOKENS = 48                             # per summary: enough to see whether JSON starts, cheap on a CPU
SHORT = dict(max_obs_chars=100, max_chars=1500)   # summary prompts of ~500 tokens instead of ~1,500 (a 6x6 grid is
                                                  # ~70 SmolLM2 tokens): prefill is most of a CPU test's time


def trajectories(n):
    """n finished episodes of real easy levels, played by tiny_base's scripted novice (valid moves, mostly fails)."""
    rng = np.random.default_rng(0)
    levels = tiny_base.pretrain_levels({**tiny_base.RECIPE, "num_levels": n})
    return [skills_lib.SummaryRequest.from_episode("sokoban", tiny_base.play(lv, tiny_base.RECIPE, rng)[0])
            for lv in levels]


def valid(skill):
    return isinstance(skill, skills_lib.Skill) and all(isinstance(v, str) and v.strip()
                                                       for v in skill.to_dict().values())


@pytest.fixture(scope="module")
def smol():
    return model_lib.load("smollm2-135m", device="cpu", dtype=torch.float32)


def test_policy_writes_skills_for_real_trajectories(smol):
    policy, tok = smol
    reqs = trajectories(2)
    greedy = model_lib.SamplingConfig(temperature=0.0, max_new_tokens=MAX_TOKENS)
    llm = skills_lib.LLMSummarizer(lambda chats: model_lib.complete(policy, tok, chats, greedy, batch_size=4), **SHORT)
    summ = skills_lib.FallbackSummarizer(llm, rule_skills.rule_summarizer("sokoban"))
    out = summ.summarize(reqs)
    assert len(out) == 2 and all(valid(s) for s in out)
    assert summ.num_primary + summ.num_fallback == 2 and llm.num_failed == summ.num_fallback
    assert llm.num_generated == 2 + summ.num_fallback           # one retry with the reminder per failed parse
    rule = rule_skills.rule_summarizer("sokoban").summarize(reqs)
    assert sum(a == b for a, b in zip(out, rule)) == summ.num_fallback   # the fallback's skills are the rule's


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """`transformers serve` on a free port with the converted folder; stopped whatever happens."""
    if not SERVING:
        pytest.skip("`transformers serve` needs transformers[serving] (fastapi, uvicorn); CI installs it")
    path, port = smollm2.ensure_converted(), _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([SERVE, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                             "--dtype", "float32", path], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read()[-2000:].decode(errors="replace")
                pytest.fail(f"transformers serve exited ({proc.returncode}): {tail}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("transformers serve did not become healthy within 120 s")
            time.sleep(0.5)
        yield {"url": url, "model": path, "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_http_summarizer_against_transformers_serve(server, smol):
    policy, tok = smol
    reqs = trajectories(2)
    http = skills_lib.HTTPSummarizer(server["url"], server["model"], timeout=120, max_tokens=MAX_TOKENS,
                                     max_workers=1, **SHORT)
    summ = skills_lib.FallbackSummarizer(http, rule_skills.rule_summarizer("sokoban"))
    out = summ.summarize(reqs)
    assert len(out) == 2 and all(valid(s) for s in out)
    assert http.num_errors == 0 and http.num_unsent == 0             # the server answered every request
    # the server's greedy reply is the text this repository's own generation loop writes for the same chat
    chat = [{"role": "user", "content": "Name the four moves of a Sokoban player, comma-separated."}]
    served = http._chat(chat)
    local = model_lib.complete(policy, tok, [chat], model_lib.SamplingConfig(temperature=0.0,
                                                                             max_new_tokens=MAX_TOKENS))[0]
    assert served and served.strip() == local.strip()


def test_real_server_timeout_then_dead_loses_no_trajectory(server, caplog):
    reqs = trajectories(3)
    rule = rule_skills.rule_summarizer("sokoban").summarize(reqs)
    for timeout, why in ((0.05, "did not answer in time"), (5, "refused the connection")):
        if why.startswith("refused"):
            server["proc"].terminate()                                 # the server dies between two batches
            server["proc"].wait(15)
        http = skills_lib.HTTPSummarizer(server["url"], server["model"], timeout=timeout, max_tokens=MAX_TOKENS,
                                         max_workers=1, **SHORT)
        summ = skills_lib.FallbackSummarizer(http, rule_skills.rule_summarizer("sokoban"))
        caplog.clear()
        with caplog.at_level("WARNING", logger="skills"):
            out = summ.summarize(reqs)
        assert out == rule and summ.stats()["skills_fallback"] == 3     # every trajectory, by the fallback
        assert (http.num_errors, http.num_unsent) == (1, 2)             # one failed call, the rest not sent
        assert any(why in r.getMessage() for r in caplog.records)
