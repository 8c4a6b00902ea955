"""Reward functions for tests/recipes/test_grpo.py, loaded by file path (also in subprocesses)."""


def says_the(completions, **_):
    """A reward the tiny random model can move: how often 'the' appears (capped)."""
    return [min(c.lower().count("the"), 3) / 3 for c in completions]


def matches(completions, answer, **_):
    return [float(a.lower() in c.lower()) for c, a in zip(completions, answer)]


def length(completions, **_):
    """Characters / 100: varies within nearly every group, so every step updates the policy."""
    return [len(c) / 100 for c in completions]


def explodes(completions, **_):
    raise ZeroDivisionError("bad reward")
