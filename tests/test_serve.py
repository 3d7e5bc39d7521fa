"""--mode=serve: a real server process answering real HTTP clients (batching, bad requests, completions, SIGTERM)."""

import base64
import csv
import http.client
import io
import json
import re
import select
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest

from conftest import TINY_SHAKESPEARE, load_config, trained_run

DIGITS = "--config=configs/digits_mlp.py:smoke"
LINEAR = "--config=configs/linear_regression.py:smoke"
GPT = "--config=configs/shakespeare_char_gpt.py:smoke"


class Server:
  """A `--mode=serve` process; its output is collected by a thread (the pipe never fills)."""

  def __init__(self, cli, workdir, *flags, timeout: float = 120):
    self.proc = cli(f"--workdir={workdir}", "--mode=serve", "--config.serve.port=0", *flags, popen=True)
    self.lines, self.started = [], threading.Event()
    threading.Thread(target=self._read, daemon=True).start()
    deadline = time.time() + timeout
    while not self.started.wait(0.1):
      assert self.proc.poll() is None and time.time() < deadline, self.output[-3000:]
    self.host, self.port = re.search(r"serving .* step \d+ on http://([\d.]+):(\d+)", self.output).groups()
    self.port = int(self.port)

  def _read(self):
    for line in self.proc.stdout:
      self.lines.append(line)
      if line.startswith("serving "):
        self.started.set()

  @property
  def output(self) -> str:
    return "".join(self.lines)

  def request(self, method: str, path: str, body=None, headers=None):
    """-> (status, JSON reply)."""
    conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    response = conn.getresponse()
    status, reply = response.status, json.loads(response.read())
    conn.close()
    return status, reply

  def stop(self):
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
    return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def digits_run(cli, tmp_path_factory):
  return trained_run(cli, tmp_path_factory, "digits", DIGITS)


@pytest.fixture(scope="module")
def digits_server(cli, digits_run):
  server = Server(cli, digits_run)
  yield server
  server.stop()


@pytest.fixture(scope="module")
def digits_test():
  from bigmodel_jax.data import load_dataset
  return load_dataset(load_config("digits_mlp", "smoke").data).test


def png(pixels: np.ndarray, mode: str = "L") -> str:
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(pixels.astype(np.uint8), mode).save(buffer, format="PNG")
  return base64.b64encode(buffer.getvalue()).decode()


def test_concurrent_clients_get_predict_modes_predictions_in_shared_batches(cli, digits_run, digits_server,
                                                                            digits_test):
  proc = cli(f"--workdir={digits_run}", "--mode=predict")
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = list(csv.DictReader(open(json.loads(proc.stdout)["files"][0])))
  inputs = digits_test["inputs"]
  assert len(rows) == len(inputs) == 359
  before = digits_server.request("GET", "/healthz")[1]

  def client(c):  # 32 clients, each sending its share of the test split in requests of 1..4 examples
    mine = list(range(c, len(inputs), 32))
    out = {}
    for start in range(0, len(mine), 1 + c % 4):
      chunk = mine[start:start + 1 + c % 4]
      status, reply = digits_server.request("POST", "/v1/predict", {"inputs": inputs[chunk].tolist()})
      assert status == 200, reply
      out.update(zip(chunk, reply["predictions"]))
    return out

  with ThreadPoolExecutor(32) as pool:
    got = {k: v for part in pool.map(client, range(32)) for k, v in part.items()}
  after = digits_server.request("GET", "/healthz")[1]
  assert sorted(got) == list(range(len(inputs)))
  for i, row in enumerate(rows):
    assert got[i]["class"] == int(row["prediction"]) and got[i]["label"] == row["prediction"]
    np.testing.assert_allclose([got[i]["probabilities"][str(c)] for c in range(10)],
                               [float(row[f"p_{c}"]) for c in range(10)], atol=2e-5)
  requests = after["requests"] - before["requests"] - 1
  batches, examples = after["batches"] - before["batches"], after["examples"] - before["examples"]
  assert examples == 359 and requests >= 96
  assert batches < requests, (batches, requests)  # concurrent requests shared model calls
  # the same examples as PNGs (0..255 pixels, scaled to digits' 0..16) predict the same
  images = [png(np.round(inputs[i, :, :, 0].astype(float) * 255 / 16)) for i in range(8)]
  status, reply = digits_server.request("POST", "/v1/predict", {"inputs": images})
  assert status == 200 and [p["class"] for p in reply["predictions"]] == [got[i]["class"] for i in range(8)]


