"""Experiment configuration: frozen dataclasses loaded from YAML plus `section.key=value` overrides.

Unknown keys are rejected with the closest valid key suggested; values are coerced to the field's type (PyYAML
reads `1e-4` as a string, and overrides arrive as strings). Every numeric field has a range (`Range`), checked
when a section is built, from YAML, overrides or Python alike, so that no out-of-range number reaches torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Sequence

import yaml

from .errors import DifflmError, check_choice


@dataclass(frozen=True)
class Range:
    """The values a numeric config field may take: finite, between `low` and `high` (each end open or closed)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def describe(self) -> str:
        if self.high == math.inf:
            if (self.low, self.low_open) in ((0, True), (1, False)):  # (1, closed): the integer fields
                return "positive"
            if self.low == 0:
                return "zero or more"
            return f"above {self.low:g}" if self.low_open else f"at least {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1)
DROPOUT = Range(0, 1, high_open=True)
OPEN_UNIT = Range(0, 1, low_open=True, high_open=True)


class Section:
    """A config section: `section` is its name in YAML, `ranges` the range of each numeric field (a subclass
    adds to its parents'). Construction checks them all, and `check` any rule between fields."""

    section: ClassVar[str] = ""
    ranges: ClassVar[Dict[str, Range]] = {}

    @classmethod
    def range_of(cls, name: str) -> Optional[Range]:
        for klass in cls.__mro__:
            if name in vars(klass).get("ranges", {}):
                return vars(klass)["ranges"][name]
        return None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, rng = getattr(self, f.name), self.range_of(f.name)
            if rng is not None and not isinstance(value, bool) and isinstance(value, (int, float)) \
                    and not rng.holds(value):
                raise DifflmError(f"config key {self.section}.{f.name} must be {rng.describe()}, got {value!r}")
        self.check()

    def check(self) -> None:
        """Rules between fields (none by default)."""


def _one_of(section: Section, key: str, allowed: Sequence[str]) -> None:
    check_choice(f"{section.section}.{key}", getattr(section, key), allowed)


def _divisible(section: Section, width: str = "hidden_size", heads: str = "num_heads") -> None:
    w, h = getattr(section, width), getattr(section, heads)
    if w % h:
        name = section.section
        raise DifflmError(f"{name}.{width} ({w}) must be divisible by {name}.{heads} ({h})")


@dataclass(frozen=True)
class DataConfig(Section):
    modality: str = "text"  # text, or image (the same core on pixels)
    source: str = "builtin:restaurants"  # builtin:NAME, a local .csv/.json/.jsonl/.txt file, or a Hub dataset id
    dev_source: str = ""  # a local file for held-out text; empty: `dev_split` of a Hub dataset, else a held-out share
    train_split: str = "train"
    dev_split: str = "validation"
    dev_fraction: float = 0.02  # share of the training text held out when there is no dev source or split
    text_column: str = "text"  # `ref` in the local E2E CSVs, `human_reference` on the Hub
    mr_column: str = ""  # meaning representations for content control: `mr` locally, `meaning_representation` on the Hub
    seq_len: int = 32  # START + tokens + END + PAD
    tokenizer: str = ""  # empty: train a word-level tokenizer; else a local Hugging Face tokenizer directory
    min_freq: int = 1  # words seen fewer times become UNK
    lowercase: bool = False
    max_train_examples: int = 0  # 0: all
    builtin_train: int = 20000  # sentences drawn from the embedded grammar
    builtin_dev: int = 1000
    builtin_seed: int = 1234
    image_column: str = "image"  # image mode, Hub datasets: `image` (ylecun/mnist), `img` (uoft-cs/cifar10)
    image_channels: int = 1  # image mode: the data must match these
    image_size: int = 16

    section = "data"
    ranges = {"dev_fraction": OPEN_UNIT, "seq_len": Range(3), "min_freq": Range(1), "max_train_examples": NON_NEGATIVE,
              "builtin_train": Range(1), "builtin_dev": Range(1), "builtin_seed": NON_NEGATIVE,
              "image_channels": Range(1), "image_size": Range(1)}


OUTPUTS = ("embedding", "logits")
OBJECTIVES = ("weighted", "elbo")
TIME_INPUTS = ("t", "log_snr")
DENOISERS = ("bert", "prenorm")
CLASSIFIER_READS = ("x_t", "x0")


