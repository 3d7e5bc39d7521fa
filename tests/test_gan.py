"""The DCGAN through the shared step machinery: two optimizers, quality that improves, exact resume after
SIGKILL, the same first losses on 8 devices (data, FSDP, pmap) as on one, bf16 and grad accumulation, and
one-line errors for a broken GAN config."""

import json
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from bigmodel_jax import train
from bigmodel_jax.checkpoint import Checkpointer
from conftest import error_lines, load_config, wait_for_checkpoint
from test_parallel import close, stepper_for, train_steps

SMOKE = "--config=configs/mnist_dcgan.py:smoke"
ARGS = [SMOKE, "--config.train.num_epochs=4", "--config.train.checkpoint_every=60", "--config.train.log_every=20"]


def gan_config():
  return load_config("mnist_dcgan", "smoke")  # digits, 16-unit generator and discriminator


@pytest.fixture(scope="module")
def reference(cli, tmp_path_factory):
  """A run compiled with LLVM's optimisations: compare its parameters only with runs made with optimized=True."""
  workdir = tmp_path_factory.mktemp("gan")
  proc = cli(*ARGS, f"--workdir={workdir}", timeout=300, optimized=True)  # 240 steps: worth optimising
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, json.loads((workdir / "final_metrics.json").read_text())


def test_quality_improves_over_training(reference):
  workdir, final = reference
  evals = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if '"validation"' in l]
  assert len(evals) == 4  # one per epoch
  first, last = evals[0], evals[-1]
  assert last["classifier_score"] > first["classifier_score"] + 0.5
  assert last["frechet_distance"] < first["frechet_distance"]
  assert 1.0 <= last["classifier_score"] <= 10.0
  assert last["real_classifier_score"] > 8.0  # the digits classifier is sure of real digits
  assert last["real_frechet_distance"] < last["frechet_distance"]  # the floor, on the same footing
  fractions = final["test"]["class_fractions"]
  assert sum(fractions) == pytest.approx(1.0, abs=1e-3) and len(fractions) == 10
  assert final["best"]["metric"] == "classifier_score" and final["best"]["eval"] == "validation"
  trains = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if '"train"' in l]
  assert {"d_loss", "g_loss", "generator/grad_norm", "discriminator/learning_rate"} <= set(trains[-1])


def test_both_optimizer_states_are_checkpointed(reference):
  workdir, _ = reference
  config = gan_config()
  config.train.num_epochs = 4
  run = train.build_run(config, workdir, for_training=False)
  try:
    step = run.checkpointer.latest_step()
    state, _, _ = run.restore(step)
  finally:
    run.checkpointer.close()
    run.writer.close()
  assert set(state.opt_state) == {"generator", "discriminator"}
  # each Adam counted every step of its own, and holds moments only for its own parameters
  for name in ("generator", "discriminator"):
    counts = [int(x) for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state[name]) if "count" in str(p)]
    assert counts and set(counts) == {step}
    moments = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state[name])}
    other = "discriminator" if name == "generator" else "generator"
    assert any(f"'{name}'" in m for m in moments) and not any(f"'{other}'" in m for m in moments)


def test_sigkill_then_relaunch_is_bit_identical(cli, tmp_path, reference):
  _, final = reference
  proc = wait_for_checkpoint(cli(*ARGS, f"--workdir={tmp_path}", popen=True, optimized=True), tmp_path, 60,
                             timeout=240)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  resumed = cli(*ARGS, f"--workdir={tmp_path}", timeout=300, optimized=True)  # the reference's own code
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from checkpoint at step" in resumed.stderr
  again = json.loads((tmp_path / "final_metrics.json").read_text())
  assert again["params_sha256"] == final["params_sha256"]
  assert again["test"]["classifier_score"] == final["test"]["classifier_score"]


@pytest.mark.parametrize("layout", [dict(data=8), dict(fsdp=8), dict(strategy="pmap")])
def test_eight_devices_give_the_first_losses_of_one(classifier_dir, layout):
  config = gan_config()
  config.parallel.strategy = layout.pop("strategy", "jit")
  for o in config.optimizers.values():  # SGD: Adam would amplify reduction-order noise near zero gradients
    o.name, o.learning_rate = "sgd", 0.05
  one_losses, one = train_steps(config, stepper_for(config, 1), steps=2)
  losses, state = train_steps(config, stepper_for(config, 8, **layout), steps=2)
  close(losses, one_losses, rtol=1e-4)  # float32 convs and batch statistics, summed in another order
  # the batch statistics (running averages) agree too: BatchNorm saw the whole global batch on every layout
  for a, b in zip(jax.tree.leaves(state.model_state), jax.tree.leaves(one.model_state)):
    if np.issubdtype(np.asarray(a).dtype, np.floating):
      close(np.asarray(a), np.asarray(b), rtol=1e-4)


