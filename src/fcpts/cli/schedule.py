"""``fcpts submit --schedule``: a KFP trigger, validated before anything is sent.

KFP takes a cron expression of six fields, seconds first (the robfig/cron format KFP
documents for ``create_recurring_run``), one of the descriptors ``@hourly``/``@daily``/
``@midnight``/``@weekly``/``@monthly``/``@yearly``/``@annually`` (sent as the equivalent
six-field expression), or ``@every DURATION`` (Go durations such as ``90m`` or ``1h30m``;
sent as KFP's periodic trigger).

croniter validates each field; what croniter accepts but robfig/cron refuses (7 for
Sunday, ``L``, ``W``, ``#``, ``H``, a range that wraps) is refused here, so a schedule
that passes is one the KFP server takes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UserError

CRON_HELP = "KFP cron has six fields, seconds first: e.g. '0 0 3 * * *' for 03:00 daily"
DESCRIPTORS = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *",
    "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}
FIELDS = (  # name, low, high, names (for months and weekdays)
    ("seconds", 0, 59, ()),
    ("minutes", 0, 59, ()),
    ("hours", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, tuple("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())),
    ("day of week", 0, 6, tuple("SUN MON TUE WED THU FRI SAT".split())),
)
DAY_FIELDS = ("day of month", "day of week")
DURATION_PART = r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)"
UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


@dataclass(frozen=True)
class Schedule:
    """A KFP trigger: a six-field cron expression, or a period in seconds."""

    cron: str | None = None
    interval_second: int | None = None


def field_value(text: str, field: tuple) -> int:
    """A number or a name of one cron field, inside the field's range (ValueError else)."""
    name, low, high, names = field
    if text.upper() in names:
        return low + names.index(text.upper())
    if not text.isdigit():
        raise ValueError(f"{text!r} in the {name} field is not a number")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{value} in the {name} field is outside {low}-{high}")
    return value


def explain_field(text: str, field: tuple) -> None:
    """Why croniter refused one field, in robfig/cron's terms (a ValueError); also refuses
    what croniter takes but robfig/cron does not (values past the range, wrapping ranges)."""
    name = field[0]
    for item in text.split(","):
        base, slash, step = item.partition("/")
        if slash and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"step {step!r} in the {name} field must be a whole number >= 1")
        if base in ("*", "?"):
            if base == "?" and name not in DAY_FIELDS:
                raise ValueError(f"'?' is allowed only in the day fields, not in {name}")
            continue
        lo, dash, hi = base.partition("-")
        first = field_value(lo, field)
        if dash and first > field_value(hi, field):
            raise ValueError(f"range {base!r} in the {name} field runs backwards")


def check_cron(fields: list[str]) -> None:
    """Each of the six fields through croniter (alone, the others ``*``), then robfig/cron's
    stricter rules; a ValueError names the field and the mistake."""
    from croniter import croniter

    for i, (text, field) in enumerate(zip(fields, FIELDS, strict=True)):
        probe = ["*"] * len(FIELDS)
        probe[i] = text
        try:
            croniter.expand(" ".join(probe), second_at_beginning=True)
        except Exception as exc:  # croniter's CroniterError family, and its KeyErrors
            explain_field(text, field)
            raise ValueError(f"{text!r} in the {field[0]} field is not valid ({exc})") from None
        explain_field(text, field)


def duration_seconds(text: str) -> int:
    """A Go duration (``90m``, ``1h30m``, ``3600s``) as whole seconds, at least one."""
    if not re.fullmatch(rf"(?:{DURATION_PART})+", text):
        raise ValueError(f"{text!r} is not a duration such as 90m, 1h30m or 3600s")
    seconds = sum(float(n) * UNIT_SECONDS[u] for n, u in re.findall(DURATION_PART, text))
    if seconds < 1 or seconds != int(seconds):
        raise ValueError(f"{text!r} must be a whole number of seconds, at least 1s")
    return int(seconds)


def parse_schedule(text: str) -> Schedule:
    """A validated KFP schedule; a UserError explains the format on a mistake."""
    spec = " ".join(str(text).split())
    try:
        if not spec:
            raise ValueError("it is empty")
        if spec.lower() in DESCRIPTORS:
            return Schedule(cron=DESCRIPTORS[spec.lower()])
        if spec.lower().startswith("@every "):
            return Schedule(interval_second=duration_seconds(spec[len("@every ") :]))
        if spec.startswith("@"):
            raise ValueError(
                f"unknown descriptor {spec.split()[0]!r} (use {', '.join(DESCRIPTORS)} or @every 1h)"
            )
        fields = spec.split(" ")
        if len(fields) != len(FIELDS):
            hint = " (a standard 5-field cron lacks the seconds: put 0 in front)"
            raise ValueError(f"it has {len(fields)} fields{hint if len(fields) == 5 else ''}")
        check_cron(fields)
    except ValueError as exc:
        raise UserError(
            f"--schedule {text!r}: {exc}; {CRON_HELP}, or @daily, or @every 6h"
        ) from None
    return Schedule(cron=spec)
