"""Adversarial training (a GAN) with two optimizers, and its quality measured by a trained classifier.

One update: `task.d_steps` discriminator steps (non-saturating loss: softplus(-D(x)) + softplus(D(G(z))), fresh
noise each, the same real batch), then one generator step (softplus(-D(G(z)))), each through the shared
machinery (state.Steps.grads / apply_gradients with wrt=<optimizer>), so mixed precision, gradient
accumulation, every layout and exact resume hold as for any model. Noise is drawn per example from
(seed, step, row), so it does not depend on the layout either.

Quality, on the same footing at every eval: for each test image i, the generator's image for a fixed
noise vector z_i (keyed by i and config.eval.seed) is scored by a classifier that is a normal run of this
codebase (config.eval.classifier_workdir; trained once from config.eval.classifier_config, cached by its contents, when
empty):
  classifier_score      exp E_x[KL(p(y|x) || p(y))] over generated images (the Inception Score formula;
                        10 is the maximum for 10 classes), and real_classifier_score for the real test images;
  frechet_distance      between generated images of the even-numbered test examples and the real odd-numbered
                        ones, in the classifier's penultimate features; real_frechet_distance: real even vs
                        real odd (the floor, same sample sizes);
  class_fractions       share of generated images per predicted class (class_fraction_min/max as scalars).
"""

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from bigmodel_jax import metrics, runinfo
from bigmodel_jax.errors import UserError
from bigmodel_jax.models.layers import seed_key
from bigmodel_jax.tasks import TASKS, Task

ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/ lives beside the package
CLASSIFIER_CACHE_ENV = "BIGMODEL_JAX_CLASSIFIER_DIR"
SCORED_BY = "quality_classifier.json"  # in a GAN's workdir: the classifier its evaluations are scored by


def to_unit(images):
  """Generator output in [-1, 1] -> [0, 1], the scale of data.normalize='unit' images."""
  return (images + 1.0) / 2.0


