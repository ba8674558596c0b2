"""Text data: the only user of `datasets`. Load text (embedded grammar, local file, or Hub id), build or load a
tokenizer, and encode fixed-length sequences START + tokens + END + PAD."""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .config import DataConfig
from .errors import DifflmError, check_choice, loading

log = logging.getLogger(__name__)

LOCAL_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text"}
SPECIALS = {"start": "[START]", "end": "[END]", "pad": "[PAD]", "unk": "[UNK]"}


@dataclass
class TextSplits:
    train: List[str]
    dev: List[str]
    train_mr: Optional[List[str]] = None  # meaning representations (`field[value], ...`) aligned with the texts
    dev_mr: Optional[List[str]] = None

    def require_meanings(self, what: str, alternative: str = "") -> None:
        """Refuse in one line when `what` needs meaning representations and these texts have none."""
        if not self.train_mr:
            ways = ["set data.mr_column (mr for the E2E CSVs, meaning_representation on the Hub)",
                    "use builtin:restaurants"] + [alternative] * bool(alternative)
            raise DifflmError(f"{what} needs meaning representations: {', '.join(ways[:-1])} or {ways[-1]}")


_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


def parse_mr(mr: str) -> Dict[str, str]:
    """E2E's meaning representation `name[The Vaults], eatType[pub], ...` as {field: value}."""
    out = {}
    for field, value in _MR_ITEM.findall(mr or ""):
        if value.strip():
            out[field.strip()] = value.strip()
    return out


def mr_values(mrs: List[str], min_count: int = 2) -> Dict[str, List[str]]:
    """{field: sorted values} stated in meaning representations at least `min_count` times, fields sorted."""
    counts: Dict[str, Counter] = {}
    for mr in mrs:
        for field, value in parse_mr(mr).items():
            counts.setdefault(field, Counter())[value] += 1
    return {f: sorted(v for v, n in c.items() if n >= min_count) for f, c in sorted(counts.items())}


def attribute_names(mrs: List[str], min_count: int = 2) -> List[str]:
    """The `field=value` pairs of meaning representations seen at least `min_count` times, sorted."""
    return sorted(f"{f}={v}" for f, values in mr_values(mrs, min_count).items() for v in values)


def attribute_vectors(mrs: List[str], names: List[str], strict: bool = False) -> torch.Tensor:
    """(N, A) 0/1 rows: which of `names` each meaning representation states. Training rows skip the rare pairs
    that `names` left out; `strict` (a user's meanings to generate from) refuses in one line a line that states
    nothing or a pair the model never learnt, naming the line and the values it knows for that field."""
    index = {a: i for i, a in enumerate(names)}
    out = torch.zeros(len(mrs), len(names), dtype=torch.long)
    for r, mr in enumerate(mrs):
        pairs = parse_mr(mr)
        if strict and not pairs:
            raise DifflmError(f"meaning {r + 1} ({mr.strip()[:60]!r}) states no field[value] pair; write it as E2E "
                              f"does, e.g. 'name[The Eagle], food[French]'")
        for k, v in pairs.items():
            if f"{k}={v}" in index:
                out[r, index[f"{k}={v}"]] = 1
            elif strict:
                known = [a.split("=", 1)[1] for a in names if a.split("=", 1)[0] == k]
                hint = f"it knows {', '.join(f'{k}[{x}]' for x in known)}" if known else f"it knows no field {k!r}"
                raise DifflmError(f"meaning {r + 1} states {k}[{v}], which the model was not trained on; {hint}")
    return out


def _looks_local(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or Path(source).suffix.lower() in LOCAL_BUILDERS
            or Path(source).exists())