def test_bad_requests_are_4xx_naming_the_field_and_the_server_lives_on(digits_server, digits_test):
  good = digits_test["inputs"][:1].tolist()
  example = good[0]
  cases = [  # (body, expected status, text in the error); body bytes go as they are
      (b"{not json", 400, "body: malformed JSON"),
      (b"\xff\xfe", 400, "body: not UTF-8"),
      ([1, 2], 400, "body: must be a JSON object"),
      ({"input": good}, 400, "inputs: missing"),
      ({"inputs": good, "normalise": True}, 400, "normalise: unknown field; /v1/predict takes inputs"),
      ({"inputs": "x"}, 400, "inputs: must be a list"),
      ({"inputs": []}, 400, "inputs: empty"),
      ({"inputs": [[1, 2, 3]]}, 400, "inputs[0]: shape [3], expected [8, 8, 1]"),
      ({"inputs": [example, [[1]]]}, 400, "inputs[1]: shape [1, 1]"),
      ({"inputs": [[[1], [2, 3]]]}, 400, "inputs[0]: ragged"),
      ({"inputs": [[[["a"]] * 8] * 8]}, 400, "inputs[0]: non-numeric"),
      ({"inputs": [[[[True]] * 8] * 8]}, 400, "inputs[0]: non-numeric"),
      ({"inputs": [None]}, 400, "inputs[0]: must be a nested list"),
      (b'{"inputs": [NaN]}', 400, "body: NaN is not a number"),
      (b'{"inputs": [' + json.dumps([[[1e999]] * 8] * 8).replace("Infinity", "1e999").encode() + b"]}", 400,
       "inputs[0]: values must be finite"),
      ({"inputs": [[[[255]] * 8] * 8]}, 422, "inputs[0]: pixel value 255 out of range 0..16"),  # digits' 0..16
      ({"inputs": [[[[300]] * 8] * 8]}, 422, "inputs[0]: pixel value 300 out of range 0..16"),  # not 0..255 (uint8)
      ({"inputs": [[[[-1]] * 8] * 8]}, 422, "inputs[0]: pixel value -1 out of range 0..16"),
      ({"inputs": [[[[1.5]] * 8] * 8]}, 400, "inputs[0]: values must be integers"),
      ({"inputs": ["not base64!"]}, 400, "inputs[0]: not valid base64"),
      ({"inputs": ["data:image/png;base64"]}, 400, "inputs[0]: a data URI without its comma"),  # was: a 500
      ({"inputs": [base64.b64encode(b"GIF89a....").decode()]}, 400, "inputs[0]: not a PNG"),
      ({"inputs": [base64.b64encode(b"\x89PNG\r\n\x1a\n broken").decode()]}, 400, "inputs[0]: unreadable PNG"),
      ({"inputs": [png(np.zeros((16, 16)))]}, 400, "inputs[0]: PNG is 16x16 (width x height), the model takes 8x8"),
      ({"inputs": good * 33}, 400, "inputs: 33 examples; at most config.serve.max_batch=32"),
      ({"inputs": [[[[17]] * 8] * 8]}, 422, "inputs[0]: pixel value 17 out of range 0..16"),
      (b'{"inputs": [' + json.dumps([[[10 ** 400]] * 8] * 8).encode() + b"]}", 400, "inputs[0]: a value is out of range"),
      ({"inputs": [png(np.zeros((8, 8, 4)), "RGBA")]}, 400, "inputs[0]: PNG mode RGBA has transparency"),
  ]
  for body, status, text in cases:
    got, reply = digits_server.request("POST", "/v1/predict", body)
    assert (got, text) == (status, reply["error"][:len(text)]) or (got == status and text in reply["error"]), \
        (body if len(str(body)) < 200 else str(body)[:200], got, reply)
  protocol = [  # (method, path, headers, body, status, text)
      ("POST", "/v1/predict", {"Content-Length": str(10 ** 9)}, None, 413, "config.serve.max_body_bytes"),
      ("POST", "/v1/predict", {"Content-Length": "12abc"}, None, 400, "Content-Length"),
      ("POST", "/v1/predict", {"Content-Length": "\u00b2"}, None, 400, "Content-Length"),  # a digit to str.isdigit
      ("POST", "/v1/predict", {"Transfer-Encoding": "chunked"}, None, 411, "Content-Length: required"),
      ("POST", "/v1/predict", {}, None, 411, "Content-Length: required"),
      ("GET", "/v1/nothing", {}, None, 404, "/v1/nothing: no such endpoint"),
      ("GET", "/v1/predict", {}, None, 405, "GET /v1/predict: use POST"),
      ("DELETE", "/healthz", {}, None, 405, "DELETE /healthz: use GET"),
      ("POST", "/v1/completions", {"Content-Length": "15"}, b'{"prompt": "a"}', 400, "/v1/completions: a classification model"),
  ]
  for method, path, headers, body, status, text in protocol:
    conn = http.client.HTTPConnection(digits_server.host, digits_server.port, timeout=30)
    conn.putrequest(method, path, skip_accept_encoding=True)
    for k, v in headers.items():
      conn.putheader(k, v)
    conn.endheaders(body)
    response = conn.getresponse()
    reply = json.loads(response.read())
    conn.close()
    assert response.status == status and text in reply["error"], (method, path, headers, response.status, reply)
  health = digits_server.request("GET", "/healthz")[1]
  assert health["status"] == "ok" and health["internal_errors"] == 0
  assert health["errors"] >= len(cases) + len(protocol)
  status, reply = digits_server.request("POST", "/v1/predict", {"inputs": good})
  assert status == 200 and len(reply["predictions"]) == 1
  status, signature = digits_server.request("GET", "/v1/models")
  assert status == 200 and signature["input_shape"] == [8, 8, 1] and signature["input_dtype"] == "uint8"
  assert signature["labels"] == [str(c) for c in range(10)] and signature["quantized"] is False


