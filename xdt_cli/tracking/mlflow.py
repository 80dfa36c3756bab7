"""MLflow: a run's metrics.jsonl rows, resolved config, files and status as one MLflow run.

Where: `tracking.mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else a local store in
./mlruns (a SQLite file, mlruns/mlflow.db, beside the artifacts: MLflow 3 refuses plain
./mlruns folders; `mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db` shows it).
Experiment: `tracking.mlflow.experiment`, else the sweep's name ($XDT_MLFLOW_EXPERIMENT, set
by `xdt sweep`), else the config's `name`. The MLflow run is named after the run folder.

What it records:
- params: the resolved config flattened to dotted keys (`optim.lr`); a string as it is, any
  other value as JSON (`0.003`, `null`, `[0, 1]`); a value over MLflow's length limit is cut
  and says so (config.yaml, an artifact, holds it whole);
- metrics: every number of every metrics.jsonl row, at the row's step (a NaN or infinity,
  null in the file, is left out);
- tags: xdt.subcommand, xdt.method, xdt.selection.rule, xdt.version, the git sha of meta.json
  (mlflow.source.git.commit), and mlflow.parentRunId for a run of a sweep;
- artifacts: config.yaml, summary.json, and checkpoints/best.pt with `log_checkpoint`;
- status: RUNNING, then FINISHED, FAILED or KILLED (summary's completed, failed, interrupted).

Never in the way of training: `log` only puts the row in a queue. One background thread
imports mlflow, creates the run and sends the rows, with short HTTP timeouts and a single
retry (CLIENT_SETTINGS). When a request fails the thread warns once on stderr and tries
again RETRY_S later; `finish` waits for it while the server answers: a request unanswered
for FINISH_STALL_S, or FINISH_MAX_S in all, and the run ends without it.

Nothing twice, no gap. metrics.jsonl is the source of truth, and `<run>/tracking/mlflow.json`
records what the server holds: the position (step, split) of the last row sent (the mark),
the batch in flight (looked up on the server before anything else is sent, so a batch whose
answer was lost is not sent again), whether the params went, a digest of each file uploaded
and the last status. meta.json's "mlflow" keeps the run id, experiment id and tracking URI,
so `xdt resume` continues the same MLflow run: first what the folder holds beyond the mark,
then the new rows; a row it computes again (after last.pt's step, bit-identical) is at or
below the mark and is skipped. `xdt log-sync RUN --to mlflow` (`sync`) sends whatever is
missing, from the folder alone.

A sweep has one parent run named after it (`sweep_parent`, `finish_sweep_parent`), its id
kept in `<sweep>/mlflow.json`; its runs read it from $XDT_MLFLOW_PARENT_RUN_ID.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import queue
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from xdt_cli import __version__
from xdt_cli.config import ExperimentConfig, first_line, flatten, read_yaml
from xdt_cli.errors import XdtError
from xdt_cli.files import atomic_write_text
from xdt_cli.runs import RunDir
from xdt_cli.tracking.base import Tracker

STATE_FILE = Path("tracking") / "mlflow.json"  # in the run folder: what the server holds
SWEEP_FILE = "mlflow.json"  # in the sweep folder: its parent run
PARENT_ENV = "XDT_MLFLOW_PARENT_RUN_ID"
EXPERIMENT_ENV = "XDT_MLFLOW_EXPERIMENT"
KEY_TAG = "xdt.key"  # a token per run folder: finds a run whose creation answer was lost

# What MLflow reads from the environment at each call, set only around the tracker's own
# calls and only where the user has not set it: a request gives up after 10 s and is retried
# once at once, and no links to the run are printed on stdout (which carries results only).
CLIENT_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
RETRY_S = 30.0  # after a failure, the next try
FINISH_STALL_S = 5.0  # finish gives up on a request unanswered this long ...
FINISH_MAX_S = 60.0  # ... and waits this long at most

STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
SPLIT_ORDER = {"train": 0, "eval": 1}  # a step's train row comes before its eval row
MAX_METRICS = 1000  # MLflow's limits: metrics and params per log_batch call, characters
MAX_PARAMS = 100  # of a param value and of a name
MAX_PARAM_LENGTH = 6000
MAX_KEY_LENGTH = 250
CUT = " ...(cut; config.yaml has it whole)"


# --------------------------------------------------------------------------- settings
def tracking_uri(configured: str | None) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else SQLite in ./mlruns (absolute, so
    that `xdt resume` from another folder finds the same store)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path.cwd() / 'mlruns' / 'mlflow.db'}"


def _mlflow_section(config: dict[str, Any]) -> dict[str, Any]:
    """`tracking.mlflow` of a config as a dict (a run older than the section has none)."""
    return (config.get("tracking") or {}).get("mlflow") or {}


def _experiment_name(config: dict[str, Any]) -> str:
    return (
        _mlflow_section(config).get("experiment")
        or os.environ.get(EXPERIMENT_ENV)
        or config.get("name")
        or "xdt"
    )


def _require_mlflow() -> None:
    if importlib.util.find_spec("mlflow") is None:
        raise XdtError(
            "tracking.backends: mlflow needs the package mlflow (pip install 'xdt[mlflow]')"
        )


_SETTINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def _client_settings() -> Iterator[None]:
    """CLIENT_SETTINGS in the environment for the calls inside, then the environment as it
    was. One lock: the calls of two trackers of one process do not overlap."""
    with _SETTINGS_LOCK:
        saved = {name: os.environ.get(name) for name in CLIENT_SETTINGS}
        os.environ.update({n: v for n, v in CLIENT_SETTINGS.items() if saved[n] is None})
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):  # SQLite does not create the folder of its file
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another run of the sweep created it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _find_or_create_run(
    client: Any, experiment_id: str, key: str, name: str, tags: dict[str, str]
) -> str:
    """The run tagged with `key`, else a new one: a creation whose answer was lost on the
    way back is found again instead of making a second run."""
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=name, tags={**tags, KEY_TAG: key})
    return run.info.run_id


# --------------------------------------------------------------------------- values
def _name(key: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, `_-. :/`)."""
    return re.sub(r"[^\w\-. :/]", "_", key)[:MAX_KEY_LENGTH]


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if len(text) > MAX_PARAM_LENGTH:
        text = text[: MAX_PARAM_LENGTH - len(CUT)] + CUT
    return text


