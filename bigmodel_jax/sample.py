"""--mode=sample: text from a language-model checkpoint, decoded with a KV cache.

The prompt fills the cache in one pass; each new token then runs the model on one position against
the cached keys/values (an LSTM's carry plays the cache's part). A Transformer's context is at most
the sequence length it was trained on (min of data.seq_len and model.max_len: later positions were
never trained). When the context is full, the next token is drawn from the full context, then the
cache is refilled from the last context/2 tokens: one prefix pass per context/2 new tokens, instead
of one per token as re-running a sliding window would cost.
"""

import contextlib
import re
import signal
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from bigmodel_jax import errors, runinfo
from bigmodel_jax.errors import UserError
from bigmodel_jax.models.layers import seed_key

SEPARATOR = "\n\n=====\n\n"  # between samples, printed and saved


def filter_logits(logits_BxV, *, temperature, top_k, top_p):
  """Scaled logits with everything outside the top-k / top-p (nucleus) set at -inf. temperature, top_k and top_p
  may be traced (one compilation serves every value): top_k filters where 0 < top_k < V (the k-th largest value,
  ties kept, from one descending sort), top_p where it is below 1 (generate passes inf for 1: no filter)."""
  logits = logits_BxV.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  use_k = (top_k > 0) & (top_k < vocab)
  kth = jax.lax.dynamic_slice_in_dim(sorted_logits, jnp.clip(top_k - 1, 0, vocab - 1), 1, axis=-1)
  logits = jnp.where(use_k & (logits < kth), -jnp.inf, logits)
  sorted_logits = jnp.where(use_k & (sorted_logits < kth), -jnp.inf, sorted_logits)  # still sorted: the top-k kept
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked above each token
  cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def next_token(logits_BxV, key, knobs=None, *, greedy: bool, banned_ids: tuple = ()):
  """knobs: (temperature, top_k, top_p) as sampling_knobs gives them (traced); greedy: temperature 0 (static)."""
  if banned_ids:  # padding / unknown: ids that decode to no text
    logits_BxV = logits_BxV.at[..., jnp.asarray(banned_ids)].set(-jnp.inf)
  if greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  temperature, top_k, top_p = knobs
  filtered = filter_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def sampling_knobs(temperature: float, top_k: int, top_p: float):
  """The traced sampling settings: float32 temperature, int32 top_k (0: off), float32 top_p (1 or more: inf, off)."""
  return (jnp.float32(temperature), jnp.int32(min(int(top_k), 2 ** 31 - 1)),
          jnp.float32(top_p if top_p < 1.0 else jnp.inf))


@partial(jax.jit, static_argnums=(0, 1))
def _init_cache(graphdef, batch_size, state):
  return nnx.merge(graphdef, state).init_cache(batch_size)


@partial(jax.jit, static_argnums=0, donate_argnums=3)
def _extend(graphdef, state, tokens_BxT, cache, index):
  logits, cache = nnx.merge(graphdef, state).extend(tokens_BxT, cache, index)
  return logits[:, -1], cache


def _prefill(graphdef, state, tokens_BxT):
  """The tokens through the model into a new cache, in pieces of power-of-two lengths, longest first (300: 256, 32,
  8, 4): whatever prompt lengths come (a server's clients), at most log2(context) + 1 shapes are compiled. The
  tokens are cut on the host (numpy): a device array's slices and tiles would each compile per prompt length."""
  tokens_BxT = np.asarray(tokens_BxT, np.int32)
  cache, index = _init_cache(graphdef, tokens_BxT.shape[0], state), 0
  for bit in reversed(range(tokens_BxT.shape[1].bit_length())):
    if tokens_BxT.shape[1] & (1 << bit):
      logits, cache = _extend(graphdef, state, tokens_BxT[:, index:index + (1 << bit)], cache, index)
      index += 1 << bit
  return logits, cache


