"""What --mode=serve accepts: request bodies checked and turned into the model's raw inputs (bigmodel_jax/serve.py).

Every check raises BadRequest with one line naming the field ('inputs[3]: ...', 'max_tokens: ...'); the server
answers it as a 4xx with {"error": that line}. Nothing here touches JAX: it runs in the request's own thread.

  /v1/predict      {"inputs": [example, ...]}; an example is, by the model card (model.json):
                   image / tabular: nested lists of numbers of shape input_shape, values as the dataset gives them
                   (uint8 pixels as integers 0..255; digits' are 0..16), or for images a base64 PNG of exactly the
                   model's height x width (grayscale or RGB, converted to the model's channels; never resized);
                   its 0..255 pixels are scaled to the dataset's range (digits: 0..16). A pixel outside that
                   range is a 422 naming it; a tabular model's range is not known (its values go as they are)
                   text: a string, tokenized with the run's own tokenizer and padded/cut to the trained length
  /v1/completions  {"prompt": str, "max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int}
"""

import base64
import binascii
import io
import json
import math

import ml_dtypes
import numpy as np

from bigmodel_jax.errors import UserError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMPLETION_FIELDS = ("prompt", "max_tokens", "temperature", "top_k", "top_p", "seed")
IGNORED_FIELDS = ("model",)  # OpenAI-style clients send the model's name; there is one model


