"""Evaluation metrics: the text bound, diversity, grammar figures."""

import math

import pytest
import torch

from difflm.data import encode
from difflm.grammar import builtin_grammar
from difflm.metrics import (_ratio_estimate, bleu, bound_report, distinct_n, diversity, grammar_report, self_bleu,
                            text_bound, unigram_entropy)
from difflm.text import load_model


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == pytest.approx(0.5)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a b c", "a b c"], 3) == pytest.approx(0.5)


def test_bleu_extremes_and_a_hand_computed_case():
    h = "the cat sat on the mat".split()
    assert bleu(h, [h]) == pytest.approx(1.0)
    assert bleu("x y z w".split(), ["a b c d".split()]) == 0.0
    # unigram 5/6, smoothed bigram (3+1)/(5+1), trigram (2+1)/(4+1), 4-gram (1+1)/(3+1); no brevity penalty
    ref = "the cat sat on a mat".split()
    expected = math.exp((math.log(5 / 6) + math.log(4 / 6) + math.log(3 / 5) + math.log(2 / 4)) / 4)
    assert bleu(h, [ref]) == pytest.approx(expected)


def test_self_bleu_and_unigram_entropy():
    assert self_bleu(["a b c d e"] * 3) == pytest.approx(1.0)
    assert self_bleu(["a b c d", "e f g h"]) == 0.0
    assert unigram_entropy(["a b c d"]) == pytest.approx(math.log(4))
    d = diversity(["a b", "a c"], reference=["a b c d"])
    assert d.distinct_1 == pytest.approx(0.75) and d.reference_unigram_entropy == pytest.approx(math.log(4))


def test_ratio_estimate_is_the_corpus_ratio():
    est = _ratio_estimate(torch.tensor([10.0, 30.0]), torch.tensor([2.0, 4.0]))
    assert est.mean == pytest.approx(40 / 6) and est.se > 0


def test_grammar_report():
    g = builtin_grammar()
    rep = grammar_report(g, ["Aromi is a pub .", "Aromi is is a pub ."])
    assert rep.grammatical_share == 0.5 and rep.mean_log_prob_of_grammatical == pytest.approx(g.log_prob("Aromi is a pub ."))
    assert rep.entropy_per_token == pytest.approx(g.entropy() / (g.expected_length() + 1))
    assert rep.exact_perplexity_of_grammatical == pytest.approx(math.exp(-g.log_prob("Aromi is a pub .") / 6))
    assert rep.true_perplexity == pytest.approx(math.exp(rep.entropy_per_token))


@pytest.fixture(scope="module")
def tiny_model(tiny_run):
    return load_model(tiny_run / "model")


def test_text_bound_terms_and_entropy(tiny_model):
    model, tok = tiny_model
    ids, _ = encode(["Aromi is a pub .", "Zizzi is a cheap pub ."], tok, model.config.seq_len)
    b = text_bound(model, ids, generator=torch.Generator().manual_seed(0))
    var0 = 1 - model.diffusion.alpha_bar(torch.tensor([1 / model.config.num_steps])).item()
    d = model.config.seq_len * model.config.embed_dim
    assert torch.allclose(b.entropy, torch.full((2,), 0.5 * d * (1 + math.log(2 * math.pi * var0))))
    for term in (b.rounding, b.diffusion, b.prior):
        assert torch.all(term >= 0) and torch.all(torch.isfinite(term))
    assert torch.all(torch.isfinite(text_bound(model, ids, continuous=True).nll))


@pytest.mark.parametrize("continuous", [False, True])
def test_bound_is_not_below_the_true_entropy(tiny_model, continuous):
    """On held-out grammar sentences the mean bound per sentence may not undercut the exact entropy beyond 3 SE."""
    model, tok = tiny_model
    g = builtin_grammar()
    ids, truncated = encode(g.corpus(96, seed=77), tok, model.config.seq_len)
    assert truncated == 0
    rep = bound_report(model, ids, continuous=continuous, draws=2, batch_size=48)
    assert rep.nats_per_sequence.mean > g.entropy() - 3 * rep.nats_per_sequence.se
    assert rep.bits_per_token.mean == pytest.approx(rep.nats_per_token.mean / math.log(2))
    assert rep.perplexity_bound == pytest.approx(math.exp(rep.nats_per_token.mean))