@TASKS.register("adversarial")
class Adversarial(Task):
  metric_names = ("classifier_score", "frechet_distance", "real_classifier_score", "real_frechet_distance",
                  "class_fraction_min", "class_fraction_max")
  optimizers = ("generator", "discriminator")
  num_outputs = 1
  scored_by = ("eval.",)

  def __init__(self, config, dataset):
    if not dataset.is_image:
      raise UserError(f"config.task.name: 'adversarial' generates images; {dataset.name!r} has no images "
                      "(use mnist, fashion_mnist or digits)")
    if config.data.normalize != "unit":
      raise UserError(f"config.data.normalize: the GAN maps [0, 1] images to the generator's [-1, 1]; set it to "
                      f"'unit', got {config.data.normalize!r}")
    self.d_steps = config.task.get("d_steps", 1)
    if not isinstance(self.d_steps, int) or self.d_steps < 1:
      raise UserError(f"config.task.d_steps: must be an integer >= 1, got {self.d_steps!r}")
    self.updates_per_step = {"discriminator": self.d_steps, "generator": 1}
    self.eval_seed = config.eval.seed
    self.num_classes = dataset.num_classes
    self.config, self.dataset = config, dataset
    self._classifier = None

  @staticmethod
  def as_compared(config: dict) -> dict:
    """The classifier's workdir given relative or absolute, with a trailing slash or through a symlink is one
    directory (a relative one is resolved against this process's directory, as Classifier.load reads it)."""
    if not (workdir := config.get("eval", {}).get("classifier_workdir")):
      return config
    return {**config, "eval": {**config["eval"], "classifier_workdir": os.path.realpath(workdir)}}

  def setup(self, workdir=None, training: bool = True) -> None:
    self._classifier = Classifier.load(self.config, self.dataset)
    if workdir is not None:
      check_scored_by(Path(workdir), self._classifier, self.config, record=training)

  @property
  def classifier(self) -> "Classifier":
    if self._classifier is None:  # outside a run (tests, notebooks): load it on first use
      self._classifier = Classifier.load(self.config, self.dataset)
    return self._classifier

  def output_shape(self, input_shape):
    return (1,)

  def outputs(self, model, batch, *, train: bool = False, rngs=None):
    return model(batch["inputs"] * 2.0 - 1.0, train=train).astype(jnp.float32)

  # --- training

  def update(self, steps, state, batch, key):
    def d_loss(model, b, rngs):
      fake = jax.lax.stop_gradient(model.generate(model.noise(rngs.noise()), train=True))
      d_real = model(b["inputs"] * 2.0 - 1.0, train=True)[:, 0].astype(jnp.float32)
      d_fake = model(fake, train=True)[:, 0].astype(jnp.float32)
      m = b["mask"]
      n = jnp.maximum(m.sum(), 1.0)
      loss = ((jax.nn.softplus(-d_real) + jax.nn.softplus(d_fake)) * m).sum() / n
      return loss, {"d_loss": loss, "d_real": (jax.nn.sigmoid(d_real) * m).sum() / n,
                    "d_fake": (jax.nn.sigmoid(d_fake) * m).sum() / n}

    def g_loss(model, b, rngs):
      d_fake = model(model.generate(model.noise(rngs.noise()), train=True), train=True)[:, 0].astype(jnp.float32)
      m = b["mask"]
      loss = (jax.nn.softplus(-d_fake) * m).sum() / jnp.maximum(m.sum(), 1.0)
      return loss, {"g_loss": loss}

    out = {}
    for i in range(self.d_steps):
      grads, model_state, m = steps.grads(d_loss, state, batch, jax.random.fold_in(key, i), wrt="discriminator")
      state, opt_metrics = steps.apply_gradients(state, grads, model_state, wrt="discriminator")
      out.update(m, **opt_metrics)
    grads, model_state, m = steps.grads(g_loss, state, batch, jax.random.fold_in(key, self.d_steps), wrt="generator")
    state, opt_metrics = steps.apply_gradients(state, grads, model_state, wrt="generator")
    out.update(m, **opt_metrics)
    out["loss"] = out["d_loss"] + out["g_loss"]  # what the progress bar shows; the parts are logged too
    return state, out

  # --- evaluation: generated images for fixed noise, one per test example

  def fixed_noise(self, model, index_B):
    keys = jax.vmap(jax.random.fold_in, (None, 0))(seed_key(self.eval_seed), index_B.astype(jnp.uint32))
    return model.noise(keys)

  def generated(self, model, index_B):
    """[0, 1] images for the fixed noise of test examples `index_B` (running batch statistics)."""
    return to_unit(model.generate(self.fixed_noise(model, index_B), train=False).astype(jnp.float32))

  def evaluate_batch(self, model, batch):
    mask, index = batch["mask"], batch["index"]
    fake = self.generated(model, index)
    real = batch["inputs"].astype(jnp.float32)
    (p_fake, f_fake), (p_real, f_real) = self.classifier(fake), self.classifier(real)
    even = mask * (index % 2 == 0)
    odd = mask * (index % 2 == 1)

    def moments(features, weights):
      return {"n": weights.sum(), "sum": (features * weights[:, None]).sum(0),
              "outer": jnp.einsum("bi,bj->ij", features * weights[:, None], features)}

    def plogp(p):
      return (p * jnp.log(jnp.maximum(p, 1e-30))).sum(-1)

    return {
        "count": mask.sum(),
        "fake_p": (p_fake * mask[:, None]).sum(0), "fake_plogp": (plogp(p_fake) * mask).sum(),
        "real_p": (p_real * mask[:, None]).sum(0), "real_plogp": (plogp(p_real) * mask).sum(),
        "fake_classes": (jax.nn.one_hot(jnp.argmax(p_fake, -1), p_fake.shape[-1]) * mask[:, None]).sum(0),
        "fake_even": moments(f_fake, even), "real_even": moments(f_real, even), "real_odd": moments(f_real, odd),
    }

  def finalize(self, sums, split: str = "test") -> dict:
    s = jax.tree.map(lambda x: np.asarray(x, np.float64), sums)
    n = s["count"]
    fractions = s["fake_classes"] / n
    gaussian = lambda m: metrics.gaussian_from_moments(m["n"], m["sum"], m["outer"])
    real_odd = gaussian(s["real_odd"])
    return {
        "classifier_score": metrics.classifier_score(s["fake_p"] / n, s["fake_plogp"] / n),
        "real_classifier_score": metrics.classifier_score(s["real_p"] / n, s["real_plogp"] / n),
        "frechet_distance": metrics.frechet_distance(*gaussian(s["fake_even"]), *real_odd),
        "real_frechet_distance": metrics.frechet_distance(*gaussian(s["real_even"]), *real_odd),
        "class_fraction_min": float(fractions.min()), "class_fraction_max": float(fractions.max()),
        "class_fractions": [round(float(f), 4) for f in fractions],
    }

  # --- predict / sample: pictures

  def predict_batch(self, model, batch):
    return {"image": self.generated(model, batch["index"])}

  def write_predictions(self, run, predictions, step, out_dir: Path) -> tuple[list, dict]:
    """A PNG grid of the images for the first test examples' fixed noise: comparable across checkpoints."""
    from bigmodel_jax import plots
    images = predictions["image"][:run.config.predict.num_images]
    probs, _ = jax.device_get(self.classifier(jnp.asarray(images)))
    labels = [run.dataset.class_names[int(c)] for c in np.argmax(probs, -1)]
    return [plots.sample_grid(images, out_dir / "samples.png", labels=labels,
                              title=f"{run.dataset.name} GAN, step {step} (fixed noise; classifier's labels)")], {}

  def sample(self, run, model, step: int) -> dict:
    """config.sample.num_samples images from noise seeded by config.sample.seed -> PNG files and one .npy."""
    from bigmodel_jax import plots
    from bigmodel_jax.workdir import claim_output_dir
    s = run.config.sample
    claim_output_dir(run, "sample")  # the images are saved there
    keys = jax.random.split(seed_key(s.seed), s.num_samples)
    images = np.asarray(jax.jit(lambda z: to_unit(model.generate(z, train=False)))(model.noise(keys)), np.float32)
    out = {"step": step, "num_images": len(images)}
    if jax.process_index() == 0:
      directory = runinfo.unused_path(run.outputs / "samples" / f"step{step}_seed{s.seed}", make_dir=True)
      for i, image in enumerate(images):
        plots.save_image(image, directory / f"{i:04d}.png")
      np.save(directory / "images.npy", images)
      logging.info("wrote %d images to %s", len(images), directory)
      out["directory"] = str(directory)
    return out


