"""Sampling that does not depend on how images are batched.

``generate(do_sample=True)`` draws every row's next token from one random
stream, so a caption depends on the other images in its call. With a seed,
beamcap instead appends :class:`SeededSampler` to the logits processors: it
runs after the usual warpers (temperature, top-k, top-p), draws each row's
token by the Gumbel-max trick with noise that is a hash of (row seed, step,
token id), and leaves only that token possible. Rows get their own streams,
the noise is computed on the scores' device, and nothing synchronises.
"""

from __future__ import annotations

import torch

_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64 constants as signed int64
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser (wrapping int64 arithmetic)."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniform_noise(row_seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise of shape (rows, vocab): a pure function of (row seed, step, token id)."""
    keys = _mix(row_seeds * _GOLDEN + step)
    tokens = torch.arange(vocab_size, device=row_seeds.device, dtype=torch.int64)
    bits = _mix(keys[:, None] ^ (tokens[None, :] * _GOLDEN))
    return (_shr(bits, 11).to(torch.float64) + 0.5) / float(1 << 53)


class SeededSampler:
    """A ``LogitsProcessor`` that samples each row from its own seeded stream.

    Args:
        row_seeds: one seed per row of the ``generate`` batch (images x
            ``num_return_sequences``, in that order).
    """

    def __init__(self, row_seeds: list[int]):
        self._seeds = row_seeds
        self._start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.shape[0] != len(self._seeds):
            raise ValueError(f"SeededSampler has {len(self._seeds)} row seeds for {scores.shape[0]} rows")
        if self._start is None:
            self._start = input_ids.shape[1]
        step = input_ids.shape[1] - self._start
        seeds = torch.tensor(self._seeds, dtype=torch.int64, device=scores.device)
        gumbel = -torch.log(-torch.log(uniform_noise(seeds, step, scores.shape[1])))
        logp = torch.log_softmax(scores.to(torch.float64), dim=-1)
        chosen = torch.argmax(logp + gumbel, dim=-1)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen[:, None], 0.0)
        return out


_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")
# Settings under which generate() adds no warper of its own.
_NEUTRAL_WARPERS = {
    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None,
}  # fmt: skip


def sampling_warpers(generation_config) -> list:
    """The warpers ``generate`` applies when sampling one beam, in its order (transformers 5)."""
    from transformers import generation as g

    c = generation_config
    warpers = []
    if c.temperature is not None and c.temperature != 1.0:
        warpers.append(g.TemperatureLogitsWarper(c.temperature))
    if getattr(c, "top_h", None) is not None:
        warpers.append(g.TopHLogitsWarper(top_h=c.top_h))
    if c.top_k is not None and c.top_k != 0:
        warpers.append(g.TopKLogitsWarper(top_k=c.top_k))
    if c.top_p is not None and c.top_p < 1.0:
        warpers.append(g.TopPLogitsWarper(top_p=c.top_p))
    if c.min_p is not None:
        warpers.append(g.MinPLogitsWarper(min_p=c.min_p))
    if c.typical_p is not None and c.typical_p < 1.0:
        warpers.append(g.TypicalLogitsWarper(mass=c.typical_p))
    if c.epsilon_cutoff is not None and 0.0 < c.epsilon_cutoff < 1.0:
        warpers.append(g.EpsilonLogitsWarper(epsilon=c.epsilon_cutoff))
    if c.eta_cutoff is not None and 0.0 < c.eta_cutoff < 1.0:
        warpers.append(g.EtaLogitsWarper(epsilon=c.eta_cutoff))
    return warpers


def seeded_settings(model, settings: dict, row_seeds: list[int]) -> dict:
    """``generate`` settings that sample each row from its own seed.

    ``generate`` applies its warpers after any custom processor, so the
    user's warpers are moved into the custom list, ahead of
    :class:`SeededSampler`, and ``generate``'s own are made neutral: its final
    draw then sees a single possible token. Sampling mode is kept so that
    ``num_return_sequences`` still encodes each image once.
    """
    import copy

    from transformers import LogitsProcessorList

    config = copy.deepcopy(model.generation_config)
    config.update(**{k: v for k, v in settings.items() if k in _SAMPLING_KEYS or k == "do_sample"})
    processors = LogitsProcessorList([*sampling_warpers(config), SeededSampler(row_seeds)])
    seeded = {k: v for k, v in settings.items() if k not in _SAMPLING_KEYS}
    seeded.update(_NEUTRAL_WARPERS, do_sample=True, logits_processor=processors)
    return seeded
