"""Charts, reports and the readable summaries the CLI prints.

Everything here reads the plain dictionaries the steps write (``manifest.json``,
``metrics.json``, ``decision.json``), so a report can be rebuilt from the files alone.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any

from .charts import chart as chart
from .links import registration_rows, tracking_line


def densest_layers(layers: Sequence[Mapping[str, Any]], k: int = 3) -> list[Mapping[str, Any]]:
    """The ``k`` layers kept densest (lowest sparsity; larger layers first on ties)."""
    return sorted(layers, key=lambda layer: (layer["sparsity"], -layer["numel"]))[:k]


def sparsest_layers(layers: Sequence[Mapping[str, Any]], k: int = 3) -> list[Mapping[str, Any]]:
    """The ``k`` layers pruned hardest (highest sparsity; larger layers first on ties)."""
    return sorted(layers, key=lambda layer: (-layer["sparsity"], -layer["numel"]))[:k]


def empty_layers(layers: Sequence[Mapping[str, Any]]) -> list[str]:
    """The layers pruned to 100% (every weight zero)."""
    return [layer["name"] for layer in layers if layer["zeros"] == layer["numel"]]


def empty_warning(layers: Sequence[Mapping[str, Any]]) -> str | None:
    """A warning line when any layer is pruned to 100%, else None."""
    names = empty_layers(layers)
    if not names:
        return None
    shown = ", ".join(n or "(root)" for n in names[:5]) + (", ..." if len(names) > 5 else "")
    return (
        f"WARNING: {len(names)} layer(s) pruned to 100% (every weight zero): {shown}; "
        "nothing passes through them (a dead model if one is on the only path): keep them "
        "dense (--keep-dense) or cap their sparsity (--max-sparsity, --bounds)"
    )


# ------------------------------------------------------------------------- formatting


def mb(n: int | float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def _f(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def quality_line(metrics: Mapping[str, Any]) -> str:
    name = metrics["metric"]
    better = "higher" if metrics.get("higher_is_better", True) else "lower"
    line = (
        f"{name} {_f(metrics['sparse'])} vs dense {_f(metrics['dense'])} "
        f"(drop {_f(metrics.get('drop'))}, {better} is better)"
    )
    extra = [
        f"{k} {_f(v['sparse'])} vs {_f(v['dense'])}"
        for k, v in metrics.get("secondary", {}).items()
    ]
    return line + ("; " + "; ".join(extra) if extra else "")


def sparsity_line(
    target: float, achieved: float, zeros: int, prunable: int, exact: bool | None
) -> str:
    tail = (
        ""
        if exact is None
        else ("  (exact: round(target x N) zeros)" if exact else "  (NOT exact)")
    )
    return f"target {target:g}, achieved {achieved:.6f} ({zeros:,} of {prunable:,} prunable weights are zero){tail}"


def structure_line(s: Mapping[str, Any]) -> str:
    """What a structured allocation removed (the manifest's ``structure`` section)."""
    if s.get("structure") == "units":
        w = s["whole_model"][s["budget"]]
        return (
            f"units, budget {s['budget']}: removed {s['achieved']:.4f} of the removable cost "
            f"(target {s['target']:g}; one step of {s.get('unit_multiple', 1)} unit(s) is at most "
            f"{s['granularity']:.4f}); whole model "
            f"{w['dense']:,} -> {w['shrunk']:,} ({w['dense'] / max(w['shrunk'], 1):.2f}x less)"
            + (f"; reconstruction {s['reconstruction']}" if s.get("reconstruction") else "")
        )
    return (
        f"{s['structure']} on {len(s['nm_layers'])} layers, {len(s['dense_layers'])} dense; "
        f"achieved {s['achieved']:.6f} (target {s['target']:g}, whole layers)"
    )


def layers_line(layers: Sequence[Mapping[str, Any]], k: int = 3, emptiest: bool = False) -> str:
    """The ``k`` densest layers (or with ``emptiest`` the sparsest) and their sparsities."""
    pick = sparsest_layers if emptiest else densest_layers
    return ", ".join(f"{layer['name']} {layer['sparsity']:.3f}" for layer in pick(layers, k))


def size_line(size: Mapping[str, Any]) -> str:
    return (
        f"dense {mb(size['dense_bytes'])} (safetensors) -> sparse {mb(size['sparse_bytes'])} "
        f"({size['format']}), {size['ratio']:.2f}x smaller"
    )


def latency_line(latency: Mapping[str, Any]) -> str:
    return (
        f"dense {latency['dense_ms']:.1f} ms, sparse {latency['sparse_ms']:.1f} ms per batch of "
        f"{latency['batch_size']} on {latency['device']} ({latency['threads']} threads, {latency['kernels']})"
    )


SLOWER_NOISE = 1.05  # a sparse model up to 5% slower is within the timing noise


def slower_warning(latency: Mapping[str, Any]) -> str | None:
    """A plain line when the sparse model runs slower than the dense one, else None."""
    dense, sparse = latency.get("dense_ms"), latency.get("sparse_ms")
    if not isinstance(dense, (int, float)) or not isinstance(sparse, (int, float)) or dense <= 0:
        return None
    ratio = sparse / dense
    if ratio <= 1.0:
        return None
    if ratio <= SLOWER_NOISE:
        return (
            f"the sparse model is no faster than dense ({ratio:.2f}x the time, within timing noise)"
        )
    return (
        f"WARNING: the sparse model is SLOWER than dense: {ratio:.2f}x the time per batch "
        f"({sparse:.1f} ms vs {dense:.1f} ms). Its zeros are still multiplied by dense kernels; "
        "the gain is size on disk unless a sparse runtime or structured pruning serves it"
    )


def decision_line(decision: Mapping[str, Any]) -> str:
    verdict = "APPROVED" if decision["approved"] else "REJECTED"
    return f"{verdict} (tolerance {decision.get('tolerance')}): " + "; ".join(decision["reasons"])


# ------------------------------------------------------------------------ the report


def _sections(metrics: Mapping[str, Any], manifest: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The report as (kind, content) blocks, rendered to Markdown or HTML."""
    ev = metrics.get("evaluation", {})
    warning = empty_warning(metrics["layers"])
    blocks: list[tuple[str, Any]] = [
        ("h1", f"fcpts evaluation: {metrics.get('model', {}).get('source', '')}"),
        *([("p", warning)] if warning else []),
        *([("p", slow)] if (slow := slower_warning(metrics["latency"])) else []),
        (
            "table",
            [
                ["", "dense", "sparse"],
                [metrics["metric"], _f(metrics["dense"]), _f(metrics["sparse"])],
                *[
                    [k, _f(v["dense"]), _f(v["sparse"])]
                    for k, v in metrics.get("secondary", {}).items()
                ],
                [
                    "size on disk",
                    mb(metrics["size"]["dense_bytes"]),
                    mb(metrics["size"]["sparse_bytes"]),
                ],
                [
                    "CPU latency / batch",
                    f"{metrics['latency']['dense_ms']:.1f} ms",
                    f"{metrics['latency']['sparse_ms']:.1f} ms",
                ],
            ],
        ),
        (
            "list",
            [
                "Sparsity: "
                + sparsity_line(
                    metrics["target"],
                    metrics["achieved_sparsity"],
                    metrics["zeros"],
                    metrics["prunable"],
                    metrics.get("exact"),
                )
                + "; counted from the saved weights.",
                f"Method {manifest.get('method')}, score {manifest.get('score')}, "
                f"task {metrics.get('task') or manifest.get('task')}"
                + (
                    f", {manifest.get('iterations')} iterations"
                    if manifest.get("iterations")
                    else ""
                )
                + f"; allocation took {manifest.get('seconds', 0):.1f} s.",
                f"Quality: {quality_line(metrics)}.",
                *([tracking_line(metrics["tracking"])] if metrics.get("tracking") else []),
                f"Evaluation data: {ev.get('samples')} samples of {ev.get('data')} ({ev.get('split')} split), "
                f"{ev.get('overlap_with_calibration')} shared with the {ev.get('calibration_samples')} calibration samples.",
                f"Size: {size_line(metrics['size'])}.",
                f"Latency: {latency_line(metrics['latency'])}. Unstructured zeros need a sparse kernel to run faster.",
                f"Kept densest: {layers_line(metrics['layers'], 5)}.",
                f"Pruned hardest: {layers_line(metrics['layers'], 5, emptiest=True)}.",
            ],
        ),
    ]
    if metrics.get("gate"):
        blocks.append(("p", "Gate: " + decision_line(metrics["gate"])))
    blocks.append(("image", "allocation.png"))
    blocks.append(
        (
            "table",
            [["layer", "weights", "zeros", "sparsity"]]
            + [
                [
                    layer["name"],
                    f"{layer['numel']:,}",
                    f"{layer['zeros']:,}",
                    f"{layer['sparsity']:.4f}",
                ]
                for layer in metrics["layers"]
            ],
        )
    )
    return blocks


def render_markdown(
    metrics: Mapping[str, Any], manifest: Mapping[str, Any], chart_name: str = "allocation.png"
) -> str:
    lines: list[str] = []
    for kind, content in _sections(metrics, manifest):
        if kind == "h1":
            lines += [f"# {content}", ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "list":
            lines += [f"- {item}" for item in content] + [""]
        elif kind == "image":
            lines += [f"![per-layer sparsity]({chart_name})", ""]
        elif kind == "table":
            head, *rows = content
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
    return "\n".join(lines)


def render_html(
    metrics: Mapping[str, Any], manifest: Mapping[str, Any], chart_png: bytes | None = None
) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>fcpts evaluation</title>',
        "<style>body{font-family:sans-serif;max-width:60em;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
        "td:first-child,th:first-child{text-align:left}</style></head><body>",
    ]
    for kind, content in _sections(metrics, manifest):
        if kind == "h1":
            parts.append(f"<h1>{e(content)}</h1>")
        elif kind == "p":
            parts.append(f"<p>{e(content)}</p>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in content) + "</ul>")
        elif kind == "image" and chart_png:
            data = base64.b64encode(chart_png).decode()
            parts.append(
                f'<p><img alt="per-layer sparsity" src="data:image/png;base64,{data}"></p>'
            )
        elif kind == "table":
            head, *rows = content
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------ summaries


def _layer_rows(layers: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    rows = [
        ("fullest", layers_line(layers) + "  (kept densest)"),
        ("emptiest", layers_line(layers, emptiest=True) + "  (pruned hardest)"),
    ]
    warning = empty_warning(layers)
    return rows + ([("warning", warning)] if warning else [])


def summary(
    manifest: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    decision: Mapping[str, Any] | None = None,
    timings: Sequence[tuple[str, float | None, str]] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The readable end-of-command summary: the method and the task, target vs achieved,
    quality vs dense, the layers kept densest and pruned hardest (a warning line for any
    pruned to 100%), and what else is known."""
    rows: list[tuple[str, str]] = []
    if manifest is not None:
        how = f"{manifest.get('method')} (score {manifest.get('score')}"
        if manifest.get("iterations"):
            how += f", {manifest['iterations']} iterations"
        how += f", {manifest.get('seconds', 0):.1f} s)"
        rows.append(("model", str(manifest.get("sources", {}).get("model", ""))))
        rows.append(("method", how))
        if manifest.get("structure"):
            rows.append(("structure", structure_line(manifest["structure"])))
    if metrics is not None:
        rows.append(
            (
                "sparsity",
                sparsity_line(
                    metrics["target"],
                    metrics["achieved_sparsity"],
                    metrics["zeros"],
                    metrics["prunable"],
                    metrics.get("exact"),
                ),
            )
        )
        rows.append(("quality", quality_line(metrics)))
        ev = metrics.get("evaluation", {})
        rows.append(
            (
                "evaluated",
                f"{ev.get('samples')} held-out samples of {ev.get('data')} ({ev.get('overlap_with_calibration')} shared with calibration)",
            )
        )
        rows += _layer_rows(metrics["layers"])
        rows.append(("size", size_line(metrics["size"])))
        rows.append(("latency", latency_line(metrics["latency"])))
        slower = slower_warning(metrics["latency"])
        if slower:
            rows.append(("speed", slower))
    elif manifest is not None:
        rows.append(
            (
                "sparsity",
                sparsity_line(
                    manifest["target"],
                    manifest["achieved_sparsity"],
                    manifest["zeros"],
                    manifest["prunable"],
                    manifest.get("exact"),
                ),
            )
        )
        rows += _layer_rows(manifest["layers"])
    if decision is not None:
        rows.append(("gate", decision_line(decision)))
        rows += registration_rows(decision.get("registration") or {})
        if decision.get("command"):
            rows.append(("reproduce", str(decision["command"])))
    if timings:
        rows.append(
            ("wall time", "per step: a fresh process each (imports, model loading, the work)")
        )
        total = None
        for name, seconds, note in timings:
            if name == "total":
                total = seconds
                continue
            shown = "     -  " if seconds is None else f"{seconds:6.1f} s"
            rows.append((f"  {name}", shown + (f"  {note}" if note else "")))
        if total is not None:
            rows.append(("  total", f"{total:6.1f} s"))
    said = next((d for d in (metrics, manifest, decision) if d and d.get("task")), None)
    if said is not None:
        reason = f" ({said['task_reason']})" if said.get("task_reason") else ""
        rows.insert(2 if manifest is not None else 0, ("task", f"{said['task']}{reason}"))
    width = max((len(k) for k, _ in rows), default=0)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
