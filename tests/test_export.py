"""A workdir describes its model (model.json): the model is rebuilt with no dataset, exported (--mode=export), and the
artifacts run in a fresh process that has only jax and numpy (this package, flax, optax, orbax hidden), giving
the outputs of the in-process model: a classifier's probabilities at float tolerance, a GPT's greedy tokens exactly.
Every model family exports (CNN, MLP, ResNet, ViT, encoder classifier, GPT, LSTM); a GAN is refused in one line."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from bigmodel_jax import export, inference, model_card, parallel, run_config, train
from bigmodel_jax.data import Dataset, load_dataset, tokenizers
from bigmodel_jax.tasks import get_task
from conftest import TINY_SHAKESPEARE, error_lines, load_config, trained_run

HAVE_ONNX = importlib.util.find_spec("jax2onnx") is not None  # the onnx extra (the test extra has it)
# float32 softmax outputs of a 2-layer MLP: the artifact and the in-process model run the same StableHLO, but XLA
# may fuse differently after deserialization; a few float32 roundings of values <= 1
ATOL = 1e-6
# onnxruntime is another implementation, not the same StableHLO: its GEMMs sum the digits MLP's dot products (64, 128
# and 128 terms, then a softmax over 10) in their own order. As tests/models/test_transformer.py's tolerance(): that
# many float32 roundings of the values' scale (probabilities <= 1), the linear worst case. Measured 4.8e-7 here,
# half of ATOL, which another CPU's onnxruntime kernels need not keep.
ONNX_ATOL = float(np.finfo(np.float32).eps) * (64 + 128 + 128 + 10)

FRESH = r'''
import importlib.abc, json, sys
HIDDEN = ("bigmodel_jax", "flax", "optax", "orbax", "ml_collections", "grain", "tensorflow_datasets", "tensorflow")
class Hide(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in HIDDEN:
      raise ImportError(f"{name} is hidden from this process")
sys.meta_path.insert(0, Hide())
import jax, numpy as np
directory, request, out = sys.argv[1:4]
request = json.load(open(request))
load = lambda name: jax.export.deserialize(open(f"{directory}/{name}.jaxexport", "rb").read())
params = dict(np.load(f"{directory}/params.npz"))
if "inputs" in request:
  result = {k: np.asarray(v) for k, v in load("predict").call(params, np.load(request["inputs"])).items()}
else:  # greedy generation: prefill the prompt, then one decode call per token
  signature = json.load(open(f"{directory}/signature.json"))
  prefill, decode = load("prefill"), load("decode")
  tokens = np.asarray([request["prompt"]], np.int32)
  logits, cache = prefill.call(params, tokens)
  ids, index = [], tokens.shape[1]
  for _ in range(request["num_tokens"]):
    logits = np.array(logits)
    logits[:, signature["tokenizer"]["special_ids"]] = -np.inf
    token = np.argmax(logits, -1).astype(np.int32)
    ids.append(int(token[0]))
    logits, cache = decode.call(params, cache, token, np.int32(index))
    index += 1
  result = {"tokens": np.asarray(ids, np.int32)}
np.savez(out, **result, hidden=np.asarray(sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN), dtype=str))
'''


def run_fresh(directory, request: dict, tmp_path) -> dict:
  """The export's artifacts called in a new Python process where only jax and numpy can be imported."""
  (tmp_path / "request.json").write_text(json.dumps(request))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([sys.executable, "-c", FRESH, str(directory), str(tmp_path / "request.json"),
                         str(tmp_path / "out.npz")], cwd=tmp_path, env={**env, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = dict(np.load(tmp_path / "out.npz"))
  assert out.pop("hidden").size == 0  # nothing of this package or flax was imported
  return out


def run_onnx(path, raw) -> dict:
  import onnxruntime
  session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
  return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"inputs": raw})))


@pytest.fixture(scope="module")
def digits_run(cli, tmp_path_factory):
  return trained_run(cli, tmp_path_factory, "digits", "--config=configs/digits_mlp.py:smoke")


