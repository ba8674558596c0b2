"""The teacher LM behind lm-score: a GPT-2 trained from scratch on the diffusion model's data and tokenizer
(Diffusion-LM's evaluation), or any local Hugging Face causal LM that shares the tokenizer."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .card import CardedRun, warn_if_unfinished
from .config import Config, save_config
from .curves import require_tensorboard
from .data import encode, special_ids
from .errors import DifflmError, loading
from .engines import TorchEngine
from .files import check_out_dir, start_out_dir
from .runtime import resolve_device
from .train import BatchStream, prepare_data, run_loop

log = logging.getLogger("difflm")


def build_teacher(cfg: Config, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    t = cfg.teacher
    start, end, pad = special_ids(tokenizer)
    gcfg = GPT2Config(vocab_size=len(tokenizer), n_positions=cfg.data.seq_len, n_embd=t.hidden_size,
                      n_layer=t.num_layers, n_head=t.num_heads, resid_pdrop=t.dropout, embd_pdrop=t.dropout,
                      attn_pdrop=t.dropout, bos_token_id=start, eos_token_id=end, pad_token_id=pad)
    return GPT2LMHeadModel(gcfg)


def sequence_nll(teacher, ids: torch.Tensor, pad_id: int):
    """Per sequence: summed -log p of every token after START up to END (PAD targets ignored), and the count."""
    # padding is on the right and attention causal, so real tokens never see PAD: an all-ones mask is exact
    logits = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]  # (B, L-1, V)
    targets = ids[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")  # (B, L-1)
    mask = targets != pad_id
    return (nll * mask).sum(dim=1), mask.sum(dim=1)


def _mean_nll(teacher, ids, pad_id, batch_size, progress=None) -> float:
    teacher.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            nll, n = sequence_nll(teacher, ids[i: i + batch_size], pad_id)
            total, count = total + nll.sum().item(), count + n.sum().item()
            if progress:
                progress(len(ids[i: i + batch_size]))
    return total / max(count, 1)


def train_teacher(cfg: Config, tokenizer=None, show_progress: bool = True, overwrite: bool = False) -> Path:
    """Train the teacher on cfg.data (with `tokenizer`, normally the diffusion model's) and save it to
    `teacher.out_dir` with save_pretrained, tokenizer included (a directory holding a run only with `overwrite`)."""
    t = cfg.teacher
    out = Path(t.out_dir)
    check_out_dir(out, "teacher.out_dir", overwrite=overwrite)
    require_tensorboard(t, "teacher")
    torch.manual_seed(t.seed)
    device = resolve_device(t.device)
    tokenizer, train_ids, dev_ids, counts = prepare_data(cfg, tokenizer)
    train_ids, dev_ids = train_ids.to(device), dev_ids.to(device)
    pad = tokenizer.pad_token_id
    model = build_teacher(cfg, tokenizer).to(device).train()
    log.info("teacher: GPT-2 %d x %d, %.2fM parameters", t.num_layers, t.hidden_size,
             sum(p.numel() for p in model.parameters()) / 1e6)
    engine = TorchEngine(model, t)
    start_out_dir(out, overwrite=overwrite)
    save_config(cfg, out / "config.yaml")
    data = BatchStream(train_ids, t.batch_size, t.seed)

    def next_loss():
        nll, n = sequence_nll(model, next(data), pad)
        return nll.sum() / n.sum(), {}

    def evaluate():
        ppl = math.exp(_mean_nll(model, dev_ids[: 16 * t.batch_size], pad, t.batch_size))
        model.train()
        return {"dev_perplexity": ppl}

    run = CardedRun("teacher", model, tokenizer, cfg, counts, t, device, out, evaluate)

    result = run_loop(engine, next_loss, run.evaluate, run.save, t, out / "metrics.jsonl",
                      show_progress=show_progress, desc="teacher", saved=f"the teacher so far saved in {out / 'model'}")
    log.info("teacher trained %d steps in %.1f min; dev perplexity %.3f; saved to %s", result.steps, result.minutes,
             result.last_eval.get("dev_perplexity", float("nan")), out / "model")
    return out / "model"


def load_teacher(path: str, tokenizer=None, device="cpu"):
    """(teacher, its tokenizer) from a local causal-LM directory; with `tokenizer`, check the vocabularies agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if (p / "model" / "config.json").is_file():
        p = p / "model"
    if not (p / "config.json").is_file():
        raise DifflmError(f"teacher directory {path} does not exist or has no config.json; train one with "
                          f"`difflm train-teacher`")
    with loading(path, "teacher (a Hugging Face causal LM)"):
        teacher = AutoModelForCausalLM.from_pretrained(p, local_files_only=True).to(device).eval()
        teacher_tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    warn_if_unfinished(p)
    if tokenizer is not None and teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise DifflmError(f"teacher {path} uses a different tokenizer from the model (vocabularies differ: "
                          f"{len(teacher_tok)} vs {len(tokenizer)} tokens); train it with `difflm train-teacher "
                          f"--model MODEL_DIR`")
    return teacher, teacher_tok


def lm_score(teacher, tokenizer, texts: Sequence[str], seq_len: int, batch_size: int = 64,
             progress: Optional[Callable[[int], None]] = None) -> float:
    """exp(mean token NLL) of `texts` under the teacher: tokens after START through END, corpus-level mean
    (Diffusion-LM's lm-score). A teacher with fewer positions than `seq_len` scores the texts in its positions
    (exact for those that fit, as padding is on the right and the teacher causal; the others, counted in a
    warning, on their first tokens)."""
    ids, _ = encode(list(texts), tokenizer, seq_len)
    positions = getattr(teacher.config, "n_positions", None) or getattr(teacher.config, "max_position_embeddings", None)
    if positions is not None and ids.shape[1] > positions:
        longer = int((ids[:, positions:] != tokenizer.pad_token_id).any(1).sum())
        if longer:
            log.warning("%d of %d texts are longer than the teacher's %d positions: scored on their first %d tokens",
                        longer, len(ids), positions, positions)
        ids = ids[:, :positions]
    ids = ids.to(next(teacher.parameters()).device)
    return math.exp(_mean_nll(teacher, ids, tokenizer.pad_token_id, batch_size, progress))
