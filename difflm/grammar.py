"""The embedded corpus: a probabilistic context-free grammar of E2E-like restaurant descriptions.

It needs no download, and because it is a PCFG every sentence has an exact probability (the inside algorithm),
so the model's likelihood bound and its samples can be compared with the true distribution, and a sample is
grammatical exactly when its probability is positive. The grammar is unambiguous (each sentence has a single
derivation; `tests/test_grammar.py` checks it), so its entropy is the derivation entropy, computed exactly.

Symbols that are keys of the rule table are nonterminals; every other symbol is a word.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

Rule = Tuple[float, Tuple[str, ...]]

NAMES = ["Aromi", "Blue Spice", "The Eagle", "Zizzi", "Cotto", "Giraffe", "The Punter", "Fitzbillies"]
NEAR_NAMES = ["Café Sicilia", "Burger King", "The Bakers", "Avalon"]
FOODS = ["Italian", "French", "Chinese", "Indian", "English", "Japanese"]


def _uniform(options: Sequence[str]) -> List[Rule]:
    return [(1.0 / len(options), tuple(o.split())) for o in options]


RESTAURANTS: Dict[str, List[Rule]] = {
    "S": [(1.0, ("NAME", "is", "DESC", "LOC", ".", "SECOND"))],
    "DESC": [(0.45, ("a", "CADJ", "TYPE")), (0.2, ("an", "VADJ", "TYPE")), (0.35, ("a", "TYPE"))],
    "CADJ": [(0.4, ("cheap",)), (0.3, ("moderately", "priced")), (0.3, ("family", "friendly"))],
    "VADJ": [(0.6, ("expensive",)), (0.4, ("average", "priced"))],
    "TYPE": [(0.4, ("restaurant",)), (0.3, ("pub",)), (0.3, ("coffee", "shop"))],
    "LOC": [(0.35, ("in", "the", "city", "centre")), (0.35, ("by", "the", "riverside")), (0.3, ())],
    "SECOND": [(0.5, ("it", "serves", "FOOD", "food", "NEAR", ".")),
               (0.3, ("it", "has", "a", "RATING", "customer", "rating", ".")), (0.2, ())],
    "NEAR": [(0.5, ("near", "NEAR_NAME")), (0.5, ())],
    "RATING": _uniform(["high", "average", "low"]),
    "FOOD": _uniform(FOODS),
    "NAME": _uniform(NAMES),
    "NEAR_NAME": _uniform(NEAR_NAMES),
}


class Grammar:
    """A PCFG: sampling, exact sentence log-probabilities (inside algorithm), exact entropy and length."""

    def __init__(self, rules: Dict[str, List[Rule]], start: str = "S", fields: Optional[Dict[str, str]] = None):
        for lhs, options in rules.items():
            total = sum(p for p, _ in options)
            if abs(total - 1.0) > 1e-9:
                raise ValueError(f"rule probabilities of {lhs} sum to {total}, not 1")
        self.rules, self.start, self.fields = rules, start, dict(fields or {})

    # ---- sampling -------------------------------------------------------------------------------------------
    def sample(self, rng: random.Random) -> List[str]:
        """One sentence as a list of words."""
        return self.sample_with_log_prob(rng)[0]

    def sample_with_log_prob(self, rng: random.Random) -> Tuple[List[str], float]:
        """One sentence and the log-probability of its derivation."""
        words, log_p, _ = self._derive(rng)
        return words, log_p

    def _derive(self, rng: random.Random) -> Tuple[List[str], float, Dict[str, str]]:
        """A sentence, its log-probability, and its meaning: the words each field nonterminal (`self.fields`)
        produced, as {field: value}."""
        words: List[str] = []
        log_p, meaning = 0.0, {}
        stack: list = [self.start]
        while stack:
            sym = stack.pop()
            if isinstance(sym, tuple):  # (field, first word index): the end of a field nonterminal's words
                if len(words) > sym[1]:
                    meaning[sym[0]] = " ".join(words[sym[1]:])
                continue
            if sym not in self.rules:
                words.append(sym)
                continue
            options = self.rules[sym]
            k = rng.choices(range(len(options)), weights=[p for p, _ in options])[0]
            log_p += math.log(options[k][0])
            if sym in self.fields:
                stack.append((self.fields[sym], len(words)))
            stack.extend(reversed(options[k][1]))
        return words, log_p, meaning

    def corpus(self, n: int, seed: int) -> List[str]:
        return [text for text, _ in self.corpus_with_meanings(n, seed)]

    def corpus_with_meanings(self, n: int, seed: int) -> List[Tuple[str, str]]:
        """(sentence, meaning representation) pairs; the meaning is written like E2E's `mr` column,
        `field[value], ...`, so the same code reads both."""
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            words, _, meaning = self._derive(rng)
            out.append((" ".join(words), ", ".join(f"{k}[{v}]" for k, v in meaning.items())))
        return out

    # ---- exact probabilities --------------------------------------------------------------------------------
    def log_prob(self, sentence: str | Sequence[str]) -> float:
        """log p(sentence) summed over all derivations (inside algorithm); -inf when ungrammatical."""
        words = tuple(sentence.split()) if isinstance(sentence, str) else tuple(sentence)
        rules = self.rules

        @lru_cache(maxsize=None)
        def inside(sym: str, i: int, j: int) -> float:
            if sym not in rules:
                return 1.0 if j == i + 1 and words[i] == sym else 0.0
            return sum(p * seq(rhs, 0, i, j) for p, rhs in rules[sym])

        @lru_cache(maxsize=None)
        def seq(rhs: Tuple[str, ...], k: int, i: int, j: int) -> float:
            if k == len(rhs):
                return 1.0 if i == j else 0.0
            return sum(inside(rhs[k], i, m) * seq(rhs, k + 1, m, j) for m in range(i, j + 1))

        p = inside(self.start, 0, len(words))
        return math.log(p) if p > 0 else -math.inf

    def is_grammatical(self, sentence: str | Sequence[str]) -> bool:
        return self.log_prob(sentence) > -math.inf

    def _expectation(self, per_rule) -> float:
        """E over derivations of a sum of per-rule quantities, by recursion over the (acyclic) rules."""
        memo: Dict[str, float] = {}

        def value(sym: str) -> float:
            if sym not in self.rules:
                return 0.0
            if sym not in memo:
                memo[sym] = sum(p * (per_rule(p, rhs) + sum(value(c) for c in rhs)) for p, rhs in self.rules[sym])
            return memo[sym]

        return value(self.start)

    def entropy(self) -> float:
        """Exact entropy of a sentence in nats (derivation entropy = sentence entropy: unambiguous grammar)."""
        return self._expectation(lambda p, rhs: -math.log(p))

    def expected_length(self) -> float:
        """Expected number of words in a sentence."""
        return self._expectation(lambda p, rhs: sum(1 for c in rhs if c not in self.rules))

    @property
    def vocabulary(self) -> List[str]:
        words = {c for options in self.rules.values() for _, rhs in options for c in rhs if c not in self.rules}
        return sorted(words)


# E2E-style fields of a sentence's meaning: the words these nonterminals produce (area is the whole phrase)
RESTAURANT_FIELDS = {"NAME": "name", "TYPE": "eatType", "FOOD": "food", "RATING": "customer rating",
                     "NEAR_NAME": "near", "LOC": "area"}
BUILTIN = {"restaurants": (RESTAURANTS, RESTAURANT_FIELDS)}


def builtin_grammar(name: str = "restaurants") -> Grammar:
    rules, fields = BUILTIN[name]
    return Grammar(rules, fields=fields)


def source_grammar(source: str):
    """The embedded grammar a data source `builtin:NAME` draws from, or None for any other source."""
    return builtin_grammar(source.split(":", 1)[1]) if source.startswith("builtin:") else None