def test_bfloat16_and_grad_accumulation(classifier_dir):
  config = gan_config()
  config.train.dtype = "bfloat16"
  config.train.grad_accum_steps = 2
  losses, state = train_steps(config, stepper_for(config, 2), steps=3)
  assert np.isfinite(losses).all()
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}


@pytest.mark.parametrize("args, needles", [
    (["--config.optimizers.discriminator.params=generator"], ["owned by no optimizer", "discriminator."]),
    (["--config.optimizers.generator.params=genrator"], ["config.optimizers.generator.params", "genrator",
                                                        "matches no parameter"]),
    (["--config.task.d_steps=0"], ["config.task.d_steps"]),
    (["--config.optimizer.learning_rate=0.5"], ["config.optimizer.learning_rate", "unused", "config.optimizers"]),
    (["--config.model.generator_features=0"], ["config.model.generator_features"]),
])
def test_bad_gan_configs_are_one_line(cli, tmp_path, args, needles):
  workdir = tmp_path / "work"
  proc = cli(SMOKE, *args, f"--workdir={workdir}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  for needle in needles:
    assert needle in lines[0]
  assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()


def test_missing_optimizer_is_one_line(cli, tmp_path):
  config_file = tmp_path / "gan_one_optimizer.py"
  config_file.write_text(
      "import importlib.util, sys\n"
      f"spec = importlib.util.spec_from_file_location('g', {str(train.Path(__file__).parents[1] / 'configs' / 'mnist_dcgan.py')!r})\n"
      "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
      "def get_config(arg=''):\n"
      "  c = m.get_config('smoke')\n"
      "  del c.optimizers['discriminator']\n"
      "  return c\n")
  proc = cli(f"--config={config_file}", f"--workdir={tmp_path / 'work'}")
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "config.optimizers.discriminator: missing" in lines[0], proc.stderr[-2000:]


def test_classifier_that_is_not_an_image_classifier(cli, tmp_path):
  regression = tmp_path / "regression"
  proc = cli("--config=configs/linear_regression.py", f"--workdir={regression}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  workdir = tmp_path / "new" / "gan"
  proc = cli(SMOKE, f"--config.eval.classifier_workdir={regression}", f"--workdir={workdir}")
  assert proc.returncode == 2
  lines = error_lines(proc.stderr)
  assert len(lines) == 1 and "config.eval.classifier_workdir" in lines[0] and "regression" in lines[0], lines
  assert not (tmp_path / "new").exists()  # was: left holding only the .train.lock it took
  (tmp_path / "kept").mkdir()  # "x/../kept" names a directory that existed: kept
  proc = cli(SMOKE, f"--config.eval.classifier_workdir={regression}", f"--workdir={tmp_path / 'x' / '..' / 'kept'}")
  assert proc.returncode == 2 and (tmp_path / "kept").is_dir(), proc.stderr[-2000:]


def test_predict_writes_a_sample_grid_and_sample_writes_images(cli, reference):
  workdir, final = reference
  proc = cli("--mode=predict", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  grid = workdir / f"predict_step{final['step']}" / "samples.png"
  assert grid.is_file() and grid.read_bytes()[:4] == b"\x89PNG"
  proc = cli("--mode=sample", f"--workdir={workdir}", *ARGS, "--config.sample.num_samples=5",
             "--config.sample.temperature=0.5")  # a language model's field: said to do nothing here
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--config.sample.temperature has no effect: a GAN samples config.sample.num_samples images" in proc.stderr
  directory = workdir / "samples" / f"step{final['step']}_seed0"
  assert len(list(directory.glob("*.png"))) == 5
  images = np.load(directory / "images.npy")
  assert images.shape == (5, 8, 8, 1) and 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.05
  proc = cli("--mode=sample", f"--workdir={workdir}", *ARGS, "--config.sample.num_samples=3")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert len(list(directory.glob("*.png"))) == 5  # kept; the repeat has a directory of its own
  assert len(list(directory.with_name(directory.name + "_2").glob("*.png"))) == 3


def test_d_steps_stretch_the_discriminators_schedule(classifier_dir):
  """With d_steps=2 the discriminator's optimizer steps twice per train step: its schedule spans 2x the steps."""
  config = gan_config()
  config.task.d_steps = 2
  config.optimizers.discriminator.schedule.name = "cosine"
  total = 100
  steps = stepper_for(config, 1)  # total_steps=100
  d, g = steps.optimizers["discriminator"], steps.optimizers["generator"]
  assert (d.updates_per_step, g.updates_per_step) == (2, 1)
  lr = config.optimizers.discriminator.learning_rate
  assert float(d.schedule(total * 2)) == pytest.approx(0.0, abs=1e-9) and float(d.schedule(total)) == pytest.approx(lr / 2)
  _, state = train_steps(config, steps, steps=2)
  counts = {int(x) for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state["discriminator"]) if "count" in str(p)}
  assert counts == {4}


def test_a_classifier_config_and_cache_relative_to_the_working_directory(cache_dir, tmp_path, monkeypatch):
  """The quality classifier trains in a process started in the checkout: a classifier config file, a cache
  directory and a data dir given relative to the user's directory are those of the user's directory."""
  from bigmodel_jax.data import load_dataset
  from bigmodel_jax.tasks import adversarial
  source = (train.Path(__file__).parents[1] / "configs" / "digits_mlp.py").read_text()
  (tmp_path / "my_classifier.py").write_text(source + "\n\n_full = get_config\n\n\ndef get_config(variant=''):\n"
                                             "  return _full('smoke')\n")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv(adversarial.CLASSIFIER_CACHE_ENV, "cache")
  monkeypatch.setenv("BIGMODEL_JAX_CACHE_DIR", str(cache_dir))
  config = gan_config()
  config.eval.classifier_config, config.data.data_dir = "my_classifier.py", "data"
  workdir = adversarial._cached_classifier(config, load_dataset(config.data))
  assert workdir == tmp_path / "cache" / adversarial.cache_name(tmp_path / "my_classifier.py", "digits")
  assert workdir.name.startswith("my_classifier_digits_")
  assert (workdir / "final_metrics.json").is_file()
  assert json.loads((workdir / "config.json").read_text())["data"]["data_dir"] == str(tmp_path / "data")
  # another file of the same name, or the file edited, is another classifier (was: the cached one, silently)
  (tmp_path / "elsewhere").mkdir()
  (tmp_path / "elsewhere" / "my_classifier.py").write_text(source.replace("128", "64"))
  assert adversarial.cache_name(tmp_path / "elsewhere" / "my_classifier.py", "digits") != workdir.name
  assert adversarial.cache_name(Path(shutil.copy(tmp_path / "my_classifier.py", tmp_path / "elsewhere")),
                                "digits") == workdir.name  # the same contents: the same classifier


def test_eval_seeds_2_to_the_32_apart_draw_other_noise_and_2_to_the_63_is_one_line():
  """config.eval.seed went to jax.random.PRNGKey as it was: 2**32 + 3 drew seed 3's evaluation noise (the same
  classifier score, though a resume refuses it as another eval.*), -5 seed 2**32 - 5's, and 2**63 ended the
  first evaluation in an OverflowError traceback; it is bounded like config.seed and keyed by seed_key."""
  import types
  from bigmodel_jax import config as config_lib
  from bigmodel_jax.errors import UserError
  from bigmodel_jax.tasks.adversarial import Adversarial
  data = types.SimpleNamespace(name="digits", is_image=True, num_classes=10)
  model = types.SimpleNamespace(noise=lambda keys: jax.vmap(lambda k: jax.random.normal(k, (3,)))(keys))
  index = np.arange(4)

  def with_seed(seed):
    config = gan_config()
    config.eval.seed = seed
    return config

  noise = lambda seed: np.asarray(Adversarial(with_seed(seed), data).fixed_noise(model, index))
  keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(3), index.astype(np.uint32))
  before = np.asarray(model.noise(keys))
  np.testing.assert_array_equal(noise(3), before)  # below 2**32: the noise it always was
  assert not np.array_equal(noise(3), noise(2 ** 32 + 3))
  for bad in (-5, 2 ** 63):
    with pytest.raises(UserError, match=r"config\.eval\.seed: must be >= 0 and below 2\*\*63"):
      config_lib.validate_fields(with_seed(bad))


def test_a_resume_scored_by_another_classifier_than_the_first_launchs_is_refused(tmp_path):
  """With eval.classifier_workdir "" the classifier is the cache entry of its config file's contents: that file
  edited between a launch and its resume (or a classifier run retrained in place) scored the resume with another
  classifier under the same config, mixing two classifiers' scores in one history. The first launch records its
  classifier's weights; a resume with others is refused (allow_config_change goes on, with a warning). The cache
  directory alone ($BIGMODEL_JAX_CLASSIFIER_DIR) moving is not refused: the same contents train the same weights."""
  import types
  from bigmodel_jax.errors import UserError
  from bigmodel_jax.tasks import adversarial
  config = gan_config()
  params = {"w": np.arange(6, dtype=np.float32)}
  first = adversarial.Classifier(None, params, {}, [0.0], [1.0], 1.0)
  first.workdir, first.field = tmp_path / "cacheA" / "digits_mlp_digits_1", "config.eval.classifier_config"
  adversarial.check_scored_by(tmp_path, first, config)  # a new run: recorded
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)
  moved = adversarial.Classifier(None, {"w": np.arange(6, dtype=np.float32)}, {}, [0.0], [1.0], 1.0)
  moved.workdir, moved.field = tmp_path / "cacheB" / "digits_mlp_digits_1", first.field
  adversarial.check_scored_by(tmp_path, moved, config)  # the same weights from another cache: goes on
  edited = adversarial.Classifier(None, {"w": np.arange(6, dtype=np.float32) + 1}, {}, [0.0], [1.0], 1.0)
  edited.workdir, edited.field = tmp_path / "cacheB" / "digits_mlp_digits_2", first.field
  with pytest.raises(UserError, match=r"^config\.eval\.classifier_config: .* was scored by another quality "
                                      r"classifier \(.*cacheB/digits_mlp_digits_1, weights \w{12}\) than "
                                      r".*digits_mlp_digits_2 .*allow_config_change=true"):
    adversarial.check_scored_by(tmp_path, edited, config)
  config.train.allow_config_change = True
  adversarial.check_scored_by(tmp_path, edited, config)
  assert json.loads((tmp_path / adversarial.SCORED_BY).read_text())["params_sha256"] == edited.sha256


