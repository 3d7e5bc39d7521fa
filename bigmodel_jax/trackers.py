"""Experiment trackers: where a run's metrics go besides metrics.jsonl (config.train.trackers, comma-separated).

tensorboard: event files in <workdir>/tensorboard (--mode=eval's in tensorboard/eval_step<N>/). mlflow: a run
in an MLflow store (a local SQLite file by default, which `mlflow ui` opens). wandb: a Weights & Biases run,
offline unless WANDB_MODE says otherwise (`wandb sync` uploads it later). MLflow and W&B are optional extras.
MetricsWriter drives them, on the chief process only.

metrics.jsonl stays the record. MLflow and W&B keep one run per workdir across launches (its id in
<workdir>/tracking.json): a resumed training run continues it, and each is sent from metrics.jsonl whatever it
lacks (records of earlier launches, of a launch where it failed, or of a run it was added to later).
"""

import abc
import contextlib
import fcntl
import importlib.util
import json
import os
import time
from pathlib import Path
from urllib.parse import quote, unquote

from absl import logging

from bigmodel_jax import errors
from bigmodel_jax.errors import UserError
from bigmodel_jax.registry import Registry

STATE_FILE = "tracking.json"
ORIGIN = "workdir"  # tracking.json's record of the workdir it was written in
EXPERIMENT_ENV = "BIGMODEL_JAX_EXPERIMENT"  # set by sweeps for their trials
DEFAULT_EXPERIMENT = "bigmodel_jax"
# What an MLflow run gets of its workdir as artifacts at the end; checkpoints stay in the workdir (they can be
# gigabytes), its path is the run's `workdir` tag.
ARTIFACTS = ("config.json", "run_info.jsonl", "metrics.jsonl", "final_metrics.json", "tokenizer")
RECORD_FIELDS = ("step", "split", "time", "eval")  # a metrics.jsonl line's fields that are not metrics


def names(config) -> list[str]:
  """The trackers config.train.trackers asks for, in order, once each ("" = none: metrics.jsonl only)."""
  return list(dict.fromkeys(n.strip() for n in config.train.trackers.split(",") if n.strip()))


def check(config) -> None:
  """Raises UserError for an unknown tracker name or one whose package is not installed; starts nothing."""
  for name in names(config):
    TRACKERS.get(name).check_installed(name)


def experiment_name(config) -> str:
  """Runs of one experiment (a sweep's trials) are grouped under this name."""
  return config.train.tracking.experiment or os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


def metric_key(record: dict) -> str:
  """What a metrics.jsonl line's metrics are named under: its split ('train', 'validation'), and the evaluator's
  name after it where that differs ('validation/ema'; --mode=eval lines: 'eval/test')."""
  split, name = record["split"], record.get("eval")
  return split if name in (None, split) else f"{split}/{name}"


def metric_values(record: dict) -> dict[str, float]:
  """{'<metric_key>/<metric>': value} for a metrics.jsonl line's numbers."""
  prefix = metric_key(record)
  return {f"{prefix}/{k}": v for k, v in record.items()
          if k not in RECORD_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def final_values(final: dict) -> tuple[dict[str, float], dict[str, str]]:
  """final_metrics.json as ({'final/test/accuracy': 0.97, 'final/best/value': ...}, {'final/params_sha256': ...}):
  numbers, and strings and flags (lists such as a confusion matrix stay in the file)."""
  numbers, labels = {}, {}

  def add(key, value):
    if isinstance(value, dict):
      for k, v in value.items():
        add(f"{key}/{k}", v)
    elif isinstance(value, (str, bool)):
      labels[key] = str(value).lower() if isinstance(value, bool) else value
    elif isinstance(value, (int, float)):
      numbers[key] = value

  for k, v in final.items():
    if k == "evals":  # {evaluator: metrics}: named like the per-step metrics, final/<evaluator>/<metric>
      for name, metrics in v.items():
        add(f"final/{name}", metrics)
    elif k != "step":
      add(f"final/{k}", v)
  return numbers, labels


def plain_config(config) -> dict:
  return json.loads(config.to_json_best_effort())


def flat_config(config) -> dict[str, str]:
  """{'optimizer.learning_rate': '0.001', ...}: the config as dotted keys with string values."""
  from bigmodel_jax.config import flatten
  return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flatten(plain_config(config)).items()}