def test_config_errors_are_one_line(cli, digits_run, digits_server):
  bad = cli(f"--workdir={digits_run}", "--mode=serve", "--config.serve.max_batch=0")
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: config.serve.max_batch: 0")
  taken = cli(f"--workdir={digits_run}", "--mode=serve", f"--config.serve.port={digits_server.port}")
  assert taken.returncode == 2, taken.stderr[-2000:]
  assert taken.stderr.strip().splitlines()[-1] == (f"error: config.serve.port: 127.0.0.1:{digits_server.port} is "
                                                   "already in use; pick another (0: any free port)")


def test_input_decoder_for_text_and_tabular_models():
  from bigmodel_jax.data.tokenizers import CharTokenizer
  from bigmodel_jax.serve_inputs import BadRequest, InputDecoder
  text = InputDecoder({"kind": "text", "input_shape": [6], "input_dtype": "int32", "preprocessing": {}},
                      CharTokenizer(" abc"), max_batch=4)
  np.testing.assert_array_equal(text({"inputs": ["ab", "cab ca"]}), [[3, 4, 0, 0, 0, 0], [5, 3, 4, 2, 5, 3]])
  tabular = InputDecoder({"kind": "tabular", "input_shape": [3], "input_dtype": "float32", "preprocessing": {}},
                         None, max_batch=4)
  assert tabular({"inputs": [[0.5, -1, 2e3]]}).dtype == np.float32
  for decoder, inputs, text in [(text, [[1, 2]], "inputs[0]: this text classifier takes strings"),
                                (text, ["  "], "inputs[0]: empty text"),
                                (tabular, ["abc"], "inputs[0]: a tabular model takes lists of numbers"),
                                (tabular, [[1, 2, 1e39]], "inputs[0]: value out of float32 range")]:
    with pytest.raises(BadRequest, match=re.escape(text)):
      decoder({"inputs": inputs})



