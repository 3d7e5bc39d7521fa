"""Pictures for --mode=predict (matplotlib, headless)."""

from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _grid(num: int, width: float, height: float):
  """A square-ish grid of `num` image panels, axes off -> (figure, the first `num` axes)."""
  cols = int(np.ceil(np.sqrt(num)))
  rows = int(np.ceil(num / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  return fig, axes.flat[:num]


def _show(ax, img, **kwargs) -> None:
  ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None, **kwargs)


def misclassified_first(targets, predictions, num: int) -> np.ndarray:
  """Test-set indices for the grid: the misclassified examples (what a researcher looks for), then correct ones
  to fill it, each group in test-set order."""
  wrong = np.asarray(targets) != np.asarray(predictions)
  return np.concatenate([np.flatnonzero(wrong), np.flatnonzero(~wrong)])[:num]


def image_grid(images, targets, predictions, class_names, path: Path, num: int = 25) -> Path:
  """`num` test images, misclassified ones first, titled '#<index in predictions.csv> true / predicted' (red where
  wrong)."""
  order = misclassified_first(targets, predictions, num)
  fig, axes = _grid(len(order), 1.7, 1.8)
  for i, ax in zip(order, axes):
    _show(ax, images[i])
    t, p = int(targets[i]), int(predictions[i])
    ax.set_title(f"#{i} {class_names[t]} / {class_names[p]}", fontsize=7, color="black" if t == p else "red")
  wrong = int(np.count_nonzero(np.asarray(targets) != np.asarray(predictions)))
  fig.suptitle(f"true / predicted: {wrong} of {len(targets)} misclassified" + (", shown first" if wrong else ""),
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def confusion_matrix(cm: np.ndarray, class_names, path: Path, title: str = "") -> Path:
  n = len(cm)
  fig, ax = plt.subplots(figsize=(1 + 0.6 * n, 1 + 0.6 * n))
  ax.imshow(cm, cmap="Blues")
  for i in range(n):
    for j in range(n):
      ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
              color="white" if cm[i, j] > cm.max() / 2 else "black")
  ax.set_xticks(range(n), class_names, rotation=90, fontsize=7)
  ax.set_yticks(range(n), class_names, fontsize=7)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def scatter_fit(inputs, targets, predictions, path: Path) -> Path:
  """Regression: targets and predictions against the first input feature."""
  x = inputs.reshape(len(inputs), -1)[:, 0]
  order = np.argsort(x)
  fig, ax = plt.subplots(figsize=(5, 4))
  ax.scatter(x, targets, s=10, label="target")
  ax.plot(x[order], predictions[order], color="red", label="prediction")
  ax.set_xlabel("input[0]")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def sample_grid(images, path: Path, labels=None, title: str = "") -> Path:
  """Generated images in a square grid, optionally titled (e.g. with a classifier's label for each)."""
  fig, axes = _grid(len(images), 1.2, 1.35)
  for i, ax in enumerate(axes):
    _show(ax, np.clip(images[i], 0.0, 1.0), vmin=0.0, vmax=1.0)
    if labels is not None:
      ax.set_title(str(labels[i]), fontsize=7)
  if title:
    fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def save_image(image, path: Path) -> Path:
  """One [0, 1] image (H x W x C) as a PNG."""
  img = np.clip(image, 0.0, 1.0)
  plt.imsave(path, img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
             vmin=0.0, vmax=1.0)
  return path