@partial(jax.jit, static_argnums=0)
def _sample_one(settings, knobs, logits_BxV, key):
  key, sub = jax.random.split(key)
  return next_token(logits_BxV, sub, knobs, **dict(settings)), key


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4, 8))
def _decode(graphdef, settings, knobs, state, cache, logits_BxV, index, key, out_BxN, out_pos, count):
  """Samples `count` tokens into out_BxN[:, out_pos:], feeding each back through the cache (one position each)."""

  def body(i, carry):
    # the state travels in the loop carry and the model is rebuilt inside the body: models that loop
    # themselves (nnx.RNN's scan) refuse parameters traced outside this loop
    state, cache, logits, out, key = carry
    key, sub = jax.random.split(key)
    token = next_token(logits, sub, knobs, **dict(settings))
    out = jax.lax.dynamic_update_slice(out, token[:, None], (0, out_pos + i))
    logits, cache = nnx.merge(graphdef, state).extend(token[:, None], cache, index + i)
    return state, cache, logits[:, -1], out, key

  _, cache, logits, out, key = jax.lax.fori_loop(0, count, body, (state, cache, logits_BxV, out_BxN, key))
  return cache, logits, out, key


def attended(model: nnx.Module, context: int | None = None) -> int | None:
  """How many tokens generate() lets `model` attend to: its max_len capped by `context`; None: no limit (LSTM).
  A longer prompt is cut to its last this-many tokens (as nanoGPT's sampling does)."""
  return min(model.max_len, context or model.max_len) if model.max_len else None


def cut_to_context(prompt_ids, limit: int | None):
  """The prompt's last `limit` tokens (attended()), with a warning if that cuts it; None: the whole prompt."""
  if limit is not None and len(prompt_ids) > limit:
    logging.warning("the prompt has %d tokens; the model sees its last %d (its context)", len(prompt_ids), limit)
    return prompt_ids[-limit:]
  return prompt_ids


CHUNK = 64  # tokens decoded per device call: streamed as they come, one compiled shape whatever num_tokens is
MAX_TOKENS = 1_000_000  # per call (config.sample.num_tokens); generate more by sampling again from the text