class Tracker(abc.ABC):
  """One destination for a run's metrics. `resumes`: it keeps a run of its own across launches (its state in
  tracking.json); it is started when training starts, not for --mode=eval/predict, and is sent from metrics.jsonl
  what it lacks."""
  package = ""  # the module it needs; "" = a core dependency
  extra = ""  # pip install 'bigmodel_jax[<extra>]' installs it
  resumes = True

  def __init__(self, config, workdir: Path):
    self.config, self.workdir = config, Path(workdir)
    self.purge_after = None  # training (re)starts after this step (set by MetricsWriter.drop_after)

  @classmethod
  def check_installed(cls, name: str) -> None:
    if cls.package and importlib.util.find_spec(cls.package) is None:
      raise UserError(f"config.train.trackers: {name!r} needs the {cls.package} package, which is not installed; "
                      f"pip install 'bigmodel_jax[{cls.extra}]' (or leave {name} out)")

  @abc.abstractmethod
  def start(self, state: dict) -> tuple[dict, bool]:
    """Starts, or continues the run described by `state` (from tracking.json). -> (its state now, whether it
    continued that run). Failures raise UserError."""

  @abc.abstractmethod
  def write(self, records: list[dict]) -> None:
    """metrics.jsonl lines, in order."""

  def finish(self, final: dict) -> None:
    """final_metrics.json, once training and the final evaluations are done."""

  def mark_discarded(self, first: int, last: int) -> None:
    """The run holds values a killed launch sent for steps first..last, which a resumed launch redoes."""

  def check_place(self) -> None:
    """At training's start (before the first step): UserError where it could write nothing all run long."""

  @abc.abstractmethod
  def close(self, status: str) -> None:
    """status: finished, failed (an error) or killed (SIGTERM/Ctrl-C: a relaunch continues)."""


TRACKERS: Registry[type[Tracker]] = Registry("tracker", "config.train.trackers")


@TRACKERS.register("tensorboard")
class TensorBoard(Tracker):
  """Event files in <workdir>/tensorboard, those of every training launch side by side. --mode=eval's records
  (split 'eval') go to a run of their own per checkpoint, tensorboard/eval_step<N>/ (a second eval of that step
  adds its file there): in the training run they would sit out of step order. A writer is made on its first
  record, so a launch that writes nothing (predict, sample, a failed eval) leaves no event file."""
  resumes = False

  # Records reach the event files within this many seconds (tensorboardX's writer thread flushes them), and all of
  # them at close; a flush per record cost ~2 ms, a fifth of a small model's loop at a record every 20 steps.
  FLUSH_SECONDS = 2

  def start(self, state):
    self._make, self._writers = _summary_writer(), {}
    return {}, False

  def _writer(self, record):
    run = f"eval_step{record['step']}" if record["split"] == "eval" else ""
    if run not in self._writers:  # a training launch (re)starting after step N: events of a killed launch past N
      purge = {"purge_step": self.purge_after + 1} if run == "" and self.purge_after is not None else {}  # hidden
      self._writers[run] = self._make(str(self.workdir / "tensorboard" / run), flush_secs=self.FLUSH_SECONDS, **purge)
    return self._writers[run]

  def check_place(self):
    path = self.workdir / "tensorboard"  # its writers are made on the first record: a file there failed them then
    if (path.exists() and not path.is_dir()) or (path.is_dir() and not os.access(path, os.W_OK | os.X_OK)):
      raise UserError(f"config.train.trackers: tensorboard cannot write its event files in {path} (a file, or not "
                      "writable); move it away or fix its permissions, or leave tensorboard out")

  def write(self, records):
    for record in records:
      writer = self._writer(record)
      for key, value in metric_values(record).items():
        writer.add_scalar(key, value, record["step"])

  def close(self, status):
    for writer in self._writers.values():
      writer.close()


