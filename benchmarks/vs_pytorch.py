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
from benchmarks.measures import Unavailable, _bare_run, _batches, _compile_s, _step_rate, load


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
  optimizer = torch.optim.Adam(net.parameters(), lr=run.config.optimizer.learning_rate)
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
  """Rows: our step (fed by our pipeline's batches) vs PyTorch eager, and vs torch.compile, steps/s."""
  torch = _torch()
  with tempfile.TemporaryDirectory() as tmp:
    run = _bare_run(load(name, text), Path(tmp) / "run", steps)
    if run.config.model.name not in MODELS:
      raise ValueError(f"vs_pytorch: no PyTorch twin of model {run.config.model.name!r}")
    layout, state = run.steps.layout, [run.steps.layout.place(run.steps.init())]
    host = list(itertools.islice(_batches(run, steps), steps))
    compile_s = _compile_s(run, state, layout.train_batch(host[0]))

    def ours():
      batches = iter(host)
      return _step_rate(run, state, lambda: layout.train_batch(next(batches)), steps)

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
                              "steps after the first / seconds, same batches; ratio = ours / PyTorch per round",
                              our_rates, compile_s=compile_s, reference=(variant, their_rates), ratios=ratios,
                              target=">= 1.0x", meets=harness.summary(ratios)["median"] >= 1.0,
                              notes=f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch "
                                    f"{run.config.data.batch_size}" +
                                    (f", torch.compile {torch_compile_s:.0f} s" if variant == "torch.compile" else "")))
    run.checkpointer.close()
    run.writer.close()
  return rows
