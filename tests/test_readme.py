"""README's library snippet runs as printed (with the random "tiny" model in place of the pretrained base, so the test
takes seconds instead of a 4-minute build), and the commands README names exist."""
import os
import re

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_block(section: str) -> str:
    text = open(os.path.join(HERE, "README.md")).read()
    part = text[text.index(f"## {section}"):]
    return re.search(r"```python\n(.*?)```", part, re.S).group(1)


def test_library_snippet_runs():
    code = readme_block("Use it as a library")
    assert "model.load(tiny_base.ensure_built())" in code
    scope = {}
    exec(compile(code.replace("model.load(tiny_base.ensure_built())", 'model.load("tiny")'), "README", "exec"), scope)
    l_sdl, policy, ledgers = scope["l_sdl"], scope["policy"], scope["ledgers"]
    assert len(ledgers) == 8 and torch.isfinite(l_sdl) and l_sdl.item() > 0          # the skill changes the teacher
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())


def test_files_named_in_readme_exist():
    text = open(os.path.join(HERE, "README.md")).read()
    for name in re.findall(r"^\| `([\w./]+)` \|", text, re.M):
        assert os.path.exists(os.path.join(HERE, name)), name
