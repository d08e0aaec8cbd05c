#!/usr/bin/env bash
# Run on a GPU machine (the device tool's H100/H200): install mmfast into the machine's Python, then one
# or more stages, leaving logs and results under $OUT (at most a handful of files: the device tool
# brings back 8).
#
#   bash scripts/gpu_check.sh [stage ...]      stages: cuda, tests, compile, overhead, bench-kernels,
#                                              bench-model, bench-model-compile, tune-adapter, tune-norm,
#                                              tune-cuda, all (default: all but bench-model-compile and the
#                                              tune stages; each stage fits a 10-minute call)
#
# Time caps (seconds): MMFAST_TESTS_TIMEOUT (tests, default 420) and MMFAST_BENCH_BUDGET (a bench stage
# stops starting runs after it, default 450, and writes what it measured). MMFAST_TESTS (default
# "tests") and MMFAST_CUDA_TESTS (default "cuda") narrow the tests / cuda stages (a path list and a -k
# expression); MMFAST_CUDA_COMPILE_CHECK=0 skips the nvcc compile report in the cuda stage.
# overhead: host microseconds per norm call for every provider (benchmarks/host_overhead.py).
# tune-adapter: GPU time of alternative tile shapes of the adapter kernels (benchmarks/tune_adapter.py,
# --quick unless MMFAST_TUNE_FULL=1: about 3 / 6 minutes), results in $OUT/tune/.
# tune-norm: GPU time of alternative launches of the Triton norm kernels (benchmarks/tune_norm.py; --quick,
# the goal widths only, unless MMFAST_TUNE_FULL=1), results in $OUT/tune-norm/. tune-cuda: the same for
# the CUDA C++ backward's shared-memory stages (0, 2, 3, 4), all widths, into $OUT/tune-norm/ too.
# bench-model-compile: the model suite with HF's and mmfast's models also under torch.compile (Inductor
# compiles each model once per tuning before its timed steps).
#
# cuda: build the CUDA C++ extension (on first use, cached in .mmfast-cache/, which the device tool keeps
# between calls), compile-check it, and run the norm test matrix on the cuda backend. bench-kernels also
# writes the backend table (backend_table.json in its tarball): copy it to mmfast/ops/backend_tables/.
#
# The machine has no package registry: wheels it lacks (liger-kernel, say) travel in .whl/ (carry it)
# and are installed from there. Results come back as $OUT/<stage>.log, $OUT/overhead/ and
# $OUT/bench-<suite>.tar.gz (its log inside): unpack one into benchmarks/results/<date>_<device>_<commit>/.
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(all)
[ "${stages[0]}" = all ] && stages=(cuda tests compile overhead bench-kernels bench-model)
export MMFAST_CACHE_DIR="${MMFAST_CACHE_DIR:-$PWD/.mmfast-cache}"

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
  python3 -c "import liger_kernel; print('liger_kernel', liger_kernel.__version__ if hasattr(liger_kernel, '__version__') else 'present')" \
    2>/dev/null || echo "liger_kernel: not installed"
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown"
} >> "$OUT/install.log" 2>&1

