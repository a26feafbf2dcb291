"""Recipes: transforms, then one rounding, applied in order.

``method=gptq`` is the recipe ``[gptq]``; ``method=[smoothquant,gptq]`` smooths and
then rounds with GPTQ (the standard W8A8 recipe); ``method=[quarot,gptq]`` rotates
and then rounds with GPTQ (``quarot_gptq`` is kept as an alias of it).  A recipe
without a rounding rounds with RTN, so ``method=smoothquant`` means what it always
meant.  What cannot be composed is refused before any model loads: a transform
after the rounding (its rescaling would undo the grid), two roundings (the second
would re-round the first's output), an unknown step or parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qeval.config import ConfigError
from qeval.quant.methods import ALIASES, METHODS, QuantMethod, Step, Transform
from qeval.quant.methods.rtn import RTN


@dataclass(frozen=True)
class Recipe:
    """A validated sequence of steps: ``transforms`` (in order), then ``rounding``."""

    transforms: tuple[Transform, ...]
    rounding: QuantMethod
    rounding_implied: bool = False  # no rounding was named: RTN

    @property
    def steps(self) -> tuple[Step, ...]:
        return (*self.transforms, self.rounding)

    @property
    def named_steps(self) -> tuple[Step, ...]:
        """The steps the user asked for (an implied RTN left out)."""
        return self.transforms if self.rounding_implied else self.steps

    @property
    def name(self) -> str:
        """``gptq``, ``smoothquant``, ``smoothquant+gptq``: the label of result files and tables."""
        return "+".join(step.name for step in self.named_steps)

    @property
    def needs_calibration(self) -> bool:
        return any(step.needs_calibration for step in self.steps)

    def check_supported(self, tensor_type: str, model_type: str | None = None) -> None:
        """Raise UnsupportedCellError when any step cannot produce this tensor type."""
        for step in self.steps:
            step.check_supported(tensor_type, model_type)

    def identity(self) -> dict[str, Any]:
        """What of the recipe changes numbers.  A one-step recipe keeps the ``{name, params}``
        form cells had before recipes composed, so their result files are still found."""
        named = self.named_steps
        if len(named) == 1:
            return named[0].identity()
        return {"name": self.name, "steps": [step.identity() for step in named]}

    @classmethod
    def of(cls, steps: list[Step] | tuple[Step, ...]) -> Recipe:
        """A recipe from step instances, checked: transforms first, at most one rounding."""
        rounding: QuantMethod | None = None
        transforms: list[Transform] = []
        for step in steps:
            if isinstance(step, QuantMethod):
                if rounding is not None:
                    raise ConfigError(
                        f"invalid method {'+'.join(s.name for s in steps)}: two roundings ({rounding.name} and "
                        f"{step.name}); a recipe is transforms followed by one rounding"
                    )
                rounding = step
            elif isinstance(step, Transform):
                if rounding is not None:
                    raise ConfigError(
                        f"invalid method {'+'.join(s.name for s in steps)}: the transform {step.name} comes after "
                        f"the rounding {rounding.name}; a transform changes the weights the rounding has already "
                        f"put on the grid, so it must come first (e.g. method=[{step.name},{rounding.name}])"
                    )
                transforms.append(step)
            else:
                raise ConfigError(f"invalid method step {step!r}: not a Transform or a QuantMethod")
        if not steps:
            raise ConfigError("invalid method: an empty recipe (name at least one step, e.g. method=rtn)")
        if rounding is None:
            return cls(tuple(transforms), RTN(), rounding_implied=True)
        return cls(tuple(transforms), rounding)

    @classmethod
    def from_mapping(cls, steps: Mapping[str, Any]) -> Recipe:
        """A recipe from the config's ``method`` node: ``{step name: params}`` in order, params
        a dataclass (from Hydra) or a mapping (from a record or a test)."""
        built: list[Step] = []
        for name, params in steps.items():
            built.append(make_step(name, params))
        return cls.of(built)


def make_step(name: str, params: Any = None) -> Step:
    """One step by name, with its parameters checked (unknown or out of range: ConfigError)."""
    if name not in METHODS:
        raise ConfigError(
            f"invalid value method={name!r}: allowed one of {', '.join(sorted([*METHODS, *ALIASES]))} "
            "or a list of them (method=[smoothquant,gptq])"
        )
    cls = METHODS[name]
    try:
        if params is None or isinstance(params, Mapping):
            return cls(**dict(params or {}))
        return cls(params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid method.{name}: {err}") from err


def get_method(name: str | list[str], params: Mapping[str, Any] | None = None) -> Recipe:
    """A recipe from a name (``"gptq"``, an alias such as ``"quarot_gptq"``) or a list of names;
    ``params`` are the parameters of a single named step (for tests and benchmarks)."""
    names = list(ALIASES.get(name, (name,))) if isinstance(name, str) else list(name)
    if params and len(names) != 1:
        raise ConfigError(f"parameters {sorted(params)} given for the recipe {'+'.join(names)}: name one step")
    return Recipe.of([make_step(n, params if len(names) == 1 else None) for n in names])
