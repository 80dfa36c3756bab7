"""The experiment schema: every section of a config, its defaults and descriptions.

A config is validated once, strictly, at the boundary; the rest of the code reads typed
attributes and never supplies a default of its own. Every section forbids unknown keys.
The `method` section is open here and validated by the chosen method's own `Config` one
floor up (xdt_cli/resolve.py), so that adding a method touches one file.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from xdt_cli.config.strict import Strict
from xdt_cli.config.transforms import TransformsConfig

SUBCOMMANDS = ("train-source", "finetune", "transfer", "multitask", "generalize")


class LoaderConfig(Strict):
    """DataLoader settings of an image-folder (disk) set; in-memory sets take none."""

    num_workers: int = Field(
        0, ge=0, strict=True, description="processes decoding images (0: the training process)"
    )
    pin_memory: bool = Field(False, description="page-locked batches for faster copies to CUDA")
    persistent_workers: bool = Field(False, description="keep the worker processes between uses")

    @model_validator(mode="after")
    def _workers(self) -> LoaderConfig:
        if self.persistent_workers and self.num_workers == 0:
            raise ValueError("persistent_workers needs num_workers > 0")
        return self


class DomainConfig(Strict):
    """One domain: which data set (and domain of it), where its files are, which classes,
    and how its images are transformed. See docs/DATA.md."""

    dataset: str = Field(description="a registered data set (see `xdt datasets`)")
    domain: str | None = Field(
        None, description="the domain of a multi-domain set, e.g. amazon in office31"
    )
    root: str | None = Field(
        None,
        description="folder of the files (torchvision sets: default ./data; image-folder sets: "
        "required, holding root/<domain>/<class>/<image>); relative to the working directory",
    )
    download: bool = Field(False, description="torchvision sets: fetch missing files into root")
    classes: list[str] | None = Field(
        None, description="keep only these classes, in this order (labels 0..k-1)"
    )
    class_map: dict[str, str] = Field(
        default_factory=dict,
        description="rename the set's classes before `classes` applies, e.g. {car: automobile}",
    )
    labels_per_class: int | None = Field(
        None,
        gt=0,
        strict=True,
        description="keep k labelled training samples per class (seeded by labels_seed)",
    )
    labels_seed: int | None = Field(
        None,
        ge=0,
        strict=True,
        description="seed of the labels_per_class draw (default: data.split_seed); val and "
        "test stay those of data.split_seed",
    )
    transforms: TransformsConfig = Field(default_factory=TransformsConfig)
    skip_bad_images: bool = Field(
        False, description="image-folder sets: skip (and count) files that cannot be decoded"
    )
    loader: LoaderConfig = Field(default_factory=LoaderConfig)

    @model_validator(mode="after")
    def _classes(self) -> DomainConfig:
        if self.classes is not None:
            if not self.classes:
                raise ValueError("classes: keep at least one class (or leave the key out)")
            seen = {c for c in self.classes if self.classes.count(c) > 1}
            if seen:
                raise ValueError(f"classes: {', '.join(sorted(seen))} given twice")
        return self

    @model_validator(mode="after")
    def _labels_seed(self) -> DomainConfig:
        if self.labels_seed is not None and self.labels_per_class is None:
            raise ValueError("labels_seed: seeds the labels_per_class draw; set that too")
        return self


TASK_KEYS = ("label", "loss", "weight", "missing_labels")  # the rest is the task's data


class TaskConfig(DomainConfig):
    """One task of `xdt multitask`: its data (the keys of a `data.source` section), its
    label, its loss and its static weight. Tasks whose data keys are all equal read the same
    inputs (one batch per step, several labels); a task with its own data gets its own batch.
    """

    label: str = Field(
        "class",
        description="class (the set's class index), parity (even/odd of an integer class "
        "name), or a label of the set, e.g. left, right or sum of multimnist5k",
    )
    loss: Literal["ce", "bce", "mse"] = Field(
        "ce", description="ce: classes; bce: a 0/1 label; mse: the label as a number"
    )
    weight: float | None = Field(
        None, ge=0, description="lambda_i of the static weighting (default 1; static only)"
    )
    missing_labels: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="hide this fraction of the task's training labels (seeded by "
        "data.split_seed): those samples add nothing to its loss",
    )

    def data_key(self) -> str:
        """The task's data, as text: tasks with the same key share their inputs."""
        return self.model_dump_json(exclude=set(TASK_KEYS))