def _utf8_text(path: Path, source: str) -> str:
    """The file's text, or a one-line error saying where it stops being UTF-8 and how to re-encode it."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        fixed = path.with_name(f"{path.stem}.utf8{path.suffix}")
        raise DifflmError(f"data file {source} is not UTF-8: byte 0x{data[e.start]:02x} at line {line}, column "
                          f"{column} (offset {e.start}); re-encode it, e.g. `iconv -f latin1 -t utf-8 {source} > "
                          f"{fixed}` (latin1, or the file's real encoding), and use that file") from None


def _load_dataset(source: str, split: str):
    import datasets  # heavy; only here

    datasets.disable_progress_bars()
    if _looks_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise DifflmError(f"data path {source} does not exist; check data.source / data.dev_source")
        if path.is_dir():  # a dataset repository on disk (a Hub snapshot, or split files such as train.csv)
            try:
                return datasets.load_dataset(str(path), split=split)
            except Exception as e:
                raise DifflmError(f"could not load split {split!r} of {source}: {str(e).splitlines()[0]}") from None
        builder = LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DifflmError(f"data file {source} has an unsupported type; use .csv, .json, .jsonl or .txt")
        if sum(1 for line in _utf8_text(path, source).splitlines() if line.strip()) <= (builder == "csv"):
            raise DifflmError(f"dataset {source} is empty: it has no rows")
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # malformed files surface as many exception types inside datasets
            raise DifflmError(f"could not read {source}: {str(e).splitlines()[0]}") from None
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:
        raise DifflmError(f"could not load Hub dataset {source!r} split {split!r} (a local path must exist; "
                          f"a Hub id needs the network or the datasets cache): {str(e).splitlines()[0]}") from None


def _column(ds, column: str, source: str, mr_column: str = "") -> Tuple[List[str], Optional[List[str]]]:
    """The non-empty texts of `column` and, when `mr_column` is set, the meaning representations beside them."""
    for name, key in ((column, "text_column"), (mr_column, "mr_column")):
        if name and name not in ds.column_names:
            raise DifflmError(f"column {name!r} not in {source}; its columns are {', '.join(ds.column_names)}: "
                              f"set data.{key} to one of them")
    mrs = ds[mr_column] if mr_column else [None] * len(ds)
    rows = [(t, m) for t, m in zip(ds[column], mrs) if isinstance(t, str) and t.strip()]
    if not rows:
        raise DifflmError(f"dataset {source} is empty: no non-empty text in column {column!r}")
    return [t for t, _ in rows], ([m or "" for _, m in rows] if mr_column else None)


def load_texts(cfg: DataConfig) -> TextSplits:
    """Training and held-out text as configured (see DataConfig)."""
    if cfg.source.startswith("builtin:"):
        from .grammar import BUILTIN, builtin_grammar

        name = cfg.source.split(":", 1)[1]
        check_choice("builtin corpus", name, BUILTIN)
        g = builtin_grammar(name)
        train = g.corpus_with_meanings(cfg.builtin_train, cfg.builtin_seed)
        dev = g.corpus_with_meanings(cfg.builtin_dev, cfg.builtin_seed + 1)
        return TextSplits(train=[t for t, _ in train], dev=[t for t, _ in dev], train_mr=[m for _, m in train],
                          dev_mr=[m for _, m in dev])
    column, mr = cfg.text_column, cfg.mr_column
    train, train_mr = _column(_load_dataset(cfg.source, cfg.train_split), column, cfg.source, mr)
    if cfg.dev_source:
        dev, dev_mr = _column(_load_dataset(cfg.dev_source, cfg.dev_split), column, cfg.dev_source, mr)
    elif not Path(cfg.source).expanduser().is_file():  # a Hub id or a dataset directory: it has splits
        dev, dev_mr = _column(_load_dataset(cfg.source, cfg.dev_split), column, f"{cfg.source}[{cfg.dev_split}]", mr)
    else:
        n_dev = max(1, int(len(train) * cfg.dev_fraction))
        if len(train) < 2:
            raise DifflmError(f"dataset {cfg.source} has {len(train)} text; need at least 2 to hold one out")
        train, dev = train[n_dev:], train[:n_dev]
        train_mr, dev_mr = (train_mr[n_dev:], train_mr[:n_dev]) if mr else (None, None)
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
        train_mr = train_mr[: cfg.max_train_examples] if train_mr is not None else None
    dev, dev_mr = _shuffled(dev, dev_mr)
    return TextSplits(train=train, dev=dev, train_mr=train_mr, dev_mr=dev_mr)


def _shuffled(texts: List[str], mrs: Optional[List[str]]) -> Tuple[List[str], Optional[List[str]]]:
    """The held-out texts (and their meanings) in one fixed random order, so that the first N, which the dev loss,
    the teacher's perplexity and every evaluation reference take, are a fair sample: E2E's dev file lists the
    references of each meaning together, and its first 256 texts hold 28 meanings (distinct-2 0.257
    against 0.311 for the first 256 in this order)."""
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    return [texts[i] for i in order], None if mrs is None else [mrs[i] for i in order]


def build_tokenizer(texts: List[str], min_freq: int = 1, lowercase: bool = False):
    """A word-level tokenizer trained on `texts` (whitespace, then punctuation split off) with the specials."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=SPECIALS["unk"]))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    trainer = trainers.WordLevelTrainer(min_frequency=min_freq, special_tokens=list(SPECIALS.values()))
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS["start"], eos_token=SPECIALS["end"],
                                   pad_token=SPECIALS["pad"], unk_token=SPECIALS["unk"])


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise DifflmError(f"tokenizer directory {path} not found; give a local Hugging Face tokenizer directory")
    with loading(path, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.bos_token_id is None and tok.cls_token_id is not None:
        tok.bos_token = tok.cls_token
    if tok.eos_token_id is None and tok.sep_token_id is not None:
        tok.eos_token = tok.sep_token
    if None in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
        raise DifflmError(f"tokenizer {path} needs start (bos/cls), end (eos/sep) and pad tokens")
    return tok


def special_ids(tokenizer) -> Tuple[int, int, int]:
    """(start, end, pad) token ids."""
    return tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id


def encode(texts: List[str], tokenizer, seq_len: int) -> Tuple[torch.Tensor, int]:
    """(N, seq_len) ids of START + tokens + END + PAD..., and how many texts were truncated to fit."""
    if seq_len < 3:
        raise DifflmError(f"sequence length must be at least 3 (START, one token, END), got {seq_len}")
    start, end, pad = special_ids(tokenizer)
    body = seq_len - 2
    out = torch.full((len(texts), seq_len), pad, dtype=torch.long)
    truncated = 0
    for i, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
        if len(ids) > body:
            ids, truncated = ids[:body], truncated + 1
        out[i, : len(ids) + 2] = torch.tensor([start, *ids, end])
    return out, truncated


def decode(ids: List[int], tokenizer) -> str:
    """Text of one generated sequence: START dropped, cut at the first END, PAD removed."""
    start, end, pad = special_ids(tokenizer)
    if ids and ids[0] == start:
        ids = ids[1:]
    if end in ids:
        ids = ids[: ids.index(end)]
    return tokenizer.decode([i for i in ids if i not in (pad, start)], skip_special_tokens=False).strip()