@pytest.fixture(scope="module")
def gpt_run(cli, tmp_path_factory):
  """A GPT trained on a copy of tiny Shakespeare that is deleted afterwards: nothing below may need it."""
  if not TINY_SHAKESPEARE.is_file():
    pytest.skip(f"no local copy of tiny Shakespeare at {TINY_SHAKESPEARE}")
  root = tmp_path_factory.mktemp("gpt")
  shutil.copy(TINY_SHAKESPEARE, root / "input.txt")
  proc = cli("--config=configs/shakespeare_char_gpt.py:smoke", f"--config.data.path={root / 'input.txt'}",
             f"--workdir={root / 'run'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  (root / "input.txt").unlink()
  return root / "run"


def test_a_classifier_export_runs_without_this_package_and_predicts_as_predict_mode(cli, digits_run, tmp_path):
  proc = cli(f"--workdir={digits_run}", "--mode=export")
  assert proc.returncode == 0, proc.stderr[-2000:]
  directory = digits_run / "export"
  assert sorted(p.name for p in directory.iterdir()) == sorted(["params.npz", "predict.jaxexport", "signature.json",
                                                                *(["predict.onnx"] if HAVE_ONNX else [])])
  signature = json.loads((directory / "signature.json").read_text())
  assert signature["functions"]["predict"]["inputs"]["inputs"] == ["batch", 8, 8, 1, "uint8"]
  assert signature["class_names"] == [str(i) for i in range(10)] and signature["jax_version"] == jax.__version__
  assert "6 months" in signature["compatibility"]
  assert signature["onnx"].startswith("predict.onnx") if HAVE_ONNX else "pip install" in signature["onnx"]

  config = run_config.get_config(str(digits_run / "config.json"))
  raw = load_dataset(config.data).test["inputs"]  # the raw 0..16 pixel values, preprocessing is in the artifact
  np.save(tmp_path / "inputs.npy", raw)
  fresh = run_fresh(directory, {"inputs": str(tmp_path / "inputs.npy")}, tmp_path)
  model = inference.Inference.load(config, digits_run)
  _, state = model.restore_step()
  here = jax.jit(model.predict_function())(model.variables(state), raw)
  model.close()
  np.testing.assert_allclose(fresh["probability"], here["probability"], rtol=0, atol=ATOL)
  np.testing.assert_array_equal(fresh["prediction"], here["prediction"])
  if not HAVE_ONNX:
    return
  onnx = run_onnx(directory / "predict.onnx", raw)
  np.testing.assert_allclose(onnx["probability"], here["probability"], rtol=0, atol=ONNX_ATOL)
  np.testing.assert_array_equal(onnx["prediction"], here["prediction"])

  predicted = cli(f"--workdir={digits_run}", "--mode=predict")
  assert predicted.returncode == 0, predicted.stderr[-2000:]
  step = json.loads((digits_run / "final_metrics.json").read_text())["step"]
  rows = (digits_run / f"predict_step{step}" / "predictions.csv").read_text().splitlines()[1:]
  np.testing.assert_array_equal([int(r.split(",")[2]) for r in rows], fresh["prediction"])


def test_a_gpt_generates_from_the_artifact_alone_the_tokens_sampling_gives(cli, gpt_run, tmp_path):
  proc = cli(f"--workdir={gpt_run}", "--mode=export")  # the training text is gone: nothing reads it
  assert proc.returncode == 0, proc.stderr[-2000:]
  directory = gpt_run / "export"
  signature = json.loads((directory / "signature.json").read_text())
  assert {"prefill", "decode"} <= set(signature["functions"]) and signature["context"] == 32
  tokenizer = tokenizers.load_tokenizer(directory / "tokenizer")
  prompt = "ROMEO:"
  fresh = run_fresh(directory, {"prompt": tokenizer.encode(prompt).tolist(), "num_tokens": 20}, tmp_path)
  sampled = cli(f"--workdir={gpt_run}", "--mode=sample", f"--config.sample.prompt={prompt}",
                "--config.sample.temperature=0", "--config.sample.num_tokens=20")
  assert sampled.returncode == 0, sampled.stderr[-2000:]
  assert sampled.stdout.rstrip("\n") == prompt + tokenizer.decode(fresh["tokens"])


def test_a_workdir_from_before_model_json_gets_one_from_its_dataset_once(cli, digits_run, tmp_path):
  old = tmp_path / "old"
  shutil.copytree(digits_run, old, ignore=shutil.ignore_patterns("export", "predict_step*"))
  card = json.loads((old / model_card.FILE).read_text())
  (old / model_card.FILE).unlink()
  proc = cli(f"--workdir={old}", "--mode=export")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "has no model.json" in proc.stderr
  assert json.loads((old / model_card.FILE).read_text()) == card
  again = cli(f"--workdir={old}", "--mode=export")
  assert again.returncode == 0 and "has no model.json" not in again.stderr


def test_an_old_language_model_workdir_samples_from_its_tokenizer_alone(cli, gpt_run, tmp_path):
  """A run from before model.json whose training text is gone: the card comes from tokenizer/ and seq_len."""
  old = Path(shutil.copytree(gpt_run, tmp_path / "old", ignore=shutil.ignore_patterns("export", "samples")))
  card = json.loads((old / model_card.FILE).read_text())
  (old / model_card.FILE).unlink()
  proc = cli(f"--workdir={old}", "--mode=sample", "--config.sample.num_tokens=10")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "writing it from its tokenizer" in proc.stderr
  rebuilt = json.loads((old / model_card.FILE).read_text())
  assert {k: v for k, v in rebuilt.items() if k != "chars_per_token"} == \
      {k: v for k, v in card.items() if k != "chars_per_token"}


def test_bad_export_requests_are_one_line(cli, digits_run, tmp_path):
  bad = cli(f"--workdir={digits_run}", "--mode=export", "--config.export.platforms=cpu,gpu")
  assert bad.returncode == 2 and error_lines(bad.stderr) == [
      "error: config.export.platforms: 'cpu,gpu' must be a comma-separated list of cpu, cuda, rocm, tpu"]
  (tmp_path / "bad").mkdir()
  shutil.copy(digits_run / "config.json", tmp_path / "bad" / "config.json")
  empty = cli(f"--workdir={tmp_path / 'bad'}", "--mode=export")
  assert empty.returncode == 2 and "no checkpoints" in error_lines(empty.stderr)[0]
  copy = tmp_path / "copy"
  shutil.copytree(digits_run, copy, ignore=shutil.ignore_patterns("export", "predict_step*", "quantized"))
  card = json.loads((copy / model_card.FILE).read_text())
  for damaged, said in [("{not json", "unreadable"), ("5", "not a model card (a JSON int"),
                        (json.dumps({**card, "format": "1"}), "format '1' is not a version number"),
                        (json.dumps({**card, "input_dtype": "uint9"}), "input_dtype 'uint9' is not a dtype"),
                        (json.dumps({**card, "input_shape": [8, -8]}), "input_shape [8, -8] is not a list")]:
    (copy / model_card.FILE).write_text(damaged)
    broken = cli(f"--workdir={copy}", "--mode=export", f"--output_dir={tmp_path / 'out'}")
    lines = error_lines(broken.stderr)
    assert broken.returncode == 2 and len(lines) == 1, broken.stderr
    assert lines[0].startswith(f"error: {copy / model_card.FILE}: ") and said in lines[0], lines
    assert "delete it and it is rebuilt" in lines[0]


@pytest.mark.parametrize("mode, name", [("export", "export"), ("quantize", "quantized")])
def test_an_output_name_held_by_a_file_is_one_line_and_the_file_stays(cli, digits_run, tmp_path, mode, name):
  """Was: a file where export/ (quantized/) goes was moved to a hidden .export.old (.quantized.old) that the cleanup
  (rmtree) could not delete, and every later call failed with '<dir>/export: Not a directory' naming neither."""
  (tmp_path / name).write_text("my notes\n")
  for _ in range(2):
    proc = cli(f"--workdir={digits_run}", f"--mode={mode}", f"--output_dir={tmp_path}", "--config.quantize.repeats=1")
    assert proc.returncode == 2 and error_lines(proc.stderr) == [
        f"error: {tmp_path / name}: exists and is not a plain directory (a file or a link); --mode={mode} writes a "
        "directory there: move it away"], proc.stderr[-3000:]
  assert (tmp_path / name).read_text() == "my notes\n" and sorted(p.name for p in tmp_path.iterdir()) == [name]
  (tmp_path / name).unlink()
  assert cli(f"--workdir={digits_run}", f"--mode={mode}", f"--output_dir={tmp_path}",
             "--config.quantize.repeats=1").returncode == 0


@pytest.mark.parametrize("field, value", [("preprocessing.scale", 255.0), ("class_names", list("abcdefghij"))])
def test_a_model_card_changed_after_training_is_refused_before_a_model_is_built_on_it(cli, digits_run, tmp_path,
                                                                                     field, value):
  copy = Path(shutil.copytree(digits_run, tmp_path / "copy", ignore=shutil.ignore_patterns("export", "predict_step*",
                                                                                            "quantized")))
  original = (copy / model_card.FILE).read_text()
  card = json.loads(original)
  section, _, key = field.rpartition(".")
  (card[section] if section else card)[key] = value
  (copy / model_card.FILE).write_text(json.dumps(card))
  for mode in ("export", "quantize"):
    proc = cli(f"--workdir={copy}", f"--mode={mode}", f"--output_dir={tmp_path / 'out'}")
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"error: {copy / model_card.FILE} is not the model card checkpoint step "), lines
  assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]  # nothing exported or quantized
  (copy / model_card.FILE).write_text(json.dumps(json.loads(original)))  # the same card, other whitespace: accepted
  proc = cli(f"--workdir={copy}", "--mode=export", f"--output_dir={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr[-2000:]


ONNX_CONVERTS = ("mnist_cnn", "fashion_mnist_vit", "spam_transformer")  # ResNet: jax2onnx 0.13.0 fails on nnx.conv padding


def text_dataset(lines=None) -> Dataset:
  """A small real text-classification set: lines of tiny Shakespeare's opening labelled by who speaks them."""
  lines = lines or ["Before we proceed any further, hear me speak.", "Speak, speak.",
                    "You are all resolved rather to die", "Resolved. resolved.",
                    "First, you know Caius Marcius is chief enemy", "We know't, we know't."] * 4
  tokenizer = tokenizers.CharTokenizer.build(lines)
  arrays = {"inputs": tokenizer.encode_batch(lines, 16), "targets": np.arange(len(lines), dtype=np.int32) % 2}
  return Dataset("lines", train=arrays, test=arrays, validation=arrays, kind="text", num_classes=2,
                 class_names=("first", "all"), tokenizer=tokenizer, vocab_size=tokenizer.vocab_size)


@pytest.mark.parametrize("name, overrides", [
    ("mnist_cnn", {"model.conv_features": (8, 8), "model.pool_after": 1, "model.dense_features": (16,)}),
    ("fashion_mnist_resnet", {"model.depth": 8, "model.width": 4}),
    ("fashion_mnist_vit", {"model.num_layers": 1, "model.embed_dim": 16, "model.num_heads": 2}),
    ("spam_transformer", {"model.num_layers": 1, "model.embed_dim": 16, "model.num_heads": 2, "model.max_len": 17,
                          "data.seq_len": 16}),
    ("shakespeare_lstm", {"data.seq_len": 16})])
def test_every_model_family_exports_with_the_in_process_outputs(name, overrides, tmp_path):
  """Untrained weights are enough to check the artifact computes the model (digits' 8x8 images, or text)."""
  config = load_config(name)
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  if name == "fashion_mnist_vit":
    config.model.patch_size = 4
  if name == "shakespeare_lstm":
    config.model.hidden_size, config.model.embed_dim = 16, 8
    lines = text_dataset().tokenizer
    ids = lines.encode("Before we proceed any further, hear me speak. " * 8)
    from bigmodel_jax.data import corpus
    dataset = Dataset("lines", train={"tokens": ids}, test=None, validation=corpus.windows(ids, 16), kind="lm",
                      tokenizer=lines, vocab_size=lines.vocab_size)
  elif name == "spam_transformer":
    dataset = text_dataset()
  else:
    config.data.name = "digits"
    dataset = load_dataset(config.data).hold_out_validation(0.1)
  task = get_task(config, dataset)
  steps = train.make_steps(config, dataset, task, parallel.make_mesh(config.mesh, jax.devices()[:1]),
                           inference.SCHEDULE_STEPS,
                           check_train_step=False)
  model = inference.Inference(config, tmp_path, model_card.describe(dataset, task, config), dataset, task, steps, None)
  variables = model.variables(steps.init())
  export.write(model, 0, variables)
  load = lambda n: jax.export.deserialize((tmp_path / "export" / f"{n}.jaxexport").read_bytes())
  if dataset.is_token_stream:
    prefill, decode = model.lm_functions()
    prompt = dataset.train["tokens"][None, :5].astype(np.int32)
    want, cache = jax.jit(prefill)(variables, prompt)
    got, exported_cache = load("prefill").call(variables, prompt)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    token = np.argmax(np.asarray(want), -1).astype(np.int32)
    want, _ = jax.jit(decode)(variables, cache, token, 5)
    got, _ = load("decode").call(variables, exported_cache, token, np.int32(5))
  else:
    raw = dataset.test["inputs"][:7]
    want = jax.jit(model.predict_function())(variables, raw)["probability"]
    got = load("predict").call(variables, raw)["probability"]
    signature = json.loads((tmp_path / "export" / "signature.json").read_text())
    assert (tmp_path / "export" / "predict.onnx").exists() == signature["onnx"].startswith("predict.onnx")
    if not HAVE_ONNX:
      assert "pip install" in signature["onnx"]
    elif name in ONNX_CONVERTS:
      np.testing.assert_allclose(run_onnx(tmp_path / "export" / "predict.onnx", raw)["probability"], want, rtol=0,
                                 atol=1e-5)
    else:  # what jax2onnx 0.13.0 has no rule for is named
      assert "jax2onnx cannot convert" in signature["onnx"], signature["onnx"]
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # float32 logits of O(1) through <= 10 layers


def test_a_gan_is_not_exported_and_says_why(tmp_path):
  config = load_config("mnist_dcgan")
  config.data.name = "digits"
  dataset = load_dataset(config.data)
  model = inference.Inference(config, tmp_path, {}, dataset, None, None, None)
  with pytest.raises(Exception, match="a GAN .* is not exported: its use is sampling images"):
    export.export(model, None)


@pytest.mark.parametrize("mode", ["serve", "export", "quantize"])
def test_a_masked_language_model_is_not_deployed_and_says_what_it_is_for(mode):
  """Was: served with /v1/completions answering 500, exported and quantized into a traceback (no extend())."""
  import types
  from bigmodel_jax import quantize, serve
  model = types.SimpleNamespace(config=load_config("spam_bert_pretrain", "smoke"))  # refused before anything is read
  with pytest.raises(Exception, match=rf"^--mode={mode}: a masked language model \(task masked_language_modeling\) "
                     r"is not \w+: it is pretraining; fine-tune a classifier from it \(config.init.workdir"):
    {"serve": serve.serve, "export": export.export, "quantize": quantize.quantize}[mode](model, None)


def test_a_step_saved_under_an_earlier_preprocessing_names_the_steps_saved_under_this_one(cli, digits_run, tmp_path):
  copy = Path(shutil.copytree(digits_run, tmp_path / "copy", ignore=shutil.ignore_patterns("export", "predict_step*",
                                                                                            "quantized")))
  old = sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit())
  resumed = cli("--config=configs/digits_mlp.py:smoke", f"--workdir={copy}", "--config.train.num_epochs=4",
                "--config.data.normalize=standardize", "--config.train.allow_config_change=true")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  new = sorted(int(p.name) for p in (copy / "checkpoints").iterdir() if p.name.isdigit() and int(p.name) > old[-1])
  proc = cli(f"--workdir={copy}", "--mode=export", f"--checkpoint_step={old[-1]}", f"--output_dir={tmp_path / 'o'}")
  lines = error_lines(proc.stderr)
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
  # the config record is checked first (before the state is read); it names the field that changed
  assert f"checkpoint step {old[-1]} was saved with data.normalize='unit'" in lines[0], lines
  assert lines[0].endswith(f"use a step saved under this config: {', '.join(map(str, new))} (--checkpoint_step=N)")
  assert cli(f"--workdir={copy}", "--mode=export", f"--output_dir={tmp_path / 'o'}").returncode == 0