class DomainFilesConfig(Strict):
    """`data.files` of generalize: the file-reading keys of a `data.source` section, shared
    by every domain of `data.dataset` (e.g. PACS's root, transforms and loader)."""

    root: str | None = Field(None, description="the folder holding <domain>/<class>/<image>")
    download: bool = Field(False, description="torchvision sets: fetch missing files into root")
    transforms: TransformsConfig = Field(default_factory=TransformsConfig)
    skip_bad_images: bool = Field(False, description="skip and count undecodable images")
    loader: LoaderConfig = Field(default_factory=LoaderConfig)


class DataConfig(Strict):
    split_seed: int = Field(
        0,
        ge=0,
        lt=2**63,
        strict=True,
        description="seed of the stratified splits: 70/15/15 train/val/test, or 85/15 "
        "train/val of a set's official training split (its official test split stays test)",
    )
    source: DomainConfig | None = Field(
        None, description="the labelled source domain (finetune: only evaluated, optional)"
    )
    target: DomainConfig | None = Field(
        None,
        description="train-source: only evaluated; finetune: trained on with its labels; "
        "transfer: trained on without labels",
    )
    # generalize: one multi-domain set, its training domains and the held-out ones
    dataset: str | None = Field(
        None, description="generalize: a multi-domain data set, e.g. rotated_mnist5k"
    )
    domains: list[str] | None = Field(
        None, description="generalize: the domains used (default: all of data.dataset's)"
    )
    test_domains: list[str] = Field(
        default_factory=list,
        description="generalize: held-out domains, never trained on (split 20% val / 80% test)",
    )
    domain_weights: dict[str, float] = Field(
        default_factory=dict,
        description="generalize: lambda_d of a training domain in the loss (default 1.0)",
    )
    files: DomainFilesConfig | None = Field(
        None,
        description="generalize on a disk set (image folders such as PACS): where every "
        "domain's files are and how they are read; the keys of a data.source section",
    )
    tasks: dict[str, TaskConfig] = Field(
        default_factory=dict,
        description="multitask: task name -> its data, label, loss and weight",
    )
    sample_weights: str = Field(
        "none",
        description="generalize: per-sample weights s inside each domain's mean risk: none "
        "(every domain's mean loss counts the same, DomainBed's ERM), pooled (every training "
        "sample counts the same, whatever its domain's size), class_balanced (every class "
        "counts the same in each domain), or a .npy file indexed like the training samples "
        "(the training domains' train splits in data.domains order); see regimes.py",
    )

    @model_validator(mode="after")
    def _weights(self) -> DataConfig:
        for name in self.tasks:
            if name in ("avg", "train"):
                raise ValueError(f"data.tasks.{name}: '{name}' is reserved in metric names")
            if not name.isidentifier():
                raise ValueError(
                    f"data.tasks.{name}: a task name is a letter or _ then letters, digits "
                    "or _ (it names metrics such as left/test/acc)"
                )
        for name, value in self.domain_weights.items():
            if not (value >= 0 and value < float("inf")):
                raise ValueError(f"data.domain_weights.{name}: expected a weight >= 0, got {value}")
        if self.domain_weights and not any(v > 0 for v in self.domain_weights.values()):
            raise ValueError("data.domain_weights: at least one weight must be > 0")
        if self.sample_weights == "inverse_domain_size":
            raise ValueError(
                "data.sample_weights: 'inverse_domain_size' was removed: 'none' (the default) "
                "now gives every training domain the same share (DomainBed's ERM)"
            )
        named = ("none", "pooled", "class_balanced")
        if self.sample_weights not in named and not self.sample_weights.endswith(".npy"):
            raise ValueError(
                f"data.sample_weights: expected {', '.join(named)} or a .npy file, "
                f"got '{self.sample_weights}'"
            )
        for key in ("domains", "test_domains"):
            values = getattr(self, key) or []
            twice = sorted({d for d in values if values.count(d) > 1})
            if twice:
                raise ValueError(f"data.{key}: {', '.join(twice)} given twice")
        return self


