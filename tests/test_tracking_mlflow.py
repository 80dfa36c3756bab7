"""`tracking.backends: [mlflow]` against a real MLflow server on the loopback: what a run
sends (params, every metric at every step, tags, files), a killed and resumed run that stays
one MLflow run, a server that is down or silent (one warning, no slow-down) and
`xdt log-sync`, and a sweep as one parent run with its runs as children."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

from tests.conftest import TINY, write_config  # noqa: E402
from xdt_cli import __version__  # noqa: E402
from xdt_cli.checkpoint import load_checkpoint  # noqa: E402
from xdt_cli.config import flatten  # noqa: E402
from xdt_cli.engine import Engine  # noqa: E402
from xdt_cli.resolve import load_config  # noqa: E402
from xdt_cli.runs import RunDir, read_metrics  # noqa: E402
from xdt_cli.tracking import mlflow as tracking  # noqa: E402

XDT = [sys.executable, "-m", "xdt_cli"]


# --------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """An `mlflow server` process; `uri` waits until it answers (it starts in the
    background while the first tests, which need no server, run)."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.log = root / "server.log"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner
        for name in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, tracking.EXPERIMENT_ENV):
            env.pop(name, None)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "mlflow", "server"),
                    *("--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"),
                    *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
                    *("--artifacts-destination", str(root / "artifacts")),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=root,
                start_new_session=True,  # one process group: stopped as a whole below
            )
        self._ready = False

    @property
    def uri(self) -> str:
        uri = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while not self._ready:
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the MLflow server did not start"
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    self._ready = answer.status == 200
            except OSError:
                time.sleep(0.2)
        return uri

    def stop(self) -> None:
        """The server's whole process group (its database is thrown away with it)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module", autouse=True)
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    started = Server(tmp_path_factory.mktemp("mlflow_server"))
    yield started
    started.stop()


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MLFLOW_TRACKING_URI", tracking.PARENT_ENV, tracking.EXPERIMENT_ENV):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------- checks
def param_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def mlflow_run_of(run_dir: Path) -> str:
    return json.loads((run_dir / "meta.json").read_text())["mlflow"]["run_id"]


def assert_mirrors(client: MlflowClient, run_id: str, run_dir: Path) -> None:
    """The MLflow run holds exactly metrics.jsonl: every number of every row at its step,
    no step twice, none missing, no other metric."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in read_metrics(run_dir / "metrics.jsonl"):
        for key, value in row.items():
            if key not in ("step", "split") and value is not None:
                expected.setdefault(key, []).append((row["step"], value))
    assert expected, "the run logged nothing"
    run = client.get_run(run_id)
    assert set(run.data.metrics) == set(expected)
    for key, points in expected.items():
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == points, key


def experiment_runs(client: MlflowClient, name: str) -> list:
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, name
    return client.search_runs([experiment.experiment_id])


def closed_port_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there any more