def test_an_output_dir_holding_another_runs_export_keeps_it(cli, digits_run, tmp_path):
  """Was: --mode=export --output_dir=D of a second run replaced the first run's D/export without a word (and a
  researcher's own D/export/ folder): refused in one line, the files kept; the same run's export is replaced."""
  other = tmp_path / "other"
  shutil.copytree(digits_run, other, ignore=shutil.ignore_patterns("export", "predict_step*", "quantized"))
  out, mine = tmp_path / "out", tmp_path / "mine"
  assert cli(f"--workdir={digits_run}", "--mode=export", f"--output_dir={out}").returncode == 0
  files = lambda d: {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
  first = files(out / "export")
  (mine / "export").mkdir(parents=True)
  (mine / "export" / "notes.txt").write_text("my notes\n")
  for directory, whose in [(out, f"another run's --mode=export outputs ({digits_run.resolve()})"),
                           (mine, "files whose signature.json does not name this run (another run's, or from "
                                  "before signature.json named it)")]:
    proc = cli(f"--workdir={other}", "--mode=export", f"--output_dir={directory}")
    assert proc.returncode == 2 and error_lines(proc.stderr) == [
        f"error: {directory / 'export'}: holds {whose}; pass another --output_dir or move it away (this run's would "
        "replace them)"], proc.stderr[-3000:]
  assert files(out / "export") == first and files(mine / "export") == {"notes.txt": b"my notes\n"}
  assert json.loads(first["signature.json"])["workdir"] == str(digits_run.resolve())
  assert sorted(p.name for p in out.iterdir()) == ["export"]  # no staging left behind
  again = cli(f"--workdir={digits_run}", "--mode=export", f"--output_dir={out}")  # the same run: replaced
  assert again.returncode == 0, again.stderr[-3000:]
  # a run's own workdir holds its own export, a copied workdir's too (it names the run it was copied from)
  shutil.copytree(out / "export", other / "export")
  own = cli(f"--workdir={other}", "--mode=export")
  assert own.returncode == 0, own.stderr[-3000:]
  assert json.loads((other / "export" / "signature.json").read_text())["workdir"] == str(other.resolve())