def test_an_eval_with_another_classifier_leaves_the_recorded_one(tmp_path, monkeypatch):
  """--mode=eval (build_run for_training=False) reads the workdir: with allow_config_change and another classifier
  it went on, and overwrote the record, so the training's next launch with its own classifier was refused (and one
  with the eval's was not)."""
  from bigmodel_jax.tasks import adversarial
  config = gan_config()
  trained = adversarial.Classifier(None, {"w": np.arange(6, dtype=np.float32)}, {}, [0.0], [1.0], 1.0)
  other = adversarial.Classifier(None, {"w": np.arange(6, dtype=np.float32) + 1}, {}, [0.0], [1.0], 1.0)
  for c in (trained, other):
    c.workdir = tmp_path / "clf"
  adversarial.check_scored_by(tmp_path, trained, config)  # the first launch's record
  recorded = (tmp_path / adversarial.SCORED_BY).read_text()
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  monkeypatch.setattr(adversarial.Classifier, "load", classmethod(lambda cls, config, dataset: other))
  monkeypatch.setattr(train, "Checkpointer", lambda *a, **k: None)  # the fake step holds no checkpoint
  config.train.allow_config_change = True
  train.build_run(config, tmp_path, for_training=False)
  assert (tmp_path / adversarial.SCORED_BY).read_text() == recorded


