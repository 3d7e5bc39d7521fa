"""The command line a researcher lives in: --help, --list_configs, --print_config, composed variants, a trained
run used (eval / predict) without repeating its config, config.json as a config, and honest start-up times."""

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigmodel_jax import cli as cli_lib, config as config_lib
from test_errors import assert_one_error  # exit 2, one 'error:' line naming every needle, no traceback

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["--config=configs/digits_mlp.py:smoke", "--config.optimizer.learning_rate=3e-3",
          "--config.train.num_epochs=3", "--config.train.progress_bar=false"]


def ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def load(name: str, variant: str = ""):
  path = ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"_test_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def as_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


@pytest.fixture(scope="module")
def digits_run(cli, tmp_path_factory) -> Path:
  """A run trained with command-line overrides (which eval / predict must not need repeated)."""
  workdir = tmp_path_factory.mktemp("cli") / "digits"
  proc = ok(cli(*DIGITS, f"--workdir={workdir}"))
  (workdir.parent / "train.stderr").write_text(proc.stderr)
  return workdir


# --- discover ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_exits_0_and_names_every_mode(cli, flag):
  proc = ok(cli(flag))
  for mode in ("train", "eval", "predict", "sample", "export", "serve", "quantize"):  # every --mode value
    assert f"  {mode} " in proc.stdout, mode
    assert f"--mode={mode}" in proc.stdout or mode == "train"
  assert "--print_config" in proc.stdout and "--list_configs" in proc.stdout


def test_the_console_script_has_the_same_help():
  script = Path(sys.executable).with_name("bigmodel-jax")
  if not script.exists():
    pytest.skip("bigmodel-jax is not installed beside this python (pip install -e .)")
  proc = ok(subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60))
  assert "--mode=eval" in proc.stdout


def test_list_configs_names_every_config_with_its_variants(cli):
  proc = ok(cli("--list_configs"))
  for path in sorted((ROOT / "configs").glob("*.py")):
    assert f"configs/{path.name}" in proc.stdout, path.name
  line = next(l for l in proc.stdout.splitlines() if "shakespeare_char_gpt.py" in l)
  assert "cpu, plays, smoke" in line
  assert "nanoGPT" in proc.stdout  # the first line of each config's docstring


def test_print_config_prints_every_field_and_touches_no_file(cli, tmp_path):
  workdir = tmp_path / "never"
  proc = ok(cli(*DIGITS, f"--workdir={workdir}", "--print_config"))
  assert not workdir.exists()
  printed = {line[2:].split(" = ")[0].strip() for line in proc.stdout.splitlines() if " = " in line}
  expected = set(config_lib.flatten(as_json(load("digits_mlp", "smoke"))))
  assert printed == expected
  lines = {line[2:].split(" = ")[0].strip(): line for line in proc.stdout.splitlines() if " = " in line}
  assert lines["optimizer.learning_rate"].startswith("* ") and "0.003" in lines["optimizer.learning_rate"]
  assert "# global batch size" in lines["data.batch_size"]
  assert "one of: adam, adamw, sgd" in lines["optimizer.name"]
  assert "training steps: " in proc.stdout and "parameters: " in proc.stdout


@pytest.mark.parametrize("flag", ["--print_config", "--list_configs"])
def test_stdout_closed_by_its_reader_while_printing_the_config_is_one_line(cache_dir, flag):
  """--print_config | head -1 (head gone after the line it wanted) was a BrokenPipeError traceback, exit 1, as the
  modes' results were (f4a995c): one line naming stdout, exit 141."""
  from conftest import CLOSED_STDOUT, with_stdout_closed
  status, err = with_stdout_closed("bigmodel_jax.main", *DIGITS, flag, env={"BIGMODEL_JAX_CACHE_DIR": str(cache_dir)},
                                   timeout=120)
  assert status == 141 and "Traceback" not in err, err[-3000:]
  assert [l for l in err.splitlines() if l.startswith("error:")] == [CLOSED_STDOUT], err[-3000:]


