"""Real English prose that ships with Python: sentences from standard-library docstrings.

Deterministic for a given Python version: modules are read in a fixed order, sentences
are deduplicated and shuffled by a hash, so splits taken by position never overlap.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import warnings

MODULES = (
    "argparse",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fileinput",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "lzma",
    "mailbox",
    "mimetypes",
    "multiprocessing",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pkgutil",
    "platform",
    "poplib",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "socketserver",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.dom.minidom",
    "zipfile",
    "zoneinfo",
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORD = re.compile(r"[A-Za-z]+")


def _docstrings(module) -> list[str]:
    docs = [inspect.getdoc(module) or ""]
    for _, obj in sorted(vars(module).items()):
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for _, member in sorted(vars(obj).items()):
                    if inspect.isfunction(member):
                        docs.append(inspect.getdoc(member) or "")
    return docs


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 8 <= len(words) <= 40:
        return False
    alpha = sum(len(w) for w in _WORD.findall(sentence))
    if alpha < 0.75 * len(sentence.replace(" ", "")):
        return False
    return not any(tok in sentence for tok in (">>>", "::", "==", "->", "__", "{", "}"))


def sentences() -> list[str]:
    """All prose sentences, deduplicated, in a fixed pseudo-random order."""
    seen: set[str] = set()
    for name in MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated aliases warn when their doc is read
            try:
                module = importlib.import_module(name)
            except Exception:  # a module missing from this Python build is simply skipped
                continue
            docs = _docstrings(module)
        for doc in docs:
            for paragraph in doc.split("\n\n"):
                text = " ".join(paragraph.split())
                for s in _SENTENCE.split(text):
                    s = s.strip()
                    if _is_prose(s):
                        seen.add(s)
    return sorted(seen, key=lambda s: hashlib.sha256(s.encode()).hexdigest())


SPLITS = ("calibration", "validation", "evaluation")


def split(corpus: list[str], name: str, n: int, seed: int = 0) -> list[str]:
    """Disjoint splits: calibration from the front, evaluation from the back, validation between."""
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    rng_order = sorted(
        range(len(corpus)), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest()
    )
    third = len(corpus) // 3
    ranges = {
        "calibration": rng_order[:third],
        "validation": rng_order[third : 2 * third],
        "evaluation": rng_order[2 * third :],
    }
    chosen = ranges[name]
    if n > len(chosen):
        raise ValueError(
            f"the {name} split has {len(chosen)} sentences, fewer than the {n} asked for"
        )
    return [corpus[i] for i in chosen[:n]]