def _position(step: int, split: str) -> tuple[int, int]:
    """Where a row sits in metrics.jsonl's order: by step, then train before eval."""
    return int(step), SPLIT_ORDER.get(split, len(SPLIT_ORDER))


def _metrics(row: dict[str, Any], timestamp: int) -> list[Any]:
    """A row's numbers as MLflow metrics at its step; None, NaN and infinity left out."""
    from mlflow.entities import Metric

    return [
        Metric(_name(key), float(value), timestamp, int(row["step"]))
        for key, value in row.items()
        if key not in ("step", "split")
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    ]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


# --------------------------------------------------------------------------- one run
class _Sender:
    """Sends one run folder to its MLflow run and records in tracking/mlflow.json what went.
    The tracker's thread and `sync` both use it; each call may raise (the server is down)
    and leaves the record as it was before that call."""

    def __init__(
        self,
        run: RunDir,
        config: dict[str, Any],
        *,
        subcommand: str | None = None,
        uri: str | None = None,
    ) -> None:
        self.run = run
        self.config = config
        meta = run.read_json(run.meta_path)
        known = meta.get("mlflow") or {}
        self.uri = (
            uri
            or known.get("tracking_uri")
            or tracking_uri(_mlflow_section(config).get("tracking_uri"))
        )
        self.run_id: str | None = known.get("run_id")
        self.subcommand = subcommand or str(meta.get("subcommand"))
        self.git_sha = meta.get("git_sha")
        self.parent_run_id = os.environ.get(PARENT_ENV)
        self.state_path = run.path / STATE_FILE
        self.state = self._read_state()
        self.client: Any = None
        self.waiting_since: float | None = None  # a request is out, since (monotonic)

    def _read_state(self) -> dict[str, Any]:
        state = _read_record(self.state_path)
        state.setdefault("artifacts", {})
        return state

    def _save(self) -> None:
        _write_record(self.state_path, self.state)

    def _sent(self, **changes: Any) -> None:
        self.state.update(changes)
        self._save()

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        """Requests to the server inside: `finish` watches how long they are out."""
        self.waiting_since = time.monotonic()
        try:
            yield
        finally:
            self.waiting_since = None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._request():
            return getattr(self.client, method)(*args, **kwargs)

    # -- the run ---------------------------------------------------------------------
    def prepare(self, *, running: bool) -> None:
        """Connect, create (or find) the MLflow run, send the params, settle the batch left
        in flight; `running`: the run trains now (a resumed run is RUNNING again)."""
        if self.client is None:
            self.client = _client(self.uri)
        if self.run_id is None:
            self._create_run()
        if not self.state.get("params"):
            self._send_params()
        self._settle_in_flight()
        if running and self.state.get("status") != "RUNNING":
            self._call("update_run", self.run_id, status="RUNNING")
            self._sent(status="RUNNING")

    def _create_run(self) -> None:
        if "key" not in self.state:
            self.state["key"] = uuid.uuid4().hex
            self._save()
        tags = {
            "xdt.subcommand": self.subcommand,
            "xdt.method": str((self.config.get("method") or {}).get("name")),
            "xdt.selection.rule": str((self.config.get("selection") or {}).get("rule")),
            "xdt.version": __version__,
        }
        if self.git_sha:
            tags["mlflow.source.git.commit"] = str(self.git_sha)
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        with self._request():
            experiment_id = _experiment_id(self.client, _experiment_name(self.config))
            self.run_id = _find_or_create_run(
                self.client, experiment_id, self.state["key"], self.run.path.name, tags
            )
        meta = self.run.read_json(self.run.meta_path)  # re-read: keep what others wrote
        meta["mlflow"] = {
            "run_id": self.run_id,
            "experiment_id": experiment_id,
            "tracking_uri": self.uri,
        }
        self.run.write_json(self.run.meta_path, meta)
        self._sent(status="RUNNING")

    def _send_params(self) -> None:
        from mlflow.entities import Param

        params = [Param(_name(k), _param_value(v)) for k, v in flatten(self.config).items()]
        for start in range(0, len(params), MAX_PARAMS):  # the same value again is accepted
            self._call("log_batch", self.run_id, params=params[start : start + MAX_PARAMS])
        self._sent(params=True)

    def _settle_in_flight(self) -> None:
        """A batch sent without an answer: on the server if its last metric is there."""
        flight = self.state.get("in_flight")
        if not flight:
            return
        history = self._call("get_metric_history", self.run_id, flight["key"])
        if any(m.step == flight["step"] for m in history):
            self.state["sent"] = flight["upto"]
        self._sent(in_flight=None)

    # -- rows, files, status ---------------------------------------------------------
    def send_rows(self, rows: Iterable[tuple[dict[str, Any], int]]) -> int:
        """The (row, timestamp in ms) after the mark, whole rows per request; returns how
        many rows went. A row at or before the mark (or before one just taken) is skipped:
        the server has it."""
        mark = self.state.get("sent")
        last = _position(*mark) if mark else None
        batch: list[Any] = []
        upto = None
        count = 0
        for row, timestamp in rows:
            position = _position(row["step"], row["split"])
            if last is not None and position <= last:
                continue
            metrics = _metrics(row, timestamp)
            if upto is not None and len(batch) + len(metrics) > MAX_METRICS:
                self._log_batch(batch, upto)
                batch = []
            batch += metrics
            last, upto = position, [int(row["step"]), row["split"]]
            count += 1
        if upto is not None:
            self._log_batch(batch, upto)
        return count

    def _log_batch(self, metrics: list[Any], upto: list[Any]) -> None:
        """Send `metrics`, then move the mark to `upto`. The batch is recorded as in flight
        first, so that an answer lost on the way back cannot make it go twice."""
        if metrics:
            last = metrics[-1]
            self._sent(in_flight={"upto": upto, "key": last.key, "step": last.step})
            for start in range(0, len(metrics), MAX_METRICS):  # a row of > 1000 numbers
                self._call("log_batch", self.run_id, metrics=metrics[start : start + MAX_METRICS])
        self._sent(sent=upto, in_flight=None)

    def send_files(self, *, checkpoint: bool) -> list[str]:
        """config.yaml, summary.json (and best.pt) where they changed since last sent."""
        files = [self.run.config_path, self.run.summary_path]
        if checkpoint:
            files.append(self.run.best_ckpt)
        sent = []
        for path in files:
            if not path.is_file():
                continue
            name = path.relative_to(self.run.path).as_posix()
            digest = _digest(path)
            if self.state["artifacts"].get(name) == digest:
                continue
            folder = path.parent.relative_to(self.run.path).as_posix()
            self._call("log_artifact", self.run_id, str(path), None if folder == "." else folder)
            self.state["artifacts"][name] = digest
            self._save()
            sent.append(name)
        return sent

    def send_status(self, summary: dict[str, Any] | None) -> str | None:
        """The run's end as MLflow's status (no summary: the run was killed); returns it,
        or None when the server has it already."""
        status = STATUS.get(str((summary or {}).get("status")), "KILLED")
        if self.state.get("status") == status:
            return None
        self._call("set_terminated", self.run_id, status=status)
        self._sent(status=status)
        return status


