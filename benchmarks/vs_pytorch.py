"""Our compiled train step vs the same model, batch, optimizer and batches in PyTorch (eager and torch.compile),
alternating in one process with the same thread count (torch.set_num_threads = the cores XLA's CPU client uses).
PyTorch is a benchmark-only extra (pip install torch==2.13.0), never needed to train.

Models: configs/mnist_cnn.py's seed CNN (Conv32-Pool-Conv64-Pool-Conv64-Dense64-Dense10, Adam) and
configs/shakespeare_char_gpt.py's GPT (nanoGPT's model.py: pre-LN blocks, no biases, tied embeddings, learned
positions, exact GELU; AdamW with weight decay on 2-D parameters and gradient clipping).
"""

import itertools
import math
import os
import tempfile
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.measures import Unavailable, _bare_run, _batches, _feed, _feed_rate, _records, load


def _torch():
  try:
    import torch
  except ImportError:
    raise Unavailable("PyTorch is not installed (benchmark-only: pip install torch==2.13.0)") from None
  torch.set_num_threads(os.cpu_count())
  return torch


def _cnn(torch, run):
  from torch import nn
  m = run.config.model
  if m.name != "cnn" or tuple(m.conv_features) != (32, 64, 64) or m.pool_after != 2:
    raise ValueError(f"vs_pytorch: {run.config.model.name} is not the seed CNN this benchmark builds in PyTorch")
  h, w, c = run.dataset.input_shape
  side = ((h - 2) // 2 - 2) // 2 - 2
  net = nn.Sequential(nn.Conv2d(c, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3), nn.ReLU(),
                      nn.MaxPool2d(2), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64 * side * side, 64),
                      nn.ReLU(), nn.Linear(64, run.dataset.num_classes))
  o = run.config.optimizer
  if o.name != "adam" or o.weight_decay or o.grad_clip_norm:
    raise ValueError(f"vs_pytorch: the seed CNN's twin is trained with plain Adam, not {o.name!r} with weight decay "
                     f"{o.weight_decay} and clipping {o.grad_clip_norm}")
  optimizer = torch.optim.Adam(net.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps)
  to_torch = lambda b: (torch.from_numpy(b["inputs"]).permute(0, 3, 1, 2).contiguous(),
                        torch.from_numpy(b["targets"]).long())
  loss = lambda out, y: nn.functional.cross_entropy(out, y)
  return net, optimizer, to_torch, loss, None


def _gpt(torch, run):
  """nanoGPT's GPT (model.py) with our config's sizes."""
  from torch import nn
  F = nn.functional
  m, o = run.config.model, run.config.optimizer
  if m.name != "gpt" or m.use_bias or not m.tie_embeddings or m.positions != "learned" or m.dropout_rate:
    raise ValueError("vs_pytorch: the GPT comparison builds nanoGPT's model (no biases, tied embeddings, learned "
                     "positions, no dropout)")
  dim, heads, vocab, window = m.embed_dim, m.num_heads, run.dataset.vocab_size, run.dataset.input_shape[0]

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln1, self.ln2 = nn.LayerNorm(dim, bias=False), nn.LayerNorm(dim, bias=False)
      self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
      self.fc, self.out = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
      b, t, _ = x.shape
      q, k, v = (z.view(b, t, heads, dim // heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(dim, 2))
      x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, dim))
      return x + self.out(F.gelu(self.fc(self.ln2(x))))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(window, dim)
      self.blocks = nn.ModuleList(Block() for _ in range(m.num_layers))
      self.ln_f = nn.LayerNorm(dim, bias=False)
      for p in self.parameters():
        nn.init.normal_(p, std=0.02) if p.dim() == 2 else None

    def forward(self, idx):
      x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
      for block in self.blocks:
        x = block(x)
      return self.ln_f(x) @ self.wte.weight.T  # tied head

  net = GPT()
  decay = [p for p in net.parameters() if p.dim() >= 2]
  rest = [p for p in net.parameters() if p.dim() < 2]
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}], lr=o.learning_rate, betas=(o.b1, o.b2))
  to_torch = lambda b: (torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long())
  loss = lambda out, y: F.cross_entropy(out.view(-1, out.shape[-1]), y.view(-1))
  return net, optimizer, to_torch, loss, o.grad_clip_norm or None


