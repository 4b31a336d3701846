"""Every row of the bad-input catalogue (tests/bad_inputs.py, docs/bad-inputs.md) through
the real CLI: the exit code, one error line that says what to fix, no traceback, no echoed
password, nothing that existed before changed; and the document agrees with the CLI."""

from pathlib import Path

import pytest
from bad_inputs import ROWS, document, fill_bucket, make_workspace, run_row, shown, snapshot

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("bad-inputs") / "ws"
    make_workspace(ws)
    return ws


@pytest.fixture(scope="module")
def documented():
    """The error message the document shows for each row id."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        number = cells[0].lstrip("| ")
        if len(cells) == 6 and number.isdigit():
            message = cells[5].removesuffix(" |").removeprefix("`` ").removesuffix(" ``")
            rows[int(number)] = message.replace("\\|", "|")
    return {row.id: rows.get(i) for i, row in enumerate(ROWS, 1)}


def test_catalogue_is_broad():
    assert len(ROWS) >= 25
    assert len({r.id for r in ROWS}) == len(ROWS)
    areas = {r.area for r in ROWS}
    for area in (
        "targets",
        "bounds",
        "model sources",
        "data sources",
        "shapes",
        "dtypes",
        "devices",
        "configs",
        "URIs",
        "credentials",
        "servers",
    ):
        assert area in areas, f"no row for {area}"


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_row(row, workspace, documented, request):
    s3_env = None
    if row.needs == "moto":
        moto = request.getfixturevalue("moto_server")
        fill_bucket(moto.client())
        s3_env = moto.env()
    before = snapshot(workspace)
    outcome = run_row(row, workspace, s3_env)

    assert outcome.code == row.code, outcome.stderr
    assert "Traceback" not in outcome.stderr
    errors = [line for line in outcome.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, outcome.stderr
    assert errors[0].startswith("fcpts"), errors[0]
    assert row.expect in errors[0], errors[0]
    if row.secret:
        assert row.secret not in outcome.stderr
    after = snapshot(workspace)
    assert {k: after.get(k) for k in before} == before, "a failed command changed existing files"
    assert documented[row.id] == shown(outcome.message, workspace), (
        "docs/bad-inputs.md is stale: run `.venv/bin/python tests/bad_inputs.py --write "
        "docs/bad-inputs.md`"
    )


def test_document_lists_every_row_in_order():
    text = DOC.read_text()
    assert f"{len(ROWS)} rows in" in text
    messages = {r.id: "x" for r in ROWS}
    header = document(ROWS, messages).split("| 1 |")[0]
    assert text.startswith(header)
