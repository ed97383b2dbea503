"""Batch inference of a frozen backbone over a Ray Dataset: an actor pool, one model per actor.

Each actor (``BackboneInference``) builds the backbone once, loads the weights from
the object store and turns ``image`` uint8 (N, 3, S, S) batches into ``embedding``
float32 (N, D) rows; the other columns (``label``, ``key``) pass through. On a
cluster with GPUs each actor takes one GPU (Ray Data's ``map_batches`` with a
callable class, ``num_gpus=1``); on CPUs each takes ``cpus_per_actor`` cores and
that many torch threads, so actors do not oversubscribe the machine.

Used by ``darkmatter eval`` (features of labeled splits, gathered in memory) and
``darkmatter embed`` (a corpus streamed to parquet, never held in memory).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
from mlflow.tracking import MlflowClient

from pipelines.cluster.session import connect_ray
from pipelines.config import DecodeOn, load_config
from pipelines.ingest.dataset import eval_image_dataset
from pipelines.ingest.pacing import pace_scheduling_loops
from pipelines.ingest.photometric import normalise
from pipelines.ingest.recipes import IMAGENET_MEAN, IMAGENET_STD
from pipelines.ingest.sources import ImageSource, count_read_units
from pipelines.tracking import redact_uri
from pipelines.weights import load_weights
from ssl_models.backbones import build_backbone

RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})/?$")
MODEL_URI_SCHEMES = ("models:/", "runs:/")
RANDOM = "random"


@dataclass(frozen=True)
class BackboneSpec:
    """What it takes to rebuild a trained backbone: its constructor options and the
    normalisation its training views used."""

    name: str
    small_image_stem: bool
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pool: str = "cls"

    @classmethod
    def from_run_config(cls, config_file: str | Path) -> BackboneSpec:
        """From a pretraining run's ``config.yaml`` (written beside ``backbone.pt``)."""
        config = load_config(config_file)
        view = config.data.recipe.build().views[0]
        return cls(
            config.backbone.name,
            config.backbone.small_image_stem,
            config.data.recipe.size,
            view.mean,
            view.std,
            config.backbone.pool,
        )


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``backbone.pt`` (``backbone.model.state_dict()``), read safely on the CPU."""
    path = Path(path)
    if not path.is_file():
        problem = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"checkpoint {str(path)!r} {problem}")
    state = load_weights(path)
    if not isinstance(state, dict):
        raise ValueError(
            f"checkpoint {str(path)!r} is not a state dict (got {type(state).__name__})"
        )
    return state


def build_frozen_backbone(
    spec: BackboneSpec, state_dict: dict[str, torch.Tensor] | None
) -> torch.nn.Module:
    """The backbone in eval mode with ``state_dict`` loaded strictly (None: random init)."""
    backbone = build_backbone(spec.name, spec.small_image_stem, spec.image_size, spec.pool)
    if state_dict is not None:
        try:
            backbone.model.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise ValueError(
                f"checkpoint does not fit backbone {spec.name!r} "
                f"(small_image_stem={spec.small_image_stem}): {str(error).splitlines()[0]}"
            ) from None
    return backbone.eval().requires_grad_(False)


class BackboneInference:
    """map_batches callable: ``image`` uint8 (N, 3, S, S) -> ``embedding`` float32 (N, D)."""

    def __init__(
        self,
        spec: BackboneSpec,
        weights: Any,
        threads: int = 1,
        arrow_output: bool = False,
    ) -> None:
        # `weights`: {"ref": ObjectRef} (nested, so resolved here, on any node) or None.
        state_dict = ray.get(weights["ref"]) if weights is not None else None
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        self.model = build_frozen_backbone(spec, state_dict).to(self.device)
        self.spec = spec
        self.arrow_output = arrow_output

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray] | pa.Table:
        images = torch.tensor(batch["image"], device=self.device)
        x = normalise(images, self.spec.mean, self.spec.std)
        embedding = self.model(x).float().cpu().numpy()
        out = {k: v for k, v in batch.items() if k != "image"}
        if not self.arrow_output:
            return out | {"embedding": embedding}
        # A plain fixed-size list column: readable by any parquet reader, no Ray extension type.
        flat = pa.array(embedding.reshape(-1), pa.float32())
        columns = {k: pa.array(list(v)) for k, v in out.items()}
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, embedding.shape[1])
        return pa.table(columns)


# CPUs the inference actors leave to the read and decode tasks of their own pipeline:
# reads ask for 0.05 CPU each, decode tasks for DECODE_CPUS (Ray Data does not fuse a task
# stage into an actor stage). Measured on 2 CPUs: actors of 0.875 CPU each and decode tasks
# of 1 CPU left the decode backpressured for ever ("Tasks: 1 [backpressured:tasks
# (ResourceBudget)]", 2.75/2 CPU): eval of the full CIFAR-10 hung.
READ_CPUS = 0.5
DECODE_CPUS = 0.25


@dataclass(frozen=True)
class ActorPlan:
    """How many inference actors, and what each takes."""

    concurrency: int
    num_gpus: float
    num_cpus: float


def plan_actors(
    concurrency: int | None = None,
    cpus_per_actor: int = 1,
    resources: dict[str, float] | None = None,
) -> ActorPlan:
    """One actor per GPU when the cluster has GPUs; else about one per ``cpus_per_actor`` of
    the CPUs left once ``READ_CPUS`` are kept for the read tasks that feed them (decoding
    tasks ask for ``DECODE_CPUS``). On 2 CPUs, two one-CPU actors held both and the reads
    (0.05 CPU each) never ran: a hang. Now each takes a share of what is left (two actors
    of 0.75 CPU on 2 CPUs). ``resources``: the cluster's (default
    ``ray.cluster_resources()``)."""
    if cpus_per_actor < 1:
        raise ValueError(f"cpus_per_actor={cpus_per_actor!r} must be >= 1")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency={concurrency!r} must be >= 1")
    resources = ray.cluster_resources() if resources is None else resources
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        return ActorPlan(concurrency or gpus, 1, 1)
    room = max(0.5, float(resources.get("CPU", 1)) - READ_CPUS)
    count = concurrency or max(1, round(room / cpus_per_actor))
    return ActorPlan(count, 0, min(float(cpus_per_actor), room / count))


def embed_dataset(
    images: ray.data.Dataset,
    spec: BackboneSpec,
    state_dict: dict[str, torch.Tensor] | None,
    *,
    batch_size: int = 256,
    concurrency: int | None = None,
    cpus_per_actor: int = 1,
    arrow_output: bool = False,
    max_actors: int | None = None,
) -> ray.data.Dataset:
    """``images`` (columns ``image`` + any) -> ``embedding`` (+ the same other columns), lazily.

    ``max_actors``: at most this many actors (the number of read units of the source:
    more would wait for input that never comes).

    ``arrow_output`` gives ``embedding`` as a fixed-size list column (for parquet files);
    otherwise a (N, D) tensor column (for ``gather_features``).
    """
    plan = plan_actors(concurrency, cpus_per_actor)
    weights = {"ref": ray.put(state_dict)} if state_dict is not None else None
    return images.map_batches(
        BackboneInference,
        fn_constructor_kwargs=dict(
            spec=spec,
            weights=weights,
            threads=max(1, int(plan.num_cpus)),
            arrow_output=arrow_output,
        ),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            size=min(plan.concurrency, max_actors or plan.concurrency)
        ),
        num_gpus=plan.num_gpus,
        num_cpus=plan.num_cpus,
    )


def embed_source(
    source: ImageSource,
    checkpoint: Checkpoint,
    counter: str,
    *,
    batch_size: int = 256,
    concurrency: int | None = None,
    decode_on: DecodeOn = "any",
    arrow_output: bool = False,
) -> ray.data.Dataset:
    """Every decodable image of ``source`` (resized, centre-cropped; ``key`` kept) through
    ``checkpoint``'s backbone: the decode tasks ask for ``DECODE_CPUS`` so that they run
    beside the inference actors (``plan_actors``), and there are no more actors than read
    units. Undecodable images are counted in the ``IngestCounter`` named ``counter``."""
    images = eval_image_dataset(
        source,
        checkpoint.spec.image_size,
        counter=counter,
        keep_key=True,
        decode_on=decode_on,
        decode_cpus=DECODE_CPUS,
    )
    return embed_dataset(
        images,
        checkpoint.spec,
        checkpoint.state_dict,
        batch_size=batch_size,
        concurrency=concurrency,
        max_actors=count_read_units(source),
        arrow_output=arrow_output,
    )


def gather_features(
    embedded: ray.data.Dataset, with_keys: bool = False
) -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """(features (N, D) float32, labels (N,) int64, keys or None): sorted by key when
    ``with_keys``, else in the order rows arrive."""
    features, labels, keys = [], [], []
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        if len(batch["embedding"]) == 0:
            continue
        features.append(torch.tensor(np.asarray(batch["embedding"], dtype=np.float32)))
        labels.append(torch.tensor(np.asarray(batch["label"], dtype=np.int64)))
        if with_keys:
            keys.extend(str(k) for k in batch["key"])
    if not features:
        raise ValueError("gather_features: the dataset produced no rows (all images undecodable?)")
    x, y = torch.cat(features), torch.cat(labels)
    if not with_keys:
        return x, y, None
    # Rows arrive in whatever order the actors finish: sort by key, so that seeded subsets
    # (low-label probes, held-out splits) pick the same images on every run.
    order = sorted(range(len(keys)), key=keys.__getitem__)
    index = torch.tensor(order)
    return x[index], y[index], [keys[i] for i in order]


def connect(address: str | None = None, verbose: bool = False) -> None:
    """Ray for inference: a cluster, or an embedded local Ray; its pipelines' scheduling
    loops paced (``pipelines.ingest.pacing``: they run in this process)."""
    connect_ray(address, verbose=verbose)
    pace_scheduling_loops()


# --- which backbone: a file, an MLflow run, or random init ---------------------------------


@dataclass
class Checkpoint:
    """A backbone to evaluate: its weights (None: random init), how to rebuild it, and
    where it came from (``run_id`` when it is an MLflow run's ``backbone.pt``)."""

    state_dict: dict[str, torch.Tensor] | None
    spec: BackboneSpec
    description: str
    run_id: str | None = None


def _spec(
    config_file: Path | None,
    backbone: str | None,
    small_image_stem: bool | None,
    size: int | None,
    pool: str | None = None,
) -> BackboneSpec:
    """From the run's config.yaml when there is one, with the command-line options on top."""
    if config_file is not None and config_file.is_file():
        spec = BackboneSpec.from_run_config(config_file)
    elif backbone is None or size is None:
        raise ValueError(
            "no run config.yaml for this checkpoint: give --backbone and --image-size (and "
            "--small-image-stem if it has one) to say which backbone the weights belong to"
        )
    else:
        spec = BackboneSpec(backbone, False, size)
    return BackboneSpec(
        backbone or spec.name,
        spec.small_image_stem if small_image_stem is None else small_image_stem,
        size or spec.image_size,
        spec.mean,
        spec.std,
        pool or spec.pool,
    )


def run_config_file(client: MlflowClient, run_id: str, directory: str) -> Path | None:
    """The run's ``config.yaml`` artifact, downloaded into ``directory``; None without one."""
    try:
        return Path(client.download_artifacts(run_id, "config.yaml", directory))
    except Exception:  # noqa: BLE001 - fall back to the command-line options
        return None


def logged_model_checkpoint(
    uri: str, tracking_uri: str, options: tuple[str | None, bool | None, int | None]
) -> Checkpoint:
    """The backbone an MLflow model URI names (``models:/<name>/<version>``,
    ``models:/<name>@<alias>``, ``models:/<model id>``, ``runs:/<run id>/backbone``), as
    ``pretrain`` logs it (``mlflow.pytorch``); rebuilt from its run's ``config.yaml``."""
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(tracking_uri)
    try:
        info = mlflow.models.get_model_info(uri)
        module = mlflow.pytorch.load_model(uri, map_location="cpu")
    except Exception as error:  # noqa: BLE001 - MLflow raises several kinds
        raise ValueError(
            f"MLflow model {uri} cannot be loaded from {redact_uri(tracking_uri)} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        ) from None
    run_id = info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        config_file = run_config_file(MlflowClient(tracking_uri), run_id, tmp) if run_id else None
        spec = _spec(config_file, *options)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    return Checkpoint(state, spec, f"MLflow model {uri}", run_id)


def resolve_checkpoint(
    checkpoint: str,
    tracking_uri: str,
    *,
    backbone: str | None = None,
    small_image_stem: bool | None = None,
    image_size: int | None = None,
    pool: str | None = None,
    random_seed: int = 0,
) -> Checkpoint:
    """A ``backbone.pt`` path, an MLflow run id (``<32 hex>`` or ``runs:/<id>``) whose
    ``backbone.pt`` and ``config.yaml`` artifacts are fetched, or ``random`` (random init,
    drawn with ``random_seed``). The options override what the run's ``config.yaml`` says."""
    options = (backbone, small_image_stem, image_size, pool)
    if checkpoint == RANDOM:
        # Drawn once here: every actor and every split must see the same random weights.
        spec = _spec(None, *options)
        torch.manual_seed(random_seed)
        state = build_backbone(spec.name, spec.small_image_stem, spec.image_size).model.state_dict()
        return Checkpoint(state, spec, f"random init ({spec.name}, seed {random_seed})")
    path = Path(checkpoint).expanduser()
    if path.exists():
        return Checkpoint(
            load_state_dict(path),
            _spec(path.parent / "config.yaml", *options),
            str(path.resolve()),
        )
    match = RUN_ID.match(checkpoint)
    if match is None and checkpoint.startswith(MODEL_URI_SCHEMES):
        return logged_model_checkpoint(checkpoint, tracking_uri, options)
    if match is None:
        raise ValueError(
            f"checkpoint {checkpoint!r} is neither an existing file, an MLflow run id "
            f"(32 hex digits or runs:/<id>), an MLflow model URI (models:/...), nor {RANDOM!r}"
        )
    run_id = match.group(1)
    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        config_file = run_config_file(client, run_id, tmp)
        try:
            weights = client.download_artifacts(run_id, "backbone.pt", tmp)
        except Exception as error:  # noqa: BLE001 - MLflow raises several kinds
            raise ValueError(
                f"MLflow run {run_id} in {redact_uri(tracking_uri)} has no backbone.pt artifact "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]})"
            ) from None
        return Checkpoint(
            load_state_dict(weights), _spec(config_file, *options), f"MLflow run {run_id}", run_id
        )