MODELS = {"cnn": _cnn, "gpt": _gpt}


def vs_pytorch(name: str, steps: int, repeats: int, text: str = "") -> list[dict]:
  """Rows: our step (fed as our train loop feeds it: config.data.on_device gathers on the device, each round
  continuing the stream) vs PyTorch eager, and vs torch.compile, on batches of the same pipeline and shapes."""
  torch = _torch()
  with tempfile.TemporaryDirectory() as tmp:
    run = _bare_run(load(name, text), Path(tmp) / "run", steps)
    if run.config.model.name not in MODELS:
      raise ValueError(f"vs_pytorch: no PyTorch twin of model {run.config.model.name!r}")
    state, feed = [run.steps.layout.place(run.steps.init())], _feed(run)
    host = list(itertools.islice(_batches(run, steps), steps))  # PyTorch's, the pipeline's first; ours continue
    start = time.perf_counter()
    _feed_rate(state, feed, 1)  # compiles
    compile_s = time.perf_counter() - start

    def ours():  # fed as our train loop feeds it (config.data.on_device: gathered on the device)
      return _feed_rate(state, feed, steps)

    torch.manual_seed(0)
    net, optimizer, to_torch, loss_fn, clip = MODELS[run.config.model.name](torch, run)
    tensors = [to_torch(b) for b in host]

    def torch_step(forward):
      def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(forward(x), y)
        loss.backward()
        if clip:
          torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        optimizer.step()
        return loss
      return step

    variants = {"PyTorch eager": torch_step(net)}
    compiled = torch.compile(net)
    start = time.perf_counter()
    torch_step(compiled)(*tensors[0])
    torch_compile_s = time.perf_counter() - start
    variants["torch.compile"] = torch_step(compiled)

    def torch_rate(step):
      def measure():
        step(*tensors[0])
        start = time.perf_counter()
        for x, y in tensors[1:]:
          step(x, y)
        return (len(tensors) - 1) / (time.perf_counter() - start)
      return measure

    first_loss = float(variants["PyTorch eager"](*tensors[0]))  # a sanity check that both learn the same task
    if not math.isfinite(first_loss):
      raise RuntimeError(f"vs_pytorch: PyTorch's {name} loss is {first_loss}")
    rows = []
    for variant, step in variants.items():
      our_rates, their_rates = harness.alternate(ours, torch_rate(step), repeats)
      ratios = [a / b for a, b in zip(our_rates, their_rates)]
      rows.append(harness.row("vs_pytorch", name, f"our step vs {variant}", "steps/s",
                              "steps after the first / seconds, the same pipeline's batches; ratio = ours / PyTorch per round",
                              our_rates, compile_s=compile_s, reference=(variant, their_rates), ratios=ratios,
                              target=">= 1.0x", meets=harness.summary(ratios)["median"] >= 1.0,
                              notes=f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch "
                                    f"{run.config.data.batch_size}" +
                                    (f", torch.compile {torch_compile_s:.0f} s" if variant == "torch.compile" else "")))
    run.checkpointer.close()
    run.writer.close()
  return rows


