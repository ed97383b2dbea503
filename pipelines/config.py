"""The typed run configuration: loaded from YAML, overridden with ``--set key=value``,
validated once before any work starts, and logged whole to MLflow.

Every default of a run lives here (method options default to each method's own
signature, so the loss and the recipe cannot disagree).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.ingest.recipes import ViewRecipe, recipe_from_dict
from ssl_models.backbones import BACKBONES
from ssl_models.methods import METHODS, method_options


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


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(Strict):
    """Where images come from (see ``pipelines.ingest.sources.ImageSource``)."""

    path: str | list[str]
    format: Literal["auto", "folder", "parquet", "webdataset", "paths"] = "auto"
    image_column: str = "image"
    label_column: str | None = None
    s3_endpoint: str | None = None


class MethodConfig(Strict):
    name: str = "simclr"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> MethodConfig:
        if self.name not in METHODS:
            raise ValueError(
                f"unknown method {self.name!r}; accepted: {', '.join(sorted(METHODS))}"
            )
        accepted = method_options(self.name)
        unknown = sorted(set(self.options) - set(accepted))
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no option {', '.join(unknown)}; accepted: {', '.join(accepted)}"
            )
        for key, value in self.options.items():
            default = accepted[key]
            expected = (
                (bool,)
                if isinstance(default, bool)
                else (int, float)
                if isinstance(default, float)
                else (type(default),)
            )
            if isinstance(value, bool) != isinstance(default, bool) or not isinstance(
                value, expected
            ):
                raise ValueError(
                    f"method option {key!r} must be {type(default).__name__}, got {value!r}"
                )
        return self


class BackboneConfig(Strict):
    name: str = "resnet18"
    small_image_stem: bool = False

    @model_validator(mode="after")
    def _known(self) -> BackboneConfig:
        if self.name not in BACKBONES:
            raise ValueError(
                f"unknown backbone {self.name!r}; accepted: {', '.join(sorted(BACKBONES))}"
            )
        return self


class RecipeConfig(Strict):
    """A view recipe by name, its crop size, and overrides of its published parameters
    (``pipelines.ingest.recipes.recipe_from_dict``: ViewSpec fields for every view,
    ``views: {i: {...}}`` for one view, ``local_size``/``n_local`` for multicrop)."""

    name: Literal["simclr", "byol", "multicrop"] = "simclr"
    size: int = Field(32, gt=0)
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _builds(self) -> RecipeConfig:
        self.build()
        return self

    def build(self) -> ViewRecipe:
        return recipe_from_dict(self.name, self.size, self.overrides)


class DataConfig(Strict):
    train: SourceConfig
    # Images in the training set, for epoch-based schedules when the source cannot be
    # counted from listings or metadata (webdataset shards).
    num_images: int | None = Field(None, gt=0)
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    # Labeled splits for the online kNN monitor; both or neither.
    knn_bank: SourceConfig | None = None
    knn_query: SourceConfig | None = None
    knn_every_epochs: int = Field(1, ge=1)
    knn_k: int = Field(200, gt=0)
    knn_temperature: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _knn_pair(self) -> DataConfig:
        if (self.knn_bank is None) != (self.knn_query is None):
            raise ValueError("knn_bank and knn_query must be given together")
        for name in ("knn_bank", "knn_query"):
            source = getattr(self, name)
            if source is not None and source.label_column is None:
                raise ValueError(f"{name}.label_column must be set: the kNN monitor needs labels")
        return self


class OptimConfig(Strict):
    name: Literal["sgd", "adamw", "lars"] = "lars"
    base_lr: float = Field(0.3, gt=0, description="learning rate per 256 images (see lr_scaling)")
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    weight_decay: float = Field(1e-6, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    betas: tuple[float, float] = (0.9, 0.999)
    lars_eta: float = Field(0.02, gt=0)
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip_norm: float | None = Field(None, gt=0)


class ScheduleConfig(Strict):
    """Training length: ``steps`` when set, else ``epochs`` passes over the training set."""

    epochs: int | None = Field(None, gt=0)
    steps: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_length(self) -> ScheduleConfig:
        if self.epochs is None and self.steps is None:
            raise ValueError("set schedule.epochs or schedule.steps")
        return self


class TrainConfig(Strict):
    batch_size: int = Field(256, gt=0, description="global batch size, split across workers")
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    log_every: int = Field(10, gt=0)
    diagnostics_every: int = Field(50, gt=0)
    max_nonfinite_in_a_row: int = Field(5, gt=0)
    prefetch_batches: int = Field(2, ge=0)
    # How Ray places the training workers (ray.train.ScalingConfig.placement_strategy):
    # PACK fills a node first; SPREAD / STRICT_SPREAD put workers on different nodes.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


class CheckpointConfig(Strict):
    # Ray Train storage: a local path, a mounted shared path (NFS), or a URI (s3://...).
    storage_path: str = "runs"
    # A local storage_path that every node mounts at the same place (NFS, Lustre...).
    # Multi-node runs refuse a local storage_path unless this is set (see pipelines.cluster.placement).
    shared_storage: bool = False
    every_steps: int = Field(200, gt=0)
    keep: int = Field(3, gt=0)
    max_failures: int = Field(3, ge=-1)


class TrackingConfig(Strict):
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else a local sqlite store
    experiment: str = "darkmatter"


class RunConfig(Strict):
    name: str = Field("pretrain", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    method: MethodConfig = Field(default_factory=MethodConfig)
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
        steps = self.schedule.steps
        if steps is not None and self.optim.warmup_steps >= steps:
            raise ValueError(
                f"optim.warmup_steps ({self.optim.warmup_steps}) must be shorter than "
                f"schedule.steps ({steps})"
            )
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
        field = ".".join(str(p) for p in e["loc"]) or "(config)"
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{field}: {message}" if e["loc"] else message)
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
