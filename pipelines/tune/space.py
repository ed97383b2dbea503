"""Search spaces as data (``tune_spaces/<method>.yaml``), validated like run configs.

A space names a base run config, the metric to optimise, the collapse thresholds, and a
distribution for each swept config field (dotted keys, as for ``--set``). Every key is
checked against the run config by building a config with a value drawn from its range,
so a typo or an impossible value is refused before any trial starts, with the key named.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import tune

from pipelines.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    format_validation_error,
    resolve_paths,
    validate_config,
)


class Distribution(BaseModel):
    model_config = ConfigDict(extra="forbid")

    distribution: Literal["uniform", "loguniform", "choice", "randint"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> Distribution:
        if self.distribution == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty 'values' list")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.distribution} needs low < high, got {self.low}, {self.high}")
        if self.distribution == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0, got {self.low}")
        return self

    def representatives(self) -> list[Any]:
        """Values that must all make a valid config: the ends of the range, or every choice."""
        if self.distribution == "choice":
            return list(self.values or [])
        if self.distribution == "randint":
            return [int(self.low), int(self.high) - 1]
        return [self.low, self.high]

    def to_tune(self):
        if self.distribution == "choice":
            return tune.choice(self.values)
        if self.distribution == "randint":
            return tune.randint(int(self.low), int(self.high))
        if self.distribution == "loguniform":
            return tune.loguniform(self.low, self.high)
        return tune.uniform(self.low, self.high)


class CollapseThresholds(BaseModel):
    """A trial is collapsed when, after ``grace_steps``, ``patience`` reports in a row show
    effective rank below ``min_effective_rank`` or embedding std below ``min_embedding_std``
    or an energy gap at or below ``min_energy_gap`` (see ``ssl_models.diagnostics``)."""

    model_config = ConfigDict(extra="forbid")

    min_effective_rank: float = Field(1.5, ge=1.0)
    min_embedding_std: float = Field(1e-3, ge=0.0)
    min_energy_gap: float = 1e-6
    patience: int = Field(2, ge=1)
    grace_steps: int = Field(0, ge=0)


class AshaSettings(BaseModel):
    """ASHA's rungs (``ray.tune.schedulers.ASHAScheduler``), counted in a trial's reports
    (Tune's ``training_iteration``): no trial is stopped before ``grace_period`` reports,
    none runs past ``max_t`` (by default above any run's length: the schedule ends a trial)."""

    model_config = ConfigDict(extra="forbid")

    grace_period: int = Field(2, ge=1)
    max_t: int = Field(10_000, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> AshaSettings:
        if self.grace_period > self.max_t:
            raise ValueError(
                f"grace_period ({self.grace_period}) must not exceed max_t ({self.max_t})"
            )
        return self


class TuneSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_config: str
    metric: str = "knn_top1"
    mode: Literal["max", "min"] = "max"
    params: dict[str, Distribution]
    collapse: CollapseThresholds = Field(default_factory=CollapseThresholds)
    asha: AshaSettings = Field(default_factory=AshaSettings)

    @model_validator(mode="after")
    def _metric(self) -> TuneSpace:
        if self.metric not in ("knn_top1", "loss"):
            raise ValueError(
                f"metric {self.metric!r}: accepted knn_top1 (mode max) or loss (mode min)"
            )
        if not self.params:
            raise ValueError("params: a space needs at least one swept field")
        return self

    def param_space(self) -> dict[str, Any]:
        return {key: dist.to_tune() for key, dist in self.params.items()}


def set_dotted(tree: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``tree`` with each dotted key of ``params`` set."""
    return apply_overrides(
        copy.deepcopy(tree), [f"{k}={yaml.safe_dump(v).strip()}" for k, v in params.items()]
    )


def load_base_tree(space: TuneSpace, space_path: Path, overrides: list[str]) -> dict[str, Any]:
    base = Path(space.base_config)
    if not base.is_absolute():
        candidates = [Path.cwd() / base, space_path.parent / base, space_path.parent.parent / base]
        base = next((c for c in candidates if c.is_file()), candidates[0])
    if not base.is_file():
        raise ConfigError(f"base_config: {space.base_config!r} does not exist")
    tree = yaml.safe_load(base.read_text()) or {}
    return apply_overrides(tree, overrides)


def load_space(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[TuneSpace, dict[str, Any], RunConfig]:
    """(space, base config tree with overrides, the validated base config). Raises ConfigError
    naming the offending key of the space."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        space = TuneSpace.model_validate(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"search space {str(path)!r} is not valid YAML: {error}") from None
    except ValidationError as error:
        raise ConfigError(
            format_validation_error(error).replace("invalid config", f"invalid search space {path}")
        ) from None
    # Paths resolve here, once, against the directory the command runs from: each trial runs
    # in a working directory of its own, where a relative path would name nothing.
    base = resolve_paths(validate_config(load_base_tree(space, path, overrides or [])))
    tree = base.model_dump(mode="json")
    for key, dist in space.params.items():
        for value in dist.representatives():
            try:
                validate_config(set_dotted(tree, {key: value}))
            except ConfigError as error:
                detail = str(error).removeprefix("invalid config:").strip()
                raise ConfigError(
                    f"invalid search space {path}: params.{key} = {value!r}: {detail}"
                ) from None
    if space.metric == "knn_top1" and base.data.knn_bank is None:
        raise ConfigError(
            f"invalid search space {path}: metric knn_top1 needs data.knn_bank and data.knn_query "
            "in the base config; use metric: loss, mode: min"
        )
    return space, tree, base