class BadRequest(Exception):
  """A request the server refuses: `status` (4xx) and a one-line message naming the field."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def parse_json(body: bytes) -> dict:
  """The request body as a JSON object."""
  try:
    value = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
  except UnicodeDecodeError:
    raise BadRequest("body: not UTF-8 text; send JSON") from None
  except json.JSONDecodeError as e:
    raise BadRequest(f"body: malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
  except ValueError as e:  # NaN / Infinity literals
    raise BadRequest(f"body: {e}") from None
  except RecursionError:
    raise BadRequest("body: JSON nested too deeply") from None
  if not isinstance(value, dict):
    raise BadRequest(f"body: must be a JSON object like {{\"inputs\": [...]}}, got {_json_type(value)}")
  return value


def _no_constant(name: str):
  raise ValueError(f"{name} is not a number JSON allows; send finite numbers")


def _json_type(value) -> str:
  return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
      type(value), "a number")


class InputDecoder:
  """/v1/predict's "inputs" -> one numpy array (N, *input_shape) of the card's input_dtype."""

  def __init__(self, card: dict, tokenizer, max_batch: int):
    self.card, self.tokenizer, self.max_batch = card, tokenizer, max_batch
    self.kind, self.shape, self.dtype = card["kind"], tuple(card["input_shape"]), np.dtype(card["input_dtype"])
    self.scale = float(card["preprocessing"].get("scale", 1.0))

  def __call__(self, body: dict) -> np.ndarray:
    if "inputs" not in body:
      raise BadRequest(f"inputs: missing; send {{\"inputs\": [example, ...]}} (fields given: "
                       f"{', '.join(sorted(body)) or 'none'})")
    unknown = sorted(set(body) - {"inputs"} - set(IGNORED_FIELDS))
    if unknown:  # a misspelt field would otherwise be dropped without a word
      raise BadRequest(f"{unknown[0]}: unknown field; /v1/predict takes inputs")
    inputs = body["inputs"]
    if not isinstance(inputs, list):
      raise BadRequest(f"inputs: must be a list of examples, got {_json_type(inputs)}")
    if not inputs:
      raise BadRequest("inputs: empty; send at least one example")
    if len(inputs) > self.max_batch:
      raise BadRequest(f"inputs: {len(inputs)} examples; at most config.serve.max_batch={self.max_batch} per request")
    if self.kind == "text":
      return self._texts(inputs)
    return np.stack([self._example(i, x) for i, x in enumerate(inputs)])

  def _texts(self, inputs: list) -> np.ndarray:
    for i, x in enumerate(inputs):
      if not isinstance(x, str):
        raise BadRequest(f"inputs[{i}]: this text classifier takes strings, got {_json_type(x)}")
      if not x.strip():
        raise BadRequest(f"inputs[{i}]: empty text")
    return self.tokenizer.encode_batch(inputs, self.shape[0]).astype(self.dtype)

  def _example(self, i: int, x) -> np.ndarray:
    if isinstance(x, str):
      if self.kind != "image":
        raise BadRequest(f"inputs[{i}]: a {self.kind} model takes lists of numbers of shape {list(self.shape)}, got "
                         "a string")
      return self._png(i, x)
    if not isinstance(x, list):
      raise BadRequest(f"inputs[{i}]: must be a nested list of numbers of shape {list(self.shape)}"
                       + (" or a base64 PNG string" if self.kind == "image" else "") + f", got {_json_type(x)}")
    try:
      a = np.array(x, dtype=np.float64)
    except OverflowError:  # an integer too large for a float64
      raise BadRequest(f"inputs[{i}]: a value is out of range ({self.dtype.name})") from None
    except (ValueError, TypeError):
      a = None
    if a is None or a.dtype != np.float64 or _has_non_number(x):
      shape = _ragged_shape(x)
      if shape is None:
        raise BadRequest(f"inputs[{i}]: ragged nested lists; expected shape {list(self.shape)}")
      raise BadRequest(f"inputs[{i}]: non-numeric values; expected numbers ({self.dtype.name})")
    if a.shape != self.shape:
      raise BadRequest(f"inputs[{i}]: shape {list(a.shape)}, expected {list(self.shape)} (model.json's input_shape)")
    if not np.isfinite(a).all():
      raise BadRequest(f"inputs[{i}]: values must be finite (no NaN or infinity)")
    if self.kind == "image" and (a.min() < 0 or a.max() > self.scale):  # what training saw: 0..scale (a 422: well
      bad = a[(a < 0) | (a > self.scale)][0]  # formed, outside the data; before the dtype's wider range is named)
      raise BadRequest(f"inputs[{i}]: pixel value {bad:g} out of range 0..{self.scale:g} (this dataset's pixel range, "
                       "model.json's preprocessing.scale)", 422)
    if np.issubdtype(self.dtype, np.integer):
      info = np.iinfo(self.dtype)
      if (a != np.round(a)).any():
        raise BadRequest(f"inputs[{i}]: values must be integers ({self.dtype.name}), got {a[a != np.round(a)][0]}")
      if a.min() < info.min or a.max() > info.max:
        bad = a[(a < info.min) | (a > info.max)][0]
        raise BadRequest(f"inputs[{i}]: value {bad:g} out of range {info.min}..{info.max} ({self.dtype.name})")
    elif np.abs(a).max() > ml_dtypes.finfo(self.dtype).max:  # np.finfo takes no bfloat16 before ml_dtypes 0.7
      raise BadRequest(f"inputs[{i}]: value out of {self.dtype.name} range")
    return a.astype(self.dtype)

  def _png(self, i: int, text: str) -> np.ndarray:
    if text.startswith("data:") and "," not in text:
      raise BadRequest(f"inputs[{i}]: a data URI without its comma; send data:image/png;base64,<the PNG's base64>")
    try:
      data = base64.b64decode(text.split(",", 1)[1] if text.startswith("data:") else text, validate=True)
    except (binascii.Error, ValueError):
      raise BadRequest(f"inputs[{i}]: not valid base64 (a base64-encoded PNG, or nested lists of numbers)") from None
    if not data.startswith(PNG_MAGIC):
      raise BadRequest(f"inputs[{i}]: not a PNG (base64 of a .png file's bytes)")
    from PIL import Image
    height, width, channels = self.shape
    try:
      image = Image.open(io.BytesIO(data), formats=["PNG"])
      if image.size != (width, height):  # before decoding its pixels: no decompression bomb
        raise BadRequest(f"inputs[{i}]: PNG is {image.size[0]}x{image.size[1]} (width x height), the model takes "
                         f"{width}x{height}; resize it first (the server does not)")
      if channels not in (1, 3):
        raise BadRequest(f"inputs[{i}]: this model takes {channels} channels; send nested lists, not a PNG")
      if "A" in image.getbands() or "transparency" in image.info:  # what is under the alpha is no drawing
        raise BadRequest(f"inputs[{i}]: PNG mode {image.mode} has transparency; send an opaque grayscale or RGB PNG")
      if image.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit (or float) grayscale: to 0..255 by its full range
        peak = 65535.0 if image.mode.startswith("I") else 1.0
        gray = np.clip(np.asarray(image, np.float64) / peak * 255.0, 0, 255)
        pixels = gray if channels == 1 else np.repeat(gray[..., None], 3, -1)
      else:
        pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), np.float64)
    except BadRequest:
      raise
    except Exception as e:  # PIL raises many kinds for damaged files
      raise BadRequest(f"inputs[{i}]: unreadable PNG ({type(e).__name__}: {str(e)[:100]})") from None
    pixels = pixels.reshape(height, width, channels)
    if self.scale != 255.0:  # the dataset's own range (digits: 0..16)
      pixels = pixels * (self.scale / 255.0)
    return (np.round(pixels) if np.issubdtype(self.dtype, np.integer) else pixels).astype(self.dtype)


def _has_non_number(x) -> bool:
  """Booleans and nulls numpy would take as 0/1/nan."""
  stack = [x]
  while stack:
    v = stack.pop()
    if isinstance(v, list):
      stack.extend(v)
    elif isinstance(v, bool) or not isinstance(v, (int, float)):
      return True
  return False


def _ragged_shape(x):
  """x's shape if its nested lists are regular, else None."""
  shape, level = [], [x]
  while all(isinstance(v, list) for v in level):
    sizes = {len(v) for v in level}
    if len(sizes) != 1:
      return None
    shape.append(sizes.pop())
    level = [w for v in level for w in v]
    if not level:
      break
  return None if any(isinstance(v, list) for v in level) else shape


