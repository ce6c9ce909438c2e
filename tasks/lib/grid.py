"""Grids of experiments as data: variants (sets of params overrides) × seeds, checked before anything runs.

A grid file is YAML, read like params.yaml (bounded, no aliases, ``yaml.safe_load``'s loader) and
typed with Pydantic:

    # grids/seed-comparison.yaml: the seed's comparison, every optimisation then each one dropped
    variants:
      all-optimisations: {}
      no-regularisation: {train.l2_rate: 0}
      no-hidden-layer: {model.hidden_units: 0}

The first variant is the reference the table compares the others with. Every override is checked
against the params model: an unknown key is named (with a "did you mean"), a wrong type or bound
fails as it would in params.yaml, and an empty grid is refused, each as one line. A quick sweep
needs no file: ``--set train.learning_rate=0.2,0.4,0.8`` gives one variant per value, and several
``--set`` give their product (:func:`sweep`).

A cell of the grid is a variant at a seed (``train.seed``); its experiment name is
``<variant>[-<N>steps]-s<seed>``.
"""

from __future__ import annotations

import difflib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from tasks.lib.params import Params, ParamsError, parse_params, read_params_document

DEFAULT_GRID = Path("grids/seed-comparison.yaml")
Scalar = bool | int | float | str | None
VariantName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,60}$")]


class GridError(ValueError):
    """The grid cannot run as declared; the message names the file, the variant and the key."""


class GridFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    variants: dict[VariantName, dict[str, Scalar]] = Field(min_length=1)


@dataclass(frozen=True)
class Cell:
    """One experiment of the grid: a variant at a seed."""

    variant: str
    overrides: tuple[str, ...]  # `dvc exp run -S` settings, ``section.key=value``
    seed: int
    steps: int | None

    @property
    def name(self) -> str:
        steps = f"-{self.steps}steps" if self.steps else ""
        return f"{self.variant}{steps}-s{self.seed}"

    @property
    def settings(self) -> list[str]:
        extra = [f"train.steps={self.steps}"] if self.steps else []
        return [*self.overrides, f"train.seed={self.seed}", *extra]


def _setting(key: str, value: Scalar) -> str:
    """``key=value`` as `dvc exp run -S` parses it back (YAML): null, true, 0.1, 'text'."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def check_overrides(where: str, overrides: dict[str, Scalar], base: dict) -> None:
    """Apply ``overrides`` to the params document ``base`` and validate the result as params.yaml."""
    document = {section: dict(values) if isinstance(values, dict) else values for section, values in base.items()}
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        known = Params.model_fields.get(section)
        if not field or "." in field or known is None or field not in known.annotation.model_fields:
            fields = [f"{name}.{inner}" for name, info in Params.model_fields.items()
                      for inner in getattr(info.annotation, "model_fields", {})]
            guess = difflib.get_close_matches(key, fields, n=1)
            raise GridError(f"{where}: {key}: unknown parameter{f' (did you mean {guess[0]!r}?)' if guess else ''}")
        document[section][field] = value
    try:
        parse_params(document, Path(where))
    except ParamsError as error:
        detail = str(error).removeprefix("invalid parameters:\n").strip().splitlines()[0].strip()
        raise GridError(detail) from None


def read_grid(path: Path, params_file: Path = Path("params.yaml")) -> dict[str, tuple[str, ...]]:
    """The variants of a grid file, each as `-S` settings, checked against ``params_file``."""
    try:
        grid = GridFile.model_validate(read_params_document(path))
    except ParamsError as error:
        raise GridError(str(error)) from None
    except ValidationError as error:
        first = error.errors()[0]
        location = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise GridError(f"{path}: {location}: {first['msg']}") from None
    base = read_params_document(params_file)
    for variant, overrides in grid.variants.items():
        check_overrides(f"{path}: variants.{variant}", overrides, base)
    return {variant: tuple(_setting(key, value) for key, value in overrides.items())
            for variant, overrides in grid.variants.items()}


def _parse_set(text: str) -> tuple[str, list[Scalar]]:
    key, equals, values = text.partition("=")
    if not equals or not key or not values:
        raise GridError(f"--set {text}: expected section.key=value[,value...]")
    return key, [yaml.safe_load(value) for value in values.split(",")]


def sweep(sets: list[str], params_file: Path = Path("params.yaml")) -> dict[str, tuple[str, ...]]:
    """The variants of ``--set`` sweeps: one per value, the product of several; each checked."""
    axes = [_parse_set(text) for text in sets]
    base = read_params_document(params_file)
    variants = {}
    for values in itertools.product(*(values for _, values in axes)):
        overrides = {key: value for (key, _), value in zip(axes, values)}
        name = "-".join(f"{key.split('.')[-1]}-{value}" for key, value in overrides.items())
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name)
        check_overrides(f"--set {name}", overrides, base)
        variants[name] = tuple(_setting(key, value) for key, value in overrides.items())
    return variants


def cells(variants: dict[str, tuple[str, ...]], seeds: int, steps: int | None, only: list[str]) -> list[Cell]:
    """Variants in the grid's order (only those named in ``only``, if any); within one, seeds 0..seeds-1."""
    unknown = sorted(set(only) - set(variants))
    if unknown:
        raise GridError(f"--only {' '.join(unknown)}: not in the grid (its variants: {', '.join(variants)})")
    return [Cell(variant, overrides, seed, steps) for variant, overrides in variants.items()
            if not only or variant in only for seed in range(seeds)]
