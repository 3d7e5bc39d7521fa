"""Hugging Face GPT-2 / BERT weights <-> ours, as numpy arrays by name (bigmodel_jax.convert is the command).

Checked against transformers' modeling_gpt2.py / modeling_bert.py (5.x):

  GPT-2 (GPT2LMHeadModel) -> `gpt`: pre-LayerNorm blocks with biases, learned positions (wpe, n_positions), tied
    embeddings (lm_head.weight is wte.weight), GELU tanh (activation_function gelu_new), LayerNorm eps
    layer_norm_epsilon, attention scaled by 1/sqrt(head_dim) (scale_attn_weights; the per-layer inverse scaling
    is refused). Conv1D weights are (in, out): c_attn (D, 3D) is our qkv kernel (D, 3, H, Dh) as it is (q, k, v,
    then heads), c_proj (D, D) our out kernel (H, Dh, D). The causal-mask buffers attn.bias / attn.masked_bias of
    older files are skipped.
  BERT (BertForMaskedLM) -> `encoder_mlm`: post-LayerNorm blocks (attention.output.LayerNorm is ln1,
    output.LayerNorm ln2), no final LayerNorm, a LayerNorm after the embeddings, token-type embeddings (every
    token has type 0: row 0 is added; the table is kept so it is written back), exact GELU (hidden_act gelu),
    eps layer_norm_eps, torch Linear weights (out, in) transposed, query/key/value stacked into qkv, and
    cls.predictions as the MLM head (decoder tied to the word embeddings, plus cls.predictions.bias).
    pooling="mean": nothing is put in front of the tokens (BERT's [CLS] is a token id of its vocabulary).
    The pooler and next-sentence head of BertForPreTraining files are not part of the MLM: skipped.

Names here are our dotted parameter names (`trunk.blocks.0.attn.qkv.kernel`); HF names are as save_pretrained
writes them in transformers 5 (`transformer.` / `bert.` prefixes, tied weights not stored).
"""

import json

import numpy as np

from bigmodel_jax.errors import UserError

MODELS = {"gpt2": ("gpt2", "gpt"), "bert": ("bert", "encoder_mlm")}  # --model -> (HF model_type, our model name)
GELU_OF_HF = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}
T = lambda w: np.ascontiguousarray(w.T)


def _get(hf: dict, key: str, default, file: str, kind: str = "size"):
  """hf[key] (or the default), checked by kind: a bad value would otherwise fail deep inside the model (or not
  at all). "size": an int > 0; "eps": a number > 0; "prob": a number in [0, 1); "bool"."""
  if key not in hf or hf[key] is None:
    if default is KeyError:
      raise UserError(f"{file}: has no {key!r}; it is not a complete {hf.get('model_type')} config.json")
    return default
  value = hf[key]
  number = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
  ok, want = {"size": (number and isinstance(value, int) and value > 0, "a positive integer"),
              "eps": (number and value > 0, "a positive number"),
              "prob": (number and 0 <= value < 1, "a number in [0, 1)"),
              "bool": (isinstance(value, bool), "true or false")}[kind]
  if not ok:
    raise UserError(f"{file}: {key}={json.dumps(value)[:60]} is not {want}; fix it in config.json")
  return value


def _ratio(hidden: int, dim: int, field: str, file: str) -> int:
  if hidden % dim:
    raise UserError(f"{file}: {field}={hidden} is not a multiple of the hidden size {dim}; our MLP width is "
                    "mlp_ratio * embed_dim")
  return hidden // dim


def _gelu(name: str, field: str, file: str) -> str:
  if not isinstance(name, str) or name not in GELU_OF_HF:
    raise UserError(f"{file}: {field}={name!r} is not supported; valid: {', '.join(GELU_OF_HF)}")
  return GELU_OF_HF[name]


def _heads(heads: int, dim: int, fields: tuple[str, str], file: str) -> int:
  if dim % heads:
    raise UserError(f"{file}: {fields[0]}={heads} does not divide {fields[1]}={dim}; each head is {fields[1]} / "
                    f"{fields[0]} wide: fix config.json")
  return heads


