"""`posttrain run JOB.yaml [key.path=value ...]`, `posttrain validate JOB.yaml`, `posttrain preview JOB.yaml`,
`posttrain verify MODEL_DIR`, `posttrain generate MODEL_DIR --prompt ...`, `posttrain chat MODEL_DIR`,
`posttrain eval SUITE.yaml --model DIR [--model DIR ...] --out OUT`."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from . import __version__
from .compute import interrupt, replace
from .compute.checkpoint import CheckpointError, find_latest, is_complete
from .compute.rundir import RunDir
from .config import ConfigError, JobConfig, check_tracking, dump_config, job_schema, load_config, load_recipe
from .workflow.rewards import RewardError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description="LLM post-training from a job file.")
    p.add_argument("--version", action="version", version=f"posttrain {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a job")
    r.add_argument("job", help="job YAML file")
    r.add_argument("overrides", nargs="*", help="key.path=value overrides, typed like the file")
    r.add_argument("--overwrite", action="store_true", help="replace an earlier run in compute.output_dir")
    r.add_argument("--ray-address", metavar="ADDR", help="run the workers on an existing Ray cluster (e.g. auto, 127.0.0.1:6379)")
    r.add_argument("--resume", metavar="CKPT", help="resume from this checkpoint dir (default: the newest in output_dir)")
    e = sub.add_parser("export", help="export a training checkpoint to a plain HF model directory")
    e.add_argument("checkpoint", help="a checkpoint dir (…/checkpoints/step_N) or a run dir (its newest checkpoint)")
    e.add_argument("--out", help="output dir (default: <run dir>/hf-step_N)")
    v = sub.add_parser("validate", help="check a job file (types, keys, import paths) without running it")
    v.add_argument("job", nargs="?", help="job YAML file")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--schema", action="store_true", help="print the JSON schema of job files")
    f = sub.add_parser("verify", help="logit parity: our training path (packed, chunked head, LoRA, padded vocab) "
                       "and an export vs the plain transformers forward")
    f.add_argument("model_dir", nargs="+", help="HF model directories (one report each)")
    f.add_argument("--tol", type=float, default=1e-5, help="max abs log-prob difference (fp32; logits 10x)")
    f.add_argument("--docs", type=int, default=3, help="random documents packed in one row")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--no-lora", action="store_true", help="verify without LoRA adapters")
    f.add_argument("--export", metavar="DIR", help="keep the checked export in DIR (default: a temporary dir)")
    f.add_argument("--skip-export", action="store_true", help="do not check an export")
    f.add_argument("--allow-unverified", action="store_true", help="run on an architecture not in the family table")
    ev = sub.add_parser("eval", help="evaluate model dirs on a suite and compare them to the first (the baseline): "
                        "OUT/results.json, OUT/report.html, OUT/report.md, OUT/samples/")
    ev.add_argument("suite", help="suite YAML file (see docs/eval.md)")
    ev.add_argument("overrides", nargs="*", help="key.path=value overrides of the suite, e.g. tasks.0.max_samples=50")
    ev.add_argument("--model", action="append", required=True, metavar="DIR",
                    help="an exported or any HF model dir; repeat to compare (the first is the baseline)")
    ev.add_argument("--out", required=True, help="output directory")
    pv = sub.add_parser("preview", help="show samples as the model sees them (trained tokens highlighted) and token "
                        "statistics of the data, without loading the model's weights")
    pv.add_argument("job", help="job YAML file")
    pv.add_argument("overrides", nargs="*", help="key.path=value overrides, typed like the file")
    pv.add_argument("-n", type=int, default=3, help="samples to show (default 3)")
    pv.add_argument("--records", type=int, default=2000, help="samples read for the statistics (default 2000)")
    pv.add_argument("--plain", action="store_true", help="mark trained tokens with «...» even on a terminal")
    for name, help_ in (("generate", "complete one prompt with a model dir (through its chat template)"),
                        ("chat", "talk to a model dir: user turns from stdin, /reset, /exit or EOF")):
        g = sub.add_parser(name, help=help_)
        g.add_argument("model_dir", help="an exported or any HF model directory (or hub id)")
        if name == "generate":
            g.add_argument("--prompt", required=True, help="the user message")
        g.add_argument("--system", help="a system message first")
        g.add_argument("--max-new-tokens", type=int, default=256)
        g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
        g.add_argument("--top-p", type=float, default=1.0)
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, mps")
        g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    return p


def run_job(cfg: JobConfig, *, overwrite: bool = False, ray_address: str | None = None) -> dict:
    run = RunDir(cfg.compute.output_dir)
    run_dir = run.root
    replace.settle(run)  # a replacement (--overwrite) killed before it finished
    replacing = overwrite and run_dir.exists()
    if replacing:  # checked first, then moved aside; removed once the new run checkpoints or ends
        replace.set_aside(run, cfg)
    try:
        result = _run(cfg, run, ray_address)
    except BaseException:
        if replacing:
            replace.settle(run)
        raise
    if replacing:
        replace.drop_previous(run)
    return result


def _run(cfg: JobConfig, run: RunDir, ray_address: str | None) -> dict:
    run_dir = run.root
    # A run with checkpoints is resumed (compute.resume: auto). One that trained or exported without
    # leaving a checkpoint is never silently replaced; one that failed before its first step (bad
    # config, bad record) left nothing worth keeping.
    resumable = cfg.compute.resume not in ("never", "auto") or (
        cfg.compute.resume == "auto" and find_latest(run.checkpoints) is not None
    )
    if not resumable and (run.metrics.exists() or run.hf.exists()):
        raise ConfigError(
            f"compute.output_dir: {run_dir} already holds a run without a checkpoint to resume; choose "
            "another output_dir or pass --overwrite to replace it"
        )
    check_tracking(cfg)  # a missing wandb / mlflow package: one line before anything starts
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"compute.output_dir: cannot create {run_dir} ({e.strerror or e})") from e
    dump_config(cfg, run.config)
    run.stop_request.unlink(missing_ok=True)  # a stale one would stop this run after its first step
    if cfg.compute.workers > 1 or ray_address or cfg.compute.worker_group == "verl":
        from .workflow.spmd import launch

        return launch(cfg, run_dir, ray_address=ray_address)
    return load_recipe(cfg)(cfg, run_dir)


def main(argv: list[str] | None = None) -> int:
    try:
        with interrupt.immediate():  # the training loop defers signals to a step boundary (engine)
            return _main(argv)
    except KeyboardInterrupt:  # before our handler was installed
        print("interrupted: SIGINT", file=sys.stderr)
        return 130


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Arguments; `key=value` overrides may also follow the options (`run job.yaml --overwrite train.lr=1e-4`).
    argparse alone stops taking positionals after an option, and its intermixed mode refuses subcommands."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    cfg = None
    import transformers

    transformers.utils.logging.set_verbosity_error()  # our console carries the run's story
    transformers.utils.logging.disable_progress_bar()
    from .data.records import BadRecord
    from .data.tokenizer import TokenizerMismatchError
    from .workflow.engine import NothingTrained

    try:
        if args.cmd in ("generate", "chat"):
            import torch

            from .model.generate import Generator, chat_loop

            torch.manual_seed(args.seed)
            gen = Generator(args.model_dir, device=args.device, dtype=args.dtype)
            kw = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
            if args.cmd == "chat":
                chat_loop(gen, system=args.system, **kw)
                return 0
            system = [{"role": "system", "content": args.system}] if args.system else []
            print(gen.complete([*system, {"role": "user", "content": args.prompt}], **kw))
            return 0
        if args.cmd == "eval":
            try:
                import matplotlib  # noqa: F401
                import scipy  # noqa: F401
            except ImportError as e:
                raise ConfigError(f"posttrain eval needs scipy and matplotlib ({e}): pip install 'posttrain[eval]'") from None
            from .workflow.evaluate import evaluate, load_suite, summary

            results = evaluate(load_suite(args.suite, args.overrides), args.model, args.out,
                               log=lambda m: print(m, file=sys.stderr))
            print(summary(results))
            print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.html'}")
            return 0
        if args.cmd == "preview":
            from .data.preview import preview

            cfg = load_config(args.job, args.overrides)
            preview(cfg, n=args.n, records=args.records, plain=args.plain)
            return 0
        if args.cmd == "verify":
            from .model.verify import verify_model

            ok = True
            for d in args.model_dir:
                rep = verify_model(
                    d, n_docs=args.docs, seed=args.seed, tol=args.tol, lora=not args.no_lora,
                    export=not args.skip_export, export_dir=args.export, allow_unverified=args.allow_unverified,
                )
                print(rep.table())
                ok &= rep.ok
            print("verify: ok" if ok else "verify: FAILED (differences above tolerance)")
            return 0 if ok else 1
        if args.cmd == "export":
            from .workflow.export import export_checkpoint

            ckpt = Path(args.checkpoint)
            if not is_complete(ckpt):
                ckpt = find_latest(RunDir(ckpt).checkpoints) or ckpt
            print(f"exported {ckpt} -> {export_checkpoint(ckpt, Path(args.out) if args.out else None)}")
            return 0
        if args.cmd == "validate" and args.schema:
            print(json.dumps(job_schema(), indent=2))
            return 0
        if args.job is None:
            raise ConfigError("validate: give a job file (or --schema)")
        cfg = load_config(args.job, args.overrides)
        if cfg.train.eval_suite:  # the suite, its tasks and scorers, now rather than at the first evaluation
            from .workflow.evaluate import training_suite

            try:
                training_suite(cfg.train.eval_suite)
            except ConfigError as e:
                raise ConfigError(f"{args.job}: train.eval_suite: {e}") from None
        if args.cmd == "validate":
            print(f"{args.job}: ok (recipe {cfg.recipe}, model {cfg.model.path})")
            return 0
        if args.resume:
            cfg.compute.resume = args.resume
        run_job(cfg, overwrite=args.overwrite, ray_address=args.ray_address)
        return 0
    except (ConfigError, BadRecord, TokenizerMismatchError, CheckpointError, NothingTrained, RewardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except interrupt.Interrupted as e:
        msg = str(e)
        if cfg is not None and "checkpoint" not in msg:  # stopped at once: say what can be resumed
            newest = find_latest(RunDir(cfg.compute.output_dir).checkpoints)
            msg += f"; the newest checkpoint is {newest} (run the same command again to resume)" if newest else "; no checkpoint to resume from"
        print(f"interrupted: {msg}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"error: no space left on device writing {e.filename or 'a file'}; free some space and run the same command "
              "again (a run with a checkpoint resumes from it)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
