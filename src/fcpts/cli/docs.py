"""Documentation generated from the declarations: the README's settings tables.

``python -m fcpts.cli.docs README.md`` (``make docs``) rewrites the block between the markers;
tests/test_settings.py fails when the README drifts from the declarations.
"""

from __future__ import annotations

from ..settings import declared, markdown_table

README_BEGIN = "<!-- settings: generated from the declarations by `make docs`; do not edit -->"
README_END = "<!-- settings: end -->"


def option_groups() -> list[tuple[str, type]]:
    """The steps' option groups in the order the README shows them."""
    from ..core import LayerSelection
    from ..sources import Sources
    from ..steps import options as o

    return [
        ("model and data", Sources),
        ("calibration", o.CalibrationOptions),
        ("allocation", o.AllocationOptions),
        ("layer selection", LayerSelection),
        ("checkpoints (allocate)", o.CheckpointOptions),
        ("evaluation", o.EvaluationOptions),
        ("approval gate", o.GateOptions),
        ("registry", o.RegistryOptions),
        ("tracking", o.TrackingOptions),
        ("cluster (compile, submit)", o.ClusterOptions),
        ("general", o.RunOptions),
    ]


def settings_reference() -> str:
    """The README's settings tables: the steps' options by group, then one table per
    method, every declared setting with its flag, default, sweep range and help
    (``--config`` keys and KFP parameters are the flag names with ``_``)."""
    from ..alloc.declared import method_settings

    parts = [
        f"Options, {title}:\n\n{markdown_table(s for s in declared(group) if s.opt.cli)}"
        for title, group in option_groups()
    ]
    by_method: dict[str, list] = {}
    for method, setting in method_settings():
        by_method.setdefault(method, []).append(setting)
    parts += [
        f"`--method {method}` settings:\n\n{markdown_table(settings)}"
        for method, settings in by_method.items()
    ]
    return "\n\n".join(parts)


def render_readme(text: str) -> str:
    """``text`` with the block between the settings markers regenerated."""
    head, begin, rest = text.partition(README_BEGIN)
    _, end, tail = rest.partition(README_END)
    if not begin or not end:
        raise ValueError("README.md lacks the settings markers")
    return f"{head}{README_BEGIN}\n{settings_reference()}\n{README_END}{tail}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(render_readme(path.read_text()))
