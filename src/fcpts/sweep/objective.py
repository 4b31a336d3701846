"""The objective of a trial: load the model and splits once per process (:class:`Context`),
allocate with the trial's settings, report the reconstruction loss to the pruner, record
the exact-target constraint and return the validation metric; and the feasibility rules
that pick the best trial."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .common import ATTR_BASELINE, ATTR_CONSTRAINT, CONSTRAINT, say
from .space import SweepSpec


@dataclass
class Context:
    """One process's loaded model, task and splits for ``spec`` on ``device_request``."""

    spec: SweepSpec
    device_request: str
    net: Any
    task: Any
    selection: Any
    calibration: list[Any]
    validation: list[Any]
    dense_out: Any
    labels: Any
    metric: str
    device: Any
    splits: dict[str, Any]
    _norms: dict[str, Any] | None = None

    def serves(self, spec: SweepSpec, device: str) -> bool:
        """Whether this context was loaded for ``spec`` on ``device``."""
        return self.device_request == str(device) and self.spec.to_dict() == spec.to_dict()

    def norms(self) -> dict[str, Any]:
        if self._norms is None:
            from ..scores import collect_input_norms
            from ..tasks import to_device

            layers = self.selection.find(self.net)
            self._norms = collect_input_norms(
                self.net,
                layers,
                [to_device(b, self.device) for b in self.calibration],
                self.task.run,
            )
        return self._norms

    def value(self, net: Any) -> float:
        """The objective (higher is better) of ``net`` on the validation split."""
        from ..metrics import mean_cosine, outputs, relative_output_mse, top1

        out = outputs(net, self.task, self.validation, self.device)
        if self.metric in ("top1", "top1_agreement"):
            return top1(out, self.labels if self.labels is not None else self.dense_out.argmax(-1))
        if self.metric == "cosine":
            return mean_cosine(out, self.dense_out)
        return -relative_output_mse(self.dense_out, out)


def load_context(spec: SweepSpec, device: str = "auto") -> Context:
    """Load the model and data of ``spec``, check them, and compute the dense outputs on
    the validation split."""
    import torch

    from ..core import resolve_device
    from ..metrics import outputs
    from ..sources import (
        check_fit,
        layer_view,
        resolve_data,
        resolve_model,
        resolve_task,
        sample_digests,
    )
    from ..steps.common import selection_from_dict
    from ..tasks import ClassifierTask, EncoderTask, to_device

    sources = spec.sources
    model = resolve_model(sources.model, sources.weights)
    if model.scripted:
        raise UserError(
            "the fcpts method learns through the model's forward pass, which TorchScript does "
            "not allow: give module:function --weights to sweep it"
        )
    data = resolve_data(sources, model)
    task = resolve_task(sources.task, model, data)
    selection = selection_from_dict(spec.selection, base=model.selection)
    net = layer_view(model)
    selection.find(net)  # checks the patterns
    n_cal = spec.calibration_samples or model.defaults["calibration_samples"]
    bs_cal = spec.batch_size or model.defaults["calibration_batch_size"]
    n_val = spec.validation_samples or model.defaults["evaluation_samples"]
    bs_val = spec.eval_batch_size or model.defaults["evaluation_batch_size"]
    calibration = data.split("calibration", n_cal, bs_cal, spec.seed)
    validation = data.split("validation", n_val, bs_val, spec.seed)
    if not calibration or not validation:
        raise UserError(f"the calibration or validation split of {data.source} is empty")
    dev = resolve_device(device)
    net = net.to(dev).eval()
    check_fit(net, task, to_device(calibration[0], dev), data)
    dense_out = outputs(net, task, validation, dev)
    labels = None
    if isinstance(task, EncoderTask):
        metric = "cosine"
    elif isinstance(task, ClassifierTask):
        metric = "top1"
        ys = [b["y"] for b in validation if isinstance(b, Mapping) and "y" in b]
        if len(ys) == len(validation):
            labels = torch.cat(ys)
        else:
            metric = "top1_agreement"
    else:
        metric = "neg_relative_mse"
    cal_digests, val_digests = sample_digests(calibration), sample_digests(validation)
    splits = {
        "calibration": {"split": "calibration", "samples": len(cal_digests), "batch_size": bs_cal},
        "objective": {"split": "validation", "samples": len(val_digests), "batch_size": bs_val},
        "shared_samples": len(set(cal_digests) & set(val_digests)),
        "data": data.source,
        "seed": spec.seed,
    }
    if splits["shared_samples"]:
        say(
            f"warning: {splits['shared_samples']} validation samples equal calibration samples "
            "(the data set holds duplicates)"
        )
    ctx = Context(
        spec=spec,
        device_request=str(device),
        net=net,
        task=task,
        selection=selection,
        calibration=calibration,
        validation=validation,
        dense_out=dense_out,
        labels=labels,
        metric=metric,
        device=dev,
        splits=splits,
    )
    return ctx


