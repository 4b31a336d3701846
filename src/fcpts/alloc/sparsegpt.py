"""SparseGPT (Frantar & Alistarh, 2023): per-layer OBS masks and weight updates.

The per-layer sparsities come from a base allocation (``allocation``: the name of another
method, uniform by default, or explicit ``{layer: sparsity}``), landed on exact per-layer
counts (:mod:`fcpts.landing`). The layers are then pruned in model order, each with the
Hessian of its inputs in the already-pruned model (:mod:`fcpts.obs`), as SparseGPT does.
With ``blocks`` (module name patterns, e.g. ``encoder.layer.*``), the layers inside one
matched module share one pass: their Hessians come from that module's inputs after the
earlier modules were pruned (llm-compressor's ``sequential_targets``). Each pass stops
the forward once the layers it needs have seen their inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import landing, obs
from ..errors import UserError
from ..layers import LayerSpec, matches
from ..settings import Opt
from ..tasks import to_device
from .base import Allocator, Problem, Proposal, get_allocator


class _Captured(Exception):
    """Raised by a hook to end a forward pass once every needed input is captured."""


def _parse_nm(value: Any) -> tuple[int, int] | None:
    """``"2:4"`` (or ``[2, 4]``) as (2, 4); empty means unstructured."""
    if value in ("", None):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 (--set, config files) reads an unquoted 2:4 as the base-60 number 124
        value = f"{value // 60}:{value % 60}"
    if isinstance(value, (list, tuple)):
        value = ":".join(str(v) for v in value)
    n, sep, m = str(value).partition(":")
    try:
        pair = (int(n), int(m))
    except ValueError:
        pair = None
    if not sep or pair is None or not 0 < pair[0] < pair[1]:
        raise UserError(f"sparsegpt setting nm must look like '2:4' (n < m), got {value!r}")
    return pair


class SparseGPT(Allocator):
    name = "sparsegpt"

    @dataclass(frozen=True)
    class Config:
        allocation: Annotated[
            Any,
            Opt(
                "per-layer sparsities to prune to: another method's allocation (uniform, erk, "
                "owl, global, fcpts), or a mapping of layer name to sparsity (config file)",
                flag="sparsegpt-allocation",
                metavar="METHOD",
            ),
        ] = "uniform"
        damp: Annotated[
            float,
            Opt("Hessian dampening, a fraction of its mean diagonal", flag="sparsegpt-damp"),
        ] = 0.01
        blocksize: Annotated[
            int, Opt("columns per lazy-update block", flag="sparsegpt-blocksize", metavar="N")
        ] = 128
        nm: Annotated[
            Any,
            Opt(
                "N:M pattern (e.g. 2:4: at most 2 nonzeros in every 4 consecutive input "
                "weights; empty: unstructured)",
                flag="sparsegpt-nm",
                metavar="N:M",
            ),
        ] = ""
        blocks: Annotated[
            tuple[str, ...],
            Opt(
                "module-name patterns whose layers share one calibration pass (e.g. "
                "encoder.layer.*; empty: one pass per layer)",
                flag="sparsegpt-blocks",
                metavar="PATTERN",
            ),
        ] = ()

        def __post_init__(self) -> None:
            def need(ok: bool, msg: str) -> None:
                if not ok:
                    raise UserError(f"sparsegpt setting {msg}")

            alloc = self.allocation
            if isinstance(alloc, Mapping):
                for k, v in alloc.items():
                    need(
                        isinstance(v, (int, float)) and 0 <= v <= 1,
                        f"allocation gives layer {k!r} sparsity {v!r}: use numbers in [0, 1]",
                    )
                object.__setattr__(self, "allocation", {str(k): float(v) for k, v in alloc.items()})
            else:
                others = sorted(n for n in Allocator.registry if n != "sparsegpt")
                need(
                    alloc in others,
                    f"allocation must be one of {', '.join(others)} or a mapping "
                    f"{{layer: sparsity}}, got {alloc!r}",
                )
            need(
                self.damp >= 0,
                f"damp must be >= 0 (fraction of the mean Hessian diagonal, e.g. 0.01), got {self.damp}",
            )
            need(
                int(self.blocksize) == self.blocksize and self.blocksize >= 1,
                f"blocksize must be an integer >= 1 (e.g. 128), got {self.blocksize}",
            )
            nm = _parse_nm(self.nm)
            object.__setattr__(self, "nm", f"{nm[0]}:{nm[1]}" if nm else "")
            blocks = (self.blocks,) if isinstance(self.blocks, str) else tuple(self.blocks)
            object.__setattr__(self, "blocks", blocks)

    def propose(self, problem: Problem) -> Proposal:
        if problem.model is None or problem.task is None or not problem.batches:
            raise UserError(
                "the sparsegpt method needs the model, its task and calibration batches "
                "(its layer Hessians come from the calibration inputs)"
            )
        counts = self._counts(problem)
        cfg = self.config
        options = {"damp": cfg.damp, "blocksize": int(cfg.blocksize), "nm": _parse_nm(cfg.nm)}
        masks, weights = prune_in_order(problem, counts, options, cfg.blocks)
        sparsities = {layer.name: counts[layer.name] / layer.numel for layer in problem.layers}
        return Proposal(sparsities=sparsities, masks=masks, weights=weights)

    def _counts(self, problem: Problem) -> dict[str, int]:
        """Exact zeros per layer from the base allocation, landed on round(S* x N)."""
        layers = problem.layers
        existing = landing.zero_counts(problem.weights)
        landing.check_feasible(landing.check_target(problem.target), layers, existing)
        alloc = self.config.allocation
        nm = _parse_nm(self.config.nm)
        if nm is not None:
            sparsities = {
                layer.name: 0.0 if layer.keep_dense else nm[0] / nm[1] for layer in layers
            }
            proposal = Proposal(sparsities=sparsities)
        elif isinstance(alloc, Mapping):
            names = {layer.name for layer in layers}
            unknown = sorted(set(alloc) - names)
            missing = [layer.name for layer in layers if layer.name not in alloc]
            if unknown or missing:
                bad = (
                    f"names no prunable layer {unknown[0]!r}"
                    if unknown
                    else f"lacks layer {missing[0]!r}"
                )
                raise UserError(
                    f"sparsegpt setting allocation {bad}: give a sparsity for every prunable "
                    f"layer ({len(layers)} layers, e.g. {layers[0].name!r})"
                )
            proposal = Proposal(sparsities=dict(alloc))
        else:
            proposal = get_allocator(alloc).propose(problem)
        counts = landed_counts(problem, proposal)
        if nm is not None:
            for layer in layers:
                _check_nm(layer, counts[layer.name], nm)
        return counts


def landed_counts(problem: Problem, proposal: Proposal) -> dict[str, int]:
    """Exact zeros per layer of ``proposal``'s thresholds or sparsities, landed on
    round(S* x N) over the problem's weights (zeros already there count)."""
    existing = landing.zero_counts(problem.weights)
    k = landing.check_feasible(landing.check_target(problem.target), problem.layers, existing)
    zeros = {name: w == 0 for name, w in problem.weights.items()}
    values = {n: v for n, (v, _) in landing.sorted_scores(problem.scores, zeros).items()}
    if proposal.thresholds is not None:
        keys = landing.keys_from_thresholds(values, proposal.thresholds)
    else:
        keys = landing.keys_from_sparsities(values, proposal.sparsities)
    return landing.land_counts(keys, problem.layers, k, existing)


