"""The text diffusion model's likelihood bound on held-out texts (nats and bits per token, perplexity bound)."""

import datasets
import evaluate

from difflm.data import encode
from difflm.metrics import bound_report
from difflm.text import load_model


class ElboBound(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions: held-out texts; compute(..., "
            "model=DIR, continuous=False, draws=16)", features=datasets.Features({"predictions": datasets.Value("string")}))

    def _compute(self, predictions, model, continuous=False, draws=16, seed=0):
        m, tokenizer = load_model(model)
        ids, _ = encode(list(predictions), tokenizer, m.config.seq_len)
        return bound_report(m, ids, continuous=continuous, draws=draws, seed=seed).to_dict()