def model_fields(model: str, hf: dict, file: str) -> dict:
  """config.model's fields (besides name) for an HF config.json's contents."""
  if model == "gpt2":
    for field, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("add_cross_attention", False)):
      if hf.get(field, wanted) != wanted:
        raise UserError(f"{file}: {field}={hf[field]} is not supported (GPT-2 as published has {wanted})")
    for key in ("embd_pdrop", "attn_pdrop"):
      _get(hf, key, 0.1, file, "prob")
    dim = _get(hf, "n_embd", KeyError, file)
    return dict(num_layers=_get(hf, "n_layer", KeyError, file),
                num_heads=_heads(_get(hf, "n_head", KeyError, file), dim, ("n_head", "n_embd"), file), embed_dim=dim,
                mlp_ratio=_ratio(_get(hf, "n_inner", 4 * dim, file), dim, "n_inner", file),
                max_len=_get(hf, "n_positions", 1024, file), positions="learned",
                tie_embeddings=_get(hf, "tie_word_embeddings", True, file, "bool"),
                dropout_rate=float(_get(hf, "resid_pdrop", 0.1, file, "prob")), use_bias=True, norm="pre",
                layer_norm_eps=float(_get(hf, "layer_norm_epsilon", 1e-5, file, "eps")),
                gelu=_gelu(hf.get("activation_function", "gelu_new"), "activation_function", file))
  for field, wanted in (("position_embedding_type", "absolute"), ("is_decoder", False), ("tie_word_embeddings", True)):
    if hf.get(field, wanted) != wanted:
      raise UserError(f"{file}: {field}={hf[field]!r} is not supported (BertForMaskedLM as published has {wanted!r})")
  _get(hf, "attention_probs_dropout_prob", 0.1, file, "prob")
  dim = _get(hf, "hidden_size", KeyError, file)
  heads = _heads(_get(hf, "num_attention_heads", KeyError, file), dim, ("num_attention_heads", "hidden_size"), file)
  return dict(num_layers=_get(hf, "num_hidden_layers", KeyError, file), num_heads=heads, embed_dim=dim,
              mlp_ratio=_ratio(_get(hf, "intermediate_size", KeyError, file), dim, "intermediate_size", file),
              max_len=_get(hf, "max_position_embeddings", 512, file), positions="learned", pooling="mean",
              dropout_rate=float(_get(hf, "hidden_dropout_prob", 0.1, file, "prob")), use_bias=True, norm="post",
              layer_norm_eps=float(_get(hf, "layer_norm_eps", 1e-12, file, "eps")),
              gelu=_gelu(hf.get("hidden_act", "gelu"), "hidden_act", file), embed_norm=True,
              type_vocab_size=_get(hf, "type_vocab_size", 2, file))


def hf_config(model: str, fields: dict, vocab_size: int, base: dict | None = None) -> dict:
  """An HF config.json for our model fields: `base` (the converted model's own config.json, if the run has it)
  with every field we determine replaced."""
  dim, out = fields["embed_dim"], dict(base or {})
  act = {"tanh": "gelu_new", "exact": "gelu"}[fields["gelu"]]
  if model == "gpt2":
    out.update(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_layer=fields["num_layers"],
               n_head=fields["num_heads"], n_embd=dim,
               n_inner=None if fields["mlp_ratio"] == 4 else fields["mlp_ratio"] * dim,
               n_positions=fields["max_len"], vocab_size=vocab_size, layer_norm_epsilon=fields["layer_norm_eps"],
               activation_function=act, tie_word_embeddings=fields["tie_embeddings"], scale_attn_weights=True,
               scale_attn_by_inverse_layer_idx=False, dtype="float32")
    out.setdefault("resid_pdrop", fields["dropout_rate"])
    out.setdefault("embd_pdrop", fields["dropout_rate"])
  else:
    out.update(architectures=["BertForMaskedLM"], model_type="bert", num_hidden_layers=fields["num_layers"],
               num_attention_heads=fields["num_heads"], hidden_size=dim, intermediate_size=fields["mlp_ratio"] * dim,
               max_position_embeddings=fields["max_len"], vocab_size=vocab_size,
               type_vocab_size=fields["type_vocab_size"],
               layer_norm_eps=fields["layer_norm_eps"], hidden_act=act, position_embedding_type="absolute",
               tie_word_embeddings=True, pad_token_id=0, dtype="float32")
    out.setdefault("hidden_dropout_prob", fields["dropout_rate"])
  return out


