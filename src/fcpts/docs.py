"""Documentation generated from the declarations: the README's settings tables.

``python -m fcpts.docs README.md`` (``make docs``) rewrites the block between the markers;
tests/test_settings.py fails when the README drifts from the declarations.
"""

from __future__ import annotations

from .settings import markdown_table

README_BEGIN = "<!-- settings: generated from the declarations by `make docs`; do not edit -->"
README_END = "<!-- settings: end -->"


def settings_reference() -> str:
    """The README's settings tables: one per method, every declared setting with its flag,
    default, sweep range and help (``--config`` keys are the flag names with ``_``)."""
    from .alloc.declared import method_settings

    by_method: dict[str, list] = {}
    for method, setting in method_settings():
        by_method.setdefault(method, []).append(setting)
    return "\n\n".join(
        f"`--method {method}`:\n\n{markdown_table(settings)}"
        for method, settings in by_method.items()
    )


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