# --------------------------------------------------------------------------- model
class ModelConfig(Strict):
    """The network and which of its parameters train (theta_upd) or stay fixed (theta_fix).

    Parameter names are the model's own (`features.0.0.weight`, `head.bias`); patterns are
    shell-style globs, and a bare module name such as `features` means `features.*`.
    """

    backbone: str = Field(
        "lenet",
        description="lenet, cnn, brief_cnn, a torchvision classification model name, "
        "timm:<name> (with timm installed) or a plug-in backbone",
    )
    bottleneck: int | None = Field(
        None,
        gt=0,
        strict=True,
        description="a layer of this width between the features and the head(s): Linear + "
        "BatchNorm1d + ReLU, the Transfer-Learning-Library's ImageClassifier (256 there); "
        "domain-adaptation methods align its output",
    )
    preset: Literal["full", "linear_probe", "last_k_blocks"] | None = Field(
        None,
        description="full: all train; linear_probe: only the head; last_k_blocks: the head "
        "and the last k_blocks blocks of the features",
    )
    k_blocks: int | None = Field(
        None, gt=0, strict=True, description="k of preset last_k_blocks (default 1)"
    )
    freeze: list[str] = Field(
        default_factory=list, description="parameters to keep fixed (applied after preset)"
    )
    trainable: list[str] = Field(
        default_factory=list, description="parameters to train even if frozen above"
    )
    freeze_bn: bool = Field(
        False, description="batch-norm layers whose parameters are fixed also keep their statistics"
    )
    unfreeze: dict[str, int] = Field(
        default_factory=dict,
        description="gradual unfreezing: {pattern: step}; those parameters train from that step",
    )
    arch: Literal["hps", "mmoe"] | None = Field(
        None,
        description="multitask: hps (one shared encoder, a head per task; the default) or "
        "mmoe (model.experts copies of the backbone mixed by a softmax gate per task)",
    )
    experts: int | None = Field(
        None, gt=0, strict=True, description="multitask, arch mmoe: the number of experts (3)"
    )
    heads: dict[str, list[Annotated[int, Field(gt=0, strict=True)]]] = Field(
        default_factory=dict,
        description="multitask: a task's head as the widths of its hidden layers (a tower "
        "of linear+ReLU layers, as in MMoE), e.g. {left: [64]}; a task not listed gets a "
        "linear head",
    )

    @model_validator(mode="after")
    def _k_needs_preset(self) -> ModelConfig:
        if self.k_blocks is not None and self.preset != "last_k_blocks":
            raise ValueError("model.k_blocks is only used with model.preset: last_k_blocks")
        if self.experts is not None and self.arch != "mmoe":
            raise ValueError("model.experts is only used with model.arch: mmoe")
        # resolved here, so that config.yaml records them (model.arch: resolve.py, by subcommand)
        if self.preset == "last_k_blocks" and self.k_blocks is None:
            self.k_blocks = 1
        if self.arch == "mmoe" and self.experts is None:
            self.experts = 3
        for pattern, step in self.unfreeze.items():
            if isinstance(step, bool) or step < 0:
                raise ValueError(f"model.unfreeze.{pattern}: expected a step >= 0, got {step}")
        return self