def writable(model: str, fields: dict) -> str | None:
  """Why a run of our model with these fields cannot be written as `model` (None: it can)."""
  wanted = dict(positions="learned", use_bias=True)
  wanted.update(dict(norm="pre", embed_norm=False, type_vocab_size=0) if model == "gpt2" else
                dict(norm="post", embed_norm=True, pooling="mean"))
  for field, value in wanted.items():
    if fields.get(field) != value:
      return f"config.model.{field} is {fields.get(field)!r}, and {model} needs {value!r}"
  if model == "bert" and fields.get("type_vocab_size", 0) < 1:
    return "config.model.type_vocab_size is 0, and bert needs a token-type table (>= 1)"
  return None


def _table(model: str, fields: dict) -> list:
  """(HF names, our name, HF arrays -> ours, ours -> HF arrays) for every parameter of the model."""
  h, dim = fields["num_heads"], fields["embed_dim"]
  one = lambda f=lambda x: x, g=lambda x: x: (lambda xs: f(xs[0]), lambda x: [g(x)])
  heads_out = (lambda x: x.reshape(h, dim // h, dim), lambda x: x.reshape(dim, dim))  # (in=H*Dh, out) <-> (H, Dh, D)
  rows = []
  if model == "gpt2":
    rows += [(["transformer.wte.weight"], "trunk.embed.embedding", *one()),
             (["transformer.wpe.weight"], "trunk.pos_embed", *one()),
             (["transformer.ln_f.weight"], "trunk.ln_f.scale", *one()),
             (["transformer.ln_f.bias"], "trunk.ln_f.bias", *one())]
    if not fields["tie_embeddings"]:
      rows.append((["lm_head.weight"], "head.kernel", *one(T, T)))
    for i in range(fields["num_layers"]):
      p, o = f"transformer.h.{i}.", f"trunk.blocks.{i}."
      rows += [([p + "ln_1.weight"], o + "ln1.scale", *one()), ([p + "ln_1.bias"], o + "ln1.bias", *one()),
               ([p + "attn.c_attn.weight"], o + "attn.qkv.kernel",
                *one(lambda x: x.reshape(dim, 3, h, dim // h), lambda x: x.reshape(dim, 3 * dim))),
               ([p + "attn.c_attn.bias"], o + "attn.qkv.bias", *one(lambda x: x.reshape(3, h, dim // h),
                                                                     lambda x: x.reshape(-1))),
               ([p + "attn.c_proj.weight"], o + "attn.out.kernel", *one(*heads_out)),
               ([p + "attn.c_proj.bias"], o + "attn.out.bias", *one()),
               ([p + "ln_2.weight"], o + "ln2.scale", *one()), ([p + "ln_2.bias"], o + "ln2.bias", *one()),
               ([p + "mlp.c_fc.weight"], o + "mlp.fc1.kernel", *one()),
               ([p + "mlp.c_fc.bias"], o + "mlp.fc1.bias", *one()),
               ([p + "mlp.c_proj.weight"], o + "mlp.fc2.kernel", *one()),
               ([p + "mlp.c_proj.bias"], o + "mlp.fc2.bias", *one())]
    return rows
  e = "bert.embeddings."
  rows += [([e + "word_embeddings.weight"], "trunk.embed.embedding", *one()),
           ([e + "position_embeddings.weight"], "trunk.pos_embed", *one()),
           ([e + "token_type_embeddings.weight"], "trunk.type_embed", *one()),
           ([e + "LayerNorm.weight"], "trunk.embed_ln.scale", *one()),
           ([e + "LayerNorm.bias"], "trunk.embed_ln.bias", *one()),
           (["cls.predictions.transform.dense.weight"], "mlm_head.dense.kernel", *one(T, T)),
           (["cls.predictions.transform.dense.bias"], "mlm_head.dense.bias", *one()),
           (["cls.predictions.transform.LayerNorm.weight"], "mlm_head.ln.scale", *one()),
           (["cls.predictions.transform.LayerNorm.bias"], "mlm_head.ln.bias", *one()),
           (["cls.predictions.bias"], "mlm_head.bias", *one())]
  for i in range(fields["num_layers"]):
    p, o = f"bert.encoder.layer.{i}.", f"trunk.blocks.{i}."
    qkv = [p + f"attention.self.{n}." for n in ("query", "key", "value")]
    rows += [([q + "weight" for q in qkv], o + "attn.qkv.kernel",
              lambda xs: np.stack([w.T for w in xs], 1).reshape(dim, 3, h, dim // h),
              lambda x: [np.ascontiguousarray(w.reshape(dim, dim).T) for w in np.moveaxis(x, 1, 0)]),
             ([q + "bias" for q in qkv], o + "attn.qkv.bias", lambda xs: np.stack(xs).reshape(3, h, dim // h),
              lambda x: list(x.reshape(3, dim))),
             ([p + "attention.output.dense.weight"], o + "attn.out.kernel",
              *one(lambda x: x.T.reshape(h, dim // h, dim), lambda x: T(x.reshape(dim, dim)))),
             ([p + "attention.output.dense.bias"], o + "attn.out.bias", *one()),
             ([p + "attention.output.LayerNorm.weight"], o + "ln1.scale", *one()),
             ([p + "attention.output.LayerNorm.bias"], o + "ln1.bias", *one()),
             ([p + "intermediate.dense.weight"], o + "mlp.fc1.kernel", *one(T, T)),
             ([p + "intermediate.dense.bias"], o + "mlp.fc1.bias", *one()),
             ([p + "output.dense.weight"], o + "mlp.fc2.kernel", *one(T, T)),
             ([p + "output.dense.bias"], o + "mlp.fc2.bias", *one()),
             ([p + "output.LayerNorm.weight"], o + "ln2.scale", *one()),
             ([p + "output.LayerNorm.bias"], o + "ln2.bias", *one())]
  return rows


def _canonical(model: str, key: str) -> str:
  """A tensor name as transformers 5 writes it: older files' gamma/beta and unprefixed base-model names."""
  key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
  prefix, heads = ("transformer.", ("lm_head.",)) if model == "gpt2" else ("bert.", ("cls.",))
  return key if key.startswith((prefix, *heads)) else prefix + key


def _skipped(model: str, key: str, fields: dict) -> bool:
  """Buffers and heads that are no parameter of ours (tied copies are checked by to_ours)."""
  if model == "gpt2":
    return key.endswith((".attn.bias", ".attn.masked_bias")) or (key == "lm_head.weight" and fields["tie_embeddings"])
  return key.endswith("position_ids") or key.startswith(("bert.pooler.", "cls.seq_relationship.")) or \
      key in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


def to_ours(model: str, fields: dict, tensors: dict, file: str, vocab_size: int | None = None) -> dict[str, np.ndarray]:
  """HF tensors (name -> array) -> our dotted parameter names -> float32 arrays. One line naming the tensor for
  a missing one, one whose shape config.json's sizes (and vocab_size, default: the embedding's rows) do not
  imply, one we do not map, or a tied copy that differs from the embedding."""
  tensors = {_canonical(model, k): v for k, v in tensors.items()}
  embedding = "transformer.wte.weight" if model == "gpt2" else "bert.embeddings.word_embeddings.weight"
  if vocab_size is None and embedding in tensors:
    vocab_size = int(tensors[embedding].shape[0])
  shapes = expected_shapes(model, fields, vocab_size or 0)
  tied = {"lm_head.weight": embedding} if model == "gpt2" and fields["tie_embeddings"] else \
      {"cls.predictions.decoder.weight": embedding, "cls.predictions.decoder.bias": "cls.predictions.bias"} \
      if model == "bert" else {}
  for copy, original in tied.items():
    if copy in tensors and original in tensors and not np.array_equal(tensors[copy], tensors[original]):
      raise UserError(f"{file}: {copy} differs from {original}, but config.json says the embeddings are tied; fix "
                      "tie_word_embeddings")
  out, used = {}, set()
  for names, ours, forward, _ in _table(model, fields):
    missing = [n for n in names if n not in tensors]
    if missing:
      raise UserError(f"{file}: has no tensor {missing[0]!r}, which config.json's sizes imply; the file and "
                      "config.json are of different models")
    for n in names:
      check_shape(n, tensors[n].shape, shapes[n], file)
    out[ours] = np.asarray(forward([np.asarray(tensors[n], np.float32) for n in names]), np.float32)
    used.update(names)
  unknown = sorted(k for k in tensors if k not in used and not _skipped(model, k, fields))
  if unknown:
    raise UserError(f"{file}: tensors this converter does not map ({', '.join(unknown[:3])}"
                    f"{', ...' if len(unknown) > 3 else ''}); is it a {model} model with the config.json beside it?")
  return out


def config_vocab_size(hf: dict, file: str) -> int | None:
  """config.json's vocab_size, checked (None where it has none: the embedding's rows are taken)."""
  return _get(hf, "vocab_size", None, file)


def unstacked(params: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
  """A scan_layers run's blocks (trunk.blocks.X of shape num_layers x ...) as per-layer trunk.blocks.{i}.X."""
  out = {}
  for name, value in params.items():
    if name.startswith("trunk.blocks.") and not name.split(".")[2].isdigit():
      out.update({f"trunk.blocks.{i}.{name[len('trunk.blocks.'):]}": value[i] for i in range(num_layers)})
    else:
      out[name] = value
  return out


def to_hf(model: str, fields: dict, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our dotted parameter names -> HF tensor names (as save_pretrained writes them), float32; scanned blocks are
  unstacked first."""
  if fields.get("scan_layers"):
    params = unstacked(params, fields["num_layers"])
  names = {ours for _, ours, _, _ in _table(model, fields)}
  if names != set(params):  # a bug guard: the table and the model agree
    raise AssertionError(f"hf_weights table and model differ: {sorted(names ^ set(params))[:4]}")
  out = {}
  for names, ours, _, backward in _table(model, fields):
    for name, value in zip(names, backward(np.asarray(params[ours], np.float32))):
      out[name] = np.ascontiguousarray(value, np.float32)
  return out


def expected_shapes(model: str, fields: dict, vocab_size: int) -> dict[str, tuple[tuple[str, int], ...]]:
  """HF tensor name -> its axes as (config.json field, size): what config.json says each tensor's shape is, so a
  mismatch names the field (a bad file would otherwise fail inside the reshapes, or only in the model)."""
  dim, hidden, layers = fields["embed_dim"], fields["mlp_ratio"] * fields["embed_dim"], fields["num_layers"]
  if model == "gpt2":
    d, v, f, d3 = ("n_embd", dim), ("vocab_size", vocab_size), ("n_inner", hidden), ("3 * n_embd", 3 * dim)
    out = {"transformer.wte.weight": (v, d), "transformer.wpe.weight": (("n_positions", fields["max_len"]), d),
           "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,), "lm_head.weight": (v, d)}
    for i in range(layers):
      p = f"transformer.h.{i}."
      out.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
                  p + "attn.c_attn.weight": (d, d3), p + "attn.c_attn.bias": (d3,),
                  p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,), p + "mlp.c_fc.weight": (d, f),
                  p + "mlp.c_fc.bias": (f,), p + "mlp.c_proj.weight": (f, d), p + "mlp.c_proj.bias": (d,)})
    return out
  d, v, f = ("hidden_size", dim), ("vocab_size", vocab_size), ("intermediate_size", hidden)
  e = "bert.embeddings."
  out = {e + "word_embeddings.weight": (v, d), e + "position_embeddings.weight": (("max_position_embeddings",
                                                                                    fields["max_len"]), d),
         e + "token_type_embeddings.weight": (("type_vocab_size", fields["type_vocab_size"]), d),
         e + "LayerNorm.weight": (d,), e + "LayerNorm.bias": (d,), "cls.predictions.transform.dense.weight": (d, d),
         "cls.predictions.transform.dense.bias": (d,), "cls.predictions.transform.LayerNorm.weight": (d,),
         "cls.predictions.transform.LayerNorm.bias": (d,), "cls.predictions.bias": (v,)}
  for i in range(layers):
    p = f"bert.encoder.layer.{i}."
    for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
      out.update({p + n + ".weight": (d, d), p + n + ".bias": (d,)})
    out.update({p + "attention.output.LayerNorm.weight": (d,), p + "attention.output.LayerNorm.bias": (d,),
                p + "intermediate.dense.weight": (f, d), p + "intermediate.dense.bias": (f,),
                p + "output.dense.weight": (d, f), p + "output.dense.bias": (d,), p + "output.LayerNorm.weight": (d,),
                p + "output.LayerNorm.bias": (d,)})
  return out


def check_shape(name: str, shape: tuple, axes: tuple, file: str) -> None:
  """One line naming the tensor, its shape, the shape config.json implies and the fields behind the difference."""
  want = tuple(n for _, n in axes)
  if tuple(shape) == want:
    return
  differ = [(f, n) for (f, n), got in zip(axes, shape) if got != n] if len(shape) == len(want) else list(axes)
  said = ", ".join(dict.fromkeys(f"{f}={n}" for f, n in differ))
  raise UserError(f"{file}: {name} has shape {tuple(shape)}, but config.json's {said} implies {want}; fix config.json "
                  "(or give the config.json the weights were saved with)")
