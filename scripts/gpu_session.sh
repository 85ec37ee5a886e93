#!/usr/bin/env bash
# Every GPU check of the torch-cuda path in ONE call of about 5 minutes on a lent GPU machine (an H200: the image's
# python3 with torch 2.11 / CUDA 13, transformers 5.17; no network, no pip). Nothing is downloaded or installed:
# the low-bit kernels are stock torch's (aten._weight_int4pack_mm, torch._scaled_mm), so no torchao and no
# bitsandbytes wheel travels. Each result is written the moment it exists, into $OUT (7 files; the limit is 8):
#   session.log      everything printed: pytest -m gpu (graphed == eager greedy tokens on stories260K, the CUDA int4
#                    dequantization bit for bit, the low-bit bundles on the GPU, fp8 _scaled_mm, 2:4 sparse matmul;
#                    the torch.compile'd token test is left out: its compiles are timed by step 4 instead),
#                    the decode tables, the recipe's table
#   session.jsonl    one JSON line per step: started, seconds, exit code, or why it was skipped
#   gpu_decode.jsonl one JSON line per measured variant (scripts/gpu_decode.py: 1B-shape Llama, prompt 128, 256 new
#                    tokens, transformers generate as baseline, bf16 / int4 / int8 / fp8, then torch.compile'd), and
#                    the summary line with the issue's bars
#   small-run.json, small-report.md (+ its two plots)   examples/small.toml's h200 branch, run and measured here
#
# Before the call, on the development machine (~2 minutes of CPU; SHARED_SRC defaults to ../shared):
#   PYTHON=.venv/bin/python bash scripts/gpu_session.sh --prepare
# which copies stories260K and the TinyStories text into .shared/ and runs the small recipe's shared prefix (tune,
# prune, distill: target-independent, content-addressed) into .gpu-work/, so the device only runs the h200 branch
# (and needs no bitsandbytes for QLoRA). Both folders are git-ignored and travel as carried paths. Then the call:
#   run(command="bash scripts/gpu_session.sh", carry=[".shared", ".gpu-work"], timeout_s=330)
# The script keeps itself inside SESSION_BUDGET_S (default 290 s) whatever the steps do: each step's timeout is
# the smaller of its own cap and what is left, and a failing step does not stop the later ones.
#
# Without a GPU (any CPU python: PYTHON=.venv/bin/python bash scripts/gpu_session.sh) the same steps run their
# mechanics: the gpu tests skip with their reason, gpu_decode runs its tiny CPU shape, the recipe's h200 branch
# records predicted figures, and the compile variants are skipped, each saying why.
# SESSION_STEPS=tests,decode,recipe,compile (default: all) picks steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/edgepack-gpu}
BUDGET=${SESSION_BUDGET_S:-290}
STEPS=${SESSION_STEPS:-tests,decode,recipe,compile}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
[[ "${1:-}" == "--prepare" ]] || exec > >(tee -a "$OUT/session.log") 2>&1

prepare() {  # on the development machine, before the call
  set -e
  rm -rf .shared .gpu-work && mkdir -p .shared/models .shared/data .gpu-work
  cp -r "${SHARED_SRC:-../shared}/models/stories260K" .shared/models/
  cp "${SHARED_SRC:-../shared}/data/tinystories-valid-sample.txt" .shared/data/
  recipe_file
  "$PY" -m edgepack.cli run .gpu-work/small.toml --workdir .gpu-work/small
  rm -rf .gpu-work/small/h200 .gpu-work/small/run.json  # keep the shared prefix only: the branch runs on the GPU
  du -sh .shared .gpu-work
  exit 0
}

recipe_file() {  # examples/small.toml with paths into .shared/ and the h200 branch only (no other target's table)
  sed -e 's#\.\./\.\./shared/#../.shared/#g' -e '/^\[stages\.per_target\./,+1d' \
      -e 's|^targets = .*|targets = ["h200"]                # the lent GPU: H200 (sm_90, 4.8 TB/s)|' \
      examples/small.toml >.gpu-work/small.toml
}

left() { echo $((BUDGET - ($(date +%s) - T0))); }

step() {  # step NAME CAP_S COMMAND...: run with timeout min(CAP_S, time left), one JSON line in session.jsonl
  local name=$1 cap=$2; shift 2
  local t remaining rc start
  remaining=$(left)
  if [[ ",$STEPS," != *",$name,"* ]]; then
    echo "{\"step\": \"$name\", \"status\": \"skipped\", \"reason\": \"not in SESSION_STEPS\"}" >>"$OUT/session.jsonl"
    return
  fi
  if ((remaining < 15)); then
    echo "{\"step\": \"$name\", \"status\": \"skipped\", \"reason\": \"${remaining} s left of ${BUDGET}\"}" >>"$OUT/session.jsonl"
    return
  fi
  t=$((cap < remaining ? cap : remaining))
  start=$(($(date +%s) - T0))
  echo "== $name (timeout ${t} s, ${remaining} s left)"
  timeout "$t" "$@"
  rc=$?
  local status=ran
  ((rc == 124 || rc == 137)) && status=timeout
  ((rc != 0 && rc != 124 && rc != 137)) && status=failed
  echo "{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"started_s\": $start, \"seconds\": $(($(date +%s) - T0 - start)), \"timeout_s\": $t}" >>"$OUT/session.jsonl"
}