# --------------------------------------------------------------------------- init
class InitConfig(Strict):
    """Where the weights start; at most one key. Unset: random initialisation."""

    from_run: str | None = Field(None, description="a run folder: its checkpoints/best.pt")
    checkpoint: str | None = Field(None, description="an xdt checkpoint file (best.pt, last.pt)")
    weights: str | None = Field(
        None, description="a state_dict file of the model or of the torchvision backbone"
    )
    pretrained: Literal["imagenet"] | None = Field(
        None, description="torchvision's ImageNet weights for a torchvision backbone"
    )

    @model_validator(mode="after")
    def _one_source(self) -> InitConfig:
        given = [k for k in ("from_run", "checkpoint", "weights", "pretrained") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(
                f"give at most one of from_run, checkpoint, weights, pretrained "
                f"(got {', '.join(given)})"
            )
        return self

    @property
    def given(self) -> bool:
        return any((self.from_run, self.checkpoint, self.weights, self.pretrained))


# --------------------------------------------------------------------------- optim
class _OptimBase(Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_mult: dict[str, float] = Field(
        default_factory=dict,
        description="per-group lr multipliers {pattern: factor}, e.g. {features: 0.1}",
    )

    @model_validator(mode="after")
    def _positive_mult(self) -> _OptimBase:
        for pattern, factor in self.lr_mult.items():
            if not factor > 0:
                raise ValueError(f"optim.lr_mult.{pattern}: expected a factor > 0, got {factor}")
        return self


class SGDConfig(_OptimBase):
    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False


class AdamConfig(_OptimBase):
    name: Literal["adam"] = "adam"
    betas: tuple[float, float] = (0.9, 0.999)


class AdamWConfig(_OptimBase):
    name: Literal["adamw"] = "adamw"
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)


def _name_or(default: str):
    """Discriminator of a tagged section whose `name` may be left out (then `default`)."""

    def pick(value: Any) -> Any:
        if isinstance(value, dict):
            return value.get("name", default)
        return getattr(value, "name", default)

    return Discriminator(pick)


OptimConfig = Annotated[
    Annotated[SGDConfig, Tag("sgd")]
    | Annotated[AdamConfig, Tag("adam")]
    | Annotated[AdamWConfig, Tag("adamw")],
    _name_or("adam"),
]


# --------------------------------------------------------------------------- schedule
class _ScheduleBase(Strict):
    warmup_steps: int = Field(
        0, ge=0, strict=True, description="linear warm-up from 0 to the base lr"
    )


class ConstantSchedule(_ScheduleBase):
    name: Literal["constant"] = "constant"


class StepSchedule(_ScheduleBase):
    name: Literal["step"] = "step"
    step_size: int = Field(
        gt=0, strict=True, description="multiply the lr by gamma every step_size steps"
    )
    gamma: float = Field(0.1, gt=0)


class CosineSchedule(_ScheduleBase):
    name: Literal["cosine"] = "cosine"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr / base lr")


class InvSchedule(_ScheduleBase):
    """Inverse decay, lr * (1 + gamma * t) ** -power, counted two ways (`unit`):

    - `progress` (the default): t = step / train.steps, from 0 to 1, gamma 10. The annealing
      of DANN's paper (Ganin et al. 2016, JMLR, section 5.2.2), the same curve for any
      run length.
    - `step`: t = the optimizer step (0, 1, 2 ...), gamma 0.001. The Transfer-Learning-
      Library's examples (`LambdaLR(lambda x: lr * (1 + lr_gamma * x) ** -lr_decay)`,
      lr_gamma 0.001, lr_decay 0.75), so a 1,500-step run ends at 0.50 of the base lr
      where `progress` ends at 0.17. The two agree only for a 10,000-step run.

    Steps in the warm-up (`warmup_steps`) are not counted.
    """

    name: Literal["inv"] = "inv"
    unit: Literal["progress", "step"] = Field(
        "progress",
        description="progress: t = step / train.steps (Ganin et al.); step: t = the step "
        "count (the Transfer-Learning-Library)",
    )
    gamma: float | None = Field(
        None, gt=0, description="default 10 with unit progress, 0.001 with unit step"
    )
    power: float = Field(0.75, gt=0)

    @model_validator(mode="after")
    def _default_gamma(self) -> InvSchedule:
        # resolved here, so that config.yaml records the gamma that ran
        if self.gamma is None:
            self.gamma = 10.0 if self.unit == "progress" else 0.001
        return self


class OneCycleSchedule(Strict):
    """Smith & Topin 2019, as torch's OneCycleLR (cosine annealing; no momentum cycling)."""

    name: Literal["onecycle"] = "onecycle"
    pct_start: float = Field(0.3, gt=0, lt=1)
    div_factor: float = Field(25.0, gt=0)
    final_div_factor: float = Field(1e4, gt=0)


ScheduleConfig = Annotated[
    Annotated[ConstantSchedule, Tag("constant")]
    | Annotated[StepSchedule, Tag("step")]
    | Annotated[CosineSchedule, Tag("cosine")]
    | Annotated[InvSchedule, Tag("inv")]
    | Annotated[OneCycleSchedule, Tag("onecycle")],
    _name_or("constant"),
]


# --------------------------------------------------------------------------- train
class TrainConfig(Strict):
    steps: int = Field(1000, gt=0, strict=True)
    batch_size: int = Field(
        64,
        gt=0,
        strict=True,
        description="images a step (per domain or task); under torchrun the global batch, "
        "split evenly over the ranks, unless batch_size_per_rank",
    )
    batch_size_per_rank: bool = Field(
        False, description="torchrun: batch_size is each rank's, the global batch N times it"
    )
    eval_every: int = Field(
        200, gt=0, strict=True, description="evaluate and save last.pt every N steps"
    )
    eval_batch_size: int = Field(1024, gt=0, strict=True)
    log_every: int = Field(50, gt=0, strict=True)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 (or fp16) autocast on CUDA, fp32 on CPU"
    )
    grad_clip: float | None = Field(None, gt=0, description="max global gradient norm")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="a NaN or infinite loss or gradient: stop (the run fails, last.pt keeps "
        "the last good state) or skip (that step changes no weight and is counted; the run "
        "stops after max_nonfinite skipped steps in a row). skip reads the loss every step",
    )
    max_nonfinite: int = Field(
        10, gt=0, strict=True, description="on_nonfinite skip: stop after this many in a row"
    )
    early_stopping: int | None = Field(
        None, gt=0, strict=True, description="stop after N evaluations without improvement"
    )
    deterministic: bool = Field(True, description="deterministic kernels (bit-identical on CPU)")
    ema: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="decay of an exponential moving average of the weights (e.g. 0.999), "
        "warmed up as min(decay, (1+k)/(10+k)); the average is what is evaluated and saved "
        "as best.pt. Unset: off",
    )


