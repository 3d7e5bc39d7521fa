"""--mode=serve under load: requests/s and p50/p99 latency at 1, 8 and 32 concurrent clients, with and without batching.

    python benchmarks/serving.py                                  # trains the smoke runs into a temp dir first
    python benchmarks/serving.py --workdir=runs/mnist --lm_workdir=runs/gpt --seconds=5

Starts real `--mode=serve` processes on free ports and drives them with real HTTP clients (threads of this
process, one connection per request, as the server closes each): POST /v1/predict with one MNIST test image
(nested lists of uint8 pixels) per request against the MNIST CNN served with config.serve.max_batch=32 (concurrent
requests share model calls) and max_batch=1 (each request its own call); POST /v1/completions (32 tokens from
"ROMEO:", temperature 0.8) against the char GPT, which runs one completion at a time whatever max_batch is.
'calls/req' is the server's model calls per request (its /healthz counters): below 1 means batches were shared.
The clients share the machine with the server: on a small CPU box the numbers measure both.
"""

import http.client
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained MNIST classifier run (default: mnist_cnn:smoke, trained).")
_LM_WORKDIR = flags.DEFINE_string("lm_workdir", None, "A trained char-GPT run (default: shakespeare_char_gpt:smoke).")
_DATA_PATH = flags.DEFINE_string("data_path", "/work/shared/data/tinyshakespeare/input.txt",
                                 "tiny Shakespeare's input.txt, to train the default char GPT offline.")
_SECONDS = flags.DEFINE_float("seconds", 3.0, "Measured seconds per cell (after a warm-up).")
_CLIENTS = flags.DEFINE_list("clients", ["1", "8", "32"], "Concurrent client counts.")


def cli(*args, **kwargs):
  return subprocess.run([sys.executable, "-m", "bigmodel_jax.main", *args], cwd=ROOT, capture_output=True,
                        text=True, **kwargs)


def train(config: str, workdir: Path, *extra) -> Path:
  proc = cli(f"--config={config}", f"--workdir={workdir}", *extra)
  if proc.returncode:
    sys.exit(f"training {config} failed: {proc.stderr.strip().splitlines()[-1]}")
  return workdir


class Server:
  def __init__(self, workdir, *flags_):
    self.proc = subprocess.Popen([sys.executable, "-m", "bigmodel_jax.main", f"--workdir={workdir}", "--mode=serve",
                                  "--config.serve.port=0", *flags_], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    for line in self.proc.stdout:
      found = re.search(r"^serving .* on http://([\d.]+):(\d+)", line)
      if found:
        self.host, self.port = found.group(1), int(found.group(2))
        break
    else:
      sys.exit(f"the server did not start: {self.proc.wait()}")
    threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()  # keep the pipe empty

  def request(self, method, path, body=None):
    conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
    conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    reply = json.loads(response.read())
    conn.close()
    if response.status != 200:
      raise RuntimeError(f"{path}: {response.status} {reply}")
    return reply

  def stop(self):
    self.proc.terminate()
    self.proc.wait(timeout=60)


def load(server: Server, path: str, body, clients: int, seconds: float) -> dict:
  """`clients` threads sending `body` back to back for `seconds` -> requests/s, p50/p99 ms, calls/request."""
  for _ in range(3):
    server.request("POST", path, body)  # warm-up (a completion compiles its prompt length and settings once)
  before = server.request("GET", "/healthz")
  latencies, stop_at = [], time.perf_counter() + seconds

  def client():
    mine = []
    while time.perf_counter() < stop_at:
      start = time.perf_counter()
      server.request("POST", path, body)
      mine.append(time.perf_counter() - start)
    latencies.extend(mine)

  start = time.perf_counter()
  threads = [threading.Thread(target=client) for _ in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  elapsed = time.perf_counter() - start
  after = server.request("GET", "/healthz")
  ms = np.asarray(latencies) * 1000
  calls = (after.get("batches", 0) - before.get("batches", 0)) or (after["completions"] - before["completions"])
  return {"req_s": len(ms) / elapsed, "p50": np.percentile(ms, 50), "p99": np.percentile(ms, 99),
          "calls_per_request": calls / len(ms)}


def main(_):
  clients = [int(c) for c in _CLIENTS.value]
  with tempfile.TemporaryDirectory(prefix="serving_bench_") as tmp:
    mnist = Path(_WORKDIR.value) if _WORKDIR.value else train("configs/mnist_cnn.py:smoke", Path(tmp) / "mnist")
    lm = Path(_LM_WORKDIR.value) if _LM_WORKDIR.value else None
    if lm is None and Path(_DATA_PATH.value).is_file():
      lm = train("configs/shakespeare_char_gpt.py:smoke", Path(tmp) / "gpt", f"--config.data.path={_DATA_PATH.value}")
    image = np.random.default_rng(0).integers(0, 256, (28, 28, 1)).tolist()
    cells = [("mnist_cnn", "/v1/predict", mnist, batch, {"inputs": [image]}) for batch in (32, 1)]
    if lm is not None:
      cells.append(("char_gpt", "/v1/completions", lm, 32,
                    {"prompt": "ROMEO:", "max_tokens": 32, "temperature": 0.8, "top_k": 0, "top_p": 1.0}))
    else:
      print(f"no {_DATA_PATH.value}: the char GPT row is left out (pass --lm_workdir or --data_path)")
    rows = []
    for name, path, workdir, max_batch, body in cells:
      server = Server(workdir, f"--config.serve.max_batch={max_batch}")
      try:
        for c in clients:
          rows.append((name, path, max_batch, c, load(server, path, body, c, _SECONDS.value)))
      finally:
        server.stop()
  print(f"\n{_SECONDS.value:g} s per cell; one example (or one 32-token completion) per request")
  print(f"{'model':10s} {'endpoint':16s} {'max_batch':>9s} {'clients':>7s} {'req/s':>8s} {'p50 ms':>8s} "
        f"{'p99 ms':>8s} {'calls/req':>9s}")
  for name, path, max_batch, c, r in rows:
    print(f"{name:10s} {path:16s} {max_batch:9d} {c:7d} {r['req_s']:8.1f} {r['p50']:8.1f} {r['p99']:8.1f} "
          f"{r['calls_per_request']:9.2f}")


if __name__ == "__main__":
  app.run(main)
