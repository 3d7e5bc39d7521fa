"""Does masked-LM pretraining help where labels are few? 1% / 10% / 100% of the spam training labels x
(fine-tuned from the pretrained encoder, trained from scratch) x 3 seeds: configs/spam_bert_finetune.py.

    python -m bigmodel_jax.main --config=configs/spam_bert_pretrain.py --workdir=runs/spam_bert_pretrain
    python -m bigmodel_jax.sweep experiments/sweeps/spam_pretraining.py --workdir=sweeps/spam_pretraining --parallel=2

18 trials of 300 steps each (the same budget, model, tokenizer and test split for both arms; the same labelled
emails for every seed and both arms, config.data.train_fraction's fixed subset). Every arm reads its text with
the pretraining run's tokenizer: the scratch arm's tokenizer is trained on the same emails with the same
settings, so it is the same tokenizer, and its weights are a fresh initialisation. Selection on validation F1
(the checkpoint kept by it), test accuracy and F1 reported beside it. Measured: README, "Pretraining, then
fine-tuning".
"""

from pathlib import Path

from bigmodel_jax.sweeps import product, seeds

base = "configs/spam_bert_finetune.py"
# absolute, so the trials find it whatever directory they run in; run the pretraining command above first
PRETRAINED = str(Path(__file__).resolve().parents[2] / "runs" / "spam_bert_pretrain")
FRACTIONS = {"data.train_fraction": [0.01, 0.1, 1.0]}
ARMS = [{"init.workdir": PRETRAINED}, {"init.workdir": "", "init.rules": ()}]  # pretrained, scratch


def sweep():
  yield from product(FRACTIONS, ARMS, seeds(3))


def sweep_small():
  yield from product({"data.train_fraction": [0.01]}, ARMS, seeds(1))
