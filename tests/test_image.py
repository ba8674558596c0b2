"""Image mode: the same core on pixels, the discretized decoder, bits/dim, the U-Net, data and the commands."""

import gzip
import json
import math
import struct

import pytest
import torch

from difflm.cli import main
from difflm.diffusion import GaussianDiffusion
from difflm.errors import DifflmError
from difflm.image import (ImageDiffusionConfig, ImageDiffusionModel, ImageObjective, bits_per_dim, builtin_shapes,
                          discretized_log_prob, grid, image_elbo, load_image_model, read_idx, to_model_space,
                          to_pixels)
from difflm.text import save_model

from conftest import ROOT, SHARED_DATA

TINY = str(ROOT / "configs" / "tiny-image.yaml")


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def small(prediction="v", schedule="cosine", steps=1000):
    torch.manual_seed(0)
    return ImageDiffusionModel(ImageDiffusionConfig(image_size=8, channels=1, base_channels=8, channel_mults=[1, 2],
                                                    num_steps=steps, prediction=prediction, schedule=schedule))


def test_pixels_round_trip_and_the_decoder_is_a_distribution():
    px = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(to_pixels(to_model_space(px)), px)
    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, std in ((0.3, 0.05), (-0.99, 0.01), (0.0, 3.0)):
        logp = discretized_log_prob(values, torch.tensor(mean, dtype=torch.float64), torch.tensor(std,
                                                                                                  dtype=torch.float64))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)  # 256 bins, edges open to +-inf


def test_untrained_model_is_near_8_bits_per_dim():
    """A v-prediction network that outputs 0 predicts x0 = sqrt(abar) x_t, the posterior mean under N(0, I) data:
    the untrained model is the N(0, I) density, so its bound is -log2 N(x; 0, 1) (2/255) per dimension."""
    model = small()
    px = builtin_shapes(64, 0, 8)
    bpd = bits_per_dim(model, px, draws=8)
    x = to_model_space(px).double()
    reference = ((0.5 * x ** 2 + 0.5 * math.log(2 * math.pi) - math.log(2 / 255)) / math.log(2)).mean().item()
    assert 7.5 < bpd.bits_per_dim < 10
    assert abs(bpd.bits_per_dim - reference) < 3 * bpd.se + 0.05


def test_elbo_terms_add_up():
    model = small()
    px = builtin_shapes(16, 1, 8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        terms = image_elbo(model, px, g)
    torch.testing.assert_close(terms.total, terms.reconstruction + terms.prior + terms.diffusion)
    bpd = bits_per_dim(model, px, draws=4)
    # the terms are float32 sums: they add up to float32's precision (the last digits depend on the CPU's kernels)
    eps = torch.finfo(torch.float32).eps
    assert sum(bpd.terms_bits_per_dim.values()) == pytest.approx(bpd.bits_per_dim, rel=50 * eps)
    assert set(bpd.terms_bits_per_dim) == {"reconstruction", "prior", "diffusion"}


def test_image_and_text_paths_call_the_same_core(monkeypatch, tiny_run):
    from difflm.metrics import text_bound
    from difflm.sampling import sample
    from difflm.text import generate, load_model, text_loss

    calls = []
    for name in ("elbo", "denoise", "q_sample"):
        original = getattr(GaussianDiffusion, name)

        def spy(self, *a, _name=name, _original=original, **k):
            calls.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(GaussianDiffusion, name, spy)
    import difflm.sampling as sampling_module

    sampled = []
    monkeypatch.setattr(sampling_module, "sample", lambda *a, **k: sampled.append(1) or sample(*a, **k))
    import difflm.image as image_module
    import difflm.text as text_module

    monkeypatch.setattr(text_module, "sample", sampling_module.sample)
    monkeypatch.setattr(image_module, "sample", sampling_module.sample, raising=False)
    text_model, tok = load_model(tiny_run / "model")
    ids = torch.randint(0, 10, (2, 24))
    for path in ("text", "image"):
        calls.clear()
        sampled.clear()
        if path == "text":
            text_loss(text_model, ids)
            text_bound(text_model, ids)
            generate(text_model, tok, 1, steps=2)
        else:
            model = small(steps=20)
            ImageObjective(model)(builtin_shapes(2, 0, 8))
            image_elbo(model, builtin_shapes(2, 0, 8))
            from difflm.image import generate_images

            generate_images(model, 1, steps=2)
        assert {"elbo", "denoise", "q_sample"} <= set(calls) and sampled, path


def test_learned_schedule_trains_on_the_elbo():
    model = small(schedule="learned", steps=None)
    model.diffusion.num_steps = None  # continuous time, as in VDM
    loss = ImageObjective(model)(builtin_shapes(8, 0, 8), torch.Generator().manual_seed(0)).loss
    loss.backward()
    grads = [p.grad for p in model.diffusion.schedule.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert 5 < loss.item() < 20  # bits/dim of an untrained model


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_unet_shapes_and_save_load(prediction, tmp_path):
    model = small(prediction).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    assert model(x, t).shape == x.shape
    save_model(model, None, tmp_path / "m")
    loaded = load_image_model(tmp_path / "m")
    torch.testing.assert_close(loaded(x, t), model(x, t))
    odd = ImageDiffusionModel(ImageDiffusionConfig(image_size=28, channels=3, base_channels=8,
                                                   channel_mults=[1, 2, 2]))
    assert odd(torch.randn(1, 3, 28, 28), torch.tensor([0.5])).shape == (1, 3, 28, 28)  # 28 -> 14 -> 7 and back


def test_grid_layout():
    images = torch.full((5, 1, 4, 4), 200, dtype=torch.uint8)
    g = grid(images, 3, pad=1)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 1) and g[1, 1, 0] == 200 and g[0, 0, 0] == 0
    with pytest.raises(DifflmError, match="positive number of columns"):
        grid(images, 0)


def _write_idx(path, images):
    n, _, h, w = images.shape
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, h, w) + images.numpy().tobytes())


