"""BERT-style masked-LM pretraining of a small Transformer encoder on the SpamAssassin emails' own text (the
training split's bodies only: validation and test mails stay unseen), for configs/spam_bert_finetune.py.

    python -m bigmodel_jax.main --config=configs/spam_bert_pretrain.py --workdir=runs/spam_bert_pretrain
    python -m bigmodel_jax.main --config=configs/spam_bert_finetune.py --workdir=runs/spam_bert_finetune
    python -m bigmodel_jax.sweep experiments/sweeps/spam_pretraining.py --workdir=sweeps/spam_pretraining

Data: spam_assassin read as a corpus (data.as_corpus: the training emails' bodies as one stream, labels unused),
cut into 128-token windows; a SentencePiece BPE model (8,000 pieces, with a [MASK] piece) learnt from the same
training emails -- the fine-tuning run reads its text with this very tokenizer (config.init takes it over).
Task: BERT's masking (15% of tokens; 80% [MASK], 10% random, 10% kept), loss on the masked positions only.
Model: encoder_mlm, the fine-tuning classifier's trunk and [CLS] vector (2 layers, 4 heads, 128 dims) with
BERT's MLM head. AdamW 5e-4, warmup + cosine, batch 32, 3,000 steps (~2 epochs of the ~6 M training tokens;
about 12 minutes on 2 CPU cores). Measured: README (Pretraining, then fine-tuning).
"""

from bigmodel_jax.config import apply_variant, base_config, model_config

SEQ_LEN = 128
# the encoder both configs share (spam_bert_finetune builds its classifier from the same fields)
ENCODER = dict(num_layers=2, num_heads=4, embed_dim=128, max_len=SEQ_LEN + 1, pooling="cls", dropout_rate=0.1)
SMOKE_ENCODER = {"model.num_layers": 1, "model.embed_dim": 32, "model.num_heads": 2}


def data_fields(c) -> None:
  """The data both configs read: the same emails, split, tokenizer and window length."""
  c.data.name = "spam_assassin"
  c.data.strip_headers = True
  c.data.tokenizer.name = "sentencepiece"
  c.data.tokenizer.vocab_size = 8000
  c.data.tokenizer.model_type = "bpe"
  c.data.tokenizer.mask_token = True
  c.data.seq_len = SEQ_LEN
  c.data.batch_size = 32
  c.data.eval_batch_size = 256


def get_config(variant: str = ""):
  c = base_config()
  data_fields(c)
  c.data.as_corpus = True
  c.model = model_config("encoder_mlm", **ENCODER)
  c.task.name = "masked_language_modeling"
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 5e-4
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip_norm = 1.0
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_steps = 200
  c.train.num_steps = 3000
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.best_metric = "accuracy"  # masked-token accuracy on the validation emails
  c.evals.validation.every = 1000
  return apply_variant(
      c, variant, "spam_bert_pretrain",
      smoke={"data.tokenizer.vocab_size": 1000, "data.seq_len": 32, "model.max_len": 33, **SMOKE_ENCODER,
             "train.num_steps": 30, "evals.validation.every": 15, "train.log_every": 10, "schedule.warmup_steps": 5})