# --------------------------------------------------------------------------- no answer
def test_a_server_that_never_answers_holds_finish_a_few_seconds_at_most(
    tiny_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A port that accepts connections and never answers (a hung server): finish gives up
    FINISH_STALL_S after its request went out, with one warning line."""
    monkeypatch.setattr(tracking, "FINISH_STALL_S", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel accepts; nobody reads
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        cfg = load_config(
            tiny_config, [f"tracking.mlflow.tracking_uri={uri}"], subcommand="train-source"
        )
        run = RunDir(tmp_path / "silent")
        run.path.mkdir()
        run.write_json(run.meta_path, {"subcommand": "train-source", "git_sha": None})
        tracker = tracking.MLflowTracker(cfg, run, "train-source", resumed=False)
        started = time.monotonic()
        for step in range(10, 210, 10):
            tracker.log({"step": step, "split": "train", "train/loss": 1.0})
        # log never waits for the server (generous bounds: a shared machine is noisy)
        assert time.monotonic() - started < 5.0  # not 20 requests of 10 s each
        started = time.monotonic()
        tracker.finish({"status": "completed"})
        waited = time.monotonic() - started
    assert waited < 10.0  # not the 2 x 10 s of the request's timeout and retry
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: mlflow: "), err
    assert "does not answer" in err and f"xdt log-sync {run.path} --to mlflow" in err


def test_an_unreachable_server_costs_one_warning_and_log_sync_delivers_later(
    tiny_config: Path, tmp_path: Path, server: Server, cli
) -> None:
    """A closed port: the run exits 0 with exactly one line on stderr, and ends a few
    seconds at most after its summary.json; `xdt log-sync` then sends every row, and a
    second call sends nothing."""
    down = subprocess.run(
        [
            *(*XDT, "train-source", str(tiny_config)),
            f"tracking.mlflow.tracking_uri={closed_port_uri()}",
            "tracking.mlflow.experiment=synced",
            *("--log-to", "mlflow", "--name", "down", "--quiet"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    ended = time.time()
    assert down.returncode == 0, down.stderr
    lines = down.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: mlflow: cannot send to"), lines
    assert "xdt log-sync" in lines[0]
    run_dir = tmp_path / "runs" / "down"
    # what finish waited for: the rest of mlflow's import (a tiny run ends before it), then
    # one refused connection; not the retries of MLflow's defaults
    # (MLflow's own defaults retry for minutes; the bound is loose: the machine is shared)
    assert ended - (run_dir / "summary.json").stat().st_mtime < 45
    assert "mlflow" not in json.loads((run_dir / "meta.json").read_text())

    uri = server.uri
    first = cli("log-sync", run_dir, "--to", "mlflow", "--tracking-uri", uri, "--json")
    assert first.exit_code == 0, first.stderr
    sent = json.loads(first.stdout)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert sent["rows"] == len(rows) == 6  # 4 train rows, 2 eval rows
    assert sent["files"] == ["config.yaml", "summary.json"] and sent["status"] == "FINISHED"
    client = MlflowClient(uri)
    run_id = mlflow_run_of(run_dir)
    assert sent["run_id"] == run_id and [
        r.info.run_id for r in experiment_runs(client, "synced")
    ] == [run_id]
    assert_mirrors(client, run_id, run_dir)

    again = cli("log-sync", run_dir, "--to", "mlflow", "--json")  # the URI is in meta.json
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout) | {"run_id": None} == sent | {
        "rows": 0,
        "files": [],
        "status": None,
        "run_id": None,
    }
    assert_mirrors(client, run_id, run_dir)
    elsewhere = cli("log-sync", run_dir, "--to", "mlflow", "--tracking-uri", closed_port_uri())
    assert elsewhere.exit_code == 2 and "already on" in elsewhere.stderr


# --------------------------------------------------------------------------- a real server
def test_a_run_sends_its_params_every_metric_its_tags_and_files(
    tiny_config: Path, tmp_path: Path, server: Server, cli
) -> None:
    uri = server.uri
    result = cli(
        "train-source",
        tiny_config,
        f"tracking.mlflow.tracking_uri={uri}",
        "tracking.mlflow.log_checkpoint=true",
        "name=mirrored",  # the experiment is the config's name
        *("--log-to", "mlflow", "--name", "mirror", "--quiet", "--json"),
    )
    assert result.exit_code == 0, result.stderr
    json.loads(result.stdout)  # stdout holds the summary only (no links printed by MLflow)
    run_dir = tmp_path / "runs" / "mirror"
    client = MlflowClient(uri)
    run_id = mlflow_run_of(run_dir)
    [found] = experiment_runs(client, "mirrored")
    assert found.info.run_id == run_id
    run = client.get_run(run_id)
    assert run.info.run_name == "mirror" and run.info.status == "FINISHED"

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert run.data.params == {k: param_text(v) for k, v in flatten(config).items()}
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["train.steps"] == "40"
    assert_mirrors(client, run_id, run_dir)

    meta = json.loads((run_dir / "meta.json").read_text())
    tags = run.data.tags
    assert tags["xdt.subcommand"] == "train-source" and tags["xdt.method"] == "erm"
    assert tags["xdt.selection.rule"] == config["selection"]["rule"] == "source_val"
    assert tags["xdt.version"] == __version__
    assert tags.get("mlflow.source.git.commit") == meta["git_sha"]
    assert "mlflow.parentRunId" not in tags
    assert meta["mlflow"] == {
        "run_id": run_id,
        "experiment_id": found.info.experiment_id,
        "tracking_uri": uri,
    }

    listed = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "summary.json", "checkpoints"} <= listed
    assert [f.path for f in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/best.pt"]
    for name in ("config.yaml", "summary.json"):
        got = Path(client.download_artifacts(run_id, name, str(tmp_path)))
        assert got.read_bytes() == (run_dir / name).read_bytes(), name
    with tracking._SETTINGS_LOCK:  # MLflow's settings are in the environment only around
        assert not set(tracking.CLIENT_SETTINGS) & set(os.environ)  # the tracker's calls


def test_a_killed_and_resumed_run_stays_one_mlflow_run_without_repeat_or_gap(
    tiny_config: Path, tmp_path: Path, server: Server, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed at step 35 (a second Ctrl-C: no summary), after the checkpoint of step 20 and
    the rows up to step 30 reached the server; `xdt resume` computes rows 21..40 again and
    sends only those after step 30, to the same MLflow run."""
    uri = server.uri
    original = Engine._accumulate

    def accumulate(self, out):
        original(self, out)
        if self.step == 35:
            raise KeyboardInterrupt

    overrides = [f"tracking.mlflow.tracking_uri={uri}", "tracking.mlflow.experiment=resumed"]
    with monkeypatch.context() as patch:
        patch.setattr(Engine, "_accumulate", accumulate)
        cut = cli("train-source", tiny_config, *overrides, "--log-to", "mlflow", "--name", "cut")
    assert cut.exit_code == 130, cut.stderr
    run_dir = tmp_path / "runs" / "cut"
    assert not (run_dir / "summary.json").exists()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 20
    state_path = run_dir / tracking.STATE_FILE
    deadline = time.monotonic() + 60
    while not state_path.is_file() or json.loads(state_path.read_text()).get("sent") != [
        30,
        "train",
    ]:
        assert time.monotonic() < deadline, "the rows up to step 30 never reached the server"
        time.sleep(0.05)
    run_id = mlflow_run_of(run_dir)

    resumed = cli("resume", run_dir, "--quiet")
    assert resumed.exit_code == 0, resumed.stderr
    client = MlflowClient(uri)
    assert [r.info.run_id for r in experiment_runs(client, "resumed")] == [run_id]
    assert mlflow_run_of(run_dir) == run_id
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [10, 20, 20, 30, 40, 40]
    assert_mirrors(client, run_id, run_dir)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_sweep_is_one_parent_run_with_its_runs_as_children(
    tmp_path: Path, server: Server, cli
) -> None:
    uri = server.uri
    write_config(tmp_path / "tiny.yaml", TINY)
    sweep = tmp_path / "mlsweep.yaml"
    overrides = ["train.steps=10", "train.eval_every=5", "train.log_every=5"]
    overrides += ["tracking.backends=[mlflow]", f"tracking.mlflow.tracking_uri={uri}"]
    spec = {"config": "tiny.yaml", "overrides": overrides, "seeds": [0, 1]}
    sweep.write_text(yaml.safe_dump(spec, sort_keys=False))
    result = cli("sweep", sweep, "--jobs", "2", "--runs-dir", tmp_path / "runs", "-q")
    assert result.exit_code == 0, result.stderr

    folder = tmp_path / "runs" / "mlsweep"
    parent_id = json.loads((folder / tracking.SWEEP_FILE).read_text())["run_id"]
    client = MlflowClient(uri)
    runs = {r.info.run_id: r for r in experiment_runs(client, "mlsweep")}  # the sweep's name
    assert len(runs) == 3 and parent_id in runs
    parent = runs.pop(parent_id)
    assert parent.info.run_name == "mlsweep" and parent.info.status == "FINISHED"
    names = sorted(
        entry["name"] for entry in json.loads((folder / "sweep.json").read_text())["runs"]
    )
    assert sorted(r.info.run_name for r in runs.values()) == names
    for child in runs.values():
        assert child.data.tags["mlflow.parentRunId"] == parent_id
        assert child.info.status == "FINISHED"
        assert_mirrors(client, child.info.run_id, folder / child.info.run_name)

    cfg = load_config(tmp_path / "tiny.yaml", overrides, subcommand="train-source")
    again = tracking.sweep_parent(folder, "mlsweep", cfg)  # a later call of the sweep
    assert again == {tracking.PARENT_ENV: parent_id, tracking.EXPERIMENT_ENV: "mlsweep"}


def test_a_batch_whose_answer_was_lost_is_not_sent_again(
    tiny_config: Path, tmp_path: Path, server: Server, cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server took the rows but its answer never came back: the next sync finds them
    there (the batch was recorded as in flight) and sends them no second time."""
    uri = server.uri
    trained = cli("train-source", tiny_config, "--name", "lossy", "--quiet")
    assert trained.exit_code == 0, trained.stderr
    run_dir = tmp_path / "runs" / "lossy"
    original = MlflowClient.log_batch

    def answer_lost(self, run_id, metrics=(), *args, **kwargs):
        original(self, run_id, metrics, *args, **kwargs)
        if metrics:
            raise ConnectionError("connection reset by peer")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "log_batch", answer_lost)
        lost = cli("log-sync", run_dir, "--to", "mlflow", "--tracking-uri", uri)
    assert lost.exit_code == 1 and "connection reset by peer" in lost.stderr
    state = json.loads((run_dir / tracking.STATE_FILE).read_text())
    assert state["in_flight"]["upto"] == [40, "eval"] and "sent" not in state

    again = cli("log-sync", run_dir, "--to", "mlflow", "--json")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["rows"] == 0
    assert_mirrors(MlflowClient(uri), mlflow_run_of(run_dir), run_dir)


def test_log_sync_help_and_bad_input(cli, tmp_path: Path) -> None:
    assert "Example: xdt log-sync" in " ".join(cli("log-sync", "--help").stdout.split())
    for args, needle in [
        ((tmp_path / "nothing", "--to", "mlflow"), "no such run folder"),
        ((tmp_path, "--to", "mlflow"), "not an xdt run folder"),
        ((tmp_path, "--to", "neptune"), "unknown tracker 'neptune'"),
        ((tmp_path,), "--to"),
    ]:
        result = cli("log-sync", *args)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
        assert needle in result.stderr, result.stderr
