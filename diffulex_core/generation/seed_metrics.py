"""Diffulex's metrics under Diffulex's names and definitions (``tpf``, ``ttft``, ``tpot``, the
throughputs, ``postfix()``, ``log_summary()``): engines format them with ``%.2f`` and compare them with
published Diffulex figures, so each is computed with Diffulex's arithmetic, in its order, and is 0.0
without data. See ``docs/metrics.md``."""

from __future__ import annotations

import logging

__all__ = ["SeedMetrics", "seed_mean", "seed_ratio"]

logger = logging.getLogger("diffulex_core.output")  # the public module's name, which engines filter on


def seed_mean(values: list[float]) -> float:
    """Diffulex's mean: plain ``sum`` (so values match its to the last bit), 0.0 for none."""
    return sum(values) / len(values) if values else 0.0


def seed_ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


class SeedMetrics:
    """Diffulex's metrics over the counters ``GenerationOutputs`` keeps (``trajectories``,
    ``num_steps``, ``total_step_time``, the prefill/decode tokens and times, the TPF sum)."""

    @property
    def batch_step_count(self) -> int:
        """Steps that ran at least one request."""
        return self.num_steps

    @property
    def total_time(self) -> float:
        """Sum of those steps' times."""
        return float(self.total_step_time)

    @property
    def e2e_total_time(self) -> float:
        """Sum over requests of their own steps' times."""
        return float(sum(t.total_step_time for t in self.trajectories))

    @property
    def tpf(self) -> float:
        """Mean over requests with a decode step of their decode tokens / decode steps (a prefill
        step counts in neither); 0.0 with none."""
        return self._tpf_sum / self._tpf_requests if self._tpf_requests > 0 else 0.0

    @property
    def ttft(self) -> float:
        """Mean over requests of their own steps' time up to their first step with a token."""
        return seed_mean([t.first_token_step_time for t in self.trajectories if t.first_token_step_time is not None])

    @property
    def tpot(self) -> float:
        """Mean over requests with more than one token of (own time - TTFT) / (tokens - 1)."""
        return seed_mean([(t.total_step_time - t.first_token_step_time) / (t.generated_tokens - 1)
                           for t in self.trajectories
                           if t.generated_tokens > 1 and t.first_token_step_time is not None])

    @property
    def throughput(self) -> float:
        """Tokens generated in the batch (recorded or not) / ``total_time``."""
        return seed_ratio(self.batch_generated_tokens, self.total_step_time)

    @property
    def e2e_throughput(self) -> float:
        """Final tokens (``len(token_ids)``) over requests / ``total_time`` (at least 1 ms)."""
        return sum(len(t.token_ids) for t in self.trajectories) / max(self.total_step_time, 0.001)

    @property
    def prefill_throughput(self) -> float:
        return seed_ratio(self.prefill_tokens, self.prefill_time)

    @property
    def decode_throughput(self) -> float:
        return seed_ratio(self.decode_tokens, self.decode_time)

    @property
    def avg_e2e_tps(self) -> float:
        """Mean over requests of final tokens / own time."""
        return seed_mean([len(t.token_ids) / t.total_step_time for t in self.trajectories
                           if t.total_step_time > 0 and len(t.token_ids) > 0])

    @property
    def avg_decode_tps(self) -> float:
        """Mean over requests of own decode-step tokens / own decode time."""
        return seed_mean([t.decode_tokens / t.decode_time for t in self.trajectories
                           if t.decode_time > 0 and t.decode_tokens > 0])

    def postfix(self) -> dict[str, str]:
        """Diffulex's progress-bar fields."""
        return dict(tpf=f"{self.tpf:.2f}tok/step", ttft=f"{self.ttft:.2f}s", tpot=f"{self.tpot:.2f}s",
                    e2eps=f"{self.e2e_throughput:.2f}tok/s", ptps=f"{self.prefill_throughput:.2f}tok/s",
                    dtps=f"{self.decode_throughput:.2f}tok/s")

    def fast_postfix(self) -> dict[str, str]:
        """Diffulex's O(1) progress-bar fields, from the batch counters alone."""
        elapsed = max(self.total_step_time, 0.001)
        decode_elapsed = max(self.decode_time, 0.001)
        return dict(tpf=f"{self.tpf:.2f}tok/step",
                    dtps=f"{self.decode_tokens / decode_elapsed:.2f}tok/s",
                    e2eps=f"{self.batch_generated_tokens / elapsed:.2f}tok/s")

    def log_summary(self) -> None:
        """Diffulex's summary, line for line, to this module's logger at INFO."""
        rule = "--------------------------------"
        for line in (
            rule, "Generation Outputs Summary:", rule,
            f"Total Tokens: {sum(len(t.token_ids) for t in self.trajectories)} toks",
            f"Total NFEs: {self.batch_step_count} nfes (steps)",
            f"Total Time: {self.total_time} sec",
            f"E2E Time: {self.e2e_total_time} sec",
            f"TPF: {self.tpf:.2f} tok/step",
            f"TTFT: {self.ttft:.2f} sec",
            f"TPOT: {self.tpot:.2f} sec",
            f"E2E Throughput: {self.e2e_throughput:.2f} tok/sec",
            f"Prefill Throughput: {self.prefill_throughput:.2f} tok/sec",
            f"Decode Throughput: {self.decode_throughput:.2f} tok/sec",
            f"Avg E2E TPS (per-sample mean): {self.avg_e2e_tps:.2f} tok/sec",
            f"Avg Decode TPS (per-sample mean): {self.avg_decode_tps:.2f} tok/sec",
            rule,
        ):
            logger.info(line)