def time_to_accuracy(name: str, target: float, every: int = -1, repeats: int = 1, pytorch: bool = True) -> list[dict]:
  """Wall clock from the start of training to the first test accuracy >= target, the test split evaluated every
  `every` steps (-1: at the end of each epoch), evaluations included: ours is the whole product loop
  (train.train_and_evaluate: compile, checkpoints, logging; the validation evaluator only at the end), PyTorch
  eager the same model on the same pipeline's batches with Adam and the same cosine schedule, stopping when it
  reaches the target. Our run goes on to the config's end (the loop never stops on test): only the time to the
  crossing is compared. One row: ours, with PyTorch's as its reference (`pytorch=False`: ours alone, e.g. on a GPU
  machine without PyTorch)."""
  from bigmodel_jax import train
  from bigmodel_jax.data import pipeline
  torch = _torch() if pytorch else None
  ours, theirs, reached_ours, reached_theirs = [], [], [], []
  config = load(name)
  if config.schedule.name != "cosine":
    raise ValueError(f"time_to_accuracy: {name} is not trained with a cosine schedule")
  end = config.schedule.end_factor
  for _ in range(repeats):
    with tempfile.TemporaryDirectory() as tmp:
      config = load(name)
      config.evals.test.every, config.evals.validation.every = every, 0
      start = time.time()
      train.train_and_evaluate(config, Path(tmp) / "ours")
      records = _records(Path(tmp) / "ours")
      tests = sorted((r for r in records if r["split"] == "test"), key=lambda r: r["step"])
      hit = next((r for r in tests if r["accuracy"] >= target), None)
      ours.append((hit or max(records, key=lambda r: r["time"]))["time"] - start)
      reached_ours.append(hit["step"] if hit else None)
      if torch is None:
        continue
      run = _bare_run(load(name), Path(tmp) / "torch", max(r["step"] for r in records))  # our run's steps
      total, per_epoch = run.total_steps, run.steps_per_epoch
      eval_every = per_epoch if every == -1 else every
      torch.manual_seed(0)
      net, optimizer, to_torch, loss_fn, _ = _cnn(torch, run)
      # optax.cosine_decay_schedule(lr, total, alpha=end_factor), the factor for update t counted from 0 in both
      lr = lambda t: (1 - end) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total)) + end
      scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr)
      test = [to_torch(b) + (torch.from_numpy(b["mask"]) > 0,)
              for b in pipeline.eval_batches(run.dataset, "test", run.config.data)]

      def accuracy():
        net.eval()
        with torch.no_grad():
          right = sum(int(((net(x).argmax(1) == y) & m).sum()) for x, y, m in test)
        net.train()
        return right / sum(int(m.sum()) for _, _, m in test)

      start, hit = time.time(), None
      for step, batch in enumerate(_batches(run, total), 1):
        x, y = to_torch(batch)
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        optimizer.step()
        scheduler.step()
        if step % eval_every == 0 or step == total:
          if accuracy() >= target:
            hit = step
            break
      theirs.append(time.time() - start)
      reached_theirs.append(hit)
      run.checkpointer.close()
      run.writer.close()
  said = lambda steps: ", ".join("not reached" if s is None else f"step {s}" for s in steps)
  every_said = "each epoch" if every == -1 else f"every {every} steps"
  formula = ("time.time() at the first test evaluation at or above the target - start: ours from the call of "
             "train_and_evaluate (data loading, compile, evaluations, checkpoints included), PyTorch from its first "
             "step (data already loaded: a bias against us)")
  if torch is None:
    return [harness.row("time_to_accuracy", name, f"wall clock to test accuracy >= {target}", "s", formula, ours,
                        target="report", notes=f"test evaluated {every_said}; reached at {said(reached_ours)} (a "
                                              "time not reached is the whole run's)")]
  ratios = [b / a for a, b in zip(ours, theirs)]
  meets = all(s is not None for s in reached_ours) and harness.summary(ratios)["median"] >= 1.0
  return [harness.row("time_to_accuracy", name, f"wall clock to test accuracy >= {target}", "s",
                      formula + "; ratio = PyTorch's time / ours", ours,
                      reference=("PyTorch eager, same batches, Adam and cosine schedule", theirs),
                      ratios=ratios, target=">= 1.0x", meets=meets,
                      notes=f"test evaluated {every_said}; reached at: ours {said(reached_ours)}, PyTorch "
                            f"{said(reached_theirs)} (a time not reached is the whole run's; each its own "
                            "framework's default initialisation); torch "
                            f"{torch.__version__}, {torch.get_num_threads()} threads")]