def test_a_completion_takes_every_top_k_config_sample_takes():
  """Was: a run with config.sample.top_k over 2**31 - 1 (which --mode=sample takes: over the vocabulary, no filter)
  answered every completion without a top_k 400, 'top_k: 3000000000 out of range', a field the client never sent."""
  import ml_collections
  from bigmodel_jax.data.tokenizers import CharTokenizer
  from bigmodel_jax.serve_inputs import completion_request
  defaults = ml_collections.ConfigDict(dict(temperature=0.8, top_k=3_000_000_000, top_p=1.0, seed=0))
  assert completion_request({"prompt": "ab"}, CharTokenizer(" abc"), defaults, 64)["top_k"] == 3_000_000_000
  assert completion_request({"prompt": "ab", "top_k": 2 ** 40}, CharTokenizer(" abc"), defaults, 64)["top_k"] == 2 ** 40

@pytest.fixture(scope="module")
def gpt_run(cli, tmp_path_factory):
  if not TINY_SHAKESPEARE.is_file():
    pytest.skip(f"no local tiny Shakespeare at {TINY_SHAKESPEARE}")
  workdir = tmp_path_factory.mktemp("gpt")
  proc = cli(GPT, f"--workdir={workdir}", f"--config.data.path={TINY_SHAKESPEARE}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  return workdir


def test_completions_match_mode_sample_and_refuse_bad_fields(cli, gpt_run):
  sampled = cli(f"--workdir={gpt_run}", "--mode=sample", "--config.sample.temperature=0",
                "--config.sample.prompt=ROMEO:", "--config.sample.num_tokens=40")
  assert sampled.returncode == 0, sampled.stderr[-2000:]
  server = Server(cli, gpt_run, "--config.serve.max_tokens=100")
  try:
    status, reply = server.request("POST", "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 40,
                                                               "temperature": 0})
    assert status == 200 and reply["tokens"] == 40, reply
    assert "ROMEO:" + reply["completion"] == sampled.stdout.rstrip("\n")
    assert reply["prompt_tokens"] == reply["prompt_tokens_used"] == 6
    text = "ROMEO:\n" + "But soft, what light through yonder window breaks? " * 2  # 109 characters: over 32
    cut, same = (server.request("POST", "/v1/completions", {"prompt": p, "max_tokens": 5, "temperature": 0})[1]
                 for p in (text, text[-32:]))  # what was used: the last 32 tokens (a character each)
    assert (cut["prompt_tokens"], cut["prompt_tokens_used"]) == (109, 32) and same["completion"] == cut["completion"]
    status, drawn = server.request("POST", "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 30, "seed": 3,
                                                               "temperature": 1.0, "top_k": 10, "top_p": 0.9})
    assert status == 200 and drawn["tokens"] == 30
    again = server.request("POST", "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 30, "seed": 3,
                                                        "temperature": 1.0, "top_k": 10, "top_p": 0.9})[1]
    assert again["completion"] == drawn["completion"]  # the seed decides
    far = server.request("POST", "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 30, "seed": 2 ** 32 + 3,
                                                      "temperature": 1.0, "top_k": 10, "top_p": 0.9})
    assert far[0] == 200 and far[1]["completion"] != drawn["completion"], far  # as config.sample.seed: up to 2**63
    cases = [({"prompt": ""}, "prompt: empty"), ({"max_tokens": 5}, "prompt: missing"),
             ({"prompt": 7}, "prompt: must be a string"),
             ({"prompt": "ROMEO\u00e9"}, "prompt: '\u00e9' is not in the tokenizer's vocabulary"),
             ({"prompt": "A", "max_tokens": 0}, "max_tokens: 0 out of range 1..100 (config.serve.max_tokens)"),
             ({"prompt": "A", "max_tokens": 101}, "max_tokens: 101 out of range"),
             ({"prompt": "A", "max_tokens": "5"}, "max_tokens: must be an integer"),
             ({"prompt": "A", "temperature": -1}, "temperature: -1 out of range"),
             ({"prompt": "A", "temperature": "hot"}, "temperature: must be a finite number"),
             ({"prompt": "A", "temperature": 10 ** 400}, "temperature: must be a finite number"),
             ({"prompt": "A", "temperature": 1e-300}, "temperature: 1e-300 is below 0.0001; use 0"),
             ({"prompt": "A", "top_k": 1.5}, "top_k: must be an integer"),
             ({"prompt": "A", "top_p": 0}, "top_p: 0.0 must be in (0, 1]"),
             ({"prompt": "A", "top_p": 2}, "top_p: 2 out of range"),
             ({"prompt": "A", "seed": -1}, "seed: -1 out of range"), ({"prompt": "A", "seed": 2 ** 63}, "seed: "),
             ({"prompt": "A", "stream": True}, "stream: unknown field")]
    for body, text in cases:
      status, reply = server.request("POST", "/v1/completions", body)
      assert status == 400 and reply["error"].startswith(text), (body, status, reply)
    status, reply = server.request("POST", "/v1/predict", {"inputs": [[1, 2]]})
    assert status == 400 and "use POST /v1/completions" in reply["error"]
    signature = server.request("GET", "/v1/models")[1]
    assert signature["task"] == "language_modeling" and signature["context"] == 32
    assert server.request("GET", "/healthz")[1]["internal_errors"] == 0
  finally:
    assert server.stop() == 0, server.output[-3000:]


