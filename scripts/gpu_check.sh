#!/usr/bin/env bash
# Run on a GPU machine (the device tool's H100/H200): install mmfast into the machine's Python, run the
# test suite natively, run the benchmark, and leave logs and results under $OUT.
#
#   device run:  bash scripts/gpu_check.sh            (carry .whl when extra wheels are needed)
#
# The machine has no package registry: wheels it lacks travel in .whl/ and are installed from there.
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }

{
  nvidia-smi
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1

python3 -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -n 25
tests_rc=${PIPESTATUS[0]}

python3 -m mmfast.bench --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log" | grep -v '^mmfast.bench'
bench_rc=${PIPESTATUS[0]}

echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
