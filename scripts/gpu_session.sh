#!/usr/bin/env bash
# Every GPU check of issues 3, 9 and 10 in ONE call of a lent GPU machine (an H100 / H200 with the image's python3,
# torch and transformers; no network). Results land in $OUT (default /tmp/edgepack-gpu): gpu-tests.log,
# gpu_decode.json (last JSON line of scripts/gpu_decode.py), small-report.md + small-run.json (the small recipe with the
# h100-sxm branch measured on this GPU), at most 8 files (the device tool's limit). Budget: ~8 minutes of a 10-minute call; each step has its own timeout, and
# a failing step does not stop the later ones.
#
# Before the call, here (the machine with network), carry the packages the image lacks as wheels (device README):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl torchao==0.18.0 bitsandbytes==0.50.2
# and the shared model and data into the tree (the machine gets only the repository):
#   echo /.shared/ >> .git/info/exclude; mkdir -p .shared && cp -r ../shared/models ../shared/data .shared/
# then run: bash scripts/gpu_session.sh   with carry [".whl", ".shared"] and timeout_s 600.
set -uo pipefail
OUT=${OUT:-/tmp/edgepack-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# edgepack itself, without pip (no network, no build backend needed): the package with its stage folders mapped
# in by links, as setuptools' package-dir does, plus the metadata that importlib.metadata reads (version, extras)
rm -rf /tmp/ep && mkdir -p /tmp/ep && cp -r edgepack /tmp/ep/
for d in tune compress deploy targets bench; do ln -s "$PWD/$d" "/tmp/ep/edgepack/$d"; done
python3 - <<'PY' || exit 1
import tomllib, pathlib
p = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
lines = ["Metadata-Version: 2.1", f"Name: {p['name']}", f"Version: {p['version']}"]
lines += [f"Requires-Dist: {r}" for r in p["dependencies"]]
for extra, reqs in p.get("optional-dependencies", {}).items():
    lines += [f"Provides-Extra: {extra}"] + [f'Requires-Dist: {r}; extra == "{extra}"' for r in reqs]
d = pathlib.Path(f"/tmp/ep/{p['name']}-{p['version']}.dist-info")
d.mkdir()
(d / "METADATA").write_text("\n".join(lines) + "\n")
(d / "entry_points.txt").write_text("[console_scripts]\nedgepack = edgepack.cli:main\n")
PY
export PYTHONPATH=/tmp/ep${PYTHONPATH:+:$PYTHONPATH}
python3 -P -c "import edgepack.deploy.torch_cuda, importlib.metadata as m; print('edgepack', m.version('edgepack'))" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# 1. the gpu-marked tests: graphed torch-cuda == eager on stories260K, int4 / fp8 kernels, 2:4 sparse matmul
EDGEPACK_SHARED=$PWD/.shared timeout 200 python3 -P -m pytest -q -m gpu tests/test_gpu_runtimes.py tests/test_prune.py \
  tests/test_quantize.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -5

# 2. issue 10's numbers: 1B-shape Llama bf16, prompt 128, 256 new tokens; generate vs graph vs compile vs int8/int4/fp8
timeout 300 python3 -P scripts/gpu_decode.py --target h100-sxm 2>&1 | tee "$OUT/gpu_decode.log" | tail -15
tail -1 "$OUT/gpu_decode.log" >"$OUT/gpu_decode.json"

# 3. issue 9: the small recipe, its h100-sxm branch measured here (the H200 is sm_90 like the target), then the report
if [ -d .shared/models/stories260K ]; then
  sed -e 's#\.\./\.\./shared/#../.shared/#g' \
    examples/small.toml >examples/.gpu-small.toml
  timeout 150 python3 -P -m edgepack.cli run examples/.gpu-small.toml --workdir /tmp/gpu-small 2>&1 | tail -12
  python3 -P -m edgepack.cli report /tmp/gpu-small -o "$OUT/small-report.md" >/dev/null && cp /tmp/gpu-small/run.json "$OUT/small-run.json"
fi
ls -la "$OUT"