def test_idx_files_and_bad_image_inputs(tmp_path, capsys):
    imgs = builtin_shapes(40, 3, 8)
    (tmp_path / "mnist").mkdir()
    _write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", imgs[:8])
    assert torch.equal(read_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz"), imgs)
    base = ["train", "--config", TINY, f"train.out_dir={tmp_path / 'run'}", "train.max_steps=2"]
    code, _, err = run(capsys, *base, f"data.source={tmp_path / 'mnist'}", "data.dev_split=test", "--no-progress")
    assert code == 0, err
    bad = [([f"data.source={tmp_path / 'mnist'}", "data.image_channels=3"], "have 1 channel(s) but "
            "data.image_channels=3"),
           ([f"data.source={tmp_path / 'mnist'}", "data.image_size=28"], "are 8x8 but data.image_size=28"),
           (["unet.channel_mults=1,x"], "unet.channel_mults must be positive integers"),
           (["data.source=builtin:faces"], "unknown builtin image set 'faces'"),
           (["train.embedding_lr=1e-2"], "data.modality=image has none")]
    for extra, message in bad:
        code, _, err = run(capsys, *base, f"train.out_dir={tmp_path / 'bad'}", *extra, "--no-progress")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    from difflm.image import _stack

    with pytest.raises(DifflmError, match="mixed sizes"):
        _stack([torch.zeros(4, 4, dtype=torch.uint8).numpy(), torch.zeros(5, 5, dtype=torch.uint8).numpy()], "x")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(struct.pack(">IIII", 2049, 1, 2, 2)))
    with pytest.raises(DifflmError, match="not an IDX image file"):
        read_idx(tmp_path / "bad.gz")


def test_train_generate_eval_commands(tmp_path, capsys):
    out = tmp_path / "img"
    code, _, err = run(capsys, "train", "--config", TINY, f"train.out_dir={out}", "--no-progress")
    assert code == 0, err
    png = tmp_path / "grid.png"
    code, _, err = run(capsys, "generate", "--model", str(out), "--num-samples", "6", "--steps", "5",
                       "--columns", "3", "--out", str(png), "--no-progress", "--sampler", "dpm++", "--grid", "logsnr")
    assert code == 0, err
    from PIL import Image

    assert Image.open(png).size == (3 * 10 + 2, 2 * 10 + 2)
    for extra, message in ((["--columns", "0", "--out", str(tmp_path / "g.png")], "--columns"),
                           (["--out", str(tmp_path / "g.jsonl")], "give --out FILE.png")):
        code, _, err = run(capsys, "generate", "--model", str(out), "--num-samples", "2", *extra)
        assert code == 2 and message in err, err
    assert not (tmp_path / "g.png").exists()
    code, stdout, err = run(capsys, "eval", "--model", str(out), "--out", str(tmp_path / "ev"), "--num-samples", "4",
                            "--steps", "5", "--held-out", "16", "--bound-draws", "4", "--no-progress")
    assert code == 0, err
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert 0 < metrics["bits_per_dim"]["bits_per_dim"] < 20 and metrics["bits_per_dim"]["se"] > 0
    assert (tmp_path / "ev" / "samples.png").is_file() and "bits/dim" in stdout
    assert metrics["sampler"] == "ddpm, uniform grid"


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="../shared/data/mnist is not present")
def test_reads_the_shared_mnist_files():
    from difflm.config import DataConfig
    from difflm.image import load_images

    splits = load_images(DataConfig(modality="image", source=str(SHARED_DATA / "mnist"), dev_split="test",
                                    image_size=28, max_train_examples=100))
    assert splits.train.shape == (100, 1, 28, 28) and splits.dev.shape == (10000, 1, 28, 28)
    assert splits.train.dtype == torch.uint8 and splits.train.max() == 255


def _image_folder(root, sizes):
    from PIL import Image

    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        for k, size in enumerate(sizes):
            Image.fromarray(builtin_shapes(1, k, size)[0, 0].numpy()).save(root / split / f"{k}.png")


def test_image_folders_load_through_datasets(tmp_path, capsys):
    """The `datasets` path (Hub ids use it too), offline: an image folder with train/ and test/ splits."""
    from difflm.config import DataConfig
    from difflm.image import load_images

    _image_folder(tmp_path / "ok", [8] * 4)
    splits = load_images(DataConfig(modality="image", source=str(tmp_path / "ok"), dev_split="test", image_size=8))
    assert splits.train.shape == (4, 1, 8, 8) and splits.dev.shape == (4, 1, 8, 8)
    _image_folder(tmp_path / "mixed", [8, 9, 8])
    code, _, err = run(capsys, "train", "--config", TINY, f"train.out_dir={tmp_path / 'run'}",
                       f"data.source={tmp_path / 'mixed'}", "data.dev_split=test", "--no-progress")
    assert code == 2 and "mixed sizes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "model").exists()
