"""The typed run configuration: loaded from YAML, overridden with ``--set key=value``,
validated once before any work starts, and logged whole to MLflow.

Every default of a run lives here: method options are typed and defaulted by each
method's own signature, and the view recipe defaults to the one the method declares
(``Method.recipe``), so the loss, the recipe and the config cannot disagree.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_type_hints

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    model_validator,
)

from pipelines.ingest.formats import DecodeOn, SourceFormat
from pipelines.ingest.masks import MASKS, PatchMask, build_mask_generator
from pipelines.ingest.recipes import RECIPES, ViewRecipe, recipe_from_dict
from ssl_models.backbones import BACKBONES
from ssl_models.methods import METHODS, Method, method_options

# `method.name` when a config names none.
DEFAULT_METHOD = "simclr"


class ConfigError(ValueError):
    """A config that cannot run; the message names the field."""


def is_uri(path: str) -> bool:
    """``s3://bucket/key``, ``sqlite:///x.db`` and friends, as opposed to a local path."""
    return "://" in path


def resolve_path(path: str, base_dir: str | Path | None = None) -> str:
    """A local path made absolute against ``base_dir`` (default: the working directory the
    command was started from); URIs unchanged. Ray Train workers, Tune trials and Ray jobs
    all run in other directories, so every path is resolved once, before any of them starts."""
    if is_uri(path):
        return path
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    return str((base / Path(path).expanduser()).resolve())


def resolve_tracking_uri(uri: str | None, base_dir: str | Path | None = None) -> str | None:
    """A relative local store (``sqlite:///runs/mlflow.db``, ``file:runs/mlruns``, a bare
    path) made absolute; servers (``http(s)://``, ``databricks``) unchanged."""
    if uri is None:
        return None
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + resolve_path(uri.removeprefix("sqlite:///"), base_dir)
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return Path(resolve_path(uri.removeprefix("file:"), base_dir)).as_uri()
    if ":" not in uri:
        return Path(resolve_path(uri, base_dir)).as_uri()
    return uri


def _no_nul(path: str) -> str:
    """A path or URI the operating system can open: a NUL byte cannot be in one (resolving it
    would fail later with an error that names no field)."""
    if "\x00" in path:
        raise ValueError("a path cannot hold a NUL byte")
    return path


# A local path or a URI, resolved by ``resolve_paths``.
PathStr = Annotated[str, AfterValidator(_no_nul)]


def registered(kind: str, registry: Mapping[str, Any]) -> AfterValidator:
    """A name field that must be a key of ``registry``: refused at the field, so that the
    message names it (``backbone.name``, ``data.recipe.name``, ``data.mask.name``)."""

    def known(name: str) -> str:
        if name not in registry:
            raise ValueError(f"unknown {kind} {name!r}; accepted: {', '.join(sorted(registry))}")
        return name

    return AfterValidator(known)


class Strict(BaseModel):
    # Every float of a run is finite: an infinite learning rate or a NaN ratio is a mistake.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SourceConfig(Strict):
    """Where images come from (see ``pipelines.ingest.sources.ImageSource``)."""

    path: PathStr | list[PathStr]
    format: SourceFormat = "auto"
    image_column: str = "image"
    label_column: str | None = None
    s3_endpoint: str | None = None
    # Images per read task (and decode task): see ImageSource.rows_per_unit.
    rows_per_unit: int = Field(8192, ge=1)


class MethodOptions(Strict):
    """A method's options, one field per parameter of its ``__init__`` after the backbone.

    A mapping as well, so that ``build_method(name, backbone, **config.method.options)``
    passes them all."""

    def keys(self) -> list[str]:
        return list(type(self).model_fields)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def options_model(method: type[Method]) -> type[MethodOptions]:
    """``method``'s options as a model: typed by the hints of its ``__init__``, defaulting
    to its signature's defaults (so the config and the method cannot disagree)."""
    hints = get_type_hints(method.__init__)
    fields: dict[str, Any] = {
        key: (hints[key], ... if default is inspect.Parameter.empty else default)
        for key, default in method_options(method.name).items()
    }
    return create_model(f"{method.__name__}Options", __base__=MethodOptions, **fields)


def method_model(method: type[Method]) -> type[Strict]:
    """``{name: <method.name>, options: <its options model>}``, one member of ``MethodConfig``."""
    options = options_model(method)
    return create_model(
        f"{method.__name__}Method",
        __base__=Strict,
        name=(Literal[method.name], method.name),
        options=(options, Field(default_factory=options)),
    )