class Classifier:
  """A trained classifier run of this codebase as a pure function: [0, 1] images -> (probabilities, features)."""

  def __init__(self, graphdef, params, model_state, mean, std, scale):
    self.graphdef, self.params, self.model_state = graphdef, params, model_state  # host arrays: constants in a jit
    self.mean, self.std, self.scale = (np.asarray(a, np.float32) for a in (mean, std, scale))
    self.sha256 = runinfo.fingerprint((params, model_state, self.mean, self.std, self.scale))
    self.workdir, self.field = None, "config.eval.classifier_workdir"  # where it was loaded from (Classifier.load)

  def __call__(self, images01_BxHxWxC):
    model = nnx.merge(self.graphdef, self.params, self.model_state)
    x = (images01_BxHxWxC * self.scale - self.mean) / self.std
    features = model.features(x, train=False).astype(jnp.float32)
    return jax.nn.softmax(model.head(features).astype(jnp.float32), -1), features

  @classmethod
  def load(cls, config, dataset) -> "Classifier":
    from bigmodel_jax import inference, workdir as workdir_lib
    import ml_collections
    workdir = config.eval.classifier_workdir
    field = "config.eval.classifier_workdir"
    if not workdir:
      workdir, field = _cached_classifier(config, dataset), "config.eval.classifier_config"
    workdir = Path(workdir)
    saved = workdir_lib.saved_config(workdir)
    if saved is None or not workdir_lib.has_checkpoints(workdir):
      raise UserError(f"{field}: {workdir} holds no trained run (no config.json or checkpoints); train one, e.g. "
                      f"python -m bigmodel_jax.main --config=configs/mnist_cnn.py --workdir={workdir}")
    c = ml_collections.ConfigDict(saved)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.parallel.strategy = "jit"
    if c.task.name != "classification":
      raise UserError(f"{field}: {workdir} is a {c.task.name!r} run; the GAN's quality needs an image classifier "
                      f"of {dataset.name} (e.g. a run of configs/mnist_cnn.py)")
    run = inference.Inference.load(c, workdir)  # the classifier from its workdir alone: its data is not read
    try:
      shape, classes = run.dataset.input_shape, run.dataset.num_classes
      if shape != dataset.input_shape or classes != dataset.num_classes:
        raise UserError(f"{field}: {workdir} classifies {run.dataset.name} inputs of shape {shape} into {classes} "
                        f"classes; the GAN makes {dataset.name} images of shape {dataset.input_shape} "
                        f"({dataset.num_classes} classes): use a classifier trained on those")
      model_probe = run.steps.model(run.steps.abstract_state)
      if not hasattr(model_probe, "features") or not hasattr(model_probe, "head"):
        raise UserError(f"{field}: {workdir} is a {c.model.name!r} model, which has no penultimate features; use a "
                        "cnn, mlp or resnet classifier")
      try:
        _, state = run.restore_step(flag=None)  # its latest step is the classifier: no other can be picked
      except UserError as e:
        again = f"; or delete {workdir} to train it again" if field == "config.eval.classifier_config" else ""
        raise UserError(f"{field}: the GAN's quality classifier: {e}{again}") from None
      params, model_state = runinfo.to_host((state.params, state.model_state))
      pre = run.card["preprocessing"]  # its input pipeline's constants (model_card.apply) on [0, 1] images
      mean, std = (pre["mean"], pre["std"]) if pre["normalize"] == "standardize" else (np.zeros(1), np.ones(1))
      scale = 1.0 if pre["normalize"] != "none" else pre["scale"]
      logging.info("GAN quality classifier: %s (%s on %s)", workdir, c.model.name, run.dataset.name)
      classifier = cls(run.steps.graphdef, params, model_state, mean, std, scale)
      classifier.workdir, classifier.field = workdir.absolute(), field
      return classifier
    finally:
      run.close()


