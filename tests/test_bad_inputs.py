"""The corpus of bad inputs (tests/bad_inputs/*.yaml, run by tests/bad_input_corpus.py): each
one exits 2 with exactly one `error: ...` line on stderr that names the culprit, nothing on
stdout, and no traceback anywhere; a pickle with code is refused without running it.

Every case runs in-process through Typer's CliRunner (the same `_Group.main` and exit path
as the console script); a sample also runs as a real `python -m xdt_cli` process and must
give the same exit code and message.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.bad_input_corpus import (
    TOP_LEVEL,
    Case,
    Result,
    cli_subcommands,
    load_cases,
    make_tiny_run,
    run_case,
)

CASES = load_cases()
BY_NAME = {c.name: c for c in CASES}
# One case per way out of the CLI (each process costs seconds of CPU importing torch): a
# click usage error, a ConfigError from the schema, a checkpoint refused for its pickled
# code (the marker file must not appear), and an OS error (a config path that is a loop).
SUBPROCESS_SAMPLE = (
    "top_level_unknown_command",
    "override_unknown_key",
    "resume_last_pt_pickle_with_code",
    "train_source_config_symlink_loop",
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished 4-step run, copied into the cases that need a run folder."""
    return make_tiny_run(tmp_path_factory.mktemp("bad-inputs") / "tiny")


def _explain(result: Result) -> str:
    return (
        f"{result.case} ({result.why}): {'; '.join(result.problems)}\n"
        f"argv: xdt {' '.join(result.argv)}\nexit: {result.exit_code}\n"
        f"stdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    )


def _tiny(cases: list[Case], request: pytest.FixtureRequest) -> Path | None:
    """The shared tiny run, trained only when a case needs it."""
    return request.getfixturevalue("tiny_run") if any(c.needs_run for c in cases) else None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_2_with_one_line_naming_the_culprit(
    case: Case, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if case.known_bug:
        request.applymarker(pytest.mark.xfail(strict=True, reason=case.known_bug))
    result = run_case(case, tmp_path / "work", tiny_run=_tiny([case], request))
    assert result.ok, _explain(result)


def test_a_real_process_gives_the_same_answer(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    cases = [BY_NAME[name] for name in SUBPROCESS_SAMPLE]
    tiny = _tiny(cases, request)

    def run(case: Case, mode: str) -> Result:
        return run_case(case, tmp_path / case.name / mode, tiny_run=tiny, mode=mode)

    in_process = [run(c, "in-process") for c in cases]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        real = list(pool.map(lambda c: run(c, "subprocess"), cases))
    for fast, slow in zip(in_process, real, strict=True):
        assert slow.ok, _explain(slow)
        assert fast.ok, _explain(fast)
        assert slow.exit_code == fast.exit_code, slow.case
        assert slow.stdout == fast.stdout, slow.case
        in_folder = tmp_path / slow.case
        assert slow.stderr.replace(str(in_folder / "subprocess"), "<dir>") == fast.stderr.replace(
            str(in_folder / "in-process"), "<dir>"
        ), slow.case


def test_the_corpus_covers_every_subcommand() -> None:
    assert len(CASES) >= 60
    listed = cli_subcommands()
    assert {"train-source", "resume", "sweep", "log-sync"} <= set(listed)  # read, not empty
    counts = Counter(c.subcommand for c in CASES)
    missing = [name for name in listed if counts[name] == 0]
    assert not missing, f"no bad-input case for: {', '.join(missing)}"
    unknown = set(counts) - set(listed) - {TOP_LEVEL}
    assert not unknown, f"cases of subcommands that the CLI does not list: {unknown}"
    assert counts[TOP_LEVEL] >= 1


def test_every_case_says_why_and_is_named_once() -> None:
    assert len(BY_NAME) == len(CASES)
    for case in CASES:
        assert case.why and case.expect_names, case.name
        assert case.expect_exit == 2, f"{case.name}: the corpus holds bad inputs (exit 2)"
