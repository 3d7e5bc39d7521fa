"""A `TextCorpus` -> a tokenized `Dataset`: a token stream for language modelling, padded ids for classification."""

from pathlib import Path

import numpy as np

from bigmodel_jax.data import Dataset, TextCorpus, tokenizers
from bigmodel_jax.errors import UserError

DOCUMENT_SEPARATOR = "\n\n"  # between documents (plays) of a language-modelling corpus


def tokenize(corpus: TextCorpus, data_config, tokenizer_dir: Path | None, create_tokenizer: bool) -> Dataset:
  held_out = {name: getattr(corpus, name) for name in ("validation", "test") if getattr(corpus, name) is not None}
  # learnt from the training split only (validation and test never shape the vocabulary, nor its size)
  tokenizer = tokenizers.get_tokenizer(data_config.tokenizer, corpus.train, tokenizer_dir, create_tokenizer)
  seq_len = data_config.seq_len
  common = dict(tokenizer=tokenizer, vocab_size=tokenizer.vocab_size)
  if corpus.train_labels is None:
    splits, chars_per_token = {}, {}
    for split, docs in {"train": corpus.train, **held_out}.items():
      text = DOCUMENT_SEPARATOR.join(docs)
      ids = tokenizer.encode(text)
      if len(ids) < seq_len + 1:
        raise UserError(f"config.data.seq_len: {seq_len} needs at least {seq_len + 1} tokens, but the {split} split "
                        f"of {corpus.name} has {len(ids)}; use a shorter seq_len or more text")
      splits[split] = {"tokens": ids} if split == "train" else windows(ids, seq_len)
      chars_per_token[split] = len(text) / len(ids)
    return Dataset(corpus.name, train=splits["train"], test=splits.get("test"), validation=splits.get("validation"),
                   kind="lm", chars_per_token=chars_per_token, **common)
  split = lambda texts, labels: {"inputs": tokenizer.encode_batch(texts, seq_len),
                                 "targets": np.asarray(labels, np.int32)}
  return Dataset(corpus.name, train=split(corpus.train, corpus.train_labels),
                 test=split(corpus.test, corpus.test_labels) if corpus.test is not None else None,
                 validation=(split(corpus.validation, corpus.validation_labels) if corpus.validation is not None
                             else None),
                 kind="text", num_classes=len(corpus.class_names), class_names=tuple(corpus.class_names),
                 test_texts=tuple(corpus.test or ()), **common)


def windows(ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """A token stream cut into consecutive windows, so evaluation scores every token after the first once.

  Window i predicts tokens i*seq_len+1 .. (i+1)*seq_len from the ones before them in that window; the
  last window is padded and its padding masked out (token_mask 0).
  """
  n = -(-(len(ids) - 1) // seq_len)
  padded = np.zeros(n * seq_len + 1, ids.dtype)
  padded[:len(ids)] = ids
  token_mask = (np.arange(1, n * seq_len + 1) < len(ids)).astype(np.float32)
  return {"inputs": padded[:-1].reshape(n, seq_len), "targets": padded[1:].reshape(n, seq_len),
          "token_mask": token_mask.reshape(n, seq_len)}