def prune_in_order(
    problem: Problem,
    counts: Mapping[str, int],
    options: Mapping[str, Any],
    blocks: Sequence[str] = (),
    batches: Sequence[Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SparseGPT on a copy of ``problem.model``: each layer loses exactly ``counts[name]``
    weights by OBS, in model order, with the Hessian of its inputs in the already-pruned
    model over ``batches`` (default: the problem's). Returns keep-masks for every layer
    and the updated weights of the pruned ones (on the CPU)."""
    model = copy.deepcopy(problem.model).to(problem.device).eval()
    batches = [to_device(b, problem.device) for b in (batches or problem.batches)]
    todo = [layer for layer in problem.layers if counts[layer.name] > 0]
    masks, weights = {}, {}
    if todo:
        calls = _calls_per_batch(model, todo, batches[0], problem.task)
        groups = _passes(model, todo, blocks)
    else:
        groups = []
    bar = tqdm(
        total=len(todo),
        desc=f"sparsegpt {problem.target:.0%}",
        disable=not problem.progress,
        leave=False,
    )
    for group in groups:
        hessians = _hessians(model, group, batches, problem.task, calls)
        for layer in group:
            weight = model.get_submodule(layer.name).weight
            if options.get("nm") is not None:
                _check_nm(layer, counts[layer.name], options["nm"])
            with torch.no_grad():
                new, keep = obs.prune_weight(
                    layer, weight, hessians[layer.name], counts[layer.name], **options
                )
                weight.copy_(new)
            masks[layer.name] = keep.cpu()
            weights[layer.name] = new.detach().cpu()
            bar.update(1)
    bar.close()
    for layer in problem.layers:
        masks.setdefault(layer.name, torch.ones(layer.shape, dtype=torch.bool))
    return masks, weights


def _check_nm(layer: LayerSpec, zeros: int, nm: tuple[int, int]) -> None:
    n, m = nm
    groups, rows, cols = obs.matrix_shape(layer)
    if cols % m or zeros not in (0, groups * rows * (cols // m) * n):
        raise UserError(
            f"sparsegpt with nm={n}:{m}: layer {layer.name!r} ({cols} inputs per output) cannot "
            f"hold exactly {zeros} zeros in that pattern; with {n}:{m} the target must be "
            f"{n / m} over layers whose input width divides by {m} (exclude or keep the others "
            "dense and adjust the target)"
        )


def _passes(model: nn.Module, layers: list[LayerSpec], blocks: Sequence[str]) -> list[list]:
    """Consecutive groups of layers that share one pass: one layer each, or the layers
    inside one module matched by ``blocks``."""
    if not blocks:
        return [[layer] for layer in layers]
    units = [n for n, _ in model.named_modules() if n and any(matches(n, p) for p in blocks)]
    if not units:
        raise UserError(f"sparsegpt setting blocks {list(blocks)} matches no module of the model")
    groups: list[list[LayerSpec]] = []
    last = None
    for layer in layers:
        unit = next((u for u in units if layer.name.startswith(u + ".")), layer.name)
        if groups and unit == last:
            groups[-1].append(layer)
        else:
            groups.append([layer])
        last = unit
    return groups


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


@torch.no_grad()
def _calls_per_batch(model: nn.Module, layers: list[LayerSpec], batch: Any, task) -> dict:
    """How often each layer runs in one forward pass (0: not on the forward path)."""
    calls = {layer.name: 0 for layer in layers}
    handles = []
    for layer in layers:

        def hook(_m, _args, _kwargs, name=layer.name):
            calls[name] += 1

        module = model.get_submodule(layer.name)
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        task.run(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, c in calls.items() if c == 0]
    if missing:
        raise UserError(
            f"layers {missing[:3]} saw no input during calibration: they are not on the "
            "forward path; exclude them"
        )
    return calls


@torch.no_grad()
def _hessians(
    model: nn.Module, group: list[LayerSpec], batches: list, task, calls: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Per layer of ``group``: its (groups, d, d) Hessian over all calibration batches."""
    sums: dict[str, torch.Tensor | None] = {layer.name: None for layer in group}
    samples = {layer.name: 0 for layer in group}
    seen = {layer.name: 0 for layer in group}
    handles = []
    for layer in group:
        module = model.get_submodule(layer.name)

        def hook(mod, args, kwargs, layer=layer):
            x = obs.layer_inputs(layer, mod, _first_input(args, kwargs))
            sums[layer.name], n = obs.accumulate(sums[layer.name], x)
            samples[layer.name] += n
            seen[layer.name] += 1
            if all(seen[n] >= calls[n] for n in seen):
                raise _Captured

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for batch in batches:
            for name in seen:
                seen[name] = 0
            try:
                task.run(model, batch)
            except _Captured:
                pass
    finally:
        for h in handles:
            h.remove()
    return {name: obs.hessian(sums[name], samples[name]) for name in sums}
