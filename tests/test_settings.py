"""Settings are declared once (fcpts.settings) and everything else is derived from them.

The walk test takes every declared setting of every method through each place a user
meets it: its flag on `fcpts allocate` and `fcpts run`, its `--config` key, the sweep's
search space (when declared with a range), the MLflow params and the README's table.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Annotated, Literal

import optuna
import pytest

from fcpts.alloc import get_allocator
from fcpts.alloc.declared import method_settings, param_values
from fcpts.cli import build_parser
from fcpts.cli.common import allocator_settings
from fcpts.cli.config import apply_config
from fcpts.cli.docs import render_readme
from fcpts.errors import UserError
from fcpts.settings import Declared, Opt, Search, check_value, declared, markdown_table
from fcpts.sweep.space import SearchSpace, searched_settings

ROOT = Path(__file__).resolve().parents[1]


def sample(setting: Declared) -> tuple[list[str], object]:
    """Command-line words that give the setting a value other than its default, and that
    value as the allocator receives it."""
    if setting.type is bool:
        flag = setting.flag if not setting.default else "--no-" + setting.flag[2:]
        return [flag], not setting.default
    if setting.opt.choices:
        value = next(c for c in setting.opt.choices if c != setting.default)
        return [setting.flag, str(value)], value
    if setting.type is int:
        return [setting.flag, str(setting.default + 3)], setting.default + 3
    if setting.type is float:
        return [setting.flag, str(setting.default * 1.5 + 0.25)], setting.default * 1.5 + 0.25
    if setting.type is tuple:
        return [setting.flag, "encoder.*"], ("encoder.*",)
    if setting.dest in FREE_FORM:  # settings of a free-form type: a value the method takes
        return [setting.flag, FREE_FORM[setting.dest]], FREE_FORM[setting.dest]
    raise AssertionError(f"no sample for {setting}")


FREE_FORM = {"sparsegpt_allocation": "erk", "sparsegpt_nm": "2:4"}


SETTINGS = method_settings()
IDS = [f"{method}.{s.name}" for method, s in SETTINGS]


@pytest.mark.parametrize(("method", "setting"), SETTINGS, ids=IDS)
@pytest.mark.parametrize("command", ["allocate", "run"])
def test_every_setting_has_a_flag_that_reaches_the_allocator(command, method, setting):
    words, value = sample(setting)
    args = build_parser().parse_args([command, "--method", method, *words])
    apply_config(args, build_parser())
    settings = allocator_settings(args)
    assert settings == {setting.name: value}
    get_allocator(method, **settings)  # the allocator accepts what the flag produced


@pytest.mark.parametrize(("method", "setting"), SETTINGS, ids=IDS)
def test_every_setting_has_a_config_key(method, setting, tmp_path):
    _, value = sample(setting)
    shown = list(value) if isinstance(value, tuple) else value
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump({"method": method, setting.dest: shown}))
    parser = build_parser()
    args = parser.parse_args(["allocate", "--config", str(config)])
    apply_config(args, parser)
    assert allocator_settings(args) == {setting.name: value}


@pytest.mark.parametrize(("method", "setting"), SETTINGS, ids=IDS)
def test_every_setting_is_an_mlflow_param_and_a_readme_row(method, setting):
    params = param_values(method, {setting.name: "X"})
    assert params[setting.dest] == "X"
    others = [o for o, _ in SETTINGS if o != method]
    if others:  # a run of another method logs the same name, empty
        assert param_values(others[0], {setting.name: "X"})[setting.dest] is None
    readme = (ROOT / "README.md").read_text()
    assert f"| `{setting.flag}` |" in readme


def test_a_flag_of_another_method_is_refused():
    args = build_parser().parse_args(["allocate", "--method", "fcpts", "--owl-m", "3"])
    with pytest.raises(UserError, match="--owl-m is a setting of --method owl"):
        allocator_settings(args)


def test_flags_and_params_are_unique_across_methods():
    dests = [s.dest for _, s in SETTINGS]
    assert len(dests) == len(set(dests))


def test_the_sweep_searches_exactly_the_settings_declared_with_a_range():
    from fcpts.alloc.fcpts import FCPTS

    ranged = [s.name for s in declared(FCPTS.Config) if s.opt.search is not None]
    assert list(searched_settings()) == ranged
    space = SearchSpace()
    assert set(space.bounds) == {*ranged, "score"}
    trial = optuna.trial.FixedTrial(
        {name: space.bounds[name][0] for name in ranged} | {"score": "wanda"}
    )
    settings, score = space.suggest(trial)
    assert set(settings) == set(ranged) and score == "wanda"
    get_allocator("fcpts", **settings)
    params, clipped = space.baseline()
    assert clipped == [] and all(
        params[s.name] == s.default for s in declared(FCPTS.Config) if s.name in ranged
    )


def test_readme_settings_tables_are_generated():
    readme = (ROOT / "README.md").read_text()
    assert render_readme(readme) == readme, "README.md is stale: run `make docs`"


# ---------------------------------------------------------------- the declaration toolkit


@dataclasses.dataclass(frozen=True)
class Toy:
    """Hand-checkable declarations: every kind of type the toolkit derives from."""

    rate: Annotated[float, Opt("a rate", search=Search(0.1, 1.0))] = 0.5
    steps: Annotated[int, Opt("steps", flag="n-steps")] = 3
    mode: Annotated[Literal["a", "b"], Opt("mode")] = "a"
    on: Annotated[bool, Opt("switch")] = True
    names: Annotated[tuple[str, ...], Opt("patterns")] = ()
    size: Annotated[int | None, Opt("optional size")] = None
    plain: int = 7  # no Opt: not a declared setting


def test_declared_reads_types_defaults_flags_and_choices():
    got = {s.name: s for s in declared(Toy)}
    assert list(got) == ["rate", "steps", "mode", "on", "names", "size"]
    assert (got["rate"].type, got["rate"].default, got["rate"].opt.search.high) == (float, 0.5, 1.0)
    assert (got["steps"].flag, got["steps"].dest) == ("--n-steps", "n_steps")
    assert got["mode"].opt.choices == ("a", "b") and got["mode"].type is str
    assert got["names"].type is tuple and got["size"].optional and got["size"].type is int


def test_declared_reads_function_signatures():
    def step(x, *, limit: Annotated[int, Opt("a limit")] = 4, other=None):
        return x

    (limit,) = declared(step)
    assert (limit.name, limit.type, limit.default) == ("limit", int, 4)


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("rate", 2, 2.0),
        ("steps", 4.0, 4),
        ("names", ["x"], ("x",)),
        ("size", None, None),
        ("mode", "b", "b"),
    ],
)
def test_check_value_converts(name, value, expected):
    setting = next(s for s in declared(Toy) if s.name == name)
    assert check_value(setting, value, name) == expected


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("rate", [1, 2], "rate must be a number, got \\[1, 2\\]"),
        ("rate", True, "must be a number"),
        ("steps", 2.5, "must be a whole number"),
        ("on", "yes", "must be true or false"),
        ("mode", "c", "must be one of a, b"),
        ("names", [1], "must be a list of strings"),
        ("rate", "x" * 500, "\\.\\.\\."),
    ],
)
def test_check_value_refuses_with_one_line(name, value, message):
    setting = next(s for s in declared(Toy) if s.name == name)
    with pytest.raises(UserError, match=message) as info:
        check_value(setting, value, name)
    assert len(str(info.value)) < 200


def test_markdown_table_rows():
    table = markdown_table(declared(Toy)).splitlines()
    assert table[2] == "| `--rate` | 0.5 | 0.1 to 1 (log) | a rate |"
    assert table[4] == "| `--mode` | a |  | mode (a, b) |"
    assert table[5] == "| `--on` | true |  | switch |"


def test_argparse_derivation_of_a_bool_gives_both_forms():
    from fcpts.cli.derive import argparse_kwargs

    parser = argparse.ArgumentParser()
    on = next(s for s in declared(Toy) if s.name == "on")
    parser.add_argument(on.flag, **argparse_kwargs(on))
    assert parser.parse_args(["--no-on"]).on is False
    assert parser.parse_args([]).on is None


# ------------------------------------------------------------------- the steps' options

COMMAND_GROUPS = {
    # command: the option groups whose every CLI-visible field it takes
    "calibrate": ("Sources", "CalibrationOptions", "LayerSelection", "TrackingOptions", "RunOptions"),
    "allocate": ("Sources", "CalibrationOptions", "AllocationOptions", "LayerSelection",
                 "CheckpointOptions", "TrackingOptions", "RunOptions"),
    "evaluate": ("Sources", "EvaluationOptions", "GateOptions", "TrackingOptions", "RunOptions"),
    "register": ("GateOptions", "RegistryOptions", "TrackingOptions"),
    "run": ("Sources", "CalibrationOptions", "AllocationOptions", "LayerSelection",
            "EvaluationOptions", "GateOptions", "RegistryOptions", "TrackingOptions", "RunOptions"),
}  # fmt: skip


def _groups():
    from fcpts.cli.docs import option_groups

    return {group.__name__: group for _, group in option_groups()}


def _option_cases():
    groups = _groups()
    return [
        (command, setting)
        for command, names in COMMAND_GROUPS.items()
        for name in names
        for setting in declared(groups[name])
        if setting.opt.cli
    ]


@pytest.mark.parametrize(
    ("command", "setting"), _option_cases(), ids=lambda v: getattr(v, "dest", v)
)
def test_every_step_option_has_its_flag_config_key_and_readme_row(command, setting, tmp_path):
    import yaml

    if setting.type is dict:
        words, value = [setting.flag, "x.*=0:0.5"], ["x.*=0:0.5"]
    elif setting.type is str and not setting.opt.choices:
        words, value = [setting.flag, "text"], "text"
    elif setting.type is int and setting.optional:
        words, value = [setting.flag, "7"], 7
    else:
        words, value = sample(setting)
    args = build_parser().parse_args([command, *words])
    got = getattr(args, setting.dest)
    assert (list(got) if isinstance(got, list) and setting.type is tuple else got) == (
        list(value) if isinstance(value, tuple) else value
    )
    config = tmp_path / "c.yaml"
    shown = list(value) if isinstance(value, tuple) else value
    config.write_text(yaml.safe_dump({setting.dest: shown}))
    parser = build_parser()
    from_file = parser.parse_args([command, "--config", str(config)])
    apply_config(from_file, parser)
    assert getattr(from_file, setting.dest) == got
    assert f"| `{setting.flag}` |" in (ROOT / "README.md").read_text()


def test_every_kfp_visible_step_option_is_a_parameter_of_its_components():
    from components.build import STEPS, component
    from fcpts.steps.options import PipelineOptions

    groups = set(_groups().values()) | {PipelineOptions}
    for name, step in STEPS.items():
        inputs = component(name).component_spec.inputs
        for item in step.groups:
            group, only = item if isinstance(item, tuple) else (item, None)
            assert group in groups | {
                __import__("fcpts.steps.options").steps.options.PipelineOptions
            }
            for setting in declared(group):
                if setting.opt.kfp and (only is None or setting.dest in only):
                    assert setting.dest in inputs, (name, setting.dest)


def test_the_allocate_steps_defaults_are_the_declared_ones():
    # the step function repeats the declared defaults in its signature (library callers
    # get the same model as the CLI and the components): they must not drift apart
    import inspect

    from fcpts.steps.allocate import allocate
    from fcpts.steps.options import AllocationOptions, CheckpointOptions
    from fcpts.structured import shrink_to

    pairs = ((allocate, (AllocationOptions, CheckpointOptions)), (shrink_to, (AllocationOptions,)))
    for fn, groups in pairs:
        params = inspect.signature(fn).parameters
        for setting in [s for group in groups for s in declared(group)]:
            param = params.get(setting.dest)
            if param is None or param.default is inspect.Parameter.empty:
                continue
            assert param.default == setting.default, (fn.__name__, setting.dest)