def generate(model: nnx.Module, prompt_ids: np.ndarray, num_tokens: int, *, num_samples: int = 1,
             temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             banned_ids: tuple[int, ...] = (), context: int | None = None, on_tokens=None) -> np.ndarray:
  """`num_samples` continuations of the prompt, `num_tokens` each -> int32 array (num_samples, num_tokens).

  temperature 0 takes the most likely token every time; `banned_ids` (padding, unknown) are never drawn.
  `context` caps how many tokens a Transformer attends to (default: its max_len). `on_tokens(new_BxN)` is called
  with each chunk of at most CHUNK new tokens as soon as it is drawn (to stream them).
  """
  graphdef, state = nnx.split(model)
  limit = attended(model, context)
  max_len = limit or len(prompt_ids) + num_tokens  # no position limit (LSTM): one pass, never a refill
  refill = max(1, max_len // 2)
  # static (a compilation each): greedy or not, the banned ids; traced: temperature, top_k, top_p
  settings = (("banned_ids", tuple(int(i) for i in banned_ids)), ("greedy", temperature == 0))
  knobs = sampling_knobs(temperature, top_k, top_p)
  history = np.asarray(cut_to_context(prompt_ids, limit), np.int32)
  logits, cache = _prefill(graphdef, state, np.tile(history, (num_samples, 1)))
  vocab, ids = logits.shape[-1], np.asarray(prompt_ids)
  if (bad := ids[(ids < 0) | (ids >= vocab)]).size:  # the embedding would take -1 as its last row, NaN past the end
    raise UserError(f"prompt: token id {int(bad[0])} is outside the model's vocabulary 0..{vocab - 1} "
                    f"(vocab_size {vocab})")
  index = len(history)
  chunk = jnp.zeros((num_samples, CHUNK), jnp.int32)
  key = seed_key(seed)
  out = []  # host chunks of drawn tokens
  tail = np.zeros((num_samples, 0), np.int32)  # the last max_len of them, for a refill (none without a limit)
  done = 0

  def emit(tokens_BxN: np.ndarray) -> None:
    nonlocal tail
    out.append(tokens_BxN)
    if limit is not None:  # an LSTM's would grow to num_tokens, copied whole at every chunk
      tail = np.concatenate([tail, tokens_BxN], 1)[:, -max_len:]
    if on_tokens is not None:
      on_tokens(tokens_BxN)

  while done < num_tokens:
    if index == max_len:  # context full: draw the next token from it, then restart from the most recent tokens
      token, key = _sample_one(settings, knobs, logits, key)
      emit(np.asarray(token)[:, None])
      done += 1
      if done == num_tokens:
        break
      recent = np.concatenate([np.tile(history, (num_samples, 1)), tail], 1)[:, -refill:]
      logits, cache = _prefill(graphdef, state, recent)
      index = refill
    count = min(num_tokens - done, max_len - index, CHUNK)
    cache, logits, chunk, key = _decode(graphdef, settings, knobs, state, cache, logits, index, key, chunk, 0,
                                       count)
    emit(np.asarray(chunk)[:, :count])
    done, index = done + count, index + count
  return np.concatenate(out, 1) if out else np.zeros((num_samples, 0), np.int32)


class TextStream:
  """Decoded text of tokens arriving in chunks, written as it comes. A chunk is decoded with a few tokens before it
  (a subword or a multi-byte character can span the boundary), keeping only what they add; a U+FFFD at the end (a
  byte-level token can end inside a character) waits for the next chunk, which may finish the character, and `close`
  writes what is left. The tokens before a chunk start where a decoded prefix ends in a whole character: GPT-2's
  byte-level tokens can each end inside one (bytes e6 97 | a5 e6 | 9c ac e8 | ...), so there may be none for a while."""

  OVERLAP = 8  # tokens of context before the tokens not yet written whole

  def __init__(self, tokenizer, write):
    self.tokenizer, self.write = tokenizer, write
    # self.ids[:written]: context, whose text is written; the text of self.ids[written:] is written up to `sent`
    self.ids, self.written, self.sent = np.zeros((0,), np.int32), 0, 0

  def __call__(self, tokens_1xN: np.ndarray) -> None:
    old = len(self.ids)
    self.ids = np.concatenate([self.ids, tokens_1xN[0]])
    text = self._text(len(self.ids))
    self._send(text, len(text) - text.endswith("\ufffd"))
    for end in range(len(self.ids), max(old, self.written), -1):  # the last new boundary after a whole character
      done = text if end == len(self.ids) else self._text(end)
      if not done.endswith("\ufffd") and text.startswith(done):
        keep = max(0, end - self.OVERLAP)
        self.ids, self.written, self.sent = self.ids[keep:], end - keep, max(0, self.sent - len(done))
        break

  def close(self) -> None:
    text = self._text(len(self.ids))
    self._send(text, len(text))
    self.ids, self.written, self.sent = self.ids[-self.OVERLAP:], min(len(self.ids), self.OVERLAP), 0

  def _send(self, text: str, upto: int) -> None:
    if upto > self.sent:
      self.write(text[self.sent:upto])
      self.sent = upto

  def _text(self, end: int) -> str:
    """The text that self.ids[written:end] add to the context's."""
    head, whole = self.tokenizer.decode(self.ids[:self.written]), self.tokenizer.decode(self.ids[:end])
    return whole[len(head):] if whole.startswith(head) else self.tokenizer.decode(self.ids[self.written:end])


def sample(run, checkpoint_step: int | None) -> dict:
  """--mode=sample: restores the checkpoint and lets the task make its samples (text, images), with the parameters in
  the compute dtype (config.train.dtype) as evaluation, export and serve compute."""
  from bigmodel_jax.evaluate import restore_for_eval
  step, state = restore_for_eval(run, checkpoint_step)
  return run.task.sample(run, run.steps.model(state, cast=True), step)


def check_prompt(run) -> list[int]:
  """config.sample.prompt as token ids, or a one-line error."""
  s, dataset = run.config.sample, run.dataset
  if not s.prompt:
    raise UserError("config.sample.prompt: empty; give at least one character to start from (e.g. '\\n')")
  if bad := re.search("[\udc80-\udcff]", s.prompt):  # a byte the command line could not read as UTF-8
    raise UserError(f"config.sample.prompt: byte 0x{ord(bad.group()) - 0xdc00:02x} at character {bad.start()} is not "
                    "UTF-8; give the prompt as UTF-8 text")
  try:
    prompt_ids = dataset.tokenizer.encode(s.prompt, strict=True)
  except UserError as e:
    raise UserError(f"config.sample.prompt: {e}") from None
  if len(prompt_ids) == 0:
    raise UserError(f"config.sample.prompt: {s.prompt!r} encodes to no tokens; give a longer prompt")
  return prompt_ids


class _Stopped(Exception):
  """A signal interrupts.holding() held arrived while the text streamed; args = (signal number,)."""


def sample_text(run, model, step: int) -> dict:
  """config.sample.num_samples texts from a language model: printed and saved. One text streams as it is drawn; a
  Ctrl-C / SIGTERM then stops after the chunk being decoded, with the text so far written out whole (a character
  a byte-level token left unfinished, the last newline) and nothing saved."""
  from bigmodel_jax import interrupts
  from bigmodel_jax.workdir import claim_output_dir
  s, dataset = run.config.sample, run.dataset
  # said before the prompt is printed, not in the line after it; later positions were never trained
  limit = attended(model, dataset.input_shape[0])
  prompt_ids = cut_to_context(check_prompt(run), limit)
  claim_output_dir(run, "sample")  # the text is saved there
  stream, drawn = None, [0]
  if s.num_samples == 1 and jax.process_index() == 0:  # one text: printed as it is generated
    stream = TextStream(dataset.tokenizer, lambda text: (sys.stdout.write(text), sys.stdout.flush()))

  def on_tokens(tokens_1xN: np.ndarray) -> None:
    stream(tokens_1xN)
    drawn[0] += tokens_1xN.shape[1]
    if interrupts.held():
      raise _Stopped(interrupts.held())

  start = time.perf_counter()
  try:
    with interrupts.holding() if stream else contextlib.nullcontext():
      if stream:
        stream.write(s.prompt)
      tokens = generate(model, prompt_ids, s.num_tokens, num_samples=s.num_samples, temperature=s.temperature,
                        top_k=s.top_k, top_p=s.top_p, seed=s.seed, banned_ids=dataset.tokenizer.special_ids,
                        context=limit,
                        on_tokens=on_tokens if stream else None)
      if interrupts.held():
        raise _Stopped(interrupts.held())
      seconds = time.perf_counter() - start
      if stream:
        stream.close()
        print(flush=True)
  except (_Stopped, KeyboardInterrupt, BrokenPipeError) as e:
    if stream is None:
      raise
    from bigmodel_jax.train import Preempted
    so_far = f"after {drawn[0]:,} of {s.num_tokens:,} tokens"
    if isinstance(e, BrokenPipeError):  # nobody reads the rest
      raise Preempted(signal.SIGPIPE, errors.closed_stdout(f"{so_far}; nothing saved")) from None
    stream.close()
    print(flush=True)
    signum = e.args[0] if isinstance(e, _Stopped) else signal.SIGINT
    raise Preempted(signum, f"{signal.Signals(signum).name}: --mode=sample stopped {so_far}; the text above is what "
                    "was generated (nothing saved)") from None
  texts = [s.prompt + dataset.tokenizer.decode(row) for row in tokens]
  result = {"step": step, "texts": texts, "tokens_per_s": tokens.size / seconds, "streamed": stream is not None}
  if jax.process_index() == 0:
    (run.outputs / "samples").mkdir(parents=True, exist_ok=True)
    # another prompt or setting sampled before: keep both
    path = runinfo.unused_path(run.outputs / "samples" / f"step{step}_seed{s.seed}.txt")
    runinfo.write_text_atomic(path, SEPARATOR.join(texts) + "\n")
    logging.info("wrote %s (%d tokens in %.1f s, compilation included)", path, tokens.size, seconds)
    result["file"] = str(path)
  return result