def supports_set_constraint() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def constraint_of(trial: Any) -> list[float]:
    """The constraint values of a finished trial (<= 0: feasible). Trials without any
    (pruned before landing) count as feasible: they are never selected anyway."""
    values = dict(getattr(trial, "constraints", None) or {})
    if not values:
        con = (getattr(trial, "system_attrs", None) or {}).get("constraints")
        if con is not None:
            values = {str(i): c for i, c in enumerate(con)}
    if not values:
        con = trial.user_attrs.get(ATTR_CONSTRAINT)
        if con is not None:
            values = {str(i): c for i, c in enumerate(con if isinstance(con, list) else [con])}
    return [float(v) for v in values.values()]


def constraints_func(trial: Any) -> list[float]:
    """For Optuna < 5, where TPESampler reads constraints through this function."""
    con = trial.user_attrs.get(ATTR_CONSTRAINT)
    return [float(c) for c in con] if con is not None else [0.0]


def is_feasible(trial: Any) -> bool:
    return all(v <= 0.0 for v in constraint_of(trial))


def select_best(trials: Sequence[Any]) -> Any | None:
    """The best feasible COMPLETE trial with a finite value (highest value, lowest number
    on ties), or None."""
    import optuna

    candidates = [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
        and t.value is not None
        and math.isfinite(t.value)
        and is_feasible(t)
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda t: (t.value, -t.number))


def landing_gap(allocation: Any, target: float) -> int:
    """How many zeros the allocation is off ``round(target x prunable)``."""
    from ..sparse_model import round_half_up

    return abs(allocation.zeros - round_half_up(target * allocation.prunable))


def checkpoints(iters: int, shortest: int, every: int) -> dict[int, int]:
    """``{iteration: step}``: where a run of ``iters`` iterations reports to the pruner.

    A run of the shortest searched length reports every ``every`` iterations, at step =
    iteration; a longer run reports at the same fractions of its own length under the same
    step numbers. The pruner compares trials at equal steps, and under the cosine schedule
    the loss of runs of different lengths is comparable at equal fractions, not at equal
    iterations (at iteration 180 a 200-iteration run has nearly decayed, a 400-iteration
    run has not)."""
    slots = max(1, int(shortest) // int(every))
    return {math.ceil(j * int(iters) / slots): j * int(every) for j in range(1, slots + 1)}


class Objective:
    """The objective of one process: allocate with the trial's settings, report the
    reconstruction loss at checkpoints, record the constraint, return the validation
    metric."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.spec = ctx.spec
        self.space = ctx.spec.search_space

    def __call__(self, trial: Any) -> float:
        import optuna
        import torch

        from ..core import sparsify
        from ..sparse_model import apply_allocation

        ctx, spec = self.ctx, self.spec
        swept, score = self.space.suggest(trial)
        settings = {**spec.settings, **swept, "seed": int(spec.seed)}
        baseline = bool(trial.user_attrs.get(ATTR_BASELINE))
        last = int(swept["iters"])
        marks = checkpoints(last, self.space.range("iters")[0], int(spec.report_every))
        window: list[float] = []

        def callback(iteration: int, record: Mapping[str, float]) -> None:
            window.append(float(record["rec_loss"]))
            done = iteration + 1
            step = marks.get(done)
            if step is None:
                return
            mean = sum(window) / len(window)
            window.clear()
            if not math.isfinite(mean):
                raise optuna.TrialPruned(f"reconstruction loss is {mean} at iteration {done}")
            trial.report(-mean, step)
            # the last checkpoint is the end of the run: scoring it costs less than pruning
            if not baseline and done < last and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at iteration {done} of {last}")

        start = time.perf_counter()
        torch.manual_seed(int(spec.seed))
        allocation = sparsify(
            ctx.net,
            spec.target,
            method="fcpts",
            score=score,
            task=ctx.task,
            batches=ctx.calibration,
            selection=ctx.selection,
            settings=settings,
            input_norms=ctx.norms() if score == "wanda" else None,
            device=ctx.device,
            callback=callback,
        )
        gap = landing_gap(allocation, spec.target)
        constraint = gap / allocation.prunable
        trial.set_user_attr(ATTR_CONSTRAINT, [constraint])
        if supports_set_constraint():
            trial.set_constraint(CONSTRAINT, constraint)
        history = allocation.history
        trial.set_user_attr("zeros", allocation.zeros)
        trial.set_user_attr("prunable", allocation.prunable)
        trial.set_user_attr("achieved_sparsity", allocation.achieved)
        trial.set_user_attr("exact", gap == 0)
        if history:
            trial.set_user_attr("learned_sparsity", float(history[-1]["global_sparsity"]))
        trial.set_user_attr("settings", settings)
        trial.set_user_attr("score", score)
        sparse = apply_allocation(ctx.net, allocation)
        value = ctx.value(sparse)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
        return value if math.isfinite(value) else float("nan")