METHOD_CONFIGS: dict[str, type[Strict]] = {
    name: method_model(cls) for name, cls in sorted(METHODS.items())
}


def _method_name(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("name", DEFAULT_METHOD)
    return getattr(value, "name", None)


# `method`: one model per method, chosen by `method.name` (default DEFAULT_METHOD). The
# members are built at run time, so the union is Union[tuple] (there is no `|` of a tuple).
MethodConfig = Annotated[
    Union[tuple(Annotated[model, Tag(name)] for name, model in METHOD_CONFIGS.items())],  # noqa: UP007
    Discriminator(_method_name),
]


class BackboneConfig(Strict):
    """``pool``: a ViT's feature, ``cls`` (class token) or ``mean`` (mean patch token,
    I-JEPA's evaluation); what online kNN, ``eval`` and ``embed`` read."""

    name: Annotated[str, registered("backbone", BACKBONES)] = "resnet18"
    small_image_stem: bool = False
    pool: Literal["cls", "mean"] = "cls"

    @model_validator(mode="after")
    def _pool_fits(self) -> BackboneConfig:
        if self.pool != "cls" and not self.name.startswith("vit"):
            raise ValueError(f"pool {self.pool!r} needs a ViT backbone, not {self.name!r}")
        return self


class RecipeConfig(Strict):
    """A view recipe by name (one of ``pipelines.ingest.recipes.RECIPES``; default: the
    method's own, ``Method.recipe``), its crop size, and overrides of its published
    parameters (``recipe_from_dict``: ViewSpec fields for every view, ``views: {i: {...}}``
    for one view, the recipe's own arguments such as multicrop's ``local_size``/``n_local``).
    ``RunConfig`` fills in the name, so after validation it is always set."""

    name: Annotated[str, registered("recipe", RECIPES)] | None = None
    size: int = Field(32, gt=0)
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _builds(self) -> RecipeConfig:
        if self.name is not None:
            self.build()
        return self

    def build(self) -> ViewRecipe:
        if self.name is None:
            raise ConfigError("data.recipe.name is not resolved: validate the whole RunConfig")
        return recipe_from_dict(self.name, self.size, self.overrides)


class MaskConfig(Strict):
    """The patch mask drawn with each row's views, for masked methods (one of
    ``pipelines.ingest.masks.MASKS``): ``ratio`` of the patches hidden, patches of
    ``patch_size`` px, which must divide ``data.recipe.size`` (4 px: an 8x8 grid at 32 px).
    ``multiblock`` (I-JEPA's blocks) has its own published scales: ``ratio`` does not apply."""

    name: Annotated[str, registered("mask", MASKS)] = "random"
    ratio: float = Field(0.75, gt=0, lt=1)
    patch_size: int = Field(4, gt=0)

    def build(self, image_size: int) -> PatchMask:
        return build_mask_generator(self.name, image_size, self.patch_size, self.ratio)


class DataConfig(Strict):
    train: SourceConfig
    # Images in the training set, for epoch-based schedules when the source cannot be
    # counted from listings or metadata (webdataset shards).
    num_images: int | None = Field(None, gt=0)
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    # Rows in each worker's local shuffle buffer (``local_shuffle_buffer_size`` of the loop's
    # ``iter_torch_batches``; 0 = off): it mixes rows of the blocks that reach a worker.
    # Folder trees need none (each read task is a random sample of the files); it helps
    # where a read task holds few classes, i.e. class-sorted parquet row groups or tars.
    # Measured (docs/SCALING.md, "Shuffle quality"; CIFAR-10 sorted by class, batches of
    # 128, random sampling = 10 classes): parquet 5.7 classes per batch at 0, 7.3 at 2048,
    # 9.1 at 8192; tars 3.3, 6.5, 8.8. 2048 rows hold 616 MB of two 224 px views per worker
    # (8192: 2.4 GB) and cut the consumer's own rate at 224 px from ~14,000 to ~6,000 rows/s,
    # still ~6x what a GPU takes; raise it for class-sorted shards at small image sizes.
    shuffle_buffer: int = Field(2048, ge=0)
    # Labeled splits for the online kNN monitor; both or neither.
    knn_bank: SourceConfig | None = None
    knn_query: SourceConfig | None = None
    knn_every_epochs: int = Field(1, ge=1)
    knn_k: int = Field(200, gt=0)
    knn_temperature: float = Field(0.1, gt=0)
    # Images of the kNN bank at most (the first ones read): each rank embeds its share of
    # them at every kNN epoch, and 50,000 is ImageNet's validation set, CIFAR's train set.
    knn_bank_max: int = Field(50_000, gt=0)
    # "cpu_nodes": read and decode only on nodes labelled darkmatter/role=data (cluster.yaml's
    # cpu_worker, k8s/rayjob.yaml's cpu-workers; docs/CLUSTER.md), never beside the trainers.
    decode_on: DecodeOn = "any"
    mask: MaskConfig | None = None
    # A worker that waits this long for a batch stops the run with a message that says the
    # data stalled (starved read or decode tasks, a hung store); the run resumes by name.
    stall_timeout_s: float = Field(600.0, gt=0, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _knn_pair(self) -> DataConfig:
        if (self.knn_bank is None) != (self.knn_query is None):
            raise ValueError("knn_bank and knn_query must be given together")
        for name in ("knn_bank", "knn_query"):
            source = getattr(self, name)
            if source is not None and source.label_column is None:
                raise ValueError(f"{name}.label_column must be set: the kNN monitor needs labels")
        return self

    @model_validator(mode="after")
    def _mask_fits_recipe(self) -> DataConfig:
        if self.mask is None:
            return self
        if self.recipe.size % self.mask.patch_size:
            raise ValueError(
                f"mask.patch_size ({self.mask.patch_size}) must divide recipe.size "
                f"({self.recipe.size})"
            )
        try:
            self.mask.build(self.recipe.size)
        except ValueError as error:
            raise ValueError(f"mask: {error}") from None
        return self


class OptimConfig(Strict):
    name: Literal["sgd", "adamw", "lars"] = "lars"
    base_lr: float = Field(0.3, gt=0, description="learning rate per 256 images (see lr_scaling)")
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    weight_decay: float = Field(1e-6, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)
    # LARS trust coefficient: 0.001 in the authors' LARS (google-research/simclr
    # lars_optimizer.py, facebookresearch/barlowtwins main.py; BYOL and VICReg the same).
    lars_eta: float = Field(0.001, gt=0)
    # Learning rate of biases and norm parameters relative to the weights'; None: the
    # method's published ratio (Barlow Twins 0.0048 / 0.2, else 1).
    bias_lr_ratio: float | None = Field(None, gt=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip_norm: float | None = Field(None, gt=0)

    def check_warmup(self, total_steps: int) -> None:
        """Refuse a warmup that lasts the whole run (the cosine would never start)."""
        if self.warmup_steps >= total_steps:
            raise ConfigError(
                f"optim.warmup_steps ({self.warmup_steps}) must be shorter than the run "
                f"({total_steps} steps)"
            )


# The epochs a run with only a time budget (schedule.max_minutes) plans for: a cap, never
# reached in practice; planning is per read task, so a large cap costs nothing up front.
BUDGET_EPOCH_CAP = 1000


class ScheduleConfig(Strict):
    """Training length: ``steps`` when set, else ``epochs`` passes over the training set;
    ``max_minutes``: a wall-clock budget of training time (alone, or a limit beside the
    others: the run ends at whichever comes first). With a budget the learning rate's
    cosine runs over the time (``pipelines.train.budget``), so the run ends annealed."""

    epochs: int | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)
    max_minutes: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_length(self) -> ScheduleConfig:
        if self.epochs is None and self.steps is None and self.max_minutes is None:
            raise ValueError("set schedule.epochs, schedule.steps or schedule.max_minutes")
        return self

    def step_cap(self, steps_per_epoch: int) -> int:
        """The run's step count, or its cap when the budget is time."""
        if self.steps is not None:
            return self.steps
        epochs = self.epochs or (BUDGET_EPOCH_CAP if self.max_minutes else 1)
        return steps_per_epoch * epochs


class TrainConfig(Strict):
    batch_size: int = Field(256, gt=0, description="global batch size, split across workers")
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, gt=0)
    # CPUs counted per run (and per sweep trial) for its Ray Data read and decode stages,
    # beside its workers': an embedded Ray gets that many more, a sweep runs only as many
    # trials as fit. With one, concurrent trials' pipelines can starve each other.
    data_cpus: int = Field(2, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    log_every: int = Field(10, gt=0)
    diagnostics_every: int = Field(50, gt=0)
    max_nonfinite_in_a_row: int = Field(5, gt=0)
    # After max_nonfinite_in_a_row skipped steps the run restarts from its last checkpoint
    # with the learning rate times this (cumulative over restarts; checkpoint.max_failures
    # bounds them), else stops naming the step.
    nonfinite_lr_factor: float = Field(0.5, gt=0, le=1)
    # Test hook (fault injection, docs/RELIABILITY.md): the steps (1-based, as logged) at which
    # rank 0's views are made NaN, in every attempt (a divergence that a restart repeats).
    inject_nonfinite_at: list[int] = Field(default_factory=list)
    prefetch_batches: int = Field(2, ge=0)
    # How Ray places the training workers (ray.train.ScalingConfig.placement_strategy):
    # PACK fills a node first; SPREAD / STRICT_SPREAD put workers on different nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class CheckpointConfig(Strict):
    # Ray Train storage: a local path, a mounted shared path (NFS), or a URI (s3://...).
    storage_path: PathStr = "runs"
    # A local storage_path that every node mounts at the same place (NFS, Lustre...).
    # Multi-node runs refuse a local storage_path unless this is set (see pipelines.cluster.placement).
    shared_storage: bool = False
    every_steps: int = Field(200, gt=0)
    keep: int = Field(3, gt=0)
    max_failures: int = Field(3, ge=-1)


class TrackingConfig(Strict):
    tracking_uri: PathStr | None = None  # default: MLFLOW_TRACKING_URI, else a local sqlite store
    experiment: str = "darkmatter"
    # CPU, memory, disk, network (and GPU) of rank 0's node in the run, every 10 s.
    system_metrics: bool = True


class RunConfig(Strict):
    name: str = Field("pretrain", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    method: MethodConfig = Field(default_factory=METHOD_CONFIGS[DEFAULT_METHOD])
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=lambda: ScheduleConfig(epochs=1))
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _feasible(self) -> RunConfig:
        if self.train.batch_size < self.train.num_workers:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) is smaller than train.num_workers "
                f"({self.train.num_workers}): each worker needs at least one image per step"
            )
        if self.train.batch_size % self.train.num_workers:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must divide evenly across "
                f"train.num_workers ({self.train.num_workers})"
            )
        if self.schedule.steps is not None:
            self.optim.check_warmup(self.schedule.steps)
        return self

    @model_validator(mode="after")
    def _method_recipe(self) -> RunConfig:
        """No recipe named: the method's own (``Method.recipe``)."""
        recipe = self.data.recipe
        if recipe.name is None:
            recipe = recipe.model_copy(update={"name": METHODS[self.method.name].recipe})
            try:
                recipe.build()
            except ValueError as error:
                raise ValueError(f"data.recipe: {error}") from None
            self.data.recipe = recipe
        return self

    @property
    def local_batch_size(self) -> int:
        return self.train.batch_size // self.train.num_workers


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.batch_size=128")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted key in a nested dict (creating levels as needed)."""
    for item in overrides:
        path, value = parse_override(item)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        loc = list(e["loc"])
        method = None
        if loc[:1] == ["method"] and len(loc) > 1 and loc[1] in METHOD_CONFIGS:
            method = loc.pop(1)  # pydantic names the union member: method.simclr.options...
        field = ".".join(str(p) for p in loc)
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown key"
            if method is not None and loc[1:2] == ["options"]:
                message += f"; {method!r} accepts: {', '.join(method_options(method))}"
        elif e["type"] == "union_tag_invalid" and loc == ["method"]:
            message = f"unknown method {e['ctx']['tag']!r}; accepted: {', '.join(METHOD_CONFIGS)}"
        lines.append(f"{field}: {message}" if loc else message)
    if len(lines) == 1:  # one line, for one mistake
        return f"invalid config: {lines[0]}"
    return "invalid config:\n  " + "\n  ".join(lines)


def validate_config(tree: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def resolve_paths(config: RunConfig, base_dir: str | Path | None = None) -> RunConfig:
    """A copy of ``config`` whose local paths (sources, checkpoint storage, a local MLflow
    store) are absolute against ``base_dir`` (default: the working directory). Idempotent."""
    resolved = config.model_copy(deep=True)
    for name in ("train", "knn_bank", "knn_query"):
        source = getattr(resolved.data, name)
        if source is not None:
            paths = source.path
            source.path = (
                [resolve_path(p, base_dir) for p in paths]
                if isinstance(paths, list)
                else resolve_path(paths, base_dir)
            )
    resolved.checkpoint.storage_path = resolve_path(resolved.checkpoint.storage_path, base_dir)
    resolved.tracking.tracking_uri = resolve_tracking_uri(resolved.tracking.tracking_uri, base_dir)
    return resolved


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base_dir: str | Path | None = None,
) -> RunConfig:
    """Read YAML (if given), apply ``key=value`` overrides, validate, and resolve relative
    paths against ``base_dir`` (default: the working directory). Raises ConfigError."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return resolve_paths(validate_config(apply_overrides(tree, overrides or [])), base_dir)


def config_to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": value}, for logging as MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
