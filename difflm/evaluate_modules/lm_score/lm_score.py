"""lm-score (Diffusion-LM): exp(mean token NLL) of texts under a teacher causal LM directory."""

import datasets
import evaluate

from difflm.teacher import lm_score, load_teacher


class LmScore(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions: texts; compute(..., teacher=DIR, "
            "seq_len=64)", features=datasets.Features({"predictions": datasets.Value("string")}))

    def _compute(self, predictions, teacher, seq_len=64, batch_size=64):
        model, tokenizer = load_teacher(teacher)
        return {"lm_score": lm_score(model, tokenizer, predictions, seq_len, batch_size)}
