"""The workload registry: what can be trained, by name (the config key ``workload``).

A workload declares its two config sections (``model`` and ``data``: dataclasses that check their
own values), what the two must agree on, a builder ``(cfg, env) -> Task`` (dtrain.workloads.task) and,
optionally, how ``python -m dtrain.export`` writes its model for its own library.
Adding one is its module plus one line in WORKLOADS (or a ``register`` call from a script of your own):
the config key ``workload``, ``--help``, docs/configuration.md and the loop all read this dict.

This module and the section declarations are torch-free, so loading the config, ``train.py --help`` and
its errors stay fast: the built-in builders are named as "module:function" and imported when a run builds
its task. A builder may also be the function itself (a workload defined next to its script).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from dtrain.workloads import bert_config, image_config

if TYPE_CHECKING:
    from dtrain.workloads.task import Task


@dataclass(frozen=True)
class Workload:
    model: type  # the `model` section: a dtrain.sections.ModelSection dataclass
    data: type  # the `data` section: a dtrain.sections.DataSection dataclass
    build: str | Callable[[Any, Any], "Task"]  # (cfg, env) -> Task, or "module:function" naming it
    # (model section, data section) -> None, ConfigError when they disagree; each section checks itself first
    check: Callable[[Any, Any], None] | None = None
    # python -m dtrain.export: (dtrain.checkpoint.Checkpoint, output path) -> what it wrote; None = no export
    export: str | Callable[[Any, Any], Any] | None = None

    def builder(self) -> Callable[[Any, Any], "Task"]:
        return resolve(self.build)

    def exporter(self) -> Callable[[Any, Any], Any] | None:
        return None if self.export is None else resolve(self.export)


def resolve(function: str | Callable) -> Callable:
    """A function, or the one a "module:function" string names (imported now)."""
    if callable(function):
        return function
    module, _, name = function.partition(":")
    return getattr(importlib.import_module(module), name)


WORKLOADS: dict[str, Workload] = {
    "image": Workload(image_config.ImageModelConfig, image_config.ImageDataConfig, "dtrain.workloads.image:build",
                      export="dtrain.export:write_safetensors"),
    "bert": Workload(bert_config.BertModelConfig, bert_config.BertDataConfig, "dtrain.workloads.bert:build",
                     bert_config.check, export="dtrain.workloads.bert:export_pretrained"),
}


def register(name: str, workload: Workload) -> None:
    """Make `workload` selectable as workload=`name` in this process (a script that registers one and calls
    dtrain.train(..., nproc=0) under torchrun registers it in every rank)."""
    WORKLOADS[name] = workload


def build_task(cfg, env) -> "Task":
    return WORKLOADS[cfg.workload].builder()(cfg, env)


def __getattr__(name: str) -> Any:
    """``from dtrain.workloads import Task`` keeps working without importing torch with the registry."""
    if name in ("Task", "LoaderOptions"):
        from dtrain.workloads import task

        return getattr(task, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
