"""Model FLOPs and hardware peaks: MFU in the run logs (language models) and in benchmarks/.

FLOPs per token of a decoder LM (forward + backward): 6N + 6·L·d·T, N the parameters without the position table
(nanoGPT's get_num_params), L layers, d dims, T the window — the matmul work of causal attention counted once (its
upper triangle is masked); nanoGPT's and PaLM's estimate counts it in full, 6N + 12·L·d·T.
"""

# Dense (no 2:4 sparsity) peak TFLOP/s by jax's device_kind and compute dtype: NVIDIA's datasheets (which print the
# sparse figure, twice these) and Google Cloud's TPU pages; "float32" on GPUs is TF32, which XLA uses for float32
# matmuls there by default, and on TPUs the bf16 passes its matmuls take. Names as jax reports them, less a leading
# "NVIDIA " (older drivers omit it): "H100 80GB HBM3" (SXM), "H100 PCIe", "H200" (SXM), "H200 NVL", "GH200 480GB",
# "A100-SXM4-80GB"; TPUs "TPU v4", "TPU v5 lite" (v5e), "TPU v5" (v5p; "TPU v5p" under Pathways), "TPU v6 lite"
# (v6e). None: a kind known not to share the shorter name's peak, listed with none (TPU v4 lite is no TPU v4).
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float32": 494.0},  # SXM ("H100 80GB HBM3", "H100 SXM5 ...")
    "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "H100 NVL": {"bfloat16": 835.0, "float32": 418.0},
    "H200": {"bfloat16": 989.0, "float32": 494.0},  # SXM: the H100's die and clocks, more memory
    "H200 NVL": {"bfloat16": 835.0, "float32": 418.0},  # PCIe card at 600 W: 1,671 sparse bf16
    "GH200": {"bfloat16": 989.0, "float32": 494.0},  # Grace Hopper's H100/H200 die at SXM clocks (1,979 sparse)
    "A100": {"bfloat16": 312.0, "float32": 156.0},  # SXM4 and PCIe alike
    "L4": {"bfloat16": 121.0, "float32": 60.0},  # not "L40S": a name matches up to a space, '-' or its end
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v4 lite": None,
    "TPU v5": {"bfloat16": 459.0, "float32": 459.0},  # v5p
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},  # v5e
    "TPU v5e": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0},  # v6e (Trillium)
    "TPU v6e": {"bfloat16": 918.0, "float32": 918.0},
}


def peak_name(device_kind: str) -> str | None:
  """The PEAK_TFLOPS row of a device kind: the longest name the kind (less a leading "NVIDIA ") starts with, ending
  at a space, a '-' or the kind's end, case aside. So "NVIDIA H100 80GB HBM3" takes "H100" (SXM) and "NVIDIA H100
  PCIe" "H100 PCIe"; "NVIDIA H200 NVL" takes "H200 NVL", not the SXM "H200"; "NVIDIA L40S" takes no "L4"."""
  kind = device_kind.strip()
  kind = kind[len("NVIDIA "):] if kind.upper().startswith("NVIDIA ") else kind
  kind = kind.lower()
  matches = [n for n in PEAK_TFLOPS
             if kind.startswith(n.lower()) and (len(kind) == len(n) or kind[len(n)] in " -")]
  return max(matches, key=len) if matches else None


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Dense peak FLOP/s of one device of this kind in this compute dtype, or None when not known (no MFU then)."""
  peaks = PEAK_TFLOPS.get(peak_name(device_kind) or "")
  return peaks.get(dtype, peaks["float32"]) * 1e12 if peaks else None


def lm_flops_per_token(num_params: int, position_params: int, layers: int, dim: int, window: int,
                       attention: int = 6) -> float:
  """Training FLOPs per token: 6N + attention·L·d·T (attention 6: causal, counted once; 12: nanoGPT's)."""
  return 6 * (num_params - position_params) + attention * layers * dim * window


def gpt_flops_per_token(model_config, params, window: int, attention: int = 6) -> float | None:
  """lm_flops_per_token of a `gpt` model's parameter tree (None for other models)."""
  if model_config.name != "gpt":
    return None
  import jax
  import numpy as np
  leaves = jax.tree_util.tree_leaves_with_path(params)
  sizes = [(jax.tree_util.keystr(path), int(np.prod(x.shape))) for path, x in leaves]
  positions = sum(n for path, n in sizes if "pos_embed" in path)  # learned positions (rotary: none)
  return lm_flops_per_token(sum(n for _, n in sizes), positions, model_config.num_layers, model_config.embed_dim,
                            window, attention)


def run_rates(config, dataset, params):
  """What a training run adds to each train log record: for a `gpt`, model TFLOP/s (6N + 6LdT per token) and,
  on a device in PEAK_TFLOPS, MFU; for images, images/s. -> a function summary -> summary (updated)."""
  import jax
  flops = gpt_flops_per_token(config.model, params, dataset.input_shape[0]) if dataset.is_text else None
  peak = peak_flops(jax.devices()[0].device_kind, config.train.get("dtype", "float32"))
  peak = peak * jax.device_count() if peak else None
  image = dataset.kind == "image"

  def add(summary: dict) -> dict:
    if flops and "tokens_per_s" in summary:
      achieved = summary["tokens_per_s"] * flops
      summary["model_tflops_per_s"] = achieved / 1e12
      if peak:
        summary["mfu"] = achieved / peak
    if image:
      summary["images_per_s"] = summary["examples_per_s"]
    return summary

  return add


def measured_matmul_flops(dtype: str = "float32", size: int = 2048) -> float:
  """FLOP/s of a size x size matmul in `dtype` on this process's default device, timed for at least 0.5 s:
  what the hardware reaches here, the reference for MFU where no vendor peak is known."""
  import jax
  import jax.numpy as jnp
  import time
  a = jnp.ones((size, size), getattr(jnp, dtype) if isinstance(dtype, str) else dtype)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  reps = 2
  while True:
    start = time.perf_counter()
    for _ in range(reps):
      out = f(a)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    if seconds > 0.5:
      return reps * 2 * size ** 3 / seconds
    reps *= 2
