#!/usr/bin/env bash
# The GPU suite in one short slot on a lent GPU machine, which reaches no network: what it needs travels with the
# checkout in .gpu/ (ignored by git, ~18 MB).
#
#   here:   bash benchmarks/gpu_slot.sh stage        # wheels and data into .gpu/ (needs PyPI and the data once)
#   there:  device run: command "bash benchmarks/gpu_slot.sh run", carry [".gpu"], timeout_s 560
#   here:   python -m benchmarks.run --import_results=<files_at>/gpu.json    # into results/ and RESULTS.md
#
# The machine's image (KINDS.md of the device tool: Python 3.12, jax with CUDA, flax, optax, orbax, numpy, ...)
# lacks ml_collections, grain and tensorboardX. `run` installs this project's declared dependencies (pyproject.toml,
# less jax, whose CUDA build the image has, and TFDS, which only tfds: datasets need) from what is installed there
# and the staged wheels, without an index: pip keeps an installed version that is in our range, takes a staged wheel
# where it is not, and names what is missing if neither. Then the suite, its JSON to $OUT/gpu.json and its output
# to $OUT/run.log (benchmarks/run.py; extra arguments are passed to it, e.g. --only=lm_throughput or --size=tiny to
# check the slot's pieces).
#
# A hard crash in one benchmark (a segfault, an XLA check failure, an OOM kill) ends the suite's process; the rows
# before it are in the JSON, which names the benchmark it died in ("running"). When the suite ends with a status
# other than 0 (all measured) or 3 (some not measured) and its JSON says a benchmark was running, `run` starts it
# again with --continue_from_out (twice at most, within the budget_s counted from the first start; run.log gets
# every try): the rest are measured and the crashed one is listed as not measured. A try that leaves the JSON as it
# found it (it refused it) is not repeated. The exit status is the last try's: 3 when anything was not measured, a
# crash's (e.g. 139) when the last try crashed too.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=.gpu
# for Python 3.12, manylinux x86_64 (the image's); versions from our ranges, as the newest stack resolves them
WHEELS=(flax optax orbax-checkpoint ml_collections grain array_record portpicker tensorboardX)
TEXT=../shared/data/tinyshakespeare/input.txt

running() {  # the benchmark the suite's JSON says was running when its process ended; nothing if none or no JSON
  "$1" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("running") or "")' "$2" 2>/dev/null || true
}

unmet() {  # the staged wheels ($2) whose package the image lacks, or holds at a version outside our range ($3...):
  # the fallback installs only these, so the image's in-range flax, optax, ... (built for its jax) are kept
  "$1" - "${@:2}" <<'EOF'
import re, sys
from importlib import metadata
from pathlib import Path
try:
  from packaging.requirements import Requirement
except ImportError:
  from pip._vendor.packaging.requirements import Requirement
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
ranges = {norm(r.name): r.specifier for r in map(Requirement, sys.argv[2:])}
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
  name = norm(wheel.name.split("-")[0])
  try:
    held = metadata.version(name)
  except metadata.PackageNotFoundError:
    held = None
  try:
    kept = held is not None and ranges.get(name, Requirement(name).specifier).contains(held, prereleases=True)
  except Exception:  # a version that is not PEP 440 (packaging 22 to 24 raise): pip would not count it either
    kept = False
  if not kept:
    print(wheel)
EOF
}

requirements() {  # pyproject.toml's dependencies, less jax and TFDS (its lazy import is for tfds: datasets only)
  "$1" - <<'EOF'
import re, tomllib
skip = {"jax", "tensorflow-datasets", "importlib_resources"}
for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
  if re.split(r"[<>=!~ \[]", r)[0] not in skip:
    print(r)
EOF
}

