"""The embedded grammar: probabilities, unambiguity, exact entropy."""

import math
import random

import pytest

from difflm.grammar import Grammar, builtin_grammar


@pytest.fixture(scope="module")
def grammar():
    return builtin_grammar()


def test_inside_probability_equals_derivation_probability(grammar):
    """Unambiguous: every sampled sentence has exactly the probability of the derivation that made it."""
    rng = random.Random(0)
    for _ in range(300):
        words, log_p = grammar.sample_with_log_prob(rng)
        assert grammar.log_prob(words) == pytest.approx(log_p, abs=1e-9)


def test_entropy_matches_monte_carlo(grammar):
    rng = random.Random(1)
    draws = [grammar.sample_with_log_prob(rng) for _ in range(20000)]
    nll = [-lp for _, lp in draws]
    mean = sum(nll) / len(nll)
    se = math.sqrt(sum((x - mean) ** 2 for x in nll) / len(nll) / len(nll))
    assert grammar.entropy() == pytest.approx(mean, abs=4 * se)
    mean_len = sum(len(w) for w, _ in draws) / len(draws)
    assert grammar.expected_length() == pytest.approx(mean_len, rel=0.01)


def test_ungrammatical_sentences_have_zero_probability(grammar):
    assert grammar.is_grammatical("Aromi is a pub .")
    assert grammar.is_grammatical("The Eagle is an expensive coffee shop by the riverside . it serves Indian food near Avalon .")
    assert not grammar.is_grammatical("Aromi is a pub")  # no full stop
    assert not grammar.is_grammatical("Aromi is an cheap pub .")
    assert not grammar.is_grammatical("is a pub .")
    assert grammar.log_prob("Aromi Aromi") == -math.inf


def test_probabilities_of_a_small_grammar_sum_to_one():
    g = Grammar({"S": [(0.3, ("a", "X")), (0.7, ("X", "b"))], "X": [(0.5, ("c",)), (0.5, ())]})
    sentences = ["a c", "a", "c b", "b"]
    assert sum(math.exp(g.log_prob(s)) for s in sentences) == pytest.approx(1.0)
    assert g.entropy() == pytest.approx(-sum(p * math.log(p) for p in (0.15, 0.15, 0.35, 0.35)))


def test_rule_probabilities_must_sum_to_one():
    with pytest.raises(ValueError):
        Grammar({"S": [(0.3, ("a",))]})