def test_print_config_counts_the_parameters_and_steps_training_has(cli, digits_run):
  proc = ok(cli(f"--workdir={digits_run}", "--print_config"))
  final = json.loads((digits_run / "final_metrics.json").read_text())
  assert f"parameters: {final['num_params']:,} " in proc.stdout
  assert f"training steps: {final['step']:,} (3 epochs x" in proc.stdout


def test_every_base_config_field_has_a_meaning():
  from bigmodel_jax import cli
  missing = [k for k in config_lib.flatten(config_lib.base_config().to_dict())
             if not k.startswith("parallel.rules.") and not cli.meaning(k)]
  assert not missing, f"add a trailing comment in base_config() for {missing}"


def test_composed_variants_equal_the_same_overrides_by_hand():
  for name in ("shakespeare_char_gpt", "shakespeare_lstm"):
    by_hand = load(name, "smoke")
    by_hand.data.name = "shakespeare_plays"
    assert as_json(load(name, "smoke,plays")) == as_json(by_hand)
    assert as_json(load(name, "plays,smoke")) == as_json(by_hand)  # no conflict: the order does not matter here
  with pytest.raises(ValueError, match="variants 'smoke' and 'cpu' .* both set"):
    load("shakespeare_char_gpt", "smoke,cpu")
  with pytest.raises(config_lib.UnknownVariant, match="'nope'"):
    load("shakespeare_char_gpt", "smoke,nope")


def test_the_lstm_variants_keep_their_meaning():
  """shakespeare_lstm builds its variants from the GPT's: the same data and budget, its own model sizes."""
  gpt, lstm = as_json(load("shakespeare_char_gpt", "cpu")), as_json(load("shakespeare_lstm", "cpu"))
  assert {k: v for k, v in gpt.items() if k not in ("model", "optimizer")} == \
         {k: v for k, v in lstm.items() if k not in ("model", "optimizer")}
  assert lstm["model"]["name"] == "lstm_lm" and lstm["model"]["embed_dim"] == 128
  assert lstm["optimizer"]["learning_rate"] == 2e-3


def test_a_field_that_has_no_effect_is_said():
  config = load("digits_mlp", "smoke")  # adam, constant schedule, char tokenizer
  notes = cli_lib.resolve_overrides(config, ["schedule.warmup_steps", "optimizer.momentum",
                                             "data.tokenizer.vocab_size", "optimizer.learning_rate"])
  assert len(notes) == 3 and all("has no effect" in n for n in notes)
  gan = load("mnist_dcgan", "smoke")
  assert any("named config.optimizers" in n for n in cli_lib.resolve_overrides(gan, ["optimizer.learning_rate"]))
  config = load("digits_mlp", "smoke")
  config.train.num_steps = 100  # both given: num_steps wins, and num_epochs (unlike alone) changes nothing
  both = cli_lib.resolve_overrides(config, ["train.num_steps", "train.num_epochs"])
  assert len(both) == 1 and both[0].startswith("--config.train.num_epochs has no effect: train.num_steps=100 sets")


def test_sampling_fields_beside_temperature_zero_are_said_in_sample_mode_only():
  config = load("shakespeare_char_gpt", "smoke")
  config.sample.temperature = 0.0
  given = ["sample.temperature", "sample.top_k", "sample.top_p", "sample.seed", "sample.prompt"]
  notes = cli_lib.idle_notes(config, given, "sample")
  assert [n.split(" has no effect")[0] for n in notes] == ["--config.sample.top_k", "--config.sample.top_p",
                                                          "--config.sample.seed"]
  assert all("temperature=0" in n and "greedy" in n for n in notes)
  assert cli_lib.idle_notes(config, given, "serve") == []  # config.sample: a request's defaults, its temperature too
  assert cli_lib.idle_notes(config, given) == []  # training records them for later modes
  config.sample.temperature = 0.8
  assert cli_lib.idle_notes(config, given, "sample") == []
  gan = load("mnist_dcgan", "smoke")  # a GAN's own note wins
  gan.sample.temperature = 0.0
  assert cli_lib.idle_fields(gan, ["sample.top_k", "sample.seed"], "sample") == {  # its noise is the seed's
      "sample.top_k": "a GAN samples config.sample.num_samples images from config.sample.seed's noise (no text)"}


