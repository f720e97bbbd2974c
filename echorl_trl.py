"""EchoRL inside TRL: `EchoGRPOTrainer` adds EchoRL's clip-SFT term to TRL's GRPO loss, and
`verifier_reward` makes the project's verifier a TRL reward function.

    from trl import GRPOConfig
    from echorl import EchoConfig
    from echorl_trl import EchoGRPOTrainer, verifier_reward

    trainer = EchoGRPOTrainer(model=..., reward_funcs=[verifier_reward], args=GRPOConfig(...),
                              train_dataset=ds,                 # columns "prompt" and "answer" (the gold answer)
                              echo=EchoConfig(coef=0.001))
    trainer.train()

Where each piece runs (TRL's generation, vLLM, accelerate, DeepSpeed and FSDP are untouched):
  * After TRL scores a generation batch (`_generate_and_score_completions`): the old policy's token
    entropies, step ids (entropy.step_ids) and EchoClips (echorl.select_clips) over the rows of every
    process. A completion is correct when one named reward is >= 1.0 (default: verifier_reward), not
    by the weighted total of all rewards. The clip mask rides in TRL's batch dict, so TRL's shuffle and
    split into accumulation steps carry it with the rows.
  * In the loss (`_compute_loss`): TRL's loss, unchanged, plus echorl.echo_loss on the log-probs of
    TRL's own training forward (no extra forward), over the clip tokens of the whole optimizer step
    on every process, so gradient accumulation and the number of processes leave the update unchanged.

The entropies are those of the sampling distribution (logits / TRL's `temperature`, full vocabulary)
under the trainer's weights before the update: the old policy. Where TRL runs its own old-policy
pass (vLLM with importance-sampling correction, or generation out of step with optimizer steps),
that pass returns them too; otherwise one no-grad forward over the generation batch computes them.
With vLLM they are the trainer's numbers, not vLLM's: vLLM returns only the sampled token's log-prob.

TRL is an optional dependency (requirements-trl.txt): only this module imports it.
"""
from __future__ import annotations

import torch
from trl import GRPOTrainer

import reward
from echorl import EchoConfig, echo_loss, select_clips
from entropy import delimiter_table, step_ids
from losses import constant_groups

CORRECT = 1.0  # a reward at or above this is a verified success (the verifier's 1.0)
# TRL's loss types whose aggregation echo.normalizer "policy" mirrors (EchoGRPOTrainer.policy_aggregate)
POLICY_NORMALISED = ("grpo", "sapo", "bnpo", "dr_grpo", "dapo", "cispo", "vespo", "luspo")


def completion_texts(completions: list) -> list[str]:
    """TRL's completions, plain strings or conversations (a list of messages), as the answer texts."""
    texts = []
    for c in completions:
        content = c if isinstance(c, str) else c[-1]["content"]
        if not isinstance(content, str):  # content blocks [{"type": "text", "text": ...}, ...]
            content = "".join(part.get("text", "") for part in content)
        texts.append(content)
    return texts


def verifier_reward(completions: list, answer: list, log_metric=None, **kwargs) -> list[float]:
    """reward.score_batch as a TRL reward function: 1.0 for a verified answer, else 0.0.

    `answer` is the dataset's gold-answer column. The verifier never evaluates model text and bounds
    its time per answer (README pitfall 7). It runs in the calling process, as our loop's default
    (reward.workers 1): a pool would spawn workers that re-import the user's training script. Bound hits
    of this call go to TRL's metrics as verifier/bound_hits, verifier/bound_time, _size, _depth (TRL
    averages them over processes).
    """
    before = reward.bound_hits()
    scores = reward.score_batch(completion_texts(completions), [str(a) for a in answer], workers=1)
    if log_metric is not None:
        for key, n in reward.bound_hits().items():
            log_metric(f"verifier/{key}", float(n - before[key]))
    return scores


class EchoGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with EchoRL: loss = TRL's loss + L_echo on the EchoClips of all-correct groups.

    echo: the project's EchoConfig (coef, delimiter, reduce, select, scope, clips_per_group,
    min_step_tokens, min_steps, max_clip_tokens, normalizer); keep_dropped_groups has no use here, TRL
    drops no group. normalizer "clip_tokens": the mean over the optimizer step's clip tokens;
    "policy": the clip tokens aggregated as TRL aggregates its policy loss for `loss_type`.
    echo_reward: the name of the reward function (TRL names a function by its __name__) whose value
    >= 1.0 marks a correct completion.
    """

    def __init__(self, *args, echo: EchoConfig | None = None, echo_reward: str = "verifier_reward", **kwargs):
        super().__init__(*args, **kwargs)
        self.echo = echo if echo is not None else EchoConfig()
        if self.echo.enabled and echo_reward not in self.reward_func_names:
            raise ValueError(f"echo_reward {echo_reward!r} is not one of the reward functions: "
                             f"{self.reward_func_names}")
        if self.echo.normalizer == "policy" and self.loss_type not in POLICY_NORMALISED:
            raise ValueError(f"echo.normalizer 'policy' has no rule for loss_type {self.loss_type!r}; "
                             f"allowed: {POLICY_NORMALISED}, or echo.normalizer 'clip_tokens'")
        self.echo_reward_index = self.reward_func_names.index(echo_reward) if self.echo.enabled else -1
        self.echo_delims = delimiter_table(self._tokenizer, self.echo.delimiter, self.echo.delimiter_ids)
        self.echo_generator = torch.Generator().manual_seed(self.args.seed)  # random_step: same draws on every process
        self._echo_rewards: torch.Tensor | None = None  # [N, F] rewards of every process's rows, per function
        self._echo_old: dict | None = None               # set while TRL scores a batch: its old-policy entropies
        self._echo_logps: list | None = None             # set inside _compute_loss: the training forward's log-probs

    # -- capture what TRL computes anyway -----------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._echo_rewards = rewards_per_func  # TRL gathers them over processes: groups can straddle processes
        return rewards_per_func

    def _get_per_token_logps_and_entropies(self, model, *args, compute_entropy: bool = False, **kwargs):
        # While TRL scores a batch, its pass of the policy itself is the old-policy pass: have it return
        # entropies too. With a PEFT model and a KL term TRL's reference pass is also a pass of self.model
        # (adapter off), so nothing is taken then and _old_entropies runs instead.
        take = (self._echo_old is not None and "entropies" not in self._echo_old and model is self.model
                and (self.beta == 0.0 or self.ref_model is not None))
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(
            model, *args, compute_entropy=compute_entropy or take, **kwargs)
        if take:
            self._echo_old["entropies"] = entropies
            entropies = entropies if compute_entropy else None
        if self._echo_logps is not None:
            self._echo_logps.append(logps)
        return logps, entropies, aux

    # -- selection, once per generation batch --------------------------------------------------

    def _generate_and_score_completions(self, inputs):
        if not (self.echo.enabled and self.model.training):
            return super()._generate_and_score_completions(inputs)
        self._echo_old = {}
        try:
            out = super()._generate_and_score_completions(inputs)
            entropies = self._echo_old.get("entropies")
        finally:
            self._echo_old = None
        if entropies is None:
            entropies = self._old_entropies(out)
        out["echo_clip_mask"], out["echo_clip_tokens"], stats = self.select_echo_clips(out, entropies)
        for key, value in stats.items():
            self._metrics["train"][key].append(value)
        return out

    @torch.no_grad()
    def _old_entropies(self, out: dict) -> torch.Tensor:
        """[b, C] token entropies at TRL's temperature under the current (= sampling) weights, for a
        text-only batch, when TRL ran no old-policy pass of its own."""
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        _, entropies, _ = self._get_per_token_logps_and_entropies(
            self.model, ids, mask, out["completion_ids"].size(1),
            batch_size=self.args.per_device_train_batch_size, compute_entropy=True)
        return entropies

    def select_echo_clips(self, out: dict, entropies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """EchoClips of this process's rows [b, C], the clip tokens of the whole generation batch (every
        process), and EchoRL's statistics.

        Groups can straddle processes, so the selection runs on every process's rows (gathered) and
        each process keeps its own: the clips do not depend on the number of processes."""
        acc = self.accelerator
        mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        b, C = mask.shape                                                            # this process's rows
        ids, mask_all, ent = (acc.gather(acc.pad_across_processes(t, dim=1))          # [N, C'] every process
                              for t in (out["completion_ids"], mask, entropies.float()))
        N, G = ids.shape[0], self.num_generations
        rewards = self._echo_rewards                                                 # [N, F]
        correct = rewards[:, self.echo_reward_index] >= CORRECT                      # NaN (unscored): not correct
        group = torch.arange(N, device=ids.device) // G
        sids = step_ids(ids, mask_all, self.echo_delims, self.eos_token_ids, self.echo.min_step_tokens)
        clip, stats = select_clips(correct, group, mask_all.float(), ent, sids, self.echo,
                                   generator=self.echo_generator)
        total = (rewards * self.reward_weights.to(rewards.device)).nansum(dim=1)     # TRL's summed reward
        c = correct.view(-1, G)
        stats = {("echo/clips" if k == "echo/n_clips" else k): v for k, v in stats.items()}
        stats.update({"echo/frac_all_success": float(c.all(-1).float().mean()),
                      "echo/frac_all_fail": float((~c).all(-1).float().mean()),
                      "echo/frac_degenerate": float(constant_groups(total, G).float().mean())})
        rank = acc.process_index
        return clip[rank * b:(rank + 1) * b, :C], clip.sum(), stats

    # -- the loss, once per micro-batch --------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if not (self.echo.enabled and self.model.training and "echo_clip_mask" in inputs):
            return super()._compute_loss(model, inputs)
        self._echo_logps = []
        try:
            loss = super()._compute_loss(model, inputs)  # TRL's loss, as TRL computes it
            logps = self._echo_logps[0]                  # [b, C] its training forward's log-probs
        finally:
            self._echo_logps = None
        term = self.echo_term(logps, inputs)
        # The optimizer step's L_echo (as our loop logs loss_echo): this micro-batch's share, mean over
        # processes (each carries x num_processes for DDP's mean), x accumulation steps.
        step_value = self.accelerator.gather(term.detach()[None]).mean() * self.current_gradient_accumulation_steps
        self._metrics["train"]["echo/loss"].append(float(step_value))
        return loss + term

    def echo_term(self, logps: torch.Tensor, inputs: dict) -> torch.Tensor:
        """This micro-batch's share of L_echo = -coef x mean log-prob of the optimizer step's clip tokens.

        TRL sums the micro-batch losses of an optimizer step and averages gradients over processes, so
        the divisor is the step's clip tokens per process (as TRL's "dapo" normaliser divides by tokens):
        the generation batch's clip tokens (every process) x accumulation steps / steps per generation
        / processes."""
        clip = inputs["echo_clip_mask"]                                              # [b, C]
        if self.echo.normalizer == "policy":
            return -self.echo.coef * self.policy_aggregate(logps, clip, inputs)
        n = (inputs["echo_clip_tokens"] * self.current_gradient_accumulation_steps
             / self.args.steps_per_generation / self.accelerator.num_processes)
        return echo_loss(logps, clip, self.echo.coef, n)

    def policy_aggregate(self, values: torch.Tensor, mask: torch.Tensor, inputs: dict) -> torch.Tensor:
        """`values` [b, C] over `mask`, aggregated and normalised as TRL's _compute_loss aggregates its
        per-token policy loss for self.loss_type (losses.aggregate's counterparts: grpo ~
        seq-mean-token-mean, dr_grpo ~ seq-mean-token-sum-norm, dapo ~ token-mean over the step)."""
        ga = self.current_gradient_accumulation_steps
        v = values * mask
        if self.loss_type in ("grpo", "sapo"):
            return (v.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
        if self.loss_type == "bnpo":
            policy = inputs["completion_mask"] * inputs.get("tool_mask", 1)         # TRL's policy tokens
            return v.sum() / policy.sum().clamp(min=1.0) / ga
        if self.loss_type == "dr_grpo":
            return v.sum() / (v.size(0) * self.max_completion_length) / ga
        if self.loss_type in ("dapo", "cispo", "vespo"):
            n = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            return v.sum() / (n * ga / self.args.steps_per_generation)
        if self.loss_type == "luspo":
            return v.sum(-1).mean() / ga
        raise ValueError(f"echo.normalizer 'policy' has no rule for loss_type {self.loss_type!r}")
