"""Redelivery policy: exponential backoff with jitter, a maximum number of attempts, then dead letter."""

from __future__ import annotations

import dataclasses
import random


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """``delay(n)`` is the wait after the n-th failed attempt: ``initial * multiplier**(n-1)``, capped at
    ``max_backoff``, spread by ±``jitter`` (a fraction) so that many failed messages do not retry in step."""

    max_attempts: int = 10
    initial_backoff: float = 1.0
    max_backoff: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** max(0, attempt - 1))
        if self.jitter <= 0:
            return base
        r = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1.0 + r))

    def exhausted(self, attempts: int) -> bool:
        return attempts >= self.max_attempts