@dataclass(frozen=True)
class ModelConfig(Section):
    embed_dim: int = 16
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    dropout: float = 0.1
    attn_implementation: str = "sdpa"
    denoiser: str = "bert"  # bert (post-LN, Diffusion-LM's) or prenorm (LayerNorm before each sublayer: GPT-2, Plaid)
    self_condition: bool = False  # feed the previous x0 estimate back in (not in Diffusion-LM's recipe)
    attributes: bool = False  # condition on the meaning representation's field=value pairs (classifier-free guidance)
    attribute_dropout: float = 0.5  # each attribute dropped at random in training (so any subset can be asked for)
    unconditional_prob: float = 0.1  # and all of them dropped this often (the unconditional model)
    # the recipe after Diffusion-LM (CDCD, Plaid): see modeling.TextDiffusionModel and text.text_loss
    output: str = "embedding"  # embedding (Diffusion-LM: the denoiser regresses x0) or logits (x0 = softmax(logits) E)
    embedding_norm: bool = False  # rows of E L2-normalised and scaled by sqrt(embed_dim) (CDCD), so they cannot shrink
    mse_weight: float = 1.0  # weight of the squared x0 error (Diffusion-LM's L_simple)
    ce_weight: float = 0.0  # weight of the cross-entropy of the x0 logits against the tokens (CDCD)
    sample_temperature: float = 1.0  # saved with the model: the default of generate/eval/control --temperature
    # weighted: mse_weight x squared x0 error + ce_weight x cross-entropy (Diffusion-LM, CDCD); elbo: the
    # continuous-time ELBO itself, with a learned schedule (VDM, Plaid; text.text_elbo): the likelihood recipe
    objective: str = "weighted"
    posterior_logits: bool = False  # logits += the exact per-position posterior log q(w | x_t) (Plaid's output bias)
    # p(length) p(words | length): the length drawn first from its training distribution, PAD positions given (not
    # diffused, masked from attention), batches bucketed by length and trimmed to their longest row
    explicit_length: bool = False
    # what the network reads as its noise level: t (Diffusion-LM), or the schedule's log-SNR at t (VDM, Plaid), which
    # a learned schedule's moving map from t to the noise level then does not disturb
    time_input: str = "t"
    # which training rows read their own first estimate: null, every row of half the batches (Chen et al. 2023);
    # a share p in (0, 1], that share of every batch's rows, drawn row by row (Plaid: 0.25), a cheaper first pass
    self_condition_rows: Optional[float] = None
    # the head's last layer starts at zero (Plaid), so that a new network's logits are the posterior bias alone
    zero_init_output: bool = False

    section = "model"
    ranges = {"embed_dim": Range(1), "hidden_size": Range(1), "num_layers": Range(1), "num_heads": Range(1),
              "intermediate_size": Range(1), "dropout": DROPOUT, "attribute_dropout": PROBABILITY,
              "unconditional_prob": PROBABILITY, "mse_weight": NON_NEGATIVE, "ce_weight": NON_NEGATIVE,
              "sample_temperature": POSITIVE, "self_condition_rows": Range(0, 1, low_open=True)}

    def check(self) -> None:
        _divisible(self)
        if self.self_condition_rows is not None and not self.self_condition:
            raise DifflmError(f"model.self_condition_rows={self.self_condition_rows:g} chooses the rows that "
                              f"self-condition; it needs model.self_condition=true")
        _one_of(self, "output", OUTPUTS)
        if self.sample_temperature != 1 and self.output != "logits":
            raise DifflmError(f"model.sample_temperature={self.sample_temperature:g} needs model.output=logits (it "
                              f"sharpens softmax(logits / T) E); this model has model.output={self.output}")
        _one_of(self, "denoiser", DENOISERS)
        _one_of(self, "time_input", TIME_INPUTS)
        _one_of(self, "objective", OBJECTIVES)
        if self.objective == "elbo" and self.output != "logits":
            raise DifflmError(f"model.objective=elbo needs model.output=logits (its reconstruction term is the "
                              f"network's cross-entropy at t = 0); this model has model.output={self.output}")
        if self.posterior_logits and self.output != "logits":
            raise DifflmError(f"model.posterior_logits adds to the network's logits; it needs model.output=logits, "
                              f"not model.output={self.output}")
        if self.mse_weight == 0 and self.ce_weight == 0:
            raise DifflmError("model.mse_weight and model.ce_weight are both 0: nothing would train the denoiser")


@dataclass(frozen=True)
class UNetConfig(Section):
    """The image-mode denoiser (image.ImageDiffusionModel)."""

    base_channels: int = 32
    channel_mults: str = "1,2,2"  # one resolution level each, halving the size between levels
    res_blocks: int = 1
    attention: bool = True  # self-attention at the lowest resolution
    dropout: float = 0.1

    section = "unet"
    ranges = {"base_channels": Range(1), "res_blocks": Range(1), "dropout": DROPOUT}