# --------------------------------------------------------------------------- the tracker
class MLflowTracker(Tracker):
    """Mirrors a training run to MLflow from a background thread (see the module's text)."""

    name = "mlflow"

    def __init__(
        self, cfg: ExperimentConfig, run: RunDir, subcommand: str, *, resumed: bool
    ) -> None:
        super().__init__()
        _require_mlflow()
        self.sender = _Sender(run, cfg.model_dump(mode="json"), subcommand=subcommand)
        self.log_checkpoint = cfg.tracking.mlflow.log_checkpoint
        self.resumed = resumed
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._work, name="xdt-mlflow", daemon=True)
        self._thread.start()

    def log(self, row: dict[str, Any]) -> None:
        self._queue.put(("row", (dict(row), _now_ms())))

    def finish(self, summary: dict[str, Any]) -> None:
        """Hand over the summary and wait for the thread to send the rest, while the server
        answers: not past a request unanswered for FINISH_STALL_S, nor FINISH_MAX_S."""
        self._queue.put(("finish", summary))
        deadline = time.monotonic() + FINISH_MAX_S
        while not self._done.wait(0.05):
            out_since = self.sender.waiting_since
            now = time.monotonic()
            if now > deadline or (out_since is not None and now - out_since > FINISH_STALL_S):
                self.warn(f"{self.sender.uri} does not answer; {self._later()}")
                return

    def _later(self) -> str:
        return (
            "metrics.jsonl keeps every row: send the rest with "
            f"xdt log-sync {self.sender.run.path} --to mlflow"
        )

    def _work(self) -> None:
        """The thread: send what came, wait for more; after a failure wait RETRY_S (or for
        the summary) and try again; after the summary, one last try."""
        todo: list[tuple[dict[str, Any], int]] = []
        if self.resumed:  # what the folder holds and the server may lack comes first
            todo = [(row, _now_ms()) for row in self.sender.run.read_metrics()]
        summary = None
        retry_at = 0.0
        while True:
            try:
                with _client_settings():
                    self.sender.prepare(running=summary is None)
                    self.sender.send_rows(todo)
                    todo.clear()
                    if summary is not None:
                        self.sender.send_files(checkpoint=self.log_checkpoint)
                        self.sender.send_status(summary)
            except Exception as exc:  # a tracker never stops the run: warn, retry later
                self.warn(
                    f"cannot send to {self.sender.uri} ({first_line(exc, 120)}); {self._later()}"
                )
                retry_at = time.monotonic() + RETRY_S
            else:
                retry_at = 0.0
            if summary is not None:
                break
            summary = self._wait(todo, retry_at)
        self._done.set()

    def _wait(self, todo: list[tuple[dict[str, Any], int]], retry_at: float) -> Any:
        """Move what `log` handed over into `todo` until there is something to send and
        `retry_at` has passed; return the summary once `finish` hands it over (at once)."""
        while True:
            pause = retry_at - time.monotonic()
            if todo and pause <= 0:
                return None
            try:
                kind, item = self._queue.get(timeout=pause if pause > 0 else None)
            except queue.Empty:
                continue
            while True:
                if kind == "finish":
                    return item
                todo.append(item)
                try:
                    kind, item = self._queue.get_nowait()
                except queue.Empty:
                    break