def default_mlflow_uri() -> str:
  """MLflow's own default store (./mlflow.db), made absolute: `mlflow ui` run in that directory opens it."""
  return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
  return Path(unquote(uri[len("sqlite:///"):]).split("?")[0]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store_lock(uri: str):
  """Processes that start together (a sweep's trials) take turns to create a SQLite store's tables and the
  experiment, which MLflow does not do safely in parallel."""
  path = _sqlite_path(uri)
  if path is None:
    yield
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path.with_name(path.name + ".lock"), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    yield


def _answers(uri: str, timeout_s: float = 10) -> None:
  """An MLflow server that does not answer fails here at once: MLflow's client would retry for minutes."""
  if not uri.startswith(("http://", "https://")):
    return
  import urllib.error
  import urllib.request
  try:
    urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
  except urllib.error.HTTPError:
    pass  # it answered (e.g. a proxy that asks for a login): the client says the rest
  except (urllib.error.URLError, TimeoutError) as e:
    raise OSError(f"no answer from {uri} within {timeout_s:.0f} s ({getattr(e, 'reason', e)})") from e


@TRACKERS.register("mlflow")
class MLflow(Tracker):
  package, extra = "mlflow", "mlflow"
  STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    # the field that chose the store, for error messages
    self.field, self.uri = "config.train.tracking.mlflow_tracking_uri", config.train.tracking.mlflow_tracking_uri
    if not self.uri and os.environ.get("MLFLOW_TRACKING_URI"):
      self.field, self.uri = "MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"]
    self.uri = self.uri or default_mlflow_uri()

  def start(self, state):
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    try:
      _answers(self.uri)
      with _store_lock(self.uri):
        self.client = MlflowClient(tracking_uri=self.uri)
        run = self._previous_run(state)
        if run is None:
          run = self.client.create_run(self._experiment_id(), run_name=self.workdir.name,
                                       tags={"workdir": str(self.workdir.absolute())})
      self.run_id = run.info.run_id
      if run.info.status != "RUNNING":
        self.client.update_run(self.run_id, status="RUNNING")
      # params cannot change once logged: a resumed run adds fields it lacks (fields that may change on resume,
      # such as train.log_every, keep their first value)
      params = [Param(k, v[:6000]) for k, v in flat_config(self.config).items() if k not in run.data.params]
      for i in range(0, len(params), 100):  # MLflow's limit per batch
        self.client.log_batch(self.run_id, params=params[i:i + 100])
    except (MlflowException, OSError) as e:
      raise UserError(f"{self.field}: MLflow store {self.uri} failed ({errors.brief(e)}); give a writable store "
                      "(sqlite:///path/to/mlflow.db) or an MLflow server's http(s) URL") from e
    return {"run_id": self.run_id, "tracking_uri": self.uri}, run.info.run_id == state.get("run_id")

  def _previous_run(self, state):
    from mlflow.exceptions import MlflowException
    if state.get("tracking_uri") != self.uri or not state.get("run_id"):
      return None
    try:
      run = self.client.get_run(state["run_id"])
    except MlflowException:  # deleted from the store meanwhile: a new run
      return None
    return run if run.info.lifecycle_stage == "active" else None

  def _experiment_id(self) -> str:
    name = experiment_name(self.config)
    experiment = self.client.get_experiment_by_name(name)
    if experiment is not None:
      return experiment.experiment_id
    # a SQLite store's artifacts go beside it (MLflow would put them under the current directory's mlruns/)
    db = _sqlite_path(self.uri)
    artifacts = None if db is None else (db.parent / "mlruns" / quote(name, safe="")).as_uri()
    return self.client.create_experiment(name, artifact_location=artifacts)

  def write(self, records):
    from mlflow.entities import Metric
    metrics = [Metric(k, float(v), int(r["time"] * 1000), int(r["step"]))
               for r in records for k, v in metric_values(r).items()]
    for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
      self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])

  def finish(self, final):
    from mlflow.entities import Metric, RunTag
    numbers, labels = final_values(final)
    now, step = int(time.time() * 1000), int(final["step"])
    self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in numbers.items()],
                          tags=[RunTag(k, v[:5000]) for k, v in labels.items()])
    for name in ARTIFACTS:
      path = self.workdir / name
      if path.is_dir():
        self.client.log_artifacts(self.run_id, str(path), name)
      elif path.is_file():
        self.client.log_artifact(self.run_id, str(path))

  def mark_discarded(self, first, last):
    # MLflow cannot delete a metric's values per step (no client or store API): tag `discarded_steps` names them
    earlier = self.client.get_run(self.run_id).data.tags.get("discarded_steps")
    ranges = [*filter(None, (earlier or "").split("; ")), f"{first}-{last}"]
    while len("; ".join(ranges)) > 5000:  # MLflow's tag value limit: the oldest whole ranges go
      ranges.pop(0)
    self.client.set_tag(self.run_id, "discarded_steps", "; ".join(ranges))

  def close(self, status):
    self.client.set_terminated(self.run_id, status=self.STATUS[status])


