"""A judge for preference tasks of `posttrain eval` (examples/eval_demo.yaml).

A judge sees the prompts, two completions per prompt (`completions_a`: the baseline's or the
reference, `completions_b`: the model under test) and every other field of the records, and returns
P(b is better) for each: 1 (b wins), 0 (a wins) or anything between (0.5: a tie).
"""


def correct_answer_wins(prompts, completions_a, completions_b, answer, **_):
    """The completion that states the record's `answer` wins; both or neither: a tie."""
    out = []
    for a, b, ref in zip(completions_a, completions_b, answer):
        ok_a, ok_b = ref in a, ref in b
        out.append(0.5 if ok_a == ok_b else float(ok_b))
    return out