skip() {  # skip NAME REASON
  echo "{\"step\": \"$1\", \"status\": \"skipped\", \"reason\": \"$2\"}" >>"$OUT/session.jsonl"
  echo "== $1 skipped: $2"
}

[[ "${1:-}" == "--prepare" ]] && prepare

# edgepack itself without pip (no network, no build backend): the package with its stage folders linked in, as
# setuptools' package-dir maps them, plus the metadata importlib.metadata reads (version, extras)
EP=$(mktemp -d /tmp/edgepack-src-XXXXXX)
cp -r edgepack "$EP/"
for d in tune compress deploy targets bench; do ln -s "$PWD/$d" "$EP/edgepack/$d"; done
"$PY" - "$EP" <<'PY' || exit 1
import pathlib, sys, tomllib
p = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
lines = ["Metadata-Version: 2.1", f"Name: {p['name']}", f"Version: {p['version']}"]
lines += [f"Requires-Dist: {r}" for r in p["dependencies"]]
for extra, reqs in p.get("optional-dependencies", {}).items():
    lines += [f"Provides-Extra: {extra}"] + [f'Requires-Dist: {r}; extra == "{extra}"' for r in reqs]
d = pathlib.Path(sys.argv[1]) / f"{p['name']}-{p['version']}.dist-info"
d.mkdir()
(d / "METADATA").write_text("\n".join(lines) + "\n")
(d / "entry_points.txt").write_text("[console_scripts]\nedgepack = edgepack.cli:main\n")
PY
export PYTHONPATH=$EP${PYTHONPATH:+:$PYTHONPATH}
export EDGEPACK_SHARED=$PWD/.shared
: >"$OUT/session.jsonl"
FACTS=$("$PY" -P - <<'PY'
import json, importlib.metadata as m, torch, transformers
cuda = torch.cuda.is_available()
print(json.dumps({"step": "setup", "edgepack": m.version("edgepack"), "torch": torch.__version__,
                  "transformers": transformers.__version__, "cuda": cuda,
                  "gpu": torch.cuda.get_device_name() if cuda else None,
                  "sm": "".join(map(str, torch.cuda.get_device_capability())) if cuda else None}))
PY
) || exit 1
echo "$FACTS" | tee -a "$OUT/session.jsonl"
GPU=0
[[ "$FACTS" == *'"cuda": true'* ]] && GPU=1
((GPU)) && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.draw --format=csv,noheader

# 1. the gpu-marked tests (on a CPU they all skip, each with its reason)
step tests 85 "$PY" -P -m pytest -q -rs -m gpu -k "not torch_compile" -p no:cacheprovider tests/test_gpu_kernels.py \
  tests/test_gpu_runtimes.py tests/test_prune.py

# 2. decode / prefill / TTFT / peak memory, 1B shape: baseline and the runtime's four precisions, no compile
if ((GPU)); then
  step decode 110 "$PY" -P scripts/gpu_decode.py --target local --out "$OUT/gpu_decode.jsonl" \
    --variants hf-generate,bf16,int4,int8,fp8 --deadline-s 100
else
  skip decode-1b "no CUDA device: the 1B-shape bench needs the GPU; its mechanics run on the tiny CPU shape below"
  step decode 90 "$PY" -P scripts/gpu_decode.py --device cpu --shape tiny --dtype float32 --target cpu-x86-64 \
    --prompt 8 --new-tokens 6 --variants hf-generate,fp32,int4,fp8 --out "$OUT/gpu_decode.jsonl"
fi

# 3. the small recipe's h200 branch (quantize -> compile -> bench -> bundle) measured here, and its report. It runs
#    in a scratch copy of the prepared workdir, so nothing measured here (or in a dry run) lands in .gpu-work/.
if [[ ! -d .gpu-work/small ]]; then
  skip recipe "not prepared: run 'bash scripts/gpu_session.sh --prepare' before the call (.gpu-work/ holds the shared prefix)"
else
  RW=$(mktemp -d /tmp/edgepack-recipe-XXXXXX)
  cp -r .gpu-work/small "$RW/"
  step recipe 90 bash -c "'$PY' -P -m edgepack.cli run .gpu-work/small.toml --workdir '$RW/small' && '$PY' -P -m \
    edgepack.cli report '$RW/small' -o '$OUT/small-report.md' >/dev/null && cp '$RW/small/run.json' '$OUT/small-run.json'"
  rm -rf "$RW"
fi

# 4. what torch.compile buys per precision, in whatever time is left (appends to gpu_decode.jsonl; the summary
#    line at its end covers every variant measured in this call)
if ((GPU)); then
  DEADLINE=$(($(left) - 10))
  step compile 600 "$PY" -P scripts/gpu_decode.py --target local --out "$OUT/gpu_decode.jsonl" \
    --variants bf16+compile,int8+compile,int4+compile,fp8+compile --deadline-s "$DEADLINE"
else
  skip compile "no CUDA device: torch.compile of the decode step is measured on the GPU only"
fi
rm -rf "$EP"
echo "== done in $(($(date +%s) - T0)) s of ${BUDGET}; files in $OUT:"
ls -la "$OUT"
n=$(find "$OUT" -type f | wc -l)
((n <= 8)) || echo "warning: $n files in $OUT; the device tool returns 8"
# the last lines of the reply: the bars, as measured
grep '"kind": "summary"' "$OUT/gpu_decode.jsonl" 2>/dev/null | tail -1