case "${1:-}" in
  stage)
    PY=${PYTHON:-python3}
    listed=$(requirements "$PY")  # a failure here stops the script (a process substitution's would not)
    mapfile -t reqs <<<"$listed"
    new="$STAGE.new" && rm -rf "$new" && mkdir -p "$new/wheels" "$new/mnist"  # the old staging stays until done
    picked=()
    for name in "${WHEELS[@]}"; do
      match=$(printf '%s\n' "${reqs[@]}" | grep -i -E "^${name//[-_]/[-_]}([<>=!~ ]|$)" || true)
      picked+=("${match:-$name}")
    done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_28_x86_64 -d "$new/wheels" "${picked[@]}"
    # MNIST from this machine's data dir (a run of any MNIST config fetches it), gzipped; tiny Shakespeare
    mnist="${BIGMODEL_JAX_DATA_DIR:-$HOME/.cache/bigmodel_jax/data}/mnist"
    for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
      if [[ ! -f "$mnist/$f" ]]; then
        echo "gpu_slot stage: $mnist/$f is missing: run an MNIST config once here (it fetches MNIST), then stage" >&2
        exit 2
      fi
      gzip -c "$mnist/$f" > "$new/mnist/$f.gz"
    done
    if [[ -f "$TEXT" ]]; then cp "$TEXT" "$new/input.txt"; else
      echo "gpu_slot stage: no $TEXT: the language-model rows will be listed as not measured" >&2; fi
    rm -rf "$STAGE" && mv "$new" "$STAGE"
    ls "$STAGE/wheels"; du -sh "$STAGE"
    ;;
  run)
    shift
    PY=${PYTHON:-python3}
    [[ -n "${OUT:-}" ]] || { echo "gpu_slot run: \$OUT (the device run's output folder) is not set" >&2; exit 2; }
    [[ -d "$STAGE/wheels" ]] || { echo "gpu_slot run: no $STAGE/wheels: stage here, carry $STAGE" >&2; exit 2; }
    listed=$(requirements "$PY")
    mapfile -t reqs <<<"$listed"
    # an image whose older tqdm, matplotlib, ... lie outside our ranges must not end the slot before it measures:
    # then the staged wheels alone, without their dependencies, and the suite tries with what the image has
    if ! "$PY" -m pip install -q --no-index --find-links "$STAGE/wheels" "${reqs[@]}" > "$OUT/pip.log" 2>&1; then
      tail -20 "$OUT/pip.log"
      echo "gpu_slot run: pip cannot meet every declared range offline (above); the staged wheels the image lacks" \
           "(or holds outside our ranges) alone, going on" >&2
      # unmet() failing anyway: every staged wheel, as before it (the suite must still run)
      listed=$(unmet "$PY" "$STAGE/wheels" "${reqs[@]}") || listed=$(printf '%s\n' "$STAGE"/wheels/*.whl)
      mapfile -t wheels <<<"$listed"
      if [[ -n "${wheels[*]}" ]]; then
        "$PY" -m pip install -q --no-index --no-deps "${wheels[@]}" >> "$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
      fi
    fi
    export BIGMODEL_JAX_DATA_DIR=${BIGMODEL_JAX_DATA_DIR:-/tmp/bigmodel_jax_data}
    mkdir -p "$BIGMODEL_JAX_DATA_DIR/mnist"
    for f in "$STAGE"/mnist/*.gz; do
      gunzip -c "$f" > "$BIGMODEL_JAX_DATA_DIR/mnist/$(basename "$f" .gz)"
    done
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    (nvidia-smi || true) > "$OUT/nvidia-smi.txt" 2>&1
    "$PY" -m pip list 2>/dev/null | grep -i -E "^(jax|jaxlib|jax-cuda|flax|optax|orbax|grain|numpy) " || true
    text=()
    [[ -f "$STAGE/input.txt" ]] && text=(--text="$STAGE/input.txt")
    # the suite's whole output also into $OUT/run.log, which comes back with the JSON: a failure's traceback, and
    # the training logs, outlive the device reply's last 12,000 characters; the exit status stays the suite's
    # (PIPESTATUS: the suite's, not tee's)
    suite=("$PY" -m benchmarks.run --suite=gpu --out="$OUT/gpu.json" "${text[@]}" "$@")
    : > "$OUT/run.log"
    rm -f "$OUT/gpu.json"  # an earlier run's ($OUT used twice) is not this one's to continue
    status=0
    PYTHONUNBUFFERED=1 "${suite[@]}" 2>&1 | tee -a "$OUT/run.log" || status=${PIPESTATUS[0]}
    died=""
    for try in 1 2; do  # a crash: the rest of the suite from its JSON, the crashed benchmark listed as not measured
      [[ $status != 0 && $status != 3 ]] || break
      last=$died && died=$(running "$PY" "$OUT/gpu.json")
      [[ -n "$died" ]] || break  # it died before or between benchmarks: nothing to continue from
      # the same one still running: the last try ended before it took the JSON on (it refused it): no use again
      [[ "$died" != "$last" ]] || break
      echo "gpu_slot run: the suite's process ended with status $status during $died; continuing from" \
           "$OUT/gpu.json (try $try of 2)" | tee -a "$OUT/run.log" >&2
      previous=$status && status=0
      PYTHONUNBUFFERED=1 "${suite[@]}" --continue_from_out --previous_status="$previous" 2>&1 \
          | tee -a "$OUT/run.log" || status=${PIPESTATUS[0]}
    done
    exit "$status"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_slot.sh stage | run [benchmarks.run flags]" >&2
    exit 2
    ;;
esac
