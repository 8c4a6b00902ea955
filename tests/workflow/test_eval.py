"""`posttrain eval`: metrics against independent computations (the HF model's own loss, the pass@k
formula by enumeration, bootstrap coverage and permutation-test size on simulated data with a known
difference), the comparison (a model against itself: no difference; a trained model against its
base: a significant one), the outputs (results.json schema, self-contained report), the scorers,
the engines (vLLM == HF greedy), and bad input named clearly."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
import yaml

from posttrain.cli import main as posttrain
from posttrain.cli import run_job
from posttrain.config import ConfigError, JobConfig
from posttrain.data.records import RecordStats, encode_sft_record
from posttrain.workflow import eval_stats, scorers
from posttrain.workflow.evaluate import SuiteConfig, evaluate, load_suite, training_suite
from posttrain.workflow.rewards import RewardError

from conftest import DEMO_DATA, ROOT, job_dict, write_jsonl

HELDOUT = ROOT / "examples" / "data" / "distill_heldout.jsonl"
QUESTIONS = ROOT / "examples" / "data" / "demo_eval.jsonl"


def suite_file(tmp_path, tasks, **top):
    path = tmp_path / f"suite{len(list(tmp_path.glob('suite*.yaml')))}.yaml"  # a new file each time
    path.write_text(yaml.safe_dump({"device": "cpu", "dtype": "float32", "tasks": tasks, **top}, sort_keys=False))
    return path


def likelihood_task(path=HELDOUT, **kw):
    return {"name": "heldout", "kind": "likelihood", "data": {"sources": [{"path": str(path)}], "max_seq_len": 128,
                                                              "max_tokens_per_batch": 512}, **kw}


def generation_task(path=QUESTIONS, **kw):
    task = {"name": "answers", "kind": "generation", "data": {"sources": [{"path": str(path)}], "max_seq_len": 128},
            "sampling": {"temperature": 0, "max_new_tokens": 12}, "scorers": [{"kind": "exact_match", "field": "answer"}]}
    task.update(kw)
    return task


# ------------------------------------------------------------------------------------- statistics
def test_pass_at_k_equals_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                want = sum(any(i < c for i in s) for s in subsets) / len(subsets)  # samples 0..c-1 pass
                assert eval_stats.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError):
        eval_stats.pass_at_k(3, 1, 4)


def test_paired_interval_covers_a_known_difference_and_the_test_has_its_size():
    rng = np.random.default_rng(0)
    sims, n, true = 400, 100, 0.3
    covered = rejected_null = rejected_alt = 0
    for s in range(sims):
        a = rng.normal(size=n)
        b = a + true + rng.normal(scale=1.0, size=n)  # paired: b shares a's sample effect
        res = eval_stats.paired(a, b, resamples=1000, permutations=999, seed=s)
        covered += res["ci_low"] <= true <= res["ci_high"]
        rejected_alt += res["p_value"] < 0.05
        null = eval_stats.paired(a, a + rng.normal(scale=1.0, size=n), resamples=200, permutations=999, seed=s)
        rejected_null += null["p_value"] < 0.05
    assert 0.91 <= covered / sims <= 0.98  # nominal 0.95; 400 simulations: standard error 0.011
    assert rejected_null / sims <= 0.10  # nominal 0.05
    assert rejected_alt / sims >= 0.80  # the effect is 0.3 sd of the difference at n=100: power ~0.85
    # the weighted ratio (a token-weighted loss) and its transform (perplexity)
    v, w = np.array([2.0, 4.0, 9.0]), np.array([1.0, 2.0, 3.0])
    est = eval_stats.estimate(v, w, transform=np.exp, resamples=200)
    assert est["value"] == pytest.approx(math.exp(15 / 6)) and est["n"] == 3
    same = eval_stats.paired(v, v, w)
    assert same["difference"] == 0 and same["p_value"] == 1.0 and same["ci_low"] == same["ci_high"] == 0


# --------------------------------------------------------------------------------------- scorers
def test_builtin_scorers():
    refs = {"answer": ["Paris", "42", "x"]}
    em = scorers.exact_match("answer", ignore_case=True)
    assert em(completions=[" paris\n", "42.", "y"], **refs) == [1.0, 0.0, 0.0]
    num = scorers.numeric_match("answer", tolerance=0.5)
    assert num(completions=["so 4 + 38 = 42.", "it is 41.6", "none"], answer=[42, "42", 1]) == [1.0, 1.0, 0.0]
    assert scorers.numeric_match("answer", 0)(completions=["1,234 apples"], answer=["1234"]) == [1.0]
    rx = scorers.regex(r"\bParis\b")
    assert rx(completions=["Paris.", "Parisian"]) == [1.0, 0.0]
    schema = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}
    js = scorers.json_schema(schema, None)
    assert js(completions=['{"city": "Paris"}', '```json\n{"city": "Oslo"}\n```', '{"city": 3}', "not json"]) == [1.0, 1.0, 0.0, 0.0]
    per_record = scorers.json_schema(None, "schema")
    assert per_record(completions=["[1, 2]", "[1, 2]"], schema=[{"type": "array"}, {"type": "object"}]) == [1.0, 0.0]
    with pytest.raises(KeyError, match="no field 'answer'"):
        em(completions=["a"], other=["b"])
    with pytest.raises(ValueError, match="needs `field`"):
        scorers.ScorerSpec(kind="exact_match")
    with pytest.raises(ValueError, match="bad pattern"):
        scorers.ScorerSpec(kind="regex", pattern="(")


# ------------------------------------------------------------------------------ metrics vs HF
def test_likelihood_equals_the_hf_models_own_loss(tiny_qwen3, tmp_path):
    """Per-sample NLL and the token-weighted loss equal transformers' own loss on each held-out
    conversation alone (unpacked), labels = the assistant tokens the data pillar trains."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "chats.jsonl", HELDOUT.read_text().splitlines()[:30])
    suite = load_suite(suite_file(tmp_path, [likelihood_task(data)]))
    res = evaluate(suite, [str(tiny_qwen3)], tmp_path / "out", log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    cfg = suite.tasks[0].data
    total_nll = total_tokens = 0.0
    dumped = {json.loads(ln)["id"]: json.loads(ln) for ln in (tmp_path / "out" / "samples" / "heldout.jsonl").read_text().splitlines()}
    for i, line in enumerate(data.read_text().splitlines(), start=1):
        s = encode_sft_record(tok, json.loads(line), f"{data}:{i}", cfg, RecordStats())
        labels = torch.tensor([s.labels])
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            nll = float(model(torch.tensor([s.input_ids]), labels=labels).loss) * n
        assert dumped[f"{data}:{i}"][str(tiny_qwen3)]["nll"] == pytest.approx(nll, rel=1e-5)
        total_nll, total_tokens = total_nll + nll, total_tokens + n
    loss = res["tasks"]["heldout"]["metrics"]["loss"]["models"][str(tiny_qwen3)]
    assert loss["n"] == 30 and loss["value"] == pytest.approx(total_nll / total_tokens, rel=1e-5)
    ppl = res["tasks"]["heldout"]["metrics"]["perplexity"]["models"][str(tiny_qwen3)]
    assert ppl["value"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    assert loss["ci_low"] < loss["value"] < loss["ci_high"]


# ------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tiny_qwen3, tmp_path_factory):
    """The tiny model after 20 SFT steps on the demo chats (its export)."""
    out = tmp_path_factory.mktemp("sft")
    cfg = JobConfig.model_validate(job_dict(tiny_qwen3, DEMO_DATA, out, train={"steps": 20, "lr": 3e-3}))
    run_job(cfg)
    return out / "hf"


def test_trained_vs_base_is_significant_and_a_model_against_itself_is_not(trained, tiny_qwen3, tmp_path, capsys):
    tasks = [likelihood_task(max_samples=40),
             generation_task(max_samples=24, n=2, pass_at=[1, 2], sampling={"temperature": 1.0, "max_new_tokens": 12},
                             scorers=[{"kind": "exact_match", "field": "answer"}, {"kind": "regex", "pattern": r"\d", "name": "digit"}],
                             slices=["task"], length_buckets=2),
             {**generation_task(max_samples=24), "name": "pref", "kind": "preference", "scorers": [],
              "judge": str(ROOT / "examples" / "judges.py") + ":correct_answer_wins"}]
    out = tmp_path / "out"
    code = posttrain(["eval", str(suite_file(tmp_path, tasks)), "--model", str(trained), "--model", str(trained),
                      "--model", str(tiny_qwen3), "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["schema_version"] == 1 and res["baseline"] == str(trained)
    assert [m["label"] for m in res["models"]] == [str(trained), f"{trained}#2", str(tiny_qwen3)]
    for task in res["tasks"].values():
        for metric, block in task["metrics"].items():
            itself, base = block["comparisons"]
            assert itself["model"] == f"{trained}#2"
            # the same checkpoint, the same seeds: identical on every sample, no difference
            assert itself["difference"] == 0 and itself["p_value"] == 1.0 and not itself["significant"], metric
            assert set(base) >= {"baseline", "model", "difference", "ci_low", "ci_high", "p_value", "n", "significant"}
            for m in block["models"].values():
                assert set(m) == {"value", "n", "ci_low", "ci_high"}
    loss = res["tasks"]["heldout"]["metrics"]["loss"]
    base = loss["comparisons"][1]
    assert base["difference"] > 0 and base["ci_low"] > 0 and base["p_value"] < 0.01 and base["significant"]  # the base is worse
    assert loss["models"][str(trained)]["n"] == 40
    gen = res["tasks"]["answers"]["metrics"]
    assert {"exact_match", "exact_match/pass@1", "exact_match/pass@2", "digit", "digit/pass@2", "completion_tokens"} <= set(gen)
    assert gen["exact_match"]["models"][str(trained)]["value"] == gen["exact_match/pass@1"]["models"][str(trained)]["value"]
    assert set(gen["exact_match"]["slices"]["task"]) <= {"capital", "addition", "spelling", "opposite"}
    assert len(gen["exact_match"]["slices"]["length"]) == 2
    sliced = sum(s["models"][str(trained)]["n"] for s in gen["exact_match"]["slices"]["task"].values())
    assert sliced == gen["exact_match"]["models"][str(trained)]["n"] == 24
    pref = res["tasks"]["pref"]["metrics"]["win_rate"]["models"]
    assert pref[str(trained)]["value"] == 0.5  # the baseline against itself ties
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 4 and "heldout" in report
    assert "| loss |" in (out / "report.md").read_text()
    lines = (out / "samples" / "answers.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 24 and len(first[str(trained)]["completions"]) == 2
    assert "heldout (likelihood" in capsys.readouterr().out


def test_vllm_and_hf_engines_give_the_same_greedy_results(tiny_qwen3_h32, tmp_path):
    pytest.importorskip("vllm")
    tasks = [generation_task(max_samples=12, engine={"engine": "hf"}),
             {**generation_task(max_samples=12, engine={"engine": "vllm"}), "name": "answers_vllm"}]
    evaluate(load_suite(suite_file(tmp_path, tasks)), [str(tiny_qwen3_h32)], tmp_path / "out", log=lambda m: None)
    hf = [json.loads(ln) for ln in (tmp_path / "out" / "samples" / "answers.jsonl").read_text().splitlines()]
    vl = [json.loads(ln) for ln in (tmp_path / "out" / "samples" / "answers_vllm.jsonl").read_text().splitlines()]
    key = str(tiny_qwen3_h32)
    assert [r[key]["completions"] for r in hf] == [r[key]["completions"] for r in vl]


def test_reward_model_preference(tiny_qwen3, tmp_path):
    """A sequence-classification reward model judges each model's answer against the reference
    answer: the win is whichever it scores higher, as computed by its own forward."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = tmp_path / "rm"
    cfg = AutoConfig.from_pretrained(tiny_qwen3, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_qwen3)
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    task = {**generation_task(max_samples=8), "name": "rm", "kind": "preference", "scorers": [], "reward_model": str(rm_dir),
            "reference_field": "answer"}
    res = evaluate(load_suite(suite_file(tmp_path, [task])), [str(tiny_qwen3)], tmp_path / "out", log=lambda m: None)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()

    def score(prompt, text):
        s = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": text}], tokenize=False)
        with torch.no_grad():
            return float(rm(**tok(s, return_tensors="pt", add_special_tokens=False)).logits[0, 0])

    wins = []
    for ln in (tmp_path / "out" / "samples" / "rm.jsonl").read_text().splitlines():
        row = json.loads(ln)
        rec = json.loads(QUESTIONS.read_text().splitlines()[int(row["id"].rsplit(":", 1)[1]) - 1])
        got = row[str(tiny_qwen3)]
        a, b = score(rec["prompt"], rec["answer"]), score(rec["prompt"], got["completion"])
        assert got["win"] == (1.0 if b > a else 0.0 if b < a else 0.5) and got["opponent"] == rec["answer"]
        wins.append(got["win"])
    assert res["tasks"]["rm"]["metrics"]["win_rate"]["models"][str(tiny_qwen3)]["value"] == pytest.approx(sum(wins) / len(wins))


# ------------------------------------------------------------------------------------ bad input
def bad_scorer(completions, **_):
    return [float("nan") if i == 2 else 1.0 for i in range(len(completions))]


def raising_scorer(completions, **_):
    raise ZeroDivisionError("oops")


def odd_judge(prompts, completions_a, completions_b, **_):
    return [2.0] * len(prompts)


def test_bad_input_is_named(tiny_qwen3, tmp_path, capsys):
    fn = f"{__file__}:bad_scorer"
    suite = load_suite(suite_file(tmp_path, [generation_task(max_samples=4, scorers=[{"kind": "function", "fn": fn}])]))
    with pytest.raises(RewardError, match=rf"scorer 'bad_scorer' returned nan for completion 2 \(sample {QUESTIONS}:3\)"):
        evaluate(suite, [str(tiny_qwen3)], tmp_path / "o1", log=lambda m: None)
    raising = generation_task(max_samples=4, scorers=[{"kind": "function", "fn": f"{__file__}:raising_scorer"}])
    with pytest.raises(RewardError, match=rf"scorer 'raising_scorer' raised ZeroDivisionError: oops at .*test_eval.py:\d+ on the batch "
                       rf"of samples {QUESTIONS}:1 \.\. {QUESTIONS}:4"):
        evaluate(load_suite(suite_file(tmp_path, [raising])), [str(tiny_qwen3)], tmp_path / "o2", log=lambda m: None)
    zeroed = evaluate(load_suite(suite_file(tmp_path, [{**raising, "on_scorer_error": "zero"}])), [str(tiny_qwen3)], tmp_path / "o3",
                      log=lambda m: None)
    assert "scorer errors zeroed: {'raising_scorer': 4}" in zeroed["tasks"]["answers"]["data"][str(tiny_qwen3)]
    judge = {**generation_task(max_samples=3), "name": "p", "kind": "preference", "scorers": [], "judge": f"{__file__}:odd_judge"}
    with pytest.raises(RewardError, match=rf"judge returned 2.0 for sample {QUESTIONS}:1; expected P\(b is better\) in \[0, 1\]"):
        evaluate(load_suite(suite_file(tmp_path, [judge])), [str(tiny_qwen3), str(tiny_qwen3)], tmp_path / "o4", log=lambda m: None)

    ok = suite_file(tmp_path, [likelihood_task(max_samples=2)])

    def cli(*args):
        code = posttrain(["eval", *map(str, args), "--out", str(tmp_path / "cli")])
        return code, capsys.readouterr().err

    code, err = cli(ok, "--model", tmp_path / "nope")
    assert code == 2 and f"--model {tmp_path / 'nope'}: no such directory" in err
    code, err = cli(ok, "tokenizer_fingerprint=deadbeef", "--model", tiny_qwen3)
    assert code == 2 and "differs from the suite's tokenizer_fingerprint deadbeef" in err
    empty = write_jsonl(tmp_path / "empty.jsonl", ["not json", "{}"])
    code, err = cli(suite_file(tmp_path, [likelihood_task(empty, data={"sources": [{"path": str(empty)}], "on_bad_record": "skip"})]),
                    "--model", tiny_qwen3)
    assert code == 2 and "task 'heldout': no usable samples in" in err and "invalid_json=1" in err
    typo = tmp_path / "typo.yaml"
    typo.write_text("device: cpu\ntasks:\n  - name: a\n    kind: likelihood\n    max_sample: 3\n"
                    f"    data: {{sources: [{{path: {HELDOUT}}}]}}\n")
    code, err = cli(typo, "--model", tiny_qwen3)
    assert code == 2 and f"{typo}:5: tasks[0].max_sample: unknown key; did you mean `max_samples`?" in err
    with pytest.raises(ConfigError, match="pass_at: each k must be between 1 and n=2"):
        load_suite(suite_file(tmp_path, [generation_task(n=2, pass_at=[3])]))
    with pytest.raises(ConfigError, match="exactly one of `judge`"):
        load_suite(suite_file(tmp_path, [{**generation_task(), "kind": "preference", "scorers": []}]))
    assert load_suite(ok, ["tasks.0.max_samples=5"]).tasks[0].max_samples == 5
    assert isinstance(load_suite(ok), SuiteConfig)


def test_the_demo_suite_is_valid():
    suite = load_suite(ROOT / "examples" / "eval_demo.yaml")
    assert [t.kind for t in suite.tasks] == ["likelihood", "generation", "generation", "preference"]
    assert suite.tasks[2].scorers[0].fn == f"{ROOT / 'examples' / 'rewards.py'}:correct_answer"  # found next to the suite


def test_a_suite_during_training_is_logged_equals_posttrain_eval_and_leaves_training_unchanged(tiny_qwen3, tmp_path):
    """`train.eval_suite`: every evaluation runs the suite on the current weights; the last one equals
    `posttrain eval` on the exported model, and the training losses equal a run without the suite."""
    suite = suite_file(tmp_path, [likelihood_task(max_samples=12),
                                  generation_task(max_samples=6, sampling={"temperature": 1.0, "max_new_tokens": 8})])
    base = job_dict(tiny_qwen3, DEMO_DATA, tmp_path / "plain", train={"steps": 4, "lr": 3e-3})
    with_suite = job_dict(tiny_qwen3, DEMO_DATA, tmp_path / "suite", train={"steps": 4, "lr": 3e-3, "eval_every": 2,
                                                                           "eval_suite": str(suite), "best_metric": "eval/heldout/loss"})
    plain = run_job(JobConfig.model_validate(base))
    run = run_job(JobConfig.model_validate(with_suite))
    assert run["losses"] == plain["losses"]  # the suite's sampling left training's RNG alone
    rows = [json.loads(ln) for ln in (tmp_path / "suite" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/heldout/loss" in r}
    assert sorted(evals) == [2, 4]
    assert {"eval/answers/exact_match", "eval/answers/completion_tokens", "eval/heldout/perplexity"} <= set(evals[4])
    assert evals[4]["eval/heldout/loss"] < evals[2]["eval/heldout/loss"]
    res = evaluate(load_suite(suite), [str(tmp_path / "suite" / "hf")], tmp_path / "after", log=lambda m: None)
    for name in ("heldout/loss", "answers/exact_match", "answers/completion_tokens"):
        task, metric = name.split("/")
        assert evals[4][f"eval/{name}"] == pytest.approx(res["tasks"][task]["metrics"][metric]["models"][res["baseline"]]["value"], rel=1e-5)
    assert (tmp_path / "suite" / "eval_suite" / "step_00000004" / "results.json").exists()
    assert json.loads((tmp_path / "suite" / "best.json").read_text())["step"] == 4
    pref = suite_file(tmp_path, [{**generation_task(), "name": "p", "kind": "preference", "scorers": [],
                                  "judge": f"{__file__}:odd_judge"}])
    with pytest.raises(ConfigError, match="compares against a baseline model, which training does not have"):
        training_suite(str(pref))
    with pytest.raises(Exception, match="train.eval_suite is set but train.eval_every is not"):
        JobConfig.model_validate(job_dict(tiny_qwen3, DEMO_DATA, tmp_path / "x", train={"steps": 2, "eval_suite": str(suite)}))


def test_validate_checks_the_training_suite(tiny_qwen3, tmp_path, capsys):
    bad = suite_file(tmp_path, [{**generation_task(), "name": "p", "kind": "preference", "scorers": [], "judge": f"{__file__}:odd_judge"}])
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_dict(tiny_qwen3, DEMO_DATA, tmp_path / "r", train={"steps": 2, "eval_every": 1,
                                                                                          "eval_suite": str(bad)})))
    assert posttrain(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"error: {job}: train.eval_suite: {bad}: task 'p' compares against a baseline model" in err