@TRACKERS.register("wandb")
class WandB(Tracker):
  package, extra = "wandb", "wandb"

  def start(self, state):
    import wandb
    t = self.config.train.tracking
    directory = Path(t.wandb_dir or self.workdir).absolute()
    mode = os.environ.get("WANDB_MODE") or "offline"  # offline unless the user chose otherwise
    try:
      directory.mkdir(parents=True, exist_ok=True)
      self.run = wandb.init(project=t.wandb_project, group=experiment_name(self.config), name=self.workdir.name,
                            id=state.get("run_id"), resume="allow", dir=str(directory), mode=mode, reinit="create_new",
                            config=plain_config(self.config),
                            settings=wandb.Settings(console="off", quiet=True))
    except Exception as e:  # wandb raises its own types (UsageError, CommError) and OSError
      where = "config.train.tracking.wandb_dir" if t.wandb_dir else "config.train.trackers"
      raise UserError(f"{where}: W&B could not start a run in {directory} (WANDB_MODE={mode}; {errors.brief(e)}); "
                      "fix that, or leave wandb out of config.train.trackers") from e
    if mode == "offline":
      logging.info("W&B: offline run %s; upload it with: wandb sync %s", self.run.id, Path(self.run.dir).parent)
    return {"run_id": self.run.id, "dir": str(directory)}, self.run.id == state.get("run_id")

  def write(self, records):
    for record in records:
      self.run.log(metric_values(record), step=int(record["step"]))

  def finish(self, final):
    numbers, labels = final_values(final)
    self.run.summary.update({**numbers, **labels})

  def close(self, status):
    if status == "killed":
      self.run.mark_preempting()
    self.run.finish(exit_code=0 if status == "finished" else 1)


def read_state(workdir: Path) -> dict:
  """tracking.json: each tracker's run and the last step it was sent per metric. {} (new tracker runs) where there is
  none, where it is damaged, or where it is a copy's (cp -r of a run: the workdir it names still holds it, and the
  tracker runs stay that run's); a moved workdir goes on with its runs."""
  path = Path(workdir) / STATE_FILE
  try:
    state = json.loads(path.read_text())
  except FileNotFoundError:
    return {}
  except (OSError, UnicodeDecodeError, ValueError):
    state = None
  def valid(entry) -> bool:  # {'run_id': ..., 'last_steps': {metric: step}}
    steps = entry.get("last_steps", {}) if isinstance(entry, dict) else None
    return isinstance(steps, dict) and all(isinstance(s, int) for s in steps.values())
  if not isinstance(state, dict) or not all(valid(v) for k, v in state.items() if k != ORIGIN):
    logging.warning("%s is damaged: the trackers start new runs", path)
    return {}
  if isinstance(state.get(ORIGIN), str) and _copied_from(Path(state[ORIGIN]) / STATE_FILE, path, state):
    logging.warning("%s is a copy of %s: the trackers start new runs (that run keeps its own)", path,
                    Path(state[ORIGIN]) / STATE_FILE)
    return {}
  return state


def _copied_from(origin: Path, path: Path, state: dict) -> bool:
  """Whether tracking.json `path` is a copy of `origin` (the one in the workdir it names): another file that holds
  the same tracker runs. A moved workdir (nothing left there), a symlinked one (the same file), or a new run at the
  old path (other runs) is not."""
  try:
    if not origin.is_file() or os.path.samefile(origin, path):
      return False
    theirs = json.loads(origin.read_text())
  except (OSError, ValueError):
    return False
  run_ids = lambda s: {v.get("run_id") for k, v in s.items() if isinstance(v, dict)} - {None}
  return isinstance(theirs, dict) and bool(run_ids(state) & run_ids(theirs))


def _summary_writer():
  """tensorboardX's SummaryWriter. Its import also imports PyTorch wherever PyTorch is installed (2 s of every
  launch), only to accept torch tensors, which nothing here passes: torch is hidden from that one import."""
  import sys
  if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this entry is None
    try:
      import tensorboardX
    finally:
      del sys.modules["torch"]
  from tensorboardX import SummaryWriter
  return SummaryWriter
