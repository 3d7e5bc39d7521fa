"""--mode=serve --workdir=RUN: the trained model behind HTTP (JSON in, JSON out).

  POST /v1/predict      {"inputs": [example, ...]}  -> {"predictions": [{"label", "class", "probabilities"}], ...}
                        (regression: [{"value"}]); what an example is: bigmodel_jax/serve_inputs.py. An example whose
                        output is not finite (a regressor given 3e38) is a 422 naming it, never a 200 with NaN
  POST /v1/completions  language models: {"prompt", "max_tokens", "temperature", "top_k", "top_p", "seed"}
                        -> {"completion": text, "tokens": n, "prompt_tokens", "prompt_tokens_used", ...}: a prompt
                        longer than the context is cut to its last `context` tokens, as --mode=sample does
  GET  /healthz         {"status": "ok", "requests", "batches", "examples", ...}: liveness and counters
  GET  /v1/models       the model's signature: model.json, step, task, input shape/dtype, labels, quantized

The server is the standard library's http.server.ThreadingHTTPServer: no new dependency, and a thread per
connection is plenty when every request ends in one shared model call. What makes it survive real clients is
here, not in a framework: bodies are read only after their Content-Length is checked (411 without one, 413 over
config.serve.max_body_bytes, answered before a client waiting on `Expect: 100-continue` sends anything), every
socket has a timeout (a stalled client holds one thread for at most SOCKET_TIMEOUT_S), the request line with
its headers, then the body, must each arrive within SOCKET_TIMEOUT_S in all however they trickle (408), every
response closes its connection (no idle keep-alive threads; HTTP/1.1 so curl's 100-continue works), every error
(including http.server's own: a bad request line, which it would answer as HTTP/0.9 with no status line, is an
HTTP/1.1 400; a method it does not know, a 501; OPTIONS, a 405 with Allow) is JSON, and an exception in a handler
is a 500 with one line while the server goes on.

Batching: /v1/predict requests go onto a queue; one worker thread takes up to config.serve.max_batch examples,
waiting at most config.serve.batch_timeout_ms for more after the first, and only while other predict requests
are being decoded (their bodies arrived: a lone client, or a stalled upload, never holds a batch), pads them to
a bucket (powers of two up to max_batch; bigmodel_jax/serve_batch.py), runs the model once, and hands each
request its rows. Every bucket is compiled at start-up: no request waits for a compilation. max_batch=1 runs each
request alone. Completions run one at a time (a lock): sample.generate decodes with a KV cache over the whole
context for one prompt; concurrent completions wait their turn. A prompt goes in as pieces of power-of-two lengths:
at most log2(context) + 1 prefill shapes compile, each once; temperature, top_k and top_p are arguments of the
compiled functions (greedy decoding, temperature 0, is one more compilation).

SIGTERM or Ctrl-C: stop accepting, finish the requests in flight, return {"step", "served"} (exit 0); again: exit now.
"""

import errno
import http.server
import io
import json
import math
import os
import signal
import sys
import threading
import time
import urllib.parse

import jax
import numpy as np
from absl import logging

from bigmodel_jax import errors, inference, interrupts, sample
from bigmodel_jax.errors import UserError
from bigmodel_jax.serve_batch import Batcher, buckets
from bigmodel_jax.serve_inputs import BadRequest, InputDecoder, completion_request, parse_json

SOCKET_TIMEOUT_S = 10  # a stalled client holds its thread (and a SIGTERM drain) at most this long
ROUTES = {"/healthz": "GET", "/v1/models": "GET", "/v1/predict": "POST", "/v1/completions": "POST"}


