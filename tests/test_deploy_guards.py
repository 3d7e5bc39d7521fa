"""--mode=serve against hostile or mistaken clients, and deployed artifacts against out-of-range inputs."""

import importlib.util
import socket
import struct
import time

import jax
import numpy as np
import pytest

from test_serve import Server, digits_run, inprocess_server, raw_exchange  # noqa: F401 (fixtures)


def test_a_trickled_request_head_gets_a_408_within_the_socket_timeout(inprocess_server):
  """Was: the socket's timeout restarted with every byte, so a request line or headers sent a byte every 0.4 s
  (slowloris) held a thread for as long as they came, and a timeout then closed it with no reply."""
  for sent, trickle in [(b"", b"POST /v1/predict HTTP/1.1\r\n"),
                        (b"POST /v1/predict HTTP/1.1\r\n", b"Host: x\r\nContent-Type: application/json\r\n\r\n")]:
    status, reply, seconds = raw_exchange(inprocess_server, sent, trickle, every_s=0.3)
    assert status == "HTTP/1.1 408 Request Timeout" and b"request line and headers" in reply, reply
    assert seconds < 6, seconds  # the 2 s head deadline (and a loaded machine's slack), not 30 bytes x 0.3 s
  start = time.monotonic()  # the server is free for the next client
  status, reply, _ = raw_exchange(inprocess_server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
  assert status == "HTTP/1.1 200 OK" and time.monotonic() - start < 3, reply


def test_a_client_that_resets_its_connection_is_counted_not_an_internal_error(cli, digits_run):
  """Was: a reset while the body came was counted in /healthz's internal_errors (a bug of the server's) with its
  traceback logged, and one before the request line was read printed socketserver's traceback: a wall per client."""
  server = Server(cli, digits_run)
  try:
    for head in (b"POST /v1/pre", b'POST /v1/predict HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"inputs": '):
      for _ in range(3):
        s = socket.create_connection((server.host, server.port), timeout=30)
        s.sendall(head)
        deadline = time.time() + 30
        while head.endswith(b" ") and server.request("GET", "/healthz")[1]["in_flight"] < 1:  # reading its body
          assert time.time() < deadline
          time.sleep(0.02)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # an RST, not a FIN
    deadline = time.time() + 30
    while (health := server.request("GET", "/healthz")[1])["in_flight"]:
      assert time.time() < deadline
      time.sleep(0.02)
    assert health["internal_errors"] == 0 and health["disconnected"] == 3, health
    status, reply = server.request("POST", "/v1/predict", {"inputs": [[[[3]] * 8] * 8]})
    assert status == 200 and len(reply["predictions"]) == 1, reply
  finally:
    assert server.stop() == 0, server.output[-3000:]
  time.sleep(0.2)  # the last of its output
  assert "Traceback" not in server.output and "Exception occurred" not in server.output, server.output[-3000:]


def untrained(name: str, tmp_path, lines=None, dtype: str = "float32", **overrides):
  """(Inference, variables) of config `name` with untrained weights on a tiny text set (a classifier's or an LM's),
  computing in `dtype` (config.train.dtype)."""
  from bigmodel_jax import inference, model_card, parallel, train
  from bigmodel_jax.data import Dataset, corpus
  from bigmodel_jax.tasks import get_task
  from conftest import load_config
  from test_export import text_dataset
  config = load_config(name)
  heads = {"num_heads": 2} if "num_heads" in config.model else {}  # an LSTM has none
  for key, value in dict(num_layers=1, embed_dim=16, **heads, **overrides).items():
    config.model[key] = value
  config.data.seq_len, config.train.dtype = 16, dtype
  dataset = text_dataset(lines)
  if name != "spam_transformer":
    ids = dataset.tokenizer.encode("Before we proceed any further, hear me speak. " * 8)
    dataset = Dataset("lines", train={"tokens": ids}, test=None, validation=corpus.windows(ids, 16), kind="lm",
                      tokenizer=dataset.tokenizer, vocab_size=dataset.tokenizer.vocab_size)
  task = get_task(config, dataset)
  steps = train.make_steps(config, dataset, task, parallel.make_mesh(config.mesh, jax.devices()[:1]),
                           inference.SCHEDULE_STEPS, check_train_step=False)
  model = inference.Inference(config, tmp_path, model_card.describe(dataset, task, config), dataset, task, steps, None)
  return model, model.variables(steps.init())


def test_exported_token_models_answer_nan_for_ids_outside_the_vocabulary(tmp_path):
  """Was: the embedding's gather took id -1 as the last row (a confident answer for another text) and ids past the end
  as NaN rows, which a classifier answered as class 0; the artifacts now give NaN (class -1) for that example alone."""
  from bigmodel_jax import export
  load = lambda name: jax.export.deserialize((tmp_path / name / "export" / f"{name}.jaxexport").read_bytes())
  model, variables = untrained("spam_transformer", tmp_path / "predict", max_len=17)
  vocab = model.dataset.vocab_size
  export.write(model, 0, variables)
  for bad in (-1, vocab, vocab + 7):
    raw = model.dataset.test["inputs"][:2].copy()
    raw[0, 3] = bad
    out = {k: np.asarray(v) for k, v in load("predict").call(variables, raw).items()}
    assert out["prediction"][0] == -1 and np.isnan(out["probability"][0]).all(), (bad, out)
    assert out["prediction"][1] >= 0 and np.isfinite(out["probability"][1]).all()
  model, variables = untrained("shakespeare_char_gpt", tmp_path / "lm")
  export.write(model, 0, variables)
  (tmp_path / "prefill").symlink_to(tmp_path / "lm"), (tmp_path / "decode").symlink_to(tmp_path / "lm")
  for bad in (-1, vocab):
    logits, _ = load("prefill").call(variables, np.asarray([[1, 2, 3], [1, bad, 3]], np.int32))
    assert np.isfinite(logits[0]).all() and np.isnan(logits[1]).all(), bad
    _, cache = load("prefill").call(variables, np.asarray([[1, 2, 3], [1, 2, 3]], np.int32))
    logits, _ = load("decode").call(variables, cache, np.asarray([bad, 4], np.int32), np.int32(3))
    assert np.isnan(logits[0]).all() and np.isfinite(logits[1]).all(), bad


def test_generate_refuses_prompt_ids_outside_the_vocabulary_in_one_line(tmp_path):
  """Was: -1 was read as the last token and an id past the end gave NaN logits, from which greedy decoding drew id 0."""
  from bigmodel_jax import sample
  from bigmodel_jax.errors import UserError
  model, variables = untrained("shakespeare_char_gpt", tmp_path)
  lm, vocab = model.steps.model(model.steps.init()), model.dataset.vocab_size
  assert sample.generate(lm, np.asarray([1, 2, vocab - 1]), 3, temperature=0).shape == (1, 3)
  for bad in (-1, vocab):
    with pytest.raises(UserError, match=rf"^prompt: token id {bad} is outside the model's vocabulary "
                                        rf"0\.\.{vocab - 1} \(vocab_size {vocab}\)$"):
      sample.generate(lm, np.asarray([1, bad, 3]), 3, temperature=0)



def test_sample_and_serve_decode_a_bfloat16_run_in_bfloat16_as_its_export(tmp_path, monkeypatch):
  """Was: --mode=sample and serve's completions decoded with the float32 parameters whatever config.train.dtype, while
  evaluation and the exported prefill/decode compute in it: a bfloat16 run's greedy text could differ from its
  artifact's (3 of 40 prompts of a 6-step tiny Shakespeare GPT)."""
  import jax.numpy as jnp
  from bigmodel_jax import evaluate, sample, serve
  model, variables = untrained("shakespeare_char_gpt", tmp_path, dtype="bfloat16")
  state = model.steps.init()
  monkeypatch.setattr(evaluate, "restore_for_eval", lambda run, step: (0, state))
  handed = []
  monkeypatch.setattr(model.task, "sample", lambda run, lm, step: handed.append(lm))
  sample.sample(model, None)
  service = serve.Service(model, 0, state, variables, None, False)
  prefill, decode = (jax.jit(f) for f in model.lm_functions())
  tokenizer = model.dataset.tokenizer
  for lm in (handed[0], service.lm):
    ids = tokenizer.encode("Speak, speak.")
    logits, _ = lm.extend(jnp.asarray([ids]), lm.init_cache(1), 0)
    assert logits.dtype == jnp.bfloat16, logits.dtype
    expected, (last, cache) = [], prefill(variables, jnp.asarray([ids], jnp.int32))
    for i in range(16 - len(ids)):  # the artifact's greedy tokens, within the 16-token context
      expected.append(int(np.argmax(np.where(np.isin(np.arange(last.shape[-1]), tokenizer.special_ids), -np.inf,
                                              np.asarray(last[0])))))
      last, cache = decode(variables, cache, jnp.asarray(expected[-1:], jnp.int32), jnp.int32(len(ids) + i))
    got = sample.generate(lm, ids, 16 - len(ids), temperature=0, banned_ids=tokenizer.special_ids, context=16)
    assert got[0].tolist() == expected


@pytest.mark.parametrize("name, context", [("shakespeare_char_gpt", 16), ("shakespeare_lstm", None)])
def test_models_context_is_what_completions_cut_a_prompt_to(name, context, tmp_path):
  """Was: GET /v1/models said an LSTM's context was its training length (16) while completions gave it the whole
  prompt (prompt_tokens_used 45): a client trimming its prompts to the context threw away what the model reads."""
  from bigmodel_jax import serve
  model, variables = untrained(name, tmp_path, hidden_size=16) if "lstm" in name else untrained(name, tmp_path)
  service = serve.Service(model, 0, model.steps.init(), variables, None, False)
  assert service.signature()["context"] == context
  reply = service.complete({"prompt": "Before we proceed any further, hear me speak.", "max_tokens": 2})
  assert (reply["prompt_tokens"], reply["prompt_tokens_used"]) == (45, context or 45), reply


def test_an_exported_lstm_prefills_a_prompt_of_any_length_as_sampling_reads_it(tmp_path):
  """Was: the LSTM's artifact refused a prompt over its training length (signature.json's context 16: its shape
  check), which --mode=sample and completions read whole."""
  import json
  import jax.numpy as jnp
  from bigmodel_jax import export
  model, variables = untrained("shakespeare_lstm", tmp_path, hidden_size=16)
  export.write(model, 0, variables)
  assert json.loads((tmp_path / "export" / "signature.json").read_text())["context"] is None
  prefill = jax.export.deserialize((tmp_path / "export" / "prefill.jaxexport").read_bytes())
  ids = np.asarray([model.dataset.tokenizer.encode("Before we proceed any further, hear me speak.")], np.int32)
  lm = model.steps.model(model.steps.init())
  logits, _ = lm.extend(jnp.asarray(ids), lm.init_cache(1), 0)
  np.testing.assert_allclose(np.asarray(prefill.call(variables, ids)[0]), np.asarray(logits[:, -1]), atol=1e-5)

def test_a_text_classifiers_signature_names_its_tokenizers_own_padding_id(tmp_path):
  """Was: 'id 0 after the text' whatever the tokenizer: gpt2_bpe pads with <|endoftext|> (id 0 is '!')."""
  import json
  from bigmodel_jax import export
  model, variables = untrained("spam_transformer", tmp_path, max_len=17)
  model.dataset.tokenizer.pad_id = 5  # as gpt2_bpe's is not 0
  export.write(model, 0, variables)
  signature = json.loads((tmp_path / "export" / "signature.json").read_text())
  assert signature["tokenizer"]["padding"].startswith("id 5 (pad_id) after the text"), signature["tokenizer"]


@pytest.mark.skipif(importlib.util.find_spec("jax2onnx") is None, reason="the onnx extra")
def test_a_small_vocabularys_text_classifier_gets_its_onnx_graph(tmp_path):
  """Was: the ONNX check fed ids 0..16 whatever the vocabulary; ids past a 7-token vocabulary give NaN (as they
  should), which 'differed' from onnxruntime's, and predict.onnx was not written."""
  import json
  from bigmodel_jax import export
  model, variables = untrained("spam_transformer", tmp_path, ["abba baab", "ab ab", "ba ba ab"] * 4, max_len=17)
  assert model.dataset.vocab_size < 16
  export.write(model, 0, variables)
  signature = json.loads((tmp_path / "export" / "signature.json").read_text())
  assert signature["onnx"].startswith("predict.onnx"), signature["onnx"]
