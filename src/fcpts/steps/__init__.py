"""The pipeline's steps as plain functions: calibrate -> allocate -> evaluate -> register.

Each step reads and writes folders, so the CLI, the KFP components and tests call the
same code:

* :func:`calibrate` (:class:`~fcpts.sources.Sources` -> calibration folder)
* :func:`allocate` (calibration folder -> sparse model folder in the source's format,
  model.onnx, manifest.json)
* :func:`evaluate` (dense model + sparse folder -> metrics.json, chart, reports)
* :func:`gate` (pure) and :func:`register` (metrics + sparse folder -> decision.json, registry)

Given ``tracking=Tracking(...)`` each step also logs to the pipeline's MLflow run
(:mod:`fcpts.steps.tracked`); :func:`~fcpts.steps.backfill.register_from` logs and
registers a result that stayed on disk.
"""

from ..sources import Sources
from .allocate import Allocated, allocate
from .calibrate import Calibration, calibrate, load_calibration
from .common import selection_from_dict, selection_from_json, selection_to_dict, settings_from_json
from .evaluate import Evaluation, evaluate
from .register import Decision, Registration, RegistryRequest, gate, load_registry, register
from .tracked import Tracking

__all__ = [
    "Allocated",
    "Calibration",
    "Decision",
    "Evaluation",
    "Registration",
    "RegistryRequest",
    "Sources",
    "Tracking",
    "allocate",
    "calibrate",
    "evaluate",
    "gate",
    "load_calibration",
    "load_registry",
    "register",
    "selection_from_dict",
    "selection_from_json",
    "selection_to_dict",
    "settings_from_json",
]
