"""The README's "Training stacks" snippets run as written (issue 18: one runnable snippet each)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_training_stacks_snippets_run():
    text = README.read_text()
    start = text.index("## Training stacks")
    section = text[start:text.index("\n## ", start + 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 3
    scope: dict = {}
    exec(compile("\n".join(blocks), "README.md#training-stacks", "exec"), scope)  # one session, as a reader runs them
    assert scope["ratio"].shape == (2, 3, 1, 4, 8)
    assert float((scope["ratio"] - 1).abs().max()) < 1e-4  # replay equals the rollout before any update
