"""Reward functions for examples/grpo_demo.yaml (TRL's signature: they work in TRL unchanged).

posttrain calls each with the prompts, the decoded completions, their token ids and every other
field of the prompt records as a list (here `answer`), and expects one number per completion.
"""

import re

_INT = re.compile(r"-?\d+")


def last_integer(text: str) -> int | None:
    found = _INT.findall(text)
    return int(found[-1]) if found else None


def correct_answer(completions, answer, **_):
    """1 when the last integer in the completion equals the record's `answer`, else 0."""
    return [1.0 if last_integer(c) == int(a) else 0.0 for c, a in zip(completions, answer)]
