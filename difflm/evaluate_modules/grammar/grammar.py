"""Exact figures under difflm's embedded grammar: grammatical share, log p of samples, the true entropy."""

from dataclasses import asdict

import datasets
import evaluate

from difflm.grammar import builtin_grammar
from difflm.metrics import grammar_report


class Grammar(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions: generated texts; "
            "compute(..., grammar='restaurants')",
            features=datasets.Features({"predictions": datasets.Value("string")}))

    def _compute(self, predictions, grammar="restaurants"):
        return asdict(grammar_report(builtin_grammar(grammar), predictions))