def test_no_effect_on_a_config_missing_sections_leaves_it_to_validation():
  import ml_collections  # a --config of a hand-made workdir, read by a mode on a checkpoint: no traceback here
  config = ml_collections.ConfigDict({"model": {"name": "mlp"}, "data": {"batch_size": 8}})
  assert cli_lib.idle_fields(config, ["sample.prompt", "schedule.warmup_steps", "optimizer.momentum"]) == {}


def test_num_epochs_on_the_command_line_beats_a_variants_num_steps():
  config = load("mnist_cnn", "smoke")
  config.train.num_epochs = 2
  notes = cli_lib.resolve_overrides(config, ["train.num_epochs"])
  assert config.train.num_steps == -1 and len(notes) == 1 and "train.num_steps=100" in notes[0]
  config = load("mnist_cnn", "smoke")
  notes = cli_lib.resolve_overrides(config, ["train.num_epochs", "train.num_steps"])  # both: num_steps wins, said
  assert config.train.num_steps == 100 and len(notes) == 1 and "train.num_epochs has no effect" in notes[0]


from conftest import TINY_SHAKESPEARE as TINY  # noqa: E402


@pytest.mark.skipif(not TINY.is_file(), reason=f"no local copy of tiny Shakespeare at {TINY}")
def test_num_epochs_override_is_said_on_the_command_line(cli, tmp_path):
  proc = ok(cli("--config=configs/shakespeare_char_gpt.py:smoke", f"--config.data.path={TINY}",
                "--config.train.num_epochs=1", "--print_config"))
  assert "--config.train.num_epochs=1 replaces the config's train.num_steps=40" in proc.stderr
  assert "training steps: " in proc.stdout and " (1 epochs x " in proc.stdout


# --- use a trained run ------------------------------------------------------------------------------------------

def test_eval_and_predict_take_their_own_fields_without_config(cli, digits_run):
  proc = ok(cli(f"--workdir={digits_run}", "--mode=eval", "--config.data.eval_batch_size=7"))
  result = json.loads(proc.stdout)
  final = json.loads((digits_run / "final_metrics.json").read_text())
  assert result["validation"]["accuracy"] == pytest.approx(final["validation"]["accuracy"], abs=1e-6)
  ok(cli(f"--workdir={digits_run}", "--mode=predict", "--config.predict.num_images=4"))
  assert any(digits_run.glob("predict_step*/test_images.png"))


@pytest.mark.parametrize("mode", ["eval", "predict"])
def test_a_math_field_in_eval_modes_is_one_line(cli, digits_run, mode):
  before = sorted(p.name for p in digits_run.iterdir())
  assert_one_error(cli(f"--workdir={digits_run}", f"--mode={mode}", "--config.model.hidden_sizes=(8,)"),
                   "--config.model.hidden_sizes", f"--mode={mode}", "new --workdir")
  assert sorted(p.name for p in digits_run.iterdir()) == before


def test_eval_with_the_config_file_but_not_its_overrides_uses_the_run(cli, digits_run):
  """The run's training overrides need not be repeated: its config.json decides what it computed."""
  proc = ok(cli("--config=configs/digits_mlp.py:smoke", f"--workdir={digits_run}", "--mode=eval"))
  assert "uses the run's own values" in proc.stderr and "optimizer.learning_rate" in proc.stderr


def test_config_json_as_config_reproduces_the_run(cli, digits_run, tmp_path):
  fork = tmp_path / "fork"
  ok(cli(f"--config={digits_run / 'config.json'}", f"--workdir={fork}"))
  assert json.loads((fork / "config.json").read_text()) == json.loads((digits_run / "config.json").read_text())
  same = json.loads((fork / "final_metrics.json").read_text())["params_sha256"]
  assert same == json.loads((digits_run / "final_metrics.json").read_text())["params_sha256"]
  # and forked with an override
  ok(cli(f"--config={digits_run / 'config.json'}", "--config.seed=1", f"--workdir={tmp_path / 'seed1'}",
         "--print_config"))