def check_scored_by(workdir: Path, classifier: Classifier, config, record: bool = True) -> None:
  """A GAN run's evaluations are scored by one classifier (SCORED_BY: its weights' sha256, recorded by the first
  launch): a resume scored by another -- its config file edited since (another cache entry), its run retrained in
  place -- would mix two classifiers' scores in one history, and select its best across them. Only training
  `record`s it: an eval or predict (allow_config_change: with another classifier) reads the workdir and must not
  make its classifier the one the run's next launch is checked against."""
  from bigmodel_jax.workdir import has_checkpoints
  path, new = workdir / SCORED_BY, {"workdir": str(classifier.workdir), "params_sha256": classifier.sha256}
  try:
    held = json.loads(path.read_text())
  except (OSError, ValueError):
    held = None
  if isinstance(held, dict) and held.get("params_sha256") != classifier.sha256 and has_checkpoints(workdir):
    problem = (f"{classifier.field}: {workdir} was scored by another quality classifier ({held.get('workdir')}, "
               f"weights {str(held.get('params_sha256'))[:12]}) than {classifier.workdir} (weights "
               f"{classifier.sha256[:12]}): its config file edited or its run retrained since")
    if not config.train.allow_config_change:
      raise UserError(f"{problem}; put that classifier back, use a new --workdir, or pass "
                      "--config.train.allow_config_change=true to go on with this one")
    logging.warning("%s; going on with it (train.allow_config_change)", problem)
  if record and held != new and jax.process_index() == 0:
    try:
      runinfo.write_text_atomic(path, json.dumps(new, indent=2) + "\n")
    except OSError as e:  # e.g. a workdir made read-only
      logging.warning("cannot record the GAN's quality classifier in %s (%s)", path, e.strerror)


def cache_name(path: Path, dataset: str) -> str:
  """'mnist_cnn_mnist_<8 hex>': the classifier of this config file's contents on this dataset (another file of the
  same name, or the file edited, is another classifier, trained once in turn)."""
  return f"{path.stem}_{dataset}_{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}"


def _cached_classifier(config, dataset) -> Path:
  """The workdir of config.eval.classifier_config trained on this dataset: trained once, then reused."""
  from bigmodel_jax.data import fetch
  if jax.process_count() > 1:
    raise UserError("config.eval.classifier_workdir: a multi-process GAN run needs a trained classifier; train one "
                    "first (e.g. configs/mnist_cnn.py) and name its workdir")
  source = config.eval.classifier_config
  path = next((p for p in (Path(source), ROOT / source) if p.is_file()), Path(source))
  if not path.is_file():
    raise UserError(f"config.eval.classifier_config: no config file {path}; name one (configs/mnist_cnn.py) or "
                    "give config.eval.classifier_workdir")
  # absolute: the classifier trains in a process started in the checkout, not in this one's directory
  path = path.absolute()
  cache = Path(os.environ.get(CLASSIFIER_CACHE_ENV) or Path.home() / ".cache" / "bigmodel_jax" / "classifiers")
  cache, data_dir = cache.absolute(), fetch.data_dir(config.data.data_dir).absolute()
  workdir = cache / cache_name(path, dataset.name)
  if (workdir / "final_metrics.json").exists():
    return workdir
  cache.mkdir(parents=True, exist_ok=True)
  with open(cache / f"{workdir.name}.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # several processes (or runs) train it once
    if not (workdir / "final_metrics.json").exists():
      logging.info("training the GAN's quality classifier once: %s on %s -> %s", path, dataset.name, workdir)
      cmd = [sys.executable, "-m", "bigmodel_jax.main", f"--config={path}", f"--workdir={workdir}",
             f"--config.data.name={dataset.name}", f"--config.data.data_dir={data_dir}",
             "--config.train.progress_bar=false"]
      # one plain process beside this one: not part of a launcher's job, not holding the accelerator's memory
      env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_"))}
      env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
      done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
      if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise UserError(f"config.eval.classifier_config: training {path} on {dataset.name} failed ({last}); give a "
                        "trained classifier with config.eval.classifier_workdir")
  return workdir
