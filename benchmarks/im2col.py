"""A config's train step with and without models.layers.conv_general_dilated's im2col form, in one process.

    python -m benchmarks.im2col --config=mnist_cnn --steps=200 --repeats=5

Two runs of the config are built and compiled, the first with im2col off (layers.IM2COL_MAX_TAPS = 0 while it is
traced), the second as the package has it; each round times `steps` calls of each run's own train loop feed
(harness.alternate: the order flips every round). Prints steps/s both ways and the per-round ratio, im2col / lax,
as median (min-max). Configs without small convolutions compile the same function twice (a ratio of ~1).
"""

import tempfile
from pathlib import Path

from absl import app, flags

from benchmarks import harness, measures
from bigmodel_jax.models import layers

_CONFIG = flags.DEFINE_string("config", "mnist_cnn", "configs/<name>.py[:variant] to measure.")
_STEPS = flags.DEFINE_integer("steps", 200, "Steps per round.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Rounds, alternating the two forms.")
_TEXT = flags.DEFINE_string("text", "", "tiny Shakespeare's input.txt, for configs that train on it.")


def measure(name: str, steps: int, repeats: int, text: str = "") -> dict:
  """A harness row: the step with im2col (the package's default) against lax's convolutions only."""
  built = []
  for taps in (0, layers.IM2COL_MAX_TAPS):  # off, then as the package has it
    default, layers.IM2COL_MAX_TAPS = layers.IM2COL_MAX_TAPS, taps
    try:
      run = measures._bare_run(measures.load(name, text), Path(tempfile.mkdtemp()), steps)
      state, feed = [run.steps.layout.place(run.steps.init())], measures._feed(run)
      measures._feed_rate(state, feed, 2)  # traced and compiled while the setting holds
    finally:
      layers.IM2COL_MAX_TAPS = default
    built.append((run, state, feed))
  (_, lax_state, lax_feed), (_, state, feed) = built
  ours, reference = harness.alternate(lambda: measures._feed_rate(state, feed, steps),
                                      lambda: measures._feed_rate(lax_state, lax_feed, steps), repeats)
  for run, _, _ in built:
    run.checkpointer.close()
    run.writer.close()
  return harness.row("im2col", name, "train step, im2col convolutions", "steps/s",
                     "steps after the first / seconds, the loop's own feed; ratio = im2col / lax per round", ours,
                     reference=("lax.conv_general_dilated only", reference),
                     ratios=[a / b for a, b in zip(ours, reference)], target="report",
                     notes=f"IM2COL_MAX_TAPS {layers.IM2COL_MAX_TAPS}, {steps} steps per round")


def main(_):
  r = measure(_CONFIG.value, _STEPS.value, _REPEATS.value, _TEXT.value)
  fmt = lambda s: f"{s['median']:.3g} ({s['min']:.3g}-{s['max']:.3g})"
  print(f"{r['config']}: im2col {fmt(r['value'])} steps/s, lax {fmt(r['reference']['value'])} steps/s, "
        f"im2col / lax {fmt(r['ratio'])} over {r['ratio']['n']} rounds")


if __name__ == "__main__":
  app.run(main)