def test_a_sentencepiece_lm_refuses_a_lone_surrogate_in_one_line_and_a_400(cli, tmp_path):
  """Was: sentencepiece raised TypeError for a lone surrogate: a traceback for a --config.sample.prompt with a byte the
  locale cannot decode (b'\\xff' -> '\\udcff'), an internal error (500) for a completion's "\\ud800"."""
  if not TINY_SHAKESPEARE.is_file():
    pytest.skip(f"no local tiny Shakespeare at {TINY_SHAKESPEARE}")
  proc = cli(GPT, f"--workdir={tmp_path}", f"--config.data.path={TINY_SHAKESPEARE}",
             "--config.data.tokenizer.name=sentencepiece", "--config.data.tokenizer.vocab_size=256")
  assert proc.returncode == 0, proc.stderr[-2000:]
  bad = cli(f"--workdir={tmp_path}", "--mode=sample", "--config.sample.prompt=A\udcff")  # argv bytes b"A\xff"
  assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
  assert bad.stderr.strip().splitlines()[-1] == ("error: config.sample.prompt: byte 0xff at character 1 is not UTF-8; "
                                                 "give the prompt as UTF-8 text")
  server = Server(cli, tmp_path)
  try:
    status, reply = server.request("POST", "/v1/completions", b'{"prompt": "A\\ud800", "max_tokens": 3}')
    assert status == 400 and reply["error"].startswith("prompt: '\\ud800' is not in the tokenizer's"), reply
    assert server.request("POST", "/v1/completions", {"prompt": "ROMEO", "max_tokens": 3})[0] == 200
    assert server.request("GET", "/healthz")[1]["internal_errors"] == 0
  finally:
    assert server.stop() == 0, server.output[-3000:]


