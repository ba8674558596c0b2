"""The text model: encoding, the objective, save/load, generation."""

import json

import pytest
import torch

from difflm.config import load_config
from difflm.data import build_tokenizer, decode, encode, load_tokenizer
from difflm.errors import DifflmError
from difflm.rounding import nearest_embedding, round_to_tokens
from difflm.text import generate, load_model, save_model, text_loss
from difflm.train import build_model

TEXTS = ["Aromi is a pub .", "The Eagle is a cheap coffee shop by the riverside .", "Zizzi is a pub near Avalon ."]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS)


def small_model(tokenizer, **overrides):
    args = [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config(None, ["data.seq_len=16", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
                             "model.intermediate_size=64", "model.embed_dim=8", "diffusion.num_steps=50", *args])
    return build_model(cfg, tokenizer)


def test_encode_adds_start_end_and_pads(tokenizer):
    ids, truncated = encode(TEXTS, tokenizer, 16)
    start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    assert ids.shape == (3, 16) and truncated == 0
    n = len(TEXTS[0].split())
    assert ids[0, 0] == start and ids[0, n + 1] == end and torch.all(ids[0, n + 2:] == pad)
    assert decode(ids[1].tolist(), tokenizer) == TEXTS[1]


def test_encode_truncates_and_counts(tokenizer):
    ids, truncated = encode(TEXTS, tokenizer, 7)
    assert truncated == 2 and torch.all(ids[:, -1] == tokenizer.eos_token_id)
    with pytest.raises(DifflmError, match="at least 3"):
        encode(TEXTS, tokenizer, 2)


def test_decode_cuts_at_end_and_drops_pad(tokenizer):
    start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    word = tokenizer.convert_tokens_to_ids("pub")
    assert decode([start, word, pad, word, end, word, word], tokenizer) == "pub pub"


def test_words_unseen_in_training_become_unk_and_min_freq_applies():
    tok = build_tokenizer(TEXTS, min_freq=2)
    assert tok.convert_tokens_to_ids("Aromi") == tok.unk_token_id
    assert tok.convert_tokens_to_ids("pub") != tok.unk_token_id


def test_pretrained_tokenizer_by_path_uses_cls_and_sep(tmp_path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "aromi", "is", "a", "pub", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    ids, _ = encode(["Aromi is a pub ."], tok, 8)
    assert ids[0, 0] == tok.cls_token_id and ids[0, 6] == tok.sep_token_id and ids[0, 7] == tok.pad_token_id
    with pytest.raises(DifflmError, match="not found"):
        load_tokenizer(str(tmp_path / "missing"))


def test_text_loss_is_finite_and_trains_every_part(tokenizer):
    torch.manual_seed(0)
    model = small_model(tokenizer)
    ids, _ = encode(TEXTS * 4, tokenizer, 16)
    losses = text_loss(model, ids, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(losses.loss)
    assert losses.loss.item() == pytest.approx((losses.denoising + losses.rounding + losses.prior).item(), rel=1e-6)
    losses.loss.backward()
    assert model.embedding.weight.grad.abs().sum() > 0
    assert model.denoiser.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_first_step_is_scored_against_the_embedding(tokenizer):
    """At t = 1/T the denoising target is Emb(w) (Diffusion-LM), elsewhere x0: an oracle of Emb(w) scores 0 there."""
    model = small_model(tokenizer)
    ids, _ = encode(TEXTS, tokenizer, 16)
    emb = model.embed(ids).detach()
    model.forward = lambda x_t, t, return_logits=False, **kwargs: (emb, None) if return_logits else emb
    model.diffusion.sample_t = lambda b, device, generator=None, low_step=1, dtype=None: torch.full((b,), 1 / 50)
    assert text_loss(model, ids).denoising.item() == pytest.approx(0.0, abs=1e-12)


def test_save_and_load_round_trip(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = small_model(tokenizer, **{"diffusion.schedule": "learned"}).eval()
    save_model(model, tokenizer, tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m")
    x, t = torch.randn(2, 16, 8), torch.tensor([0.3, 0.9])
    torch.testing.assert_close(loaded(x, t), model(x, t))
    torch.testing.assert_close(loaded.diffusion.alpha_bar(t), model.diffusion.alpha_bar(t))
    assert loaded.config.to_dict()["schedule"] == "learned" and tok.get_vocab() == tokenizer.get_vocab()
    assert not list(tmp_path.glob(".m.*"))  # no temporary directory left behind


@pytest.mark.parametrize("denoiser", ["bert", "prenorm"])
def test_the_denoiser_blocks_normalise_after_or_before_each_sublayer(tokenizer, tmp_path, denoiser):
    """model.denoiser: BERT's blocks end in a LayerNorm, so every block's output is normalised per position (mean
    0, std 1 at initialisation); pre-LN blocks (RobertaPreLayerNorm) normalise each sublayer's input and leave the
    residual stream as it is, with one LayerNorm after the last block. Both train every block and round-trip."""
    torch.manual_seed(0)
    model = small_model(tokenizer, **{"model.denoiser": denoiser, "model.dropout": "0"})
    kind = {"bert": "BertModel", "prenorm": "RobertaPreLayerNormModel"}[denoiser]
    assert type(model.denoiser).__name__ == kind
    outputs = []
    first = model.denoiser.encoder.layer[0]
    hook = first.register_forward_hook(lambda m, i, o: outputs.append(o[0] if isinstance(o, tuple) else o))
    ids, _ = encode(TEXTS * 4, tokenizer, 16)
    losses = text_loss(model, ids, generator=torch.Generator().manual_seed(0))
    hook.remove()
    h = outputs[0].detach()
    normalised = torch.allclose(h.mean(-1), torch.zeros(()), atol=1e-4) and \
        torch.allclose(h.var(-1, unbiased=False), torch.ones(()), atol=1e-3)
    assert normalised == (denoiser == "bert")
    losses.loss.backward()
    for layer in model.denoiser.encoder.layer:
        assert layer.attention.self.query.weight.grad.abs().sum() > 0
        assert layer.output.dense.weight.grad.abs().sum() > 0
    save_model(model.eval(), tokenizer, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.denoiser == denoiser
    x, t = torch.randn(2, 16, 8), torch.tensor([0.3, 0.9])
    torch.testing.assert_close(loaded(x, t), model(x, t))


def test_an_unknown_denoiser_is_refused(tokenizer):
    with pytest.raises(DifflmError, match="unknown model.denoiser 'gpt'; choose one of bert, prenorm"):
        small_model(tokenizer, **{"model.denoiser": "gpt"})


def test_load_model_rejects_other_directories(tmp_path):
    with pytest.raises(DifflmError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(DifflmError, match="not a difflm model"):
        load_model(tmp_path / "other")


def test_nearest_embedding_and_rounding():
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    x = torch.tensor([[[0.9, 0.2], [0.1, 2.0], [-0.2, 0.1]]])
    assert nearest_embedding(x, emb).tolist() == [[[1.0, 0.0], [0.0, 3.0], [0.0, 0.0]]]
    assert round_to_tokens(torch.tensor([[[2.0, 0.0], [0.0, 2.0]]]), emb).tolist() == [[1, 2]]


def test_generate_is_seeded_batched_and_fixed_length(tokenizer):
    model = small_model(tokenizer)
    a = generate(model, tokenizer, 5, steps=10, seed=3, batch_size=2)
    b = generate(model, tokenizer, 5, steps=10, seed=3, batch_size=2)
    c = generate(model, tokenizer, 5, steps=10, sampler="ddim", clamp=True, seed=3, batch_size=5)
    assert [s.ids for s in a] == [s.ids for s in b] and len(a) == 5 and len(c) == 5
    assert all(len(s.ids) == 16 for s in a + c)
    with pytest.raises(DifflmError, match="--num-samples must be positive"):
        generate(model, tokenizer, 0)


def test_compiled_sampling_draws_the_same_samples(tokenizer):
    """torch.compile (CUDA graphs on a GPU) changes how the network runs, not what it computes; self-conditioning
    feeds each output back in, which a CUDA-graph replay would overwrite without the clone."""
    torch.manual_seed(0)
    model = small_model(tokenizer, **{"model.self_condition": "true"})
    runs = {}
    for compile in (False, True):
        runs[compile] = []
        generate(model, tokenizer, 3, steps=6, sampler="ddim", seed=1, batch_size=2, compile=compile,
                 callback=lambda state, seen=runs[compile]: seen.append(state.x0_hat.clone()))
    # the same latents at every step, to float32's precision (compiled kernels add in another order, so tokens of
    # an untrained model, whose rounding logits nearly tie, could differ)
    assert len(runs[True]) == len(runs[False]) == 12
    for compiled, eager in zip(runs[True], runs[False]):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_bf16_sampling_keeps_the_sampler_in_fp32(tokenizer, monkeypatch):
    from difflm import precision
    from difflm.sampling import StepState

    with pytest.raises(DifflmError, match="--precision=bf16 needs a CUDA GPU"):
        generate(small_model(tokenizer), tokenizer, 1, steps=2, precision="bf16")
    monkeypatch.setattr(precision, "bf16_supported", lambda: True)
    seen = []

    def watch(state: StepState):
        seen.append((state.x_t.dtype, state.x0_hat.dtype, state.x_s.dtype))

    samples = generate(small_model(tokenizer), tokenizer, 3, steps=4, precision="bf16", callback=watch)
    assert len(samples) == 3 and all(len(s.ids) == 16 for s in samples)
    assert set(seen) == {(torch.float32,) * 3}


def test_self_conditioning_reads_the_previous_estimate(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = small_model(tokenizer, **{"model.self_condition": "true"}).eval()
    x, t = torch.randn(2, 16, 8), torch.tensor([0.3, 0.9])
    assert not torch.allclose(model(x, t), model(x, t, x0_self=torch.randn(2, 16, 8)))
    torch.testing.assert_close(model(x, t), model(x, t, x0_self=torch.zeros(2, 16, 8)))
    ids, _ = encode(TEXTS * 4, tokenizer, 16)
    for seed in range(4):  # both halves of the coin
        assert torch.isfinite(text_loss(model, ids, generator=torch.Generator().manual_seed(seed)).loss)
    save_model(model, tokenizer, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.self_condition and len(generate(loaded, tokenizer, 3, steps=5)) == 3


def test_held_out_text_comes_in_a_fixed_random_order(tmp_path):
    from difflm.data import load_texts

    # a dev file that lists the references of each meaning together, as E2E's does
    rows = [(f"name[R{i // 8}]", f"R{i // 8} is a pub number {i} .") for i in range(80)]
    (tmp_path / "train.csv").write_text("mr,ref\n" + "".join(f'"{m}",{r}\n' for m, r in rows[:16]))
    (tmp_path / "dev.csv").write_text("mr,ref\n" + "".join(f'"{m}",{r}\n' for m, r in rows))
    cfg = load_config(None, [f"data.source={tmp_path / 'train.csv'}", f"data.dev_source={tmp_path / 'dev.csv'}",
                             "data.text_column=ref", "data.mr_column=mr"]).data
    splits = load_texts(cfg)
    assert sorted(splits.dev) == sorted(r for _, r in rows) and splits.dev != [r for _, r in rows]
    assert all(r.startswith(m[5:-1] + " ") for m, r in zip(splits.dev_mr, splits.dev))  # meanings stay aligned
    assert len({m for m in splits.dev_mr[:16]}) > 2  # the first 16 are not two meanings' references
    assert splits.dev == load_texts(cfg).dev  # the same order every time
    assert splits.train == [r for _, r in rows[:16]]  # training text keeps its order