def check_config(s) -> None:
  """config.serve's fields, each with a one-line error naming it."""
  def integer(name, low, high):
    value = s[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
      raise UserError(f"config.serve.{name}: {value!r} must be an integer in {low}..{high}")
  if not isinstance(s.host, str) or not s.host.strip():
    raise UserError(f"config.serve.host: {s.host!r} must be an address to bind (127.0.0.1, 0.0.0.0, a hostname)")
  integer("port", 0, 65535)
  integer("max_batch", 1, 65536)
  integer("max_body_bytes", 2, 2 ** 40)
  integer("max_tokens", 1, 1_000_000)
  t = s.batch_timeout_ms
  if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 60_000:
    raise UserError(f"config.serve.batch_timeout_ms: {t!r} must be a number of milliseconds in 0..60000")
  if not isinstance(s.quantized, bool):
    raise UserError(f"config.serve.quantized: {s.quantized!r} must be true or false")


class Service:
  """What the handlers call: the model, its compiled functions, the counters."""

  def __init__(self, model, step: int, state, variables: dict, model_function, quantized: bool):
    s = model.config.serve
    self.model, self.card, self.step, self.quantized = model, model.card, step, quantized
    self.is_lm = model.dataset.is_token_stream
    self.counts = dict.fromkeys(("requests", "served", "errors", "internal_errors", "completions", "disconnected"), 0)
    self.in_flight, self.lock, self.completion_lock = 0, threading.Lock(), threading.Lock()
    self.receiving = 0  # /v1/predict requests whose body has arrived, being decoded: the batcher's hint
    self.batcher = None
    if self.is_lm:
      self.lm = model_function(variables) if model_function else model.steps.model(state, cast=True)
      self.tokenizer = model.dataset.tokenizer
      return
    self.decode = InputDecoder(self.card, model.dataset.tokenizer, s.max_batch)
    device_variables = jax.device_put(variables)
    fn = jax.jit(model.predict_function(model_function))
    shape, dtype = tuple(self.card["input_shape"]), np.dtype(self.card["input_dtype"])
    start = time.perf_counter()
    compiled = {b: fn.lower(device_variables, jax.ShapeDtypeStruct((b, *shape), dtype)).compile()
                for b in buckets(s.max_batch)}
    logging.info("compiled batch sizes %s in %.1f s", list(compiled), time.perf_counter() - start)
    self.batcher = Batcher(lambda b, x: compiled[b](device_variables, x), s.max_batch, s.batch_timeout_ms / 1000,
                           coming=lambda: self.receiving)

  def count(self, name: str, by: int = 1) -> None:
    with self.lock:
      self.counts[name] += by

  def health(self) -> dict:
    out = {"status": "ok", "step": self.step, **self.counts, "in_flight": self.in_flight}
    if self.batcher is not None:
      out.update(batches=self.batcher.batches, examples=self.batcher.examples)
    return out

  def signature(self) -> dict:
    c, s = self.card, self.model.config.serve
    out = {"model": c["model"], "dataset": c.get("dataset"), "task": c["task"], "kind": c["kind"], "step": self.step,
           "quantized": self.quantized, "input_shape": c["input_shape"], "input_dtype": c["input_dtype"],
           "labels": c.get("class_names", []), "outputs": c["outputs"], "max_batch": s.max_batch,
           "max_body_bytes": s.max_body_bytes,
           "endpoints": ["/v1/completions"] if self.is_lm else ["/v1/predict"], "card": c}
    if self.is_lm:
      out.update(max_tokens=s.max_tokens, vocab_size=c.get("vocab_size"),
                 context=sample.attended(self.lm, c["input_shape"][0]))  # None: no limit (an LSTM)
    return out

  def predict(self, read_body) -> dict:
    if self.is_lm:
      raise BadRequest("/v1/predict: a language model has no per-example prediction; use POST /v1/completions")
    body = read_body()  # not counted while it arrives: a stalled upload would hold every batch for its timeout
    with self.lock:
      self.receiving += 1
    try:
      inputs = self.decode(parse_json(body))
    finally:
      with self.lock:
        self.receiving -= 1
    out = self.batcher.predict(inputs)
    finite = np.ones(len(inputs), bool)
    for v in out.values():  # an overflow (a regressor given 3e38) would be a 200 with a non-number in it
      if np.asarray(v).dtype.kind == "f":
        finite &= np.isfinite(np.asarray(v, np.float64).reshape(len(inputs), -1)).all(1)
    if not finite.all():
      raise BadRequest(f"inputs[{int(np.argmin(finite))}]: the model's output is not finite for it (an input far "
                       "outside what it was trained on?); nothing was predicted", 422)
    if "probability" in out:
      names = self.card.get("class_names") or [str(i) for i in range(out["probability"].shape[1])]
      rows = [{"label": names[int(p)], "class": int(p),
               "probabilities": {n: round(float(x), 7) for n, x in zip(names, probs)}}
              for p, probs in zip(out["prediction"], out["probability"])]
    else:
      rows = [{"value": float(v)} for v in np.asarray(out["prediction"]).reshape(len(inputs), -1)[:, 0]]
    return {"model": self.card["model"], "step": self.step, "predictions": rows}

  def complete(self, body: dict) -> dict:
    if not self.is_lm:
      raise BadRequest(f"/v1/completions: a {self.card['task']} model does not generate text; use POST /v1/predict")
    r = completion_request(body, self.tokenizer, self.model.config.sample, self.model.config.serve.max_tokens)
    context = sample.attended(self.lm, self.card["input_shape"][0])  # a longer prompt: its last `context` tokens
    with self.completion_lock:
      start = time.perf_counter()
      tokens = sample.generate(self.lm, r["prompt_ids"], r["num_tokens"], temperature=r["temperature"],
                               top_k=r["top_k"], top_p=r["top_p"], seed=r["seed"],
                               banned_ids=self.tokenizer.special_ids, context=self.card["input_shape"][0])
      seconds = time.perf_counter() - start
    self.count("completions")
    return {"model": self.card["model"], "step": self.step, "completion": self.tokenizer.decode(tokens[0]),
            "tokens": int(tokens.shape[1]), "prompt_tokens": len(r["prompt_ids"]),
            "prompt_tokens_used": min(len(r["prompt_ids"]), context or len(r["prompt_ids"])),
            "seconds": round(seconds, 4)}


class HeadTimeout(Exception):
  """The request line and headers did not all arrive by their deadline (a 408)."""


class _Clock(io.RawIOBase):
  """A connection's reads, under one deadline in all while `deadline` is set (the request head): the socket's timeout
  restarts with every byte, so a head trickled a byte every few seconds (slowloris) would hold a thread for ever."""

  def __init__(self, raw, sock):
    self.raw, self.sock, self.deadline = raw, sock, None

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    if self.deadline is None:
      return self.raw.readinto(buffer)
    if (left := self.deadline - time.monotonic()) <= 0:
      raise HeadTimeout
    self.sock.settimeout(left)
    try:
      return self.raw.readinto(buffer)
    except TimeoutError:
      raise HeadTimeout from None

  def close(self) -> None:
    self.raw.close()
    super().close()


class Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"  # for Expect: 100-continue; every response still closes its connection
  timeout = SOCKET_TIMEOUT_S
  server_version = "bigmodel_jax"
  service: Service = None  # set on the subclass serve() makes

  def setup(self):
    super().setup()
    self.clock = _Clock(self.rfile.detach(), self.connection)
    self.rfile = io.BufferedReader(self.clock)

  def handle_one_request(self):
    self.command, self.request_version, self.requestline = None, self.protocol_version, ""  # until parsed
    self.clock.deadline = time.monotonic() + SOCKET_TIMEOUT_S
    try:
      super().handle_one_request()
    except HeadTimeout:
      self.connection.settimeout(self.timeout)  # the reply's own
      self._reply(408, {"error": f"request line and headers: not all arrived in {SOCKET_TIMEOUT_S} s; send them "
                                 f"within {SOCKET_TIMEOUT_S} s"})
    except ConnectionError:  # the client reset the connection: nobody to answer, and no traceback for it
      self.close_connection = True

  def parse_request(self):
    try:
      return super().parse_request()
    finally:  # the head is in: the body has its own deadline (_read_body)
      self.clock.deadline = None
      self.connection.settimeout(self.timeout)

  def log_message(self, format, *args):  # http.server writes every request to stderr; keep that quiet
    logging.debug("serve: %s %s", self.address_string(), format % args)

  def send_error(self, code, message=None, explain=None):  # http.server's own errors, as JSON too
    self._reply(code, {"error": message or http.HTTPStatus(code).phrase})

  def handle_expect_100(self):  # refuse a too-large body before the client sends it
    try:
      self._body_length()
    except BadRequest as e:
      self._reply(e.status, {"error": str(e)})
      return False
    return super().handle_expect_100()

  def _dispatch(self, method: str) -> None:
    service = self.service
    path = urllib.parse.urlsplit(self.path).path.rstrip("/") or "/"
    service.count("requests")
    with service.lock:
      service.in_flight += path != "/healthz"
    try:
      if path not in ROUTES:
        raise BadRequest(f"{path}: no such endpoint; try {', '.join(ROUTES)}", 404)
      if method != ROUTES[path]:
        raise BadRequest(f"{method} {path}: use {ROUTES[path]}", 405)
      if path == "/healthz":
        reply = service.health()
      elif path == "/v1/models":
        reply = service.signature()
      elif path == "/v1/predict":
        reply = service.predict(self._read_body)
      else:
        reply = service.complete(parse_json(self._read_body()))
      self._reply(200, reply)
      service.count("served")
    except BadRequest as e:
      service.count("errors")
      self._reply(e.status, {"error": str(e)}, allow=ROUTES.get(path) if e.status == 405 else None)
    except ConnectionError:  # the client went away mid-request (a reset while its body came): not our error
      service.count("disconnected")
      self.close_connection = True
    except Exception as e:  # a bug: one line for the client, the traceback in the log, and the server goes on
      logging.exception("serve: %s %s failed", method, path)
      service.count("internal_errors")
      self._reply(500, {"error": f"internal error {errors.where(e)}"})
    finally:
      with service.lock:
        service.in_flight -= path != "/healthz"

  def _body_length(self) -> int:
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      raise BadRequest("Content-Length: required (chunked bodies are not accepted)", 411)
    text = self.headers.get("Content-Length")
    if text is None:
      raise BadRequest("Content-Length: required; send the body's size in bytes", 411)
    if not (text.strip().isascii() and text.strip().isdigit()):  # '²' is a digit to str.isdigit
      raise BadRequest(f"Content-Length: {text[:40]!r} is not a number of bytes")
    length, limit = int(text), self.service.model.config.serve.max_body_bytes
    if length > limit:
      raise BadRequest(f"body: {length} bytes, over config.serve.max_body_bytes={limit}", 413)
    return length

  def _read_body(self) -> bytes:
    length = self._body_length()
    body, deadline, late = bytearray(), time.monotonic() + SOCKET_TIMEOUT_S, False
    try:  # chunk by chunk, SOCKET_TIMEOUT_S in all (each read would reset a per-read timeout: a byte every few
      # seconds would hold the thread for ever); a read that times out keeps what had arrived, for the message
      while len(body) < length:
        if (left := deadline - time.monotonic()) <= 0:
          raise TimeoutError
        self.connection.settimeout(left)
        if not (chunk := self.rfile.read1(length - len(body))):
          break
        body += chunk
    except TimeoutError:
      late = True
    finally:
      self.connection.settimeout(self.timeout)  # the reply's own
    if late:
      raise BadRequest(f"body: {len(body)} of Content-Length {length} bytes arrived in {SOCKET_TIMEOUT_S} s; send "
                       f"the whole body within {SOCKET_TIMEOUT_S} s", 408)
    if len(body) < length:
      raise BadRequest(f"body: {len(body)} bytes arrived, Content-Length said {length}")
    return bytes(body)

  def _reply(self, status: int, payload: dict, allow: str | None = None) -> None:
    data = (json.dumps(payload, allow_nan=False) + "\n").encode()  # NaN / Infinity are no JSON: a 500 instead
    self.close_connection = True
    if self.request_version == "HTTP/0.9":  # http.server's guess for a request line it cannot read: no status line
      self.request_version = self.protocol_version
    try:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.send_header("Connection", "close")
      if allow:
        self.send_header("Allow", allow)
      self.end_headers()
      if self.command != "HEAD":
        self.wfile.write(data)
      self.wfile.flush()
    except OSError:  # the client went away; nothing to tell it
      pass


for _method in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"):  # OPTIONS too: a 405 with Allow
  setattr(Handler, f"do_{_method}", lambda self, method=_method: self._dispatch(method))


class Server(http.server.ThreadingHTTPServer):
  daemon_threads = False  # server_close() waits for the requests in flight
  block_on_close = True
  request_queue_size = 128


def _load(model, checkpoint_step):
  """(step, variables, model_function or None) of the float or (config.serve.quantized) the int8 model."""
  step, state = model.restore_step(checkpoint_step)
  if not model.config.serve.quantized:
    return step, state, model.variables(state), None
  from bigmodel_jax import quantize
  variables, model_function = quantize.load(model, step)  # a one-line error where --mode=quantize has not run
  return step, state, variables, model_function


def serve(model, checkpoint_step: int | None) -> dict:
  """--mode=serve: serves until SIGTERM / SIGINT, then -> {'step', 'served', ...}."""
  s = model.config.serve
  check_config(s)
  inference.check_deployable(model.config, "serve")
  step, state, variables, model_function = _load(model, checkpoint_step)
  service = Service(model, step, state, variables, model_function, bool(s.quantized))
  handler = type("BoundHandler", (Handler,), {"service": service})
  try:
    server = Server((s.host, s.port), handler)
  except OSError as e:
    if e.errno == errno.EADDRINUSE:
      raise UserError(f"config.serve.port: {s.host}:{s.port} is already in use; pick another (0: any free port)") \
          from None
    raise UserError(f"config.serve.host: cannot bind {s.host}:{s.port} ({e.strerror or e})") from None
  host, port = server.server_address[:2]
  stopping = threading.Event()

  def on_signal(signum, _frame):
    if stopping.is_set():
      os.write(2, f"error: {signal.Signals(signum).name} while draining: stopped at once\n".encode())
      os._exit(128 + signum)
    stopping.set()
    logging.info("%s: no new connections; finishing the requests in flight", signal.Signals(signum).name)
    threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() from serve_forever's thread hangs

  previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
  print(f"serving {model.card['model']} ({model.card.get('dataset')}) step {step} on http://{host}:{port}",
        flush=True)
  start = time.perf_counter()
  try:
    server.serve_forever(poll_interval=0.2)
  finally:
    server.server_close()  # joins the handler threads: the requests in flight finish
    if service.batcher is not None:
      service.batcher.stop()
    interrupts.restore(previous)
  sys.stdout.flush()
  logging.info("served %d requests in %.0f s", service.counts["served"], time.perf_counter() - start)
  return {"step": step, "served": service.counts["served"], "url": f"http://{host}:{port}",
          **{k: v for k, v in service.health().items() if k not in ("status", "step", "in_flight")}}