def completion_request(body: dict, tokenizer, defaults, max_tokens: int) -> dict:
  """/v1/completions' fields, checked -> generate()'s arguments plus 'prompt' and 'prompt_ids'.
  Unset fields take config.sample's values (`defaults`); max_tokens defaults to min(64, config.serve.max_tokens)."""
  unknown = sorted(set(body) - set(COMPLETION_FIELDS) - set(IGNORED_FIELDS))
  if unknown:
    raise BadRequest(f"{unknown[0]}: unknown field; /v1/completions takes {', '.join(COMPLETION_FIELDS)}")
  if "prompt" not in body:
    raise BadRequest("prompt: missing; send {\"prompt\": \"text to continue\"}")
  prompt = body["prompt"]
  if not isinstance(prompt, str):
    raise BadRequest(f"prompt: must be a string, got {_json_type(prompt)}")
  if not prompt:
    raise BadRequest("prompt: empty; give at least one character to start from")
  try:
    prompt_ids = tokenizer.encode(prompt, strict=True)
  except UserError as e:
    raise BadRequest(f"prompt: {e}") from None
  if len(prompt_ids) == 0:
    raise BadRequest("prompt: encodes to no tokens; give a longer prompt")
  out = {"prompt": prompt, "prompt_ids": prompt_ids,
         "num_tokens": _integer(body, "max_tokens", min(64, max_tokens), 1, max_tokens,
                                "config.serve.max_tokens"),
         "temperature": _number(body, "temperature", defaults.temperature, 0.0, 1e4),
         "top_k": _integer(body, "top_k", defaults.top_k, 0, math.inf),  # as config.sample.top_k (over V: no filter)
         "top_p": _number(body, "top_p", defaults.top_p, 0.0, 1.0),
         "seed": _integer(body, "seed", defaults.seed, 0, 2 ** 63 - 1)}  # as config.sample.seed
  if 0 < out["temperature"] < MIN_TEMPERATURE:  # logits / t overflow to inf: no distribution is left
    raise BadRequest(f"temperature: {out['temperature']:g} is below {MIN_TEMPERATURE:g}; use 0 for greedy decoding")
  if out["top_p"] <= 0:
    raise BadRequest(f"top_p: {out['top_p']} must be in (0, 1] (1: no nucleus filter)")
  return out


MIN_TEMPERATURE = 1e-4  # float32 logits of a few tens divided by less than this would overflow


def _integer(body: dict, name: str, default, low: int, high: float, limit: str = "") -> int:
  value = body.get(name, default)
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int):
    raise BadRequest(f"{name}: must be an integer, got {json.dumps(value)[:40]}")
  if not low <= value <= high:
    raise BadRequest(f"{name}: {value} out of range {low}..{high}" + (f" ({limit})" if limit else ""))
  return value


def _number(body: dict, name: str, default, low: float, high: float) -> float:
  value = body.get(name, default)
  try:
    finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
  except OverflowError:  # an integer beyond any float
    finite = False
  if not finite:
    raise BadRequest(f"{name}: must be a finite number, got {json.dumps(value)[:40]}")
  if not low <= value <= high:
    raise BadRequest(f"{name}: {value} out of range {low:g}..{high:g}")
  return float(value)