def raw_exchange(address, data: bytes, trickle: bytes = b"", every_s: float = 0) -> tuple[str, bytes, float]:
  """(status line, the whole reply, seconds) for `data` sent on a raw socket, then `trickle` a byte every_s apart."""
  with socket.create_connection(address, timeout=30) as s:
    start, reply = time.monotonic(), b""
    s.sendall(data)
    for i in range(len(trickle)):
      if select.select([s], [], [], every_s)[0]:  # the server answered (and closed) before the end
        break
      s.sendall(trickle[i:i + 1])
    while chunk := s.recv(65536):
      reply += chunk
  return reply.split(b"\r\n", 1)[0].decode(), reply, time.monotonic() - start


def test_a_garbage_request_line_gets_a_status_line_and_options_a_405_with_allow(digits_server):
  """Was: http.server answered an unreadable request line as HTTP/0.9 (the JSON body alone), OPTIONS a 501."""
  for line, status in [(b"garbage", "400 Bad Request"), (b"\x16\x03\x01 hello TLS", "400 Bad Request"),
                       (b"OPTIONS /v1/predict HTTP/1.1", "405 Method Not Allowed"),
                       (b"BREW /healthz HTTP/1.1", "501 Not Implemented")]:  # the README says: unknown methods 501
    got, reply, _ = raw_exchange((digits_server.host, digits_server.port), line + b"\r\nHost: x\r\n\r\n")
    assert got == f"HTTP/1.1 {status}" and b"Content-Type: application/json" in reply, (line, reply)
    assert b'{"error": ' in reply and (b"\r\nAllow: POST\r\n" in reply) == line.startswith(b"OPTIONS"), reply


@pytest.fixture
def inprocess_server(digits_run, monkeypatch):
  """(host, port) of the digits run served in this process, SOCKET_TIMEOUT_S 2 s, batch_timeout_ms 4000."""
  from bigmodel_jax import inference, run_config, serve
  monkeypatch.setattr(serve, "SOCKET_TIMEOUT_S", 2)
  config = run_config.get_config(str(digits_run / "config.json"))
  config.serve.batch_timeout_ms = 4000
  model = inference.Inference.load(config, digits_run)
  step, state = model.restore_step()
  service = serve.Service(model, step, state, model.variables(state), None, False)
  server = serve.Server(("127.0.0.1", 0), type("Bound", (serve.Handler,), {"service": service, "timeout": 2}))
  threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
  yield server.server_address[:2]
  server.shutdown(), server.server_close(), service.batcher.stop(), model.close()


def test_a_trickled_body_gets_a_408_within_the_socket_timeout(inprocess_server):
  """Was: each byte reset the socket's timeout, so a byte every 0.4 s held the thread for as long as it came."""
  status, reply, seconds = raw_exchange(inprocess_server, b"POST /v1/predict HTTP/1.1\r\nContent-Length: 20\r\n\r\n",
                                        b" " * 20, every_s=0.4)  # 8 s in all, each byte well within 2 s
  assert status == "HTTP/1.1 408 Request Timeout" and b"in 2 s; send the whole body" in reply and seconds < 4, reply