def test_a_tilde_after_the_equals_sign_is_the_home_directory(cli, digits_run):
  """The shell leaves --workdir=~/x as it is: was a directory named '~' in the current one (a run there, or none)."""
  home = digits_run.parent
  proc = ok(cli(f"--workdir=~/{digits_run.name}", "--mode=eval", "--output_dir=~/tilde_out",
                f"--config=~/{digits_run.name}/config.json", env={"HOME": str(home)}))
  step = json.loads((digits_run / "final_metrics.json").read_text())["step"]
  assert json.loads(proc.stdout)["step"] == step and (home / "tilde_out" / f"eval_step{step}.json").is_file()
  assert not (ROOT / "~").exists()


def test_a_tilde_in_a_path_field_is_the_home_directory(cli, digits_run, tmp_path):
  """--config.FIELD=~/x (the shell leaves the '~'), a config file's or a config.json's '~/x': the runs read
  train.tracking.wandb_dir and eval.classifier_workdir as they are (W&B wrote into a directory named '~' in the
  current one); every path field now names the home directory's, and config.json records that."""
  home = tmp_path / "home"
  paths = {"train.tracking.wandb_dir": "~/wb", "eval.classifier_workdir": "~/clf", "init.workdir": "~/src",
           "data.data_dir": "~/data"}
  proc = ok(cli("--config=configs/digits_mlp.py:smoke", *(f"--config.{k}={v}" for k, v in paths.items()),
                "--print_config", env={"HOME": str(home)}))
  printed = {line.split()[1]: line.split(" = ")[1].split("  #")[0] for line in proc.stdout.splitlines()
             if line[2:].split(" ")[0] in paths}
  assert printed == {k: repr(str(home / v[2:])) for k, v in paths.items()}
  saved = json.loads((digits_run / "config.json").read_text())
  saved["eval"]["classifier_workdir"] = "~/clf"  # a config.json written by hand
  (tmp_path / "config.json").write_text(json.dumps(saved))
  proc = ok(cli(f"--config={tmp_path / 'config.json'}", "--print_config", env={"HOME": str(home)}))
  assert f"eval.classifier_workdir            = {str(home / 'clf')!r}" in proc.stdout
  pytest.importorskip("wandb")
  workdir = tmp_path / "run"
  ok(cli("--config=configs/digits_mlp.py:smoke", "--config.train.num_steps=2", "--config.train.trackers=wandb",
         "--config.train.tracking.wandb_dir=~/wb", f"--workdir={workdir}", env={"HOME": str(home)}))
  assert (home / "wb" / "wandb").is_dir() and not (ROOT / "~").exists()
  assert json.loads((workdir / "config.json").read_text())["train"]["tracking"]["wandb_dir"] == str(home / "wb")


def test_a_config_json_in_a_path_with_colons_is_read_whole(cli, digits_run, tmp_path):
  """A workdir named by its time (runs/t08:45) forked from its config.json: was 'cannot read config file
  .../t' (the path cut at its first colon, as if the rest were a config file's variant)."""
  run = tmp_path / "t08:45"
  run.mkdir()
  shutil.copy(digits_run / "config.json", run / "config.json")
  proc = ok(cli(f"--config={run / 'config.json'}", "--config.seed=1", "--print_config"))
  assert "* seed" in proc.stdout and "training steps: " in proc.stdout
  assert_one_error(cli(f"--config={run / 'config.json'}:smoke", "--print_config"), "config.json has no variants")


