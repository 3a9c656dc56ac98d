"""Evaluation harness: benchmarks (XCOPA, MGSM, bitext retrieval, perplexity) over a `Scorer`.

The tasks only talk to a :class:`eval.scorer.Scorer` (log-likelihoods, greedy generation,
pooled hidden states), so the same task code runs on an exported Hugging Face model
(:class:`eval.scorer.HFScorer`) and on a training engine's partitioned model
(:class:`eval.engine.EngineScorer`, run after training by a recipe's ``eval:`` section).

CLI: ``python -m launcher.evaluate --model DIR --tasks xcopa,mgsm,bitext,ppl --languages sw,zh``.
"""

from eval.answers import extract_number, numbers_match
from eval.benchmarks import BenchmarkError
from eval.engine import EngineScorer
from eval.scorer import HFScorer, LoglikelihoodResult, Scorer
from eval.tasks import TaskResult

__all__ = [
    "BenchmarkError",
    "EngineScorer",
    "HFScorer",
    "LoglikelihoodResult",
    "Scorer",
    "TaskResult",
    "extract_number",
    "numbers_match",
]
