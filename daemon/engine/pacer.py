"""How many prompt tokens a step prefills: a chunk sized by time, not by a fixed count.

On a CPU a prompt token costs nearly what a whole decode step costs, and every chunk also pays a
forward pass's fixed cost, so any fixed chunk either stalls the running streams (each chunk adds its
whole cost to their next token's gap) or prefills a lone prompt slowly. While sequences decode, the
pacer keeps a step's prefill time near `budget` times the step's decode time (`--prefill-budget`),
so a stream's inter-token gap stays near (1 + budget) times its gap alone; with nothing decoding it
gives the largest chunk (`--prefill-chunk`): prefill is all there is to do.

The chunk is a feedback loop on the times mlx-lm's BatchGenerator measures for each step (its
`stats()`), not a cost model: a prefill's cost is a fixed part plus a part per token that grows with
the context, and the loop finds the chunk that fits whatever it is. n <- n * target / measured
converges to the fixed point (its slope there is fixed part / target < 1); each step moves at most 2x.
"""

from __future__ import annotations

FIRST = 16  # the chunk of the first step that prefills while others decode
SMALLEST = 1
STEP = 2.0  # the most a chunk grows or shrinks in one step
EMA = 0.3  # weight of the newest decode time


class PrefillPacer:
    """Args: largest: the chunk with nothing decoding, and the bound of every chunk; budget: a
    step's prefill time while streams decode, in their decode steps."""

    def __init__(self, largest: int, budget: float):
        self.largest, self.budget = largest, budget
        self.decode_s: float | None = None  # the decoding part of a step (EMA)
        self.n = float(min(FIRST, largest))  # the chunk while streams decode

    def chunk(self, decoding: bool) -> int:
        """Tokens per prefilling sequence for the next step."""
        return max(SMALLEST, int(self.n)) if decoding else self.largest

    def observe(self, stats) -> None:
        """One step's mlx-lm BatchStats: its prompt tokens, prompt time, decode steps, wall time."""
        if not stats.generation_steps:
            return  # nothing decoded: no gap to protect, the chunk stays where it was
        self.decode_s = _ema(self.decode_s, max(stats.wall_time - stats.prompt_time, 1e-6))
        if stats.prompt_tokens and stats.prompt_time > 0:
            ratio = self.budget * self.decode_s / stats.prompt_time
            self.n = min(float(self.largest), max(float(SMALLEST), self.n * min(STEP, max(1 / STEP, ratio))))


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new