def test_a_run_whose_config_json_predates_frozen_evaluates_and_resumes(cli, tmp_path):
  """A GAN trained before optimizers.<name>.frozen existed (2026-12-01) has named optimizer sections without it:
  its config.json is completed like any older run's (nothing frozen), not refused as 'frozen: missing'."""
  workdir = tmp_path / "gan"
  proc = cli(SMOKE, "--config.train.num_steps=20", "--config.train.log_every=10", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  saved = json.loads((workdir / "config.json").read_text())
  for section in saved["optimizers"].values():
    del section["frozen"]
  (workdir / "config.json").write_text(json.dumps(saved))  # as that version wrote it
  proc = cli("--mode=eval", f"--workdir={workdir}")
  assert proc.returncode == 0, error_lines(proc.stderr)
  assert json.loads(proc.stdout)["step"] == 20
  proc = cli(f"--config={workdir / 'config.json'}", f"--workdir={workdir}", "--config.train.num_steps=30",
             "--config.train.allow_config_change=true")
  assert proc.returncode == 0, error_lines(proc.stderr)
  assert json.loads((workdir / "final_metrics.json").read_text())["step"] == 30


def test_a_damaged_classifier_checkpoint_names_the_classifier_not_checkpoint_step(cli, tmp_path):
  """The GAN is scored by its classifier's latest step: a damaged one is one line naming the classifier field and
  that step (was: 'pass --checkpoint_step=N', a flag training refuses and eval would apply to the GAN)."""
  classifier = tmp_path / "classifier"
  proc = cli("--config=configs/digits_mlp.py:smoke", f"--workdir={classifier}", "--config.train.num_steps=20",
             "--config.train.checkpoint_every=10")
  assert proc.returncode == 0, proc.stderr[-2000:]
  step = classifier / "checkpoints" / "20"
  largest = max((p for p in step.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:100])
  proc = cli(SMOKE, "--config.train.num_steps=10", f"--config.eval.classifier_workdir={classifier}",
             f"--workdir={tmp_path / 'gan'}")
  lines = error_lines(proc.stderr)
  assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith("error: config.eval.classifier_workdir: the GAN's quality classifier: checkpoint")
  assert "put back an intact copy of step 20" in lines[0] and "--checkpoint_step" not in lines[0], lines[0]
  assert not (tmp_path / "gan" / "checkpoints").exists()