def test_a_config_files_argument_ending_in_json_is_its_argument(cli, tmp_path):
  """--config=x.py:params.json passes 'params.json' to get_config, as config_flags does: was read as a config.json
  named 'x.py:params.json' ('cannot read ...')."""
  (tmp_path / "params.json").write_text('{"seed": 7}')
  (tmp_path / "x.py").write_text("import json\nfrom bigmodel_jax.config import base_config\n\n\n"
                                 "def get_config(arg=None):\n  c = base_config()\n"
                                 "  c.seed = json.loads(open(arg).read())['seed']\n  return c\n")
  proc = ok(cli(f"--config={tmp_path / 'x.py'}:{tmp_path / 'params.json'}", "--print_config"))
  assert any(line.startswith("* seed ") and line.split("=")[1].split("#")[0].strip() == "7"
             for line in proc.stdout.splitlines()), proc.stdout


@pytest.mark.parametrize("args,needles", [
    (["--config={run}/config.json:smoke"], ["config.json has no variants"]),
    (["--config={run}/final_metrics.json"], ["final_metrics.json", "not a run's config.json"]),
    (["--config={run}/nope.json"], ["nope.json", "cannot read"]),
], ids=["variant", "not-a-config", "missing"])
def test_bad_json_configs_are_one_line(cli, digits_run, tmp_path, args, needles):
  assert_one_error(cli(*(a.format(run=digits_run) for a in args), f"--workdir={tmp_path / 'w'}"), *needles)
  assert not (tmp_path / "w").exists()


# --- honest logs ------------------------------------------------------------------------------------------------

def test_startup_time_is_measured_from_this_program_not_the_fork(tmp_path, cache_dir):
  """Launched from a long-lived parent (a shell that waited 3 s, then exec'd python: the process's fork time is 3 s
  before the program began), the recorded start-up equals the time from exec to the first step, within 1 s."""
  import os
  stamp, workdir = tmp_path / "exec_time", tmp_path / "run"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "BIGMODEL_JAX_CACHE_DIR": str(cache_dir)}
  script = (f"sleep 3; date +%s.%N > {stamp}; exec {sys.executable} -m bigmodel_jax.main "
            f"--config=configs/digits_mlp.py:smoke --config.train.num_steps=3 --config.train.progress_bar=false "
            f"--workdir={workdir}")
  ok(subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120))
  exec_time = float(stamp.read_text())
  record = next(json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()
                if json.loads(l)["split"] == "startup")
  external = record["time"] - exec_time
  assert abs(record["seconds_to_first_step"] - external) < 1.0, (record, external)
  assert time.time() > record["time"]


def test_a_single_device_run_logs_no_sharding_table(digits_run):
  log = (digits_run.parent / "train.stderr").read_text()
  assert "mesh data1 over 1 device" in log or "over 1 device " in log, log[-2000:]
  assert "per device" in log  # the one-line byte counts stay
  assert "-> [" not in log  # the per-parameter table ('hidden.0.kernel: [64, 128] P() -> [64, 128] per device')


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_workdir_is_one_line(cli, value):
  before = sorted(p.name for p in ROOT.iterdir())
  assert_one_error(cli("--config=configs/digits_mlp.py:smoke", f"--workdir={value}"), "--workdir is empty")
  assert sorted(p.name for p in ROOT.iterdir()) == before  # nothing trained into the current directory


@pytest.mark.parametrize("mode", ["eval", "export"])
def test_a_config_file_of_another_model_contributes_none_of_its_model_fields(cli, digits_run, tmp_path, mode):
  """Was: a GPT config given for the MLP run moved its runtime model.attention onto the run, which was refused as
  'config.model.attention: not a field of model 'mlp' ...; to change config.model.name, ...': a field nobody set."""
  proc = ok(cli("--config=configs/shakespeare_char_gpt.py:smoke", f"--workdir={digits_run}", f"--mode={mode}",
                f"--output_dir={tmp_path}"))
  assert "uses the run's own values" in proc.stderr, proc.stderr
  assert_one_error(cli("--config=configs/shakespeare_char_gpt.py:smoke", f"--workdir={digits_run}", f"--mode={mode}",
                       "--config.model.attention=einsum", f"--output_dir={tmp_path}"),
                   "config.model.attention: not a field of model 'mlp'")  # set on the command line: refused
