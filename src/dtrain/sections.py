"""Building blocks of the config sections: a field with its help text, and a section that checks itself.

Torch-free (config loading, ``train.py --help`` and the docs generator import it before torch), and
imported by every workload's section declarations, so it must not import dtrain.config (which imports them).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from dtrain.errors import ConfigError


def opt(default: Any, help: str) -> Any:
    """A config field with its help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


class Section:
    """A group of config keys (a dataclass) that checks its own values once they are all set.

    ``check`` raises ConfigError (exit code 2) for what the types cannot express: a range, two keys
    that contradict each other. Checks that need the run (world size, device, files) belong where
    the run is known, not here.
    """

    prefix = ""  # the dotted name of the section in messages, e.g. "data."; set by subclasses

    def check(self) -> None:
        """Nothing beyond the types, unless a section says otherwise."""

    def at_least(self, low: float, *names: str) -> None:
        """ConfigError naming the first of `names` whose value is below `low`."""
        for name in names:
            value = getattr(self, name)
            if value < low:
                raise ConfigError(f"config key {self.prefix + name!r} must be >= {low}, got {value}")


class ModelSection(Section):
    """The ``model`` section of a workload."""

    prefix = "model."

    def describe(self) -> str:
        """How messages outside the workload name this model, e.g. 'model.arch=resnet18'."""
        return "the model"


class DataSection(Section):
    """The ``data`` section of a workload."""

    prefix = "data."