@dataclass(frozen=True)
class DiffusionConfig(Section):
    schedule: str = "sqrt"
    num_steps: Optional[int] = 2000  # null: continuous time
    prediction: str = "x0"
    log_snr_max: float = 10.0  # log-SNR at t = 0 and t = 1, for the logsnr-linear and learned schedules
    log_snr_min: float = -10.0
    log_snr_max_floor: Optional[float] = None  # learned schedule: log_snr(0) kept above this (Learned)
    noise_scale: float = 1.0  # noise F times stronger against the signal: log-SNR shifted by -2 log F (Difformer)
    time_warp_bins: int = 0  # > 0: t drawn through CDCD's time warping, a CDF of the loss over t with this many bins

    section = "diffusion"
    ranges = {"num_steps": Range(1), "log_snr_max": Range(), "log_snr_min": Range(), "log_snr_max_floor": Range(),
              "noise_scale": POSITIVE, "time_warp_bins": NON_NEGATIVE}

    def check(self) -> None:
        if self.log_snr_max <= self.log_snr_min:
            raise DifflmError(f"diffusion.log_snr_max ({self.log_snr_max:g}) must be above diffusion.log_snr_min "
                              f"({self.log_snr_min:g}): the signal falls as t grows")
        if self.log_snr_max_floor is not None:
            if self.schedule != "learned":
                raise DifflmError(f"diffusion.log_snr_max_floor bounds a learned log_snr(0); it contradicts "
                                  f"diffusion.schedule={self.schedule}: drop it or set diffusion.schedule=learned")
            if not self.log_snr_max > self.log_snr_max_floor:
                raise DifflmError(f"diffusion.log_snr_max ({self.log_snr_max:g}), where the learned log_snr(0) "
                                  f"starts, must be above diffusion.log_snr_max_floor ({self.log_snr_max_floor:g})")


@dataclass(frozen=True)
class LoopConfig(Section):
    """What every training loop reads (engines.TorchEngine, train.run_loop); sections below set their defaults."""

    out_dir: str = "runs/default"
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N
    seed: int = 0
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_beta2: float = 0.999  # AdamW's second-moment decay; 0.99 forgets early gradient scales sooner (short runs)
    warmup_steps: int = 0
    max_steps: int = 1000
    max_minutes: float = 0.0  # stop early after this much wall time (0: no limit); the log says so
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 200
    save_every: int = 1000
    tensorboard: bool = False  # also write TensorBoard event files to <out_dir>/tensorboard (the tensorboard extra)

    section = "train"
    ranges = {"seed": NON_NEGATIVE, "batch_size": Range(1), "lr": POSITIVE, "weight_decay": NON_NEGATIVE,
              "adam_beta2": OPEN_UNIT, "warmup_steps": NON_NEGATIVE, "max_steps": Range(1), "max_minutes": NON_NEGATIVE,
              "grad_clip": NON_NEGATIVE, "log_every": Range(1), "eval_every": Range(1), "save_every": Range(1)}


@dataclass(frozen=True)
class TrainConfig(LoopConfig):
    engine: str = "torch"  # torch (plain PyTorch, the CPU default) or deepspeed
    precision: str = "fp32"  # fp32, bf16 (torch autocast over fp32 weights) or fp16 (deepspeed engine)
    cast_weights: bool = False  # deepspeed, bf16: DeepSpeed's own mode (weights cast, fp32 master copies); fp16 always
    compile: bool = False  # torch.compile the denoiser (ZeRO-3 excepted)
    grad_accum: int = 1  # micro-batches per optimizer step (one step = batch_size x grad_accum x processes)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0, 1, 2 or 3
    offload_optimizer: bool = False  # ZeRO optimizer state in CPU memory
    offload_params: bool = False  # ZeRO-3 parameters in CPU memory
    deepspeed_config: str = ""  # a DeepSpeed JSON laid over the generated one (it may add keys, not contradict)
    ema_decay: float = 0.9999
    eval_batches: int = 4
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    embedding_lr: float = 0.0  # the word embeddings' learning rate (no weight decay); 0: train.lr
    schedule_lr: float = 0.0  # a learned noise schedule's (diffusion.schedule=learned; no weight decay); 0: train.lr
    # model.posterior_logits: their weight in training rises linearly from 0 to 1 over this many steps (Plaid: 5,000)
    posterior_warmup_steps: int = 0

    ranges = {"grad_accum": Range(1), "zero_stage": Range(0, 3), "ema_decay": PROBABILITY, "eval_batches": Range(1),
              "threads": NON_NEGATIVE, "embedding_lr": NON_NEGATIVE, "schedule_lr": NON_NEGATIVE,
              "posterior_warmup_steps": NON_NEGATIVE}


# the small networks of the teacher and the classifiers
NETWORK_RANGES = {"hidden_size": Range(1), "num_layers": Range(1), "num_heads": Range(1), "dropout": DROPOUT}


@dataclass(frozen=True)
class TeacherConfig(LoopConfig):
    """The autoregressive teacher LM for lm-score: a GPT-2 trained from scratch on the same data and tokenizer."""

    out_dir: str = "runs/teacher"
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 2000
    eval_every: int = 500
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    dropout: float = 0.1

    section = "teacher"
    ranges = NETWORK_RANGES

    def check(self) -> None:
        _divisible(self)


