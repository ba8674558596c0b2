"""Diversity of generated text: distinct-1/2/3, self-BLEU and unigram entropy (difflm.metrics.diversity)."""

from dataclasses import asdict

import datasets
import evaluate

from difflm.metrics import diversity


class Diversity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions: generated texts; compute(..., "
            "reference_texts=[...]) adds the unigram entropy of real text",
            features=datasets.Features({"predictions": datasets.Value("string")}))

    def _compute(self, predictions, reference_texts=None):
        return asdict(diversity(predictions, reference=reference_texts))