class SelectionConfig(Strict):
    rule: str | None = Field(
        None,
        description="source_val: best on the source's val split (default of train-source and "
        "transfer); target_val: best on the target's labelled val split (default of finetune; "
        "under transfer it reads target labels and summary.json says so); last: the final "
        "step. generalize: training_domain_val (default: the training domains' val splits, "
        "train_domains/val/acc), oracle (DomainBed's: the last checkpoint; needs held-out "
        "domains) or leave_one_domain_out (DomainBed's; only with --leave-one-out). multitask: "
        "task_val (default: avg/val/acc; avg/val/mse when every task is mse). See selection.py",
    )
    metric: str | None = Field(
        None, description="default: the rule's first metric; only val splits the rule may read"
    )
    mode: Literal["max", "min"] | None = Field(
        None, description="default: min for */loss, */mse, */mae, else max"
    )


class MethodSection(BaseModel):
    """`method.name` plus that method's own hyper-parameters, checked by its Config."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("erm", description="the learning rule (multitask default: static)")


# --------------------------------------------------------------------------- tracking
class TensorBoardConfig(Strict):
    """`tracking.tensorboard`: event files under `<run>/tensorboard/` (needs the optional
    extra xdt[tensorboard]); `tensorboard --logdir <sweep folder>` compares a sweep's runs."""

    config_text: bool = Field(True, description="write the resolved config as a text entry")


class MLflowConfig(Strict):
    """`tracking.mlflow` (needs the optional extra xdt[mlflow])."""

    tracking_uri: str | None = Field(
        None,
        description="default: $MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns "
        "(mlruns/mlflow.db)",
    )
    experiment: str | None = Field(
        None, description="MLflow experiment; default: the sweep's name, else the config's name"
    )
    log_checkpoint: bool = Field(False, description="also upload checkpoints/best.pt")


class TrackingConfig(Strict):
    """Where the run's metrics go besides metrics.jsonl, which stays the source of truth."""

    backends: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="tensorboard, mlflow (default: none); `--log-to` on the command line",
    )
    tensorboard: TensorBoardConfig = TensorBoardConfig()
    mlflow: MLflowConfig = MLflowConfig()

    @field_validator("backends")
    @classmethod
    def _once(cls, value: list[str]) -> list[str]:
        twice = sorted({b for b in value if value.count(b) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} given twice")
        return value


class ExperimentConfig(Strict):
    name: str | None = Field(None, description="experiment name; default: the file's stem")
    seed: int = Field(
        0, ge=-(2**63), lt=2**63, strict=True, description="a 64-bit integer (torch's range)"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    init: InitConfig = InitConfig()
    method: MethodSection = MethodSection()
    optim: OptimConfig = Field(default_factory=lambda: AdamConfig(name="adam"))
    schedule: ScheduleConfig = Field(default_factory=lambda: ConstantSchedule(name="constant"))
    train: TrainConfig = TrainConfig()
    selection: SelectionConfig = SelectionConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if self.train.early_stopping is not None and self.selection.rule == "last":
            raise ValueError(
                "train.early_stopping needs a selection metric, and selection.rule 'last' has none"
            )
        if (
            isinstance(
                self.schedule, StepSchedule | CosineSchedule | ConstantSchedule | InvSchedule
            )
            and self.schedule.warmup_steps >= self.train.steps
        ):
            raise ValueError("schedule.warmup_steps must be smaller than train.steps")
        return self

    # The validated `method` section: set by load_config from the method's own Config.
    _method_config: Any = None

    @property
    def method_config(self) -> BaseModel:
        return self._method_config


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"dotted.key": leaf value}; an empty mapping has no entries."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in out.items()}


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML, exactly what runs (and what `xdt resume` re-reads)."""
    data = cfg.model_dump(mode="json")
    for section in data.values():  # `name` first where a section is chosen by name
        if isinstance(section, dict) and "name" in section:
            section_name = section.pop("name")
            items = list(section.items())
            section.clear()
            section.update({"name": section_name, **dict(items)})
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
