"""Plain Diffusers loading of a ``LatentDiffusionPipeline`` directory, in a process that never imports ldm_pipeline:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("runs/demo/pipeline")     # a LatentDiffusionPipeline

Diffusers resolves ``model_index.json``'s ``"_class_name": "LatentDiffusionPipeline"`` as
``getattr(diffusers, "LatentDiffusionPipeline")``, and ``import ldm_pipeline`` sets that attribute. Installing
ldm-pipeline also installs ``ldm_pipeline_diffusers.pth``, a line that Python's ``site`` runs at start-up:
``install()`` below. It imports nothing: it only watches for the first ``import diffusers``, then gives the
``diffusers`` module a module-level ``__getattr__`` (PEP 562) that imports ``ldm_pipeline`` when Diffusers asks
for one of :data:`PIPELINE_CLASSES`; every other name goes on to Diffusers' own lookup. The class comes from the
installed package: nothing is read or run from a pipeline directory.

This module stands outside the ``ldm_pipeline`` package so that start-up does not import the package (nor
torch): the package is imported where it would be anyway, on first use.
"""

from __future__ import annotations

import importlib
import sys

PIPELINE_CLASSES = ("LatentDiffusionPipeline",)
WATCHED_MODULE = "diffusers"


def add_lazy_lookup(diffusers_module) -> None:
    """Make ``diffusers_module.<name>`` import ``ldm_pipeline`` for each name of :data:`PIPELINE_CLASSES`."""
    previous = vars(diffusers_module).get("__getattr__")

    def __getattr__(name: str):
        if name in PIPELINE_CLASSES:
            try:
                importlib.import_module("ldm_pipeline")  # sets the attribute on diffusers
            except ImportError as error:
                raise AttributeError(f"diffusers.{name} is provided by ldm-pipeline, which failed to import: "
                                     f"{error}") from error
            return vars(diffusers_module)[name]
        if previous is not None:
            return previous(name)
        raise AttributeError(f"module {diffusers_module.__name__!r} has no attribute {name!r}")

    diffusers_module.__getattr__ = __getattr__


class DiffusersImportWatcher:
    """A ``sys.meta_path`` finder that answers only for ``diffusers``: it finds the module as the other finders
    would and, once the module has run, calls :func:`add_lazy_lookup` on it and leaves ``sys.meta_path``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != WATCHED_MODULE:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            add_lazy_lookup(sys.modules.get(fullname, module))  # diffusers replaces itself by a lazy module
            if self in sys.meta_path:
                sys.meta_path.remove(self)

        spec.loader.exec_module = exec_module  # this spec's own loader object, made by the finder above
        return spec


def install() -> None:
    """Called at start-up by ``ldm_pipeline_diffusers.pth``; also safe to call again."""
    if WATCHED_MODULE in sys.modules:
        add_lazy_lookup(sys.modules[WATCHED_MODULE])
    elif not any(isinstance(finder, DiffusersImportWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, DiffusersImportWatcher())
