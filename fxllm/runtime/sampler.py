"""Batched sampler: penalties, min_tokens, logprobs, greedy / temperature / top-k / top-p / min-p.

Every step is a batched tensor op over the [N, V] logits with per-row parameters as tensors; rows with a
feature off get a neutral value (top_k = V, top_p = 1, min_p = 0, penalty 1 / 0) so one kernel serves
the whole batch. `Sampler.launch` leaves everything on the device and starts one non-blocking copy of
the sampled ids (and the few logprob values asked for) to the host; `PendingSample.resolve` waits for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fxllm.runtime.outputs import Logprob
from fxllm.runtime.sampling_params import SamplingParams

# Temperatures this small are sampled greedily: the distribution is one-hot in float32 anyway, and
# dividing by a denormal temperature overflows to inf and turns the softmax into NaN.
_GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingRow:
    """One row of the logits batch: its parameters, RNG and the tokens penalties look at."""

    params: SamplingParams
    generator: torch.Generator | None  # from make_generator(params.seed, device); None = global RNG
    prompt_token_ids: list[int]
    output_token_ids: list[int]


@dataclass
class SamplerOutput:
    """The sampled token of every row and, for rows that asked, their logprobs."""

    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]  # per row, None if that row asked no logprobs


class PendingSample:
    """A launched sampling step: the ids on the device, and their copy to the host in flight.

    On CUDA the copy goes into pinned memory with `non_blocking=True` and a CUDA event marks its end, so
    the host can build the next step while the GPU works; on the CPU the copy is a plain one.
    """

    def __init__(
        self,
        token_ids: torch.Tensor,
        params: Sequence[SamplingParams],
        logprob_parts: tuple[list[int], int, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.token_ids = token_ids  # [N] int64 on the device: the next step's inputs read it there
        self.params = params
        self._wanted: list[int] = []
        self._max_k = 0
        ints, floats = token_ids, None
        if logprob_parts is not None:
            self._wanted, self._max_k, more_ints, floats = logprob_parts
            ints = torch.cat([token_ids, more_ints])
        self._ints = _to_host(ints)
        self._floats = _to_host(floats) if floats is not None else None
        self._event: torch.cuda.Event | None = None
        if token_ids.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        self._output: SamplerOutput | None = None

    def ready(self) -> bool:
        """Whether the host copy has landed (resolve() will not block)."""
        return self._event is None or self._event.query()

    def resolve(self) -> SamplerOutput:
        """Wait for the host copy and build the output (once; later calls return the same object)."""
        if self._output is None:
            if self._event is not None:
                self._event.synchronize()
            self._output = self._build()
        return self._output

    def _build(self) -> SamplerOutput:
        ints = self._ints.tolist()
        num_rows = len(self.params)
        if self._floats is None:
            return SamplerOutput(token_ids=ints, logprobs=[None] * num_rows)
        floats = self._floats.tolist()
        out_ids, top_id_list = ints[:num_rows], ints[num_rows:]
        wanted, max_k = self._wanted, self._max_k
        top_lp_list = floats[len(wanted) :]
        per_row: list[dict[int, Logprob] | None] = [None] * num_rows
        for j, i in enumerate(wanted):
            sampled = out_ids[i]
            entry = {sampled: Logprob(token_id=sampled, logprob=floats[j])}
            for r in range(min(self.params[i].logprobs or 0, max_k)):
                token = top_id_list[j * max_k + r]
                entry.setdefault(token, Logprob(token_id=token, logprob=top_lp_list[j * max_k + r]))
            per_row[i] = entry
        return SamplerOutput(token_ids=out_ids, logprobs=per_row)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start copying a small device tensor to the host (pinned, non-blocking on CUDA); CPU tensors as is."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator on `device` seeded with `seed`, or None (use the global RNG) when seed is None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def to_device(
    data: Sequence[float] | Sequence[int] | Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Copy host data to `device` without blocking the host (pinned staging on CUDA)."""
    tensor = torch.tensor(data, dtype=dtype)
    if device.type == "cuda":
        # A copy from pageable memory would block the host until the GPU catches up.
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def pad_token_lists(token_lists: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Right-pad token lists with `pad_id` into an int64 [N, max_len] tensor (at least one column)."""
    width = max((len(tokens) for tokens in token_lists), default=0) or 1
    padded = [list(tokens) + [pad_id] * (width - len(tokens)) for tokens in token_lists]
    return to_device(padded, torch.int64, device)


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: torch.Tensor,
    output_ids: torch.Tensor,
    repetition: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
) -> torch.Tensor:
    """Apply HF repetition and OpenAI presence/frequency penalties; returns new [N, V] float logits.

    `prompt_ids` / `output_ids` are [N, L] int64 padded with V (one past the vocabulary); `repetition`,
    `presence`, `frequency` are [N] float. Repetition covers prompt + output tokens (HF:
    logit > 0 ? logit / p : logit * p); presence/frequency cover output tokens only
    (logit -= frequency * count + presence * (count > 0)).
    """
    num_rows, vocab = logits.shape
    # The extra column absorbs the padding id so scatter needs no mask; it is sliced off afterwards.
    counts = torch.zeros(num_rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=logits.dtype))
    counts = counts[:, :vocab]
    in_prompt = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=logits.device)
    in_prompt.scatter_(1, prompt_ids, True)
    seen = in_prompt[:, :vocab] | (counts > 0)

    rep = repetition.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask to -inf everything outside each row's top-k and top-p nucleus; returns new logits.

    `top_k` is [N] int64 in [1, V] (V = off); `top_p` is [N] float in (0, 1] (1 = off). Ties with the
    k-th logit are kept, and top-p always keeps the most likely token.
    """
    vocab = logits.shape[-1]
    # Ascending sort lets top-k and top-p share one sort: the kept tokens form a suffix.
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        kth_largest = sorted_logits.gather(1, (vocab - top_k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        outside = cumulative <= (1 - top_p).unsqueeze(1)
        outside[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p times the row's top probability ([N] min_p, 0 = off)."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_from_probs(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Draw one token per row by the exponential race: argmax(probs / Exp(1) noise).

    The race is equivalent to multinomial sampling but lets every row draw its noise from its own
    generator, so a seeded request gets the same tokens whatever else shares its batch.
    """
    noise = torch.empty_like(probs).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    # Exp(1) can round to 0 in float32; 0 / tiny keeps masked tokens at 0 instead of NaN.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return probs.div(noise).argmax(dim=-1)


def _min_tokens_mask(
    rows: Sequence[SamplingRow], eos_token_id: int | None, vocab: int
) -> tuple[list[int], list[int]]:
    """(row, token) pairs to forbid: EOS and stop tokens of rows that are still below min_tokens."""
    row_idx: list[int] = []
    token_idx: list[int] = []
    for i, row in enumerate(rows):
        params = row.params
        if len(row.output_token_ids) >= params.min_tokens:
            continue
        banned = set(params.stop_token_ids)
        # With ignore_eos, EOS is an ordinary token that ends nothing, so it need not be held back.
        if eos_token_id is not None and not params.ignore_eos:
            banned.add(eos_token_id)
        for token in sorted(banned):
            if token < vocab:
                row_idx.append(i)
                token_idx.append(token)
    return row_idx, token_idx


def _plain_greedy(params: SamplingParams) -> bool:
    """Greedy with nothing that needs float32 logits (penalties, logprobs)."""
    return params.temperature < _GREEDY_TEMPERATURE and not params.has_penalties and params.logprobs is None


def _native_argmax(logits: torch.Tensor) -> torch.Tensor | None:
    """The CPU's native row argmax (reads bfloat16 logits without a float32 copy), or None elsewhere."""
    if logits.device.type != "cpu":
        return None
    from fxllm.backends.cpu.native import argmax_rows

    return argmax_rows(logits)


class Sampler:
    """Turns a batch of [N, V] logits into one token (plus optional logprobs) per row."""

    def __init__(self, eos_token_id: int | None = None) -> None:
        """`eos_token_id` is masked (with stop_token_ids) for rows below their min_tokens."""
        self.eos_token_id = eos_token_id

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """Sample one token per row of `logits` (any float dtype) following each row's params."""
        return self.launch(logits, rows).resolve()

    def launch(self, logits: torch.Tensor, rows: list[SamplingRow]) -> PendingSample:
        """Sample on the device and start the ids' copy to the host; `resolve()` the result when needed."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}")
        params = [row.params for row in rows]
        if not rows:
            return PendingSample(torch.empty(0, dtype=torch.int64, device=logits.device), params)
        device = logits.device
        vocab = logits.shape[1]
        row_idx, token_idx = _min_tokens_mask(rows, self.eos_token_id, vocab)
        if not row_idx and all(_plain_greedy(p) for p in params):
            # The argmax of the logits as they are: a float32 copy ([N, V], 0.5 GB at 1,000 rows of a
            # 128k vocabulary) picks the same index, since widening to float32 is exact and keeps ties.
            token_ids = _native_argmax(logits)
            return PendingSample(logits.argmax(dim=-1) if token_ids is None else token_ids, params)
        # All ops below are out-of-place, so the caller's logits are never modified.
        logits = logits.float()

        if any(p.has_penalties for p in params):
            logits = apply_penalties(
                logits,
                pad_token_lists([row.prompt_token_ids for row in rows], vocab, device),
                pad_token_lists([row.output_token_ids for row in rows], vocab, device),
                to_device([p.repetition_penalty for p in params], torch.float32, device),
                to_device([p.presence_penalty for p in params], torch.float32, device),
                to_device([p.frequency_penalty for p in params], torch.float32, device),
            )

        if row_idx:
            index = (to_device(row_idx, torch.int64, device), to_device(token_idx, torch.int64, device))
            logits = logits.index_put(index, logits.new_full((), float("-inf")))

        token_ids = self._sample(logits, rows)
        return self._gather(logits, token_ids, params)

    def _sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Greedy rows take the argmax; the rest are tempered, truncated and raced."""
        vocab = logits.shape[1]
        device = logits.device
        greedy = [row.params.temperature < _GREEDY_TEMPERATURE for row in rows]
        if all(greedy):
            return logits.argmax(dim=-1)

        # Greedy rows get neutral settings here; their random draw is discarded below.
        random_params = [None if g else row.params for g, row in zip(greedy, rows)]
        temps = [1.0 if p is None else p.temperature for p in random_params]
        top_k = [vocab if p is None or p.top_k <= 0 else min(p.top_k, vocab) for p in random_params]
        top_p = [1.0 if p is None else p.top_p for p in random_params]
        min_p = [0.0 if p is None else p.min_p for p in random_params]

        scaled = logits / to_device(temps, torch.float32, device).unsqueeze(1)
        use_top_k = any(k < vocab for k in top_k)
        use_top_p = any(p < 1.0 for p in top_p)
        if use_top_k or use_top_p:
            scaled = apply_top_k_top_p(
                scaled,
                to_device(top_k, torch.int64, device) if use_top_k else None,
                to_device(top_p, torch.float32, device) if use_top_p else None,
            )
        if any(p > 0.0 for p in min_p):
            scaled = apply_min_p(scaled, to_device(min_p, torch.float32, device))

        generators = [None if g else row.generator for g, row in zip(greedy, rows)]
        sampled = sample_from_probs(scaled.softmax(dim=-1), generators)
        if any(greedy):
            sampled = torch.where(to_device(greedy, torch.bool, device), logits.argmax(dim=-1), sampled)
        return sampled

    @staticmethod
    def _gather(
        logits: torch.Tensor, token_ids: torch.Tensor, params: Sequence[SamplingParams]
    ) -> PendingSample:
        """Gather the requested logprobs on the device and start the one copy of ids + values to the host."""
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not wanted:
            return PendingSample(token_ids, params)

        # Logprobs are log_softmax of the penalised (and min_tokens-masked) logits, before temperature
        # and truncation: they describe the model's distribution, not the sampling knobs, so they are
        # comparable across requests and match HF's scores for temperature 1 without truncation.
        index = to_device(wanted, torch.int64, token_ids.device)
        logprobs = torch.log_softmax(logits.index_select(0, index), dim=-1)
        chosen = token_ids.index_select(0, index)
        chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
        max_k = min(max(params[i].logprobs or 0 for i in wanted), logits.shape[1])
        # topk(0) is valid and yields empty [len(wanted), 0] tensors, so k = 0 needs no special case.
        top_lp, top_ids = logprobs.topk(max_k, dim=-1)
        floats = torch.cat([chosen_lp, top_lp.flatten()])
        return PendingSample(token_ids, params, (wanted, max_k, top_ids.flatten(), floats))
