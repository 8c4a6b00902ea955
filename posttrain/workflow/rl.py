"""The mechanics of an on-policy step, so that an RL recipe reads like its algorithm box.

`Rollouts` is the step's data source for `Engine.steps` (it replaces the data loader):

    rank 0 (the controller):  P prompts from the prompt stream -> the rollout engine -> G completions
                              each, with their sampling log-probs -> reward functions -> advantages
                              -> filters (truncated completions, zero-variance groups)
    every rank:               its share of the completions as packed micro-batches, the same number
                              per minibatch on every rank (a rank short of data repeats its last
                              micro-batch with weight 0: FSDP2's forward and backward are collectives)
    after the update:         `sync()` gathers the policy's weights (a collective) and rank 0 pushes
                              them into the engine in place

The engine runs beside rank 0 (colocated: it generates while the trainer waits, then the trainer
trains while it idles). Sampling seeds derive from (train.seed, step), and the prompt stream's state
is checkpointed with the step, so a resumed run generates exactly what the uninterrupted one did.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from ..compute import interrupt
from ..compute.checkpoint import find_latest
from ..compute.distributed import all_reduce
from ..data.loader import SampleStream
from ..data.packing import pack_row, share_prefix
from ..data.prompts import Prompt, make_prompt_encoder, prompt_limit
from ..data.records import RecordStats, Sample
from ..model.export import export_hf
from ..model.rl import group_advantages, zero_variance_groups
from .rewards import Rewards
from .rollout import Completion, EngineConfig, Sampling, ensure_ray, start_engine


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919) % (2**31 - 1)


class Rollouts:
    def __init__(self, job, *, prompts_per_step: int, group_size: int, sampling: Sampling, engine: EngineConfig,
                 rewards: Rewards, scale_rewards: str, mask_truncated: bool, filter_zero_variance: bool,
                 minibatches: int):
        self.job, self.P, self.G = job, prompts_per_step, group_size
        self.sampling, self.rewards, self.scale = sampling, rewards, scale_rewards
        self.mask_truncated, self.filter_zero_variance, self.minibatches = mask_truncated, filter_zero_variance, minibatches
        self.rank0 = job.rank == 0
        self.wait_s = 0.0
        self.times: dict[str, float] = defaultdict(float)
        self.metrics: dict[str, float] = {}
        self._synced_at = 0  # the step whose weights the engine holds
        cfg = job.cfg
        self.stream = SampleStream(cfg.data, job.tokenizer, seed=cfg.train.seed, rank=0, world_size=1,
                                   encode=make_prompt_encoder(prompt_limit(cfg.data, sampling.max_new_tokens))) if self.rank0 else None
        self.stats = self.stream.stats if self.rank0 else RecordStats()
        self.engine, self.own_ray = None, False
        # rollout.overlap: the next step's generation, started before this step trains:
        # {"index", "prompts", "handle" (the engine's handle, or (completions, seconds) once received), "stream_before"}
        self.overlap, self.pending = engine.overlap, None
        apart = engine.ray_resources().get("CPU", 0) + rewards.remote_cpus()
        if self.rank0 and apart:  # one Ray (a local one for an in-process trainer) for every actor placed apart
            self.own_ray = ensure_ray(apart)
        # The engine starts from the policy as it is now (its vocabulary padding, LoRA merged).
        model = job.unsharded()
        if self.rank0:
            self.model_dir = job.out.root / "rollout_model"
            export_hf(model, job.tokenizer, self.model_dir, merge_lora=True)
            t0 = time.perf_counter()
            self.engine = start_engine(engine, self.model_dir, job.tokenizer, dtype=job.dtype, device=job.device,
                                       max_model_len=cfg.data.max_seq_len, seed=cfg.train.seed, scratch=job.out.root)
            log = getattr(self.engine, "log", None)
            job.say(f"rollout engine: {engine.engine} ready in {time.perf_counter() - t0:.1f} s" + (f" (its output: {log})" if log else ""))

    # ---------------------------------------------------------------------------- phases
    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] += time.perf_counter() - t0

    PHASES = ("generate", "reward", "reference", "train", "sync")

    def take_times(self) -> dict[str, float]:
        """This step's seconds per phase (the same keys on every rank: metrics are reduced together)."""
        out = {f"time/{k}_s": self.times.get(k, 0.0) for k in self.PHASES}
        self.times.clear()
        return out

    # ---------------------------------------------------------------------------- a step's data
    def next_step(self, index: int) -> list[dict] | None:
        t0 = time.perf_counter()
        if self.job.start_step and self._synced_at < self.job.start_step:  # resumed: the engine holds step-0 weights
            self.sync(self.job.start_step)
        payload = self._generate_or_stop(index) if self.rank0 else None
        if self.job.world > 1:
            box = [payload]
            dist.broadcast_object_list(box, src=0)
            payload = box[0]
        self.wait_s += time.perf_counter() - t0
        if payload is None:
            return None
        items, metrics, epoch = payload
        self.metrics = metrics if self.rank0 else {k: 0.0 for k in metrics}  # rank 0's values; step.log sums ranks
        return self._micro_batches(items[self.job.rank :: self.job.world], epoch)

    def _generate_or_stop(self, index: int):
        """A Ctrl-C at a terminal reaches the engine's own processes too (vLLM's engine core and
        worker stop on SIGINT), so a generation it interrupts fails: stop cleanly instead, with the
        prompt stream put back where the last completed step left it."""
        if self.job.world == 1 and (signum := interrupt.requested()):
            # it arrived after the last step's check (during its checkpoint): the engine may be gone
            # already (a call then fails, `VLLMEngine._wait`): no need to try
            raise self._stopped(signum, index, "before")
        ahead = self._pending_for(index)
        before = ahead["stream_before"] if ahead else self.stream.state_dict()
        try:
            return self._generate(index)
        except Exception:
            signum = interrupt.requested()
            if not signum:
                raise
            self.stream.load_state_dict(before)
            self.pending = None
            raise self._stopped(signum, index, "during") from None

    def _stopped(self, signum: int, index: int, when: str, what: str = "the rollouts of step") -> interrupt.Interrupted:
        newest = find_latest(self.job.out.checkpoints)
        return interrupt.Interrupted(signum, (
            f"{interrupt.name(signum)} {when} {what} {index}, which stops the rollout engine too: "
            + (f"the newest checkpoint is {newest}; run the same command again to resume" if newest
               else "no checkpoint to resume from (compute.checkpoint_every)")
            + " (rollout.placement: separate keeps the engine out of the terminal's reach)"))

    def _draw(self) -> list[Prompt]:
        prompts: list[Prompt] = []
        while len(prompts) < self.P:
            p = self.stream.next()
            if p is None:
                break
            prompts.append(p)
        return prompts

    def _pending_for(self, index: int) -> dict | None:
        """The generation started for step `index` while the step before it trained, if any."""
        return self.pending if self.pending is not None and self.pending["index"] == index else None

    def _generate(self, index: int):
        seed = self.job.cfg.train.seed
        pending, self.pending = self._pending_for(index), None
        if pending is not None:  # started while the last step trained
            prompts = pending["prompts"]
            with self.phase("generate"):  # the part of it the trainer waits for
                done = pending["handle"] if isinstance(pending["handle"], tuple) else self.engine.result(pending["handle"])
            groups, gen_s = done
        else:
            prompts = self._draw()
            if not prompts:
                return None
            with self.phase("generate"):
                groups = self.engine.generate([list(p.ids) for p in prompts], self.sampling, n=self.G, seed=step_seed(seed, index))
            gen_s = self.times["generate"]
        if self.overlap and index < self.job.cfg.train.steps:
            # the next step's prompts go to the engine now, to generate while this step trains: from the
            # weights it holds (before this step's update; its sync queues behind this generation)
            before = self.stream.state_dict()
            if nxt := self._draw():
                handle = self.engine.submit([list(p.ids) for p in nxt], self.sampling, n=self.G, seed=step_seed(seed, index + 1))
                self.pending = {"index": index + 1, "prompts": nxt, "handle": handle, "stream_before": before}
        tok = self.job.tokenizer
        flat: list[tuple[Prompt, Completion]] = [(p, c) for p, g in zip(prompts, groups) for c in g]
        with self.phase("reward"):
            texts = tok.batch_decode([c.ids for _, c in flat], skip_special_tokens=True)
            columns = {k: [p.record.get(k) for p, _ in flat] for k in sorted({k for p in prompts for k in p.record if k != "prompt"})}
            scored = self.rewards([p.record["prompt"] for p, _ in flat], texts, [c.ids for _, c in flat], columns)
        adv = group_advantages(scored.total, self.G, self.scale)
        truncated = torch.tensor([c.finish == "length" for _, c in flat])
        keep = torch.ones(len(flat), dtype=torch.bool)
        zero_var = zero_variance_groups(scored.total, self.G)
        if self.filter_zero_variance and not zero_var.all():
            keep &= ~zero_var.repeat_interleave(self.G)
        if self.mask_truncated:
            keep &= ~truncated
        if not keep.any():  # nothing left to learn from: train on every completion (zero advantages)
            keep[:] = True
        lens = torch.tensor([len(c.ids) for _, c in flat], dtype=torch.float)
        metrics = {
            "reward/mean": scored.total.mean().item(), "reward/std": scored.total.std().item() if len(flat) > 1 else 0.0,
            "reward/zero_variance_groups": zero_var.float().mean().item(),
            "completion/length_mean": lens.mean().item(), "completion/length_max": lens.max().item(),
            "completion/truncated": truncated.float().mean().item(), "completion/trained": keep.float().mean().item(),
            "generated_tokens_per_s": lens.sum().item() / max(gen_s, 1e-9),
            "rollout/off_policy_steps": float(pending is not None),
        }
        for name, values in scored.per_fn.items():
            metrics[f"reward/{name}/mean"] = values.mean().item()
            metrics[f"reward/{name}/std"] = values.std().item() if len(values) > 1 else 0.0
            if scored.errors[name]:
                metrics[f"reward/{name}/errors"] = float(scored.errors[name])
        items = [(p.ids, c.ids, c.logprobs, float(a), f"{p.where}#{j % self.G}")
                 for j, ((p, c), a, k) in enumerate(zip(flat, adv.tolist(), keep.tolist())) if k]
        epoch = min(p.epoch for p in prompts)  # the pass over the prompts this step's come from
        return items, metrics, epoch

    def _micro_batches(self, items: list, epoch: int) -> list[dict]:
        """This rank's completions, split in order into `minibatches` parts, each packed best-fit into
        micro-batches of at most data.max_tokens_per_batch tokens; equal counts on every rank. With
        prefix sharing (`Engine.share_prefix`) the completions of one prompt form one unit, their
        prompt computed once (split where a unit would not fit a micro-batch)."""
        cfg = self.job.cfg.data
        budget, pad = cfg.max_tokens_per_batch, self.job.tokenizer.pad_token_id
        parts = [items[k :: self.minibatches] for k in range(self.minibatches)]
        micro: list[dict] = []
        for k, part in enumerate(parts):
            rows: list[list] = []  # per row, its units: [(items, sample)]
            for unit in sorted(self._units(part, budget), key=lambda u: -len(u[1].input_ids)):
                n = len(unit[1].input_ids)
                row = next((r for r in rows if sum(len(u[1].input_ids) for u in r) + n <= budget), None)
                if row is None:
                    rows.append([unit])
                else:
                    row.append(unit)
            count = int(all_reduce(len(rows), "max"))
            batches = [self._pack(r, budget, pad, k, epoch) for r in rows]
            if not batches:  # no data for this rank in this minibatch: a weight-0 placeholder
                it = items[0] if items else self._dummy()
                batches = [self._pack([([it], self._sample([it]))], budget, pad, k, epoch, weight=0.0)]
            while len(batches) < count:
                batches.append({**batches[-1], "weight": 0.0})
            micro += batches
        return micro

    def _units(self, part: list, budget: int) -> list[tuple[list, Sample]]:
        """Packing units of completions with their samples: one completion each, or with prefix
        sharing the completions of one prompt (in order), cut where the next would overflow `budget`."""
        if not self.job.share_prefix:
            return [([it], self._sample([it])) for it in part]
        groups: dict[str, list] = {}
        for it in part:
            groups.setdefault(it[4].rsplit("#", 1)[0], []).append(it)
        units = []
        for group in groups.values():
            whole = self._sample(group)
            if len(whole.input_ids) <= budget:  # the common case: built once, not once per completion
                units.append((group, whole))
                continue
            unit: list = [group[0]]
            sample = self._sample(unit)
            for it in group[1:]:
                grown = self._sample(unit + [it])
                if len(grown.input_ids) > budget:
                    units.append((unit, sample))
                    unit, grown = [], self._sample([it])
                unit.append(it)
                sample = grown
            units.append((unit, sample))
        return units

    def _sample(self, unit: list) -> Sample:
        """One packing unit of completions (prompt + completion each; the prompt's tokens untrained),
        its shared prompt turned into branches when prefix sharing is on."""
        ids, labels, lens = (), (), []
        for p, c, _, _, _ in unit:
            ids += tuple(p) + tuple(c)
            labels += (-100,) * len(p) + tuple(c)
            lens.append(len(p) + len(c))
        s = Sample(ids, labels, unit[0][4], tuple(lens))
        return share_prefix(s) if self.job.share_prefix else s

    def _dummy(self):
        t = self.job.tokenizer.pad_token_id
        return ((t,), (t,), [0.0], 0.0, "placeholder")

    def _pack(self, units: list[tuple[list, Sample]], budget: int, pad: int, minibatch: int, epoch: int,
              weight: float = 1.0) -> dict:
        # drop_last: each completion's last token is not computed (its output predicts nothing; it is
        # still a target, predicted from the position before it), 64 of ~2,130 positions of the GRPO
        # benchmark's step. fwd + bwd of 12 captured benchmark rows (interleaved in-process, compiled
        # layers): -2.5% and -3.3% in two A/Bs (eager -1.9%), log-probs within 5e-7. The SFT loader keeps
        # whole documents: on the SFT demo's rows (2% of positions) it measured slower (docs/performance.md).
        b = pack_row([sample for _, sample in units], budget, pad, self.job.cfg.data.pack_to_multiple_of, drop_last=True)
        row = [it for items, _ in units for it in items]  # the documents' order
        b["behaviour_logp"] = torch.tensor([lp for _, _, lps, _, _ in row for lp in lps], dtype=torch.float32)
        b["advantages"] = torch.tensor([a for _, _, _, a, _ in row], dtype=torch.float32)
        b["minibatch"], b["epoch"], b["weight"] = minibatch, epoch, weight
        return b

    # ---------------------------------------------------------------------------- weights
    def sync(self, step: int) -> None:
        """The policy's current weights into the engine (gathered on rank 0; a collective). Skipped
        when the run stops after this step (Ctrl-C / SIGTERM, agreed by every rank): the engine may
        have received the signal too, and the next run's engine starts from the checkpoint."""
        if all_reduce(interrupt.requested() or 0, "max"):
            return
        with self.phase("sync"):
            state = self.job.inference_weights()
            if self.rank0:
                try:
                    self.engine.sync(state)
                except Exception:
                    if not (signum := interrupt.requested()):
                        raise
                    # the signal reached the engine too, during the sync: this step's update is not saved
                    raise self._stopped(signum, step, "during", "the weight sync after step") from None
        self._synced_at = step

    # ---------------------------------------------------------------------------- loader protocol
    def state_dict(self) -> dict:
        """The prompt stream, and with rollout.overlap the next step's completions: generated from the
        weights before this step's update, which a resumed engine no longer holds."""
        if not self.rank0:
            return {}
        out = {"prompts": self.stream.state_dict()}
        if self.pending is not None:
            if not isinstance(self.pending["handle"], tuple):  # done by now: the step's sync waited for it
                self.pending["handle"] = self.engine.result(self.pending["handle"])
            out["pending"] = dict(self.pending)
        return out

    def load_state_dict(self, state: dict) -> None:
        if self.rank0:
            self.stream.load_state_dict(state["prompts"])
            self.stats = self.stream.stats
            self.pending = state.get("pending")

    def proportions(self) -> str:
        return "prompts"

    def close(self) -> None:
        self.rewards.close()
        if self.engine is not None:
            engine, self.engine = self.engine, None
            try:
                engine.close()
            except Exception:  # noqa: BLE001 - an engine stopped by a signal may fail to shut down cleanly
                if not interrupt.requested():
                    raise
        if self.rank0:
            shutil.rmtree(self.model_dir, ignore_errors=True)
        if self.own_ray:
            import ray

            ray.shutdown()
            self.own_ray = False