# --------------------------------------------------------------------------- log-sync
def sync(run_dir: Path, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """`xdt log-sync RUN --to mlflow`: send what the MLflow run lacks (its creation, params,
    rows after the mark, changed files, the final status) from the run folder alone. A
    second call sends nothing. `tracking_uri` (--tracking-uri) overrides where a run that
    never reached its server goes."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise XdtError(f"{run.path}: no such run folder")
    if not run.config_path.is_file():
        raise XdtError(f"{run.path}: not an xdt run folder (no config.yaml)")
    known = (run.read_json(run.meta_path).get("mlflow") or {}).get("tracking_uri")
    if tracking_uri and known and tracking_uri != known:
        raise XdtError(
            f"--tracking-uri: {run.path} is already on {known}; its MLflow run lives there"
        )
    _require_mlflow()
    config = read_yaml(run.config_path)
    run.lock()  # refuses a run that trains now: its own tracker is sending
    try:
        sender = _Sender(run, config, uri=tracking_uri)
        summary = run.read_json(run.summary_path) if run.summary_path.is_file() else None
        try:
            with _client_settings():
                sender.prepare(running=False)
                rows = sender.send_rows((row, _now_ms()) for row in run.read_metrics())
                files = sender.send_files(
                    checkpoint=bool(_mlflow_section(config).get("log_checkpoint"))
                )
                status = sender.send_status(summary)
        except Exception as exc:
            raise RuntimeError(f"cannot send to {sender.uri}: {first_line(exc)}") from exc
    finally:
        run.unlock()
    return {
        "run_dir": str(run.path),
        "tracking_uri": sender.uri,
        "run_id": sender.run_id,
        "rows": rows,
        "files": files,
        "status": status,
    }


# --------------------------------------------------------------------------- sweeps
def sweep_parent(sweep_dir: Path, sweep_name: str, cfg: ExperimentConfig) -> dict[str, str]:
    """The environment that makes a sweep's runs children of its parent run, created now
    (named after the sweep, in the runs' experiment) or, on a later call of the sweep, found
    in `<sweep>/mlflow.json`. Without a server: a warning, and the runs go on their own."""
    _require_mlflow()
    section = cfg.tracking.mlflow
    experiment = section.experiment or sweep_name
    uri = tracking_uri(section.tracking_uri)
    env = {EXPERIMENT_ENV: experiment}
    path = sweep_dir / SWEEP_FILE
    record = _read_record(path)
    if record.get("tracking_uri") != uri or record.get("experiment") != experiment:
        record = {"tracking_uri": uri, "experiment": experiment}  # elsewhere: a new parent
    try:
        with _client_settings():
            client = _client(uri)
            if "run_id" in record:
                client.update_run(record["run_id"], status="RUNNING")
            else:
                record["experiment_id"] = _experiment_id(client, experiment)
                record.setdefault("key", uuid.uuid4().hex)
                _write_record(path, record)
                tags = {"xdt.sweep": sweep_name, "xdt.version": __version__}
                record["run_id"] = _find_or_create_run(
                    client, record["experiment_id"], record["key"], sweep_name, tags
                )
                _write_record(path, record)
    except Exception as exc:
        print(
            f"warning: mlflow: no parent run for the sweep on {uri} ({first_line(exc)}); "
            "its runs are logged on their own",
            file=sys.stderr,
            flush=True,
        )
        return env
    return {**env, PARENT_ENV: record["run_id"]}


def finish_sweep_parent(sweep_dir: Path, sweep_status: str) -> None:
    """Close the parent run: FINISHED, FAILED or KILLED as the sweep ended (quietly: each
    run warned about a server it could not reach)."""
    record = _read_record(sweep_dir / SWEEP_FILE)
    if "run_id" not in record:
        return
    with contextlib.suppress(Exception), _client_settings():
        client = _client(record["tracking_uri"])
        client.set_terminated(record["run_id"], status=STATUS.get(sweep_status, "KILLED"))


def _read_record(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
