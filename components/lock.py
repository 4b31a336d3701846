"""Pin the image's runtime dependencies: ``python -m components.lock`` (``make lock``).

Walks the requirements of the installed fcpts with the extras the image installs
(``pipeline``, ``demo``) plus the study database's driver, through every dependency's own
requirements (markers evaluated for this interpreter: Python 3.11 on Linux, as in the
image), and writes each distribution as installed here, ``name==version``, to

* ``components/requirements.lock``: torch's CPU build (``+cpu``, from PyTorch's CPU index);
* ``components/requirements-cuda.lock``: the same pins with torch's default Linux build
  from PyPI, which is the CUDA one (its ``nvidia-*`` dependencies are pinned exactly by
  torch's own metadata).

The Dockerfile installs one of them (``VARIANT=cpu`` or ``cuda``), then fcpts itself with
``--no-deps``, so an image built twice from one lock has the same packages.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
EXTRAS = ("pipeline", "demo")
# not an fcpts extra: the driver of the sweep's postgresql+psycopg2:// study storage
IMAGE_ONLY = ("psycopg2-binary",)
INDEX = {
    "cpu": "https://download.pytorch.org/whl/cpu",
    "cuda": None,  # PyPI's Linux torch wheel is the CUDA build
}
LOCKS = {"cpu": HERE / "requirements.lock", "cuda": HERE / "requirements-cuda.lock"}


def closure(
    root: str = "fcpts", extras: tuple[str, ...] = EXTRAS, wants: dict | None = None
) -> dict[str, str]:
    """Installed version of every distribution ``root[extras]`` needs here, by canonical
    name (``root`` itself left out); ``wants`` collects each requirement met on the way."""
    pins: dict[str, str] = {}
    todo = [(root, frozenset(extras))] + [(name, frozenset()) for name in IMAGE_ONLY]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        name, wanted = todo.pop()
        key = (canonicalize_name(name), wanted)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"lock: {name} is not installed in {sys.prefix}") from None
        if key[0] != canonicalize_name(root):
            pins[key[0]] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
                if wants is not None:
                    wants.setdefault(canonicalize_name(req.name), []).append(req)
    return pins


def render(pins: dict[str, str], variant: str) -> str:
    lines = [
        f"# The fcpts image's runtime dependencies ({variant}), pinned as installed in the",
        "# development environment. Regenerate with `make lock` (python -m components.lock).",
    ]
    if INDEX[variant]:
        lines.append(f"--extra-index-url {INDEX[variant]}")
    for name in sorted(pins):
        version = pins[name]
        if name == "torch":
            base = version.split("+", 1)[0]
            version = f"{base}+cpu" if variant == "cpu" else base
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def read_pins(path: Path) -> dict[str, str]:
    """The ``name==version`` lines of a lock file, by canonical name."""
    pins = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith(("#", "-")):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


def problems(path: Path, pins: dict[str, str], wants: dict[str, list]) -> list[str]:
    """Why the lock at ``path`` does not fit the requirements: a needed distribution it
    lacks, or a pin that a requirement excludes. Versions newer than the lock on the
    index are no problem (the image installs the lock, not the newest release)."""
    if not path.is_file():
        return [f"{path.name} is missing"]
    locked = read_pins(path)
    found = [f"{path.name} lacks {name}" for name in sorted(set(pins) - set(locked))]
    for name, reqs in sorted(wants.items()):
        version = locked.get(name, "").split("+", 1)[0]
        for req in reqs:
            if version and not req.specifier.contains(version, prereleases=True):
                found.append(f"{path.name} pins {name}=={version}, which {req} excludes")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m components.lock", description=__doc__)
    parser.add_argument(
        "--check",
        action="store_true",
        help="fail if a lock file lacks a needed distribution or pins a version a requirement excludes",
    )
    args = parser.parse_args(argv)
    wants: dict[str, list] = {}
    pins = closure(wants=wants)
    stale = []
    for variant, path in LOCKS.items():
        if args.check:
            stale += problems(path, pins, wants)
            continue
        path.write_text(render(pins, variant))
        print(f"wrote {path.relative_to(HERE.parent)}: {len(pins)} pinned distributions")
    if stale:
        print("lock: " + "; ".join(stale) + ": run `make lock`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