def test_a_stalled_upload_does_not_hold_other_predict_requests_for_the_batch_timeout(inprocess_server, digits_test):
  """Was: the batcher waited (up to batch_timeout_ms) while any body was still arriving, a stalled one included."""
  body = json.dumps({"inputs": digits_test["inputs"][:2].tolist()}).encode()
  with socket.create_connection(inprocess_server, timeout=30) as stalled:
    stalled.sendall(f"POST /v1/predict HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10])
    time.sleep(0.2)  # its handler is reading the body
    status, reply, seconds = raw_exchange(inprocess_server, f"POST /v1/predict HTTP/1.1\r\nContent-Length: "
                                          f"{len(body)}\r\n\r\n".encode() + body)
  assert status == "HTTP/1.1 200 OK" and b'"predictions"' in reply, reply
  assert seconds < 1.5, seconds  # not the 2 s until the stalled body times out, nor the 4 s batch timeout


def test_a_non_finite_regression_output_is_a_422_naming_the_example(cli, tmp_path_factory):
  """Was: a 200 with {"value": Infinity}, which is not JSON."""
  server = Server(cli, trained_run(cli, tmp_path_factory, "linear", LINEAR))
  try:
    status, reply = server.request("POST", "/v1/predict", {"inputs": [[1.0], [2.0]]})
    assert status == 200 and all(np.isfinite(p["value"]) for p in reply["predictions"]), reply
    status, reply = server.request("POST", "/v1/predict", {"inputs": [[1.0], [3e38]]})
    assert status == 422 and reply["error"].startswith("inputs[1]: the model's output is not finite"), reply
    assert server.request("GET", "/healthz")[1]["internal_errors"] == 0
  finally:
    assert server.stop() == 0, server.output[-3000:]


def test_sigterm_finishes_the_requests_in_flight_then_exits_0(digits_server, digits_test):
  """Last in this module: it ends the shared server."""
  body = json.dumps({"inputs": digits_test["inputs"][:3].tolist()}).encode()
  head = (f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          f"Content-Length: {len(body)}\r\n\r\n").encode()
  sockets = [socket.create_connection((digits_server.host, digits_server.port), timeout=30) for _ in range(3)]
  for s in sockets:
    s.sendall(head + body[:10])  # half a request: in flight until the rest comes
  deadline = time.time() + 30
  while digits_server.request("GET", "/healthz")[1]["in_flight"] < len(sockets):
    assert time.time() < deadline
    time.sleep(0.02)
  digits_server.proc.send_signal(signal.SIGTERM)
  time.sleep(0.5)
  assert digits_server.proc.poll() is None  # still draining
  for s in sockets:
    s.sendall(body[10:])
  for s in sockets:
    reply = b""
    while chunk := s.recv(65536):
      reply += chunk
    s.close()
    status, payload = reply.split(b"\r\n", 1)[0], json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert status == b"HTTP/1.1 200 OK" and len(payload["predictions"]) == 3
  assert digits_server.proc.wait(timeout=30) == 0, digits_server.output[-3000:]
  output = digits_server.output
  result = json.JSONDecoder().raw_decode(output[output.index("\n{") + 1:])[0]
  assert result["served"] >= 3 and result["internal_errors"] == 0
  with pytest.raises(OSError):  # no longer accepting
    socket.create_connection((digits_server.host, digits_server.port), timeout=5)


def test_the_quantized_model_serves_its_own_predictions(cli, digits_run, digits_test):
  missing = cli(f"--workdir={digits_run}", "--mode=serve", "--config.serve.port=0", "--config.serve.quantized=true")
  assert missing.returncode == 2 and "run --mode=quantize first" in missing.stderr.strip().splitlines()[-1]
  quantized = cli(f"--workdir={digits_run}", "--mode=quantize")
  assert quantized.returncode == 0, quantized.stderr[-2000:]
  from bigmodel_jax import inference, quantize, run_config
  model = inference.Inference.load(run_config.get_config(str(digits_run / "config.json")), digits_run)
  step, _ = model.restore_step()
  variables, model_function = quantize.load(model, step)
  want = np.asarray(jax.jit(model.predict_function(model_function))(variables, digits_test["inputs"][:16])["prediction"])
  model.close()
  server = Server(cli, digits_run, "--config.serve.quantized=true")
  try:
    assert server.request("GET", "/v1/models")[1]["quantized"] is True
    status, reply = server.request("POST", "/v1/predict", {"inputs": digits_test["inputs"][:16].tolist()})
    assert status == 200 and [p["class"] for p in reply["predictions"]] == want.tolist()
  finally:
    assert server.stop() == 0
