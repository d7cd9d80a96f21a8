"""Next-token selection: greedy, or temperature / top-k / top-p sampling from a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 means greedy)")
        if self.top_k < 0:
            raise ValueError("top-k must be >= 0 (0 means no cut)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top-p must be in (0, 1]")


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        cfg = self.config
        if cfg.temperature == 0:
            return int(np.argmax(logits))
        scores = np.asarray(logits, np.float64) / cfg.temperature
        order = np.argsort(-scores, kind="stable")  # most likely first
        if cfg.top_k:
            order = order[: cfg.top_k]
        probs = np.exp(scores[order] - scores[order[0]])
        probs /= probs.sum()
        if cfg.top_p < 1:
            # The smallest prefix whose mass reaches top_p (always at least one token).
            keep = int(np.searchsorted(np.cumsum(probs), cfg.top_p) + 1)
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(order), p=probs)])
