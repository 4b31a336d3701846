"""Sources: labels that fit the model, the task --task auto infers (and why), and the
package's imports (one direction, no private names across modules)."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from fcpts.errors import UserError
from fcpts.sources import Sources, choose_task, resolve_data, resolve_model
from fcpts.steps import calibrate, evaluate

SRC = Path(__file__).resolve().parents[1] / "src"
CNN = "fcpts.demos.digits:DigitsCNN"


def _digits_npz(path, *, labels=True, bad=None):
    """60 digits (x, and y unless labels=False); ``bad`` replaces the label of the last
    sample, which the seeded thirds put in the evaluation or validation split, not in the
    first calibration batch."""
    from fcpts.demos.digits import data

    x, y = data()
    x, y = x[:60].numpy(), y[:60].numpy().copy()
    if bad is not None:
        y[-1] = bad
    np.savez(path, **({"x": x, "y": y} if labels else {"x": x}))
    return str(path)


@pytest.mark.parametrize(
    "label, message", [(57, "label 57 in .* is out of range"), (-3, "label -3 in .* is negative")]
)
def test_labels_outside_the_models_classes_are_refused(tmp_path, label, message):
    data = _digits_npz(tmp_path / "bad.npz", bad=label)
    with pytest.raises(UserError, match=message + ".*10 outputs") as err:
        calibrate(Sources(model="demo:digits-cnn", data=data), tmp_path / "cal", samples=8)
    assert "bad.npz" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "cal").exists()


@pytest.mark.parametrize("label", [57, -3])
def test_evaluate_refuses_labels_outside_the_models_classes(digits_sparse, tmp_path, label):
    data = _digits_npz(tmp_path / "bad.npz", bad=label)
    with pytest.raises(UserError, match=f"label {label} in .*bad.npz"):
        evaluate(
            Sources(model="demo:digits-cnn", data=data),
            digits_sparse.path,
            tmp_path / "eval",
            samples=20,
            latency_seconds=0.01,
        )
    assert not (tmp_path / "eval").exists()


def test_unlabelled_data_for_a_cnn_classifier_is_a_classifier_task(tmp_path):
    data = _digits_npz(tmp_path / "x.npz", labels=False)
    cal = calibrate(Sources(model=CNN, data=data), tmp_path / "cal", samples=10, batch_size=5)
    info = json.loads((cal.path / "calibration.json").read_text())
    assert info["task"] == "classifier"
    assert "(batch, 10) output" in info["task_reason"]
    assert "--task regression" in info["task_reason"]


def test_a_given_task_is_kept_and_said_so(tmp_path):
    data = _digits_npz(tmp_path / "x.npz", labels=False)
    cal = calibrate(Sources(model=CNN, data=data, task="regression"), tmp_path / "cal", samples=10)
    assert (
        cal.info["task"] == "regression" and cal.info["task_reason"] == "given: --task regression"
    )
    labelled = _digits_npz(tmp_path / "xy.npz")
    model = resolve_model(CNN)
    choice = choose_task("auto", model, resolve_data(Sources(CNN, labelled), model))
    assert choice.task.kind == "classifier" and "has class labels" in choice.reason


BUILDERS = """
from torch import nn


def scalar():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 1))


def sequence():
    return nn.Sequential(nn.Flatten(2), nn.Conv1d(1, 4, 3, padding=1))


def integers():
    class Argmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

        def forward(self, x):
            return self.head(x).argmax(-1, keepdim=True).expand(-1, 10)

    return Argmax()
"""


@pytest.mark.parametrize(
    "builder, shape", [("scalar", "(batch, 1)"), ("sequence", "(batch, 4, 64)"), ("integers", "")]
)
def test_other_outputs_stay_regression(tmp_path, builder, shape):
    (tmp_path / "builders.py").write_text(BUILDERS)
    model = resolve_model(f"{tmp_path / 'builders.py'}:{builder}")
    data = resolve_data(Sources(model.source, _digits_npz(tmp_path / "x.npz", labels=False)), model)
    choice = choose_task("auto", model, data)
    assert type(choice.task).__name__ == "Task" and choice.task.kind == "regression"
    assert shape in choice.reason and "relative MSE" in choice.reason


def test_unfitting_data_fails_while_choosing_the_task(tmp_path):
    rgb = tmp_path / "rgb.npy"
    np.save(rgb, np.zeros((30, 3, 8, 8), dtype=np.float32))
    model = resolve_model(CNN)
    with pytest.raises(UserError, match="does not fit the model"):
        choose_task("auto", model, resolve_data(Sources(CNN, str(rgb)), model))


def test_the_text_demo_lends_its_tokenizer_to_user_text(tmp_path):
    model = resolve_model("demo:minilm")
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(f"sentence number {i} of the test." for i in range(12)))
    batches = resolve_data(Sources("demo:minilm", str(text)), model).split("calibration", 4, 2)
    assert model.tokenizer is not None
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2]


# --------------------------------------------------------------------------- imports


def _imports(path: Path):
    """(module, names) of every import in ``path`` (function-level ones too), with
    relative imports made absolute."""
    module = ".".join(path.relative_to(SRC).with_suffix("").parts)
    if module.endswith(".__init__"):
        module = module.removesuffix(".__init__")
        base = module.split(".")
    else:
        base = module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(parts + ([node.module] if node.module else []))
            yield target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def _modules(package: str):
    folder = SRC.joinpath(*package.split("."))
    files = folder.rglob("*.py") if folder.is_dir() else [folder.with_suffix(".py")]
    return {
        ".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
        for p in files
    }


def _graph(modules):
    """Which of ``modules`` each of them imports."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target, names in _imports(path):
            submodules = {f"{target}.{n}" for n in names} & set(modules)
            targets |= submodules or ({target} & set(modules))
        graph[name] = targets - {name}
    return graph


def _cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    done = set()

    def visit(name, path):
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        for target in sorted(graph[name]):
            found = visit(target, [*path, name])
            if found:
                return found
        done.add(name)
        return None

    return next(filter(None, (visit(name, []) for name in sorted(graph))), None)


def test_sources_and_demos_import_one_way():
    graph = _graph({**_modules("fcpts.sources"), **_modules("fcpts.demos")})
    assert "fcpts.demos.digits" in graph["fcpts.demos.registry"]
    assert _cycle(graph) is None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_private_name_of_sources_or_demos_is_imported_elsewhere():
    owned = set(_modules("fcpts.sources")) | set(_modules("fcpts.demos"))
    leaks = []
    for path in SRC.rglob("*.py"):
        for target, names in _imports(path):
            if target in owned:
                leaks += [
                    f"{path.relative_to(SRC)}: {target}.{n}" for n in names if n.startswith("_")
                ]
    assert not leaks