@dataclass(frozen=True)
class ClassifierConfig(LoopConfig):
    """A noisy classifier for guided generation (`difflm train-classifier`): a small transformer on x_t."""

    out_dir: str = ""  # empty: runs/classifier-TASK
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_steps: int = 2000
    eval_every: int = 500
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.1
    max_examples: int = 20000  # training texts to label (spaCy tagging is the slow part for pos and syntax)
    reads: str = "x_t"  # x_t (the noisy latent, Diffusion-LM) or x0 (the frozen model's x0 estimate from x_t)

    section = "classifier"
    ranges = {**NETWORK_RANGES, "max_examples": Range(1)}

    def check(self) -> None:
        _divisible(self)
        _one_of(self, "reads", CLASSIFIER_READS)


@dataclass(frozen=True)
class GuidanceConfig(Section):
    """Controlled generation (`difflm control`): Diffusion-LM's gradient update after each sampler step."""

    steps: int = 3  # K gradient steps on x_{t-1} per sampler step
    step_size: float = 0.1
    fluency: float = 0.01  # lambda of lambda * ||x_{t-1} - mu||^2 / sigma^2
    optimizer: str = "adagrad"  # adagrad (Diffusion-LM) or sgd
    unguided_last: int = 0  # leave this many final sampler steps unguided
    classifier_weight: float = 1.0  # weight of each classifier's log-probability
    constraint_weight: float = 1.0  # weight of token constraints (length, infilling) scored by the rounding head
    impute: bool = True  # also put fixed tokens (infilling, END/PAD of a length) into each x0 estimate
    implied_length: bool = True  # pos and syntax targets also guide the length they imply, as a token constraint
    free_weight: float = 2.0  # classifier-free guidance: x0 = (1 + w) x0(c) - w x0(no c)
    sampling_steps: int = 200  # sampler steps (Diffusion-LM guides 200 of its 2000)
    sampler: str = "ddpm"  # ddpm, ddim or dpm++ (sampling.SAMPLERS)
    grid: str = "uniform"  # the sampler's time grid: uniform, logsnr or warp (sampling.GRIDS)
    order: int = 0  # dpm++'s order, 1 to 3 (0: its default, 2)
    eta: float = 0.0  # ddim's noise level (0: deterministic; 1: ancestral; above 1: more noise than the posterior)

    section = "guidance"
    ranges = {"steps": NON_NEGATIVE, "step_size": POSITIVE, "fluency": NON_NEGATIVE, "unguided_last": NON_NEGATIVE,
              "classifier_weight": NON_NEGATIVE, "constraint_weight": NON_NEGATIVE, "free_weight": NON_NEGATIVE,
              "sampling_steps": Range(1), "order": NON_NEGATIVE, "eta": NON_NEGATIVE}


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def positive_ints(text: str) -> Optional[list]:
    """The positive integers of a comma-separated list such as "1,2,2", or None if it is not one."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        return None
    return values if values and min(values) >= 1 else None


def _suggest(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(options)}"


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin_args = typing.get_args(typ)
    if typing.get_origin(typ) is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        typ = next(a for a in origin_args if a is not type(None))
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise DifflmError(f"{where}: unsupported type {typ}")
    raise DifflmError(f"{where} must be {typ.__name__}, got {value!r}")


def _build(cls, values: Dict[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise DifflmError(f"unknown config key {prefix + key!r}{_suggest(key, names)}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise DifflmError(f"config section {prefix}{key} must be a mapping, got {value!r}")
            kwargs[key] = _build(typ, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, typ, f"config key {prefix}{key}")
    return cls(**kwargs)


def _apply_override(tree: Dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise DifflmError(f"override {override!r} must look like section.key=value (for example train.lr=3e-4)")
    dotted, value = override.split("=", 1)
    parts = dotted.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DifflmError(f"override {override!r}: {part} is not a config section")
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """The Config from a YAML file (or the defaults) with `section.key=value` overrides applied."""
    tree: Dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise DifflmError(f"config file {path} not found; pass --config configs/NAME.yaml")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise DifflmError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise DifflmError(f"config file {path} must hold a mapping of sections")
    for o in overrides:
        _apply_override(tree, o)
    return _build(Config, tree, "")


def config_yaml(cfg: Config) -> str:
    """The config as YAML, with local data files as absolute paths: a relative one names a file from the directory
    training ran in, so commands that read a saved config from elsewhere (eval, train-teacher --model) find it."""
    tree = cfg.to_dict()
    for key in ("source", "dev_source"):
        value = tree["data"][key]
        if value and Path(value).exists():
            tree["data"][key] = str(Path(value).resolve())
    return yaml.safe_dump(tree, sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(config_yaml(cfg))