status=0
for stage in "${stages[@]}"; do
  case "$stage" in
    cuda)
      {
        start=$(date +%s)
        python3 -c "from mmfast.kernels import cuda_ext as c; ok = c.load(); print('cuda extension:', 'loaded from ' + str(c.origin()) if ok else 'UNAVAILABLE: ' + str(c.unavailable_reason())); raise SystemExit(0 if ok else 1)"
        rc=$?
        echo "build/load: $(( $(date +%s) - start )) s"
        [ "${MMFAST_CUDA_COMPILE_CHECK:-1}" = 0 ] || python3 -m mmfast.kernels.cuda_compile_check | tail -n 25
        [ $rc -eq 0 ] && python3 -m pytest tests/test_norm.py tests/test_adapter.py tests/test_cuda_backend.py tests/test_cuda_staged.py tests/test_cuda_binding.py -q -p no:cacheprovider \
          -k "${MMFAST_CUDA_TESTS:-cuda}" --durations=10 2>&1 | tail -n 30
        rc=$(( rc | ${PIPESTATUS[0]:-0} ))
      } > "$OUT/cuda.log" 2>&1
      tail -n 40 "$OUT/cuda.log" ;;
    tests)
      # capped so that a hung kernel still leaves its log (the device tool kills a call at 10 minutes)
      # shellcheck disable=SC2086
      timeout "${MMFAST_TESTS_TIMEOUT:-420}" python3 -m pytest ${MMFAST_TESTS:-tests} -q -p no:cacheprovider --durations=15 2>&1 \
        | tee "$OUT/tests.log" | tail -n 40
      rc=${PIPESTATUS[0]} ;;
    compile)
      python3 -m mmfast.kernels.compile_check 2>&1 | tee "$OUT/compile.log" | tail -n 20
      rc=${PIPESTATUS[0]} ;;
    overhead)
      mkdir -p "$OUT/overhead"
      python3 benchmarks/host_overhead.py --out "$OUT/overhead" 2>&1 | tee "$OUT/overhead/overhead.log"
      rc=${PIPESTATUS[0]} ;;
    tune-adapter)
      mkdir -p "$OUT/tune"
      quick=$([ "${MMFAST_TUNE_FULL:-0}" = 1 ] || echo --quick)
      # shellcheck disable=SC2086
      python3 benchmarks/tune_adapter.py --out "$OUT/tune" $quick 2>&1 | tee "$OUT/tune/tune.log" | tail -n 12
      rc=${PIPESTATUS[0]} ;;
    tune-norm)
      mkdir -p "$OUT/tune-norm"
      quick=$([ "${MMFAST_TUNE_FULL:-0}" = 1 ] || echo --quick)
      # shellcheck disable=SC2086
      python3 benchmarks/tune_norm.py --out "$OUT/tune-norm" $quick 2>&1 | tee "$OUT/tune-norm/tune.log" | tail -n 16
      rc=${PIPESTATUS[0]} ;;
    tune-cuda)
      # builds the CUDA C++ extension first if .mmfast-cache/ has no build for these sources (about a minute)
      mkdir -p "$OUT/tune-norm"
      python3 benchmarks/tune_norm.py --backend cuda --out "$OUT/tune-norm" 2>&1 | tee "$OUT/tune-norm/tune-cuda.log" | tail -n 16
      rc=${PIPESTATUS[0]} ;;
    bench-kernels|bench-model|bench-model-compile)
      suite=${stage#bench-}
      ops=$([ "$suite" = kernels ] && echo rms_norm,layer_norm,mma_adapter,swiglu,quick_gelu || echo model)
      dir="$OUT/bench-$suite"
      extra=$([ "$suite" = kernels ] && echo "--backend-table $dir/backend_table.json")
      [ "$suite" = model-compile ] && extra="--providers hf-eager,mmfast,hf-compile,mmfast-compile"
      mkdir -p "$dir"
      sizes=$([ "$suite" = kernels ] && echo "--sizes large")
      # shellcheck disable=SC2086
      python3 -m mmfast.bench --ops "$ops" --out "$dir" --time-budget "${MMFAST_BENCH_BUDGET:-450}" $sizes $extra 2>&1 \
        | tee "$dir/bench.log" | grep -v '^mmfast.bench'
      rc=${PIPESTATUS[0]}
      if [ "$suite" = kernels ]; then  # the CUDA-graph (small-shape) cases in a process of their own
        mkdir -p "$dir/graphs"
        python3 -m mmfast.bench --ops "$ops" --out "$dir/graphs" --sizes small 2>&1 \
          | tee "$dir/graphs/bench.log" | grep -v '^mmfast.bench'
        rc=$(( rc | PIPESTATUS[0] ))
      fi
      tar -czf "$OUT/$stage.tar.gz" -C "$dir" . && rm -rf "$dir" ;;
    *)
      echo "unknown stage $stage"; rc=2 ;;
  esac
  echo "stage $stage: rc=$rc"
  [ "$rc" -ne 0 ] && status=1
done
exit $status
