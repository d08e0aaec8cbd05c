#!/usr/bin/env bash
# Run on a GPU machine (the device tool's H100/H200): install mmfast into the machine's Python, then one
# or more stages, leaving logs and results under $OUT (at most a handful of files: the device tool
# brings back 8).
#
#   bash scripts/gpu_check.sh [stage ...]      stages: lease, cuda, tests, compile, overhead, bench-kernels,
#                                              bench-model, bench-model-compile, tune-adapter, tune-norm,
#                                              tune-cuda, all (cuda, tests, compile, overhead, bench-kernels and
#                                              bench-model: several calls' worth); default: lease. Each stage
#                                              but all fits a 10-minute call
#
# lease: the whole check in ONE call that fits a task's device time (15 minutes, the machine's start
# included): MMFAST_LEASE_BUDGET seconds from the script's start, the install included (default 540; run
# it with timeout_s=600), every step capped by what is left, the most wanted first: the CUDA C++ build in the background while the
# native tests of everything else run (pytest-xdist where installed), the Triton backward's grid at the goal
# widths (programs per SM), the cuda-backend tests, the kernel
# suite's large sizes with the backend table, the model suite (layernorm first), the CUDA-graph cases,
# and with what is left the CUDA C++ backward's stage tuning and the Triton backward's launches. The goals
# table over all of it ends $OUT/lease.log and the output. Files (8, the device tool's most): install.log,
# lease.log, tests.log, cuda.log, bench-kernels.tar.gz, bench-model.tar.gz, bench-graphs.tar.gz,
# tune.tar.gz, each tarball packed as soon as its step ends, so a call cut short still brings back every
# finished step. Liger's wheel: scripts/gpu_wheels.sh, run here first.
#
# Time caps (seconds): MMFAST_TESTS_TIMEOUT (tests, default 420) and MMFAST_BENCH_BUDGET (a bench stage
# stops starting runs after it, default 420, and writes what it measured; stopped 30 s later, and
# bench-kernels' CUDA-graph cases after 60 s more). MMFAST_TESTS (default
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
lease_start=$(date +%s)  # the lease's budget counts from here: the install is part of the call
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(lease)
[ "${stages[0]}" = all ] && stages=(cuda tests compile overhead bench-kernels bench-model)
export MMFAST_CACHE_DIR="${MMFAST_CACHE_DIR:-$PWD/.mmfast-cache}"

# the commit scripts/gpu_wheels.sh recorded where the checkout is (this copy's git metadata is not its own)
[ -s .whl/COMMIT ] && export MMFAST_COMMIT="$(cat .whl/COMMIT)"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$OUT/install.log" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
    || echo "WARNING: the carried wheels did not install (.whl/): $(ls .whl)" | tee -a "$OUT/install.log"
fi
{
  nvidia-smi
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
  python3 -c "import liger_kernel; print('liger_kernel', liger_kernel.__version__ if hasattr(liger_kernel, '__version__') else 'present')" \
    2>/dev/null || echo "liger_kernel: not installed"
  echo "commit: ${MMFAST_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown) (this copy's git metadata: \
run scripts/gpu_wheels.sh before the call for the checkout's)}"
} >> "$OUT/install.log" 2>&1

# the CUDA C++ extension: build (first use) or load it, say which; exit 1 where it is unavailable
CUDA_LOAD="from mmfast.kernels import cuda_ext as c; ok = c.load(); \
print('cuda extension:', 'loaded from ' + str(c.origin()) if ok else 'UNAVAILABLE: ' + str(c.unavailable_reason())); \
raise SystemExit(0 if ok else 1)"
# the Triton norm backward's persistent grid at the goal widths (bf16, as the kernel suite runs them): programs
# per SM, as many as one SM holds of the compiled kernel (mmfast.kernels.norm.bwd_grid), up to 32 warps' worth
GRID="import torch; from mmfast.kernels import norm as K, _device as D; dev = torch.device('cuda'); \
sms = D.sm_count(dev); bf = torch.bfloat16
for rms, M, N in ((True, 32768, 4096), (True, 32768, 5120), (True, 32768, 8192), (False, 64 * 577, 1024)):
    c, _ = K.bwd_grid(M, N, dev, rms, bf, bf, bf, True, True, not rms)
    print(f'backward grid {\"rms\" if rms else \"ln\"} N={N}: {c.programs} programs on {sms} SMs '
          f'({c.programs / sms:.3g} per SM), {c.num_warps} warps, BLOCK_M {c.block_m}')"
# the tests that run the cuda backend (with -k cuda)
CUDA_TESTS="tests/test_norm.py tests/test_adapter.py tests/test_cuda_backend.py tests/test_cuda_staged.py tests/test_cuda_binding.py \
tests/test_op_layouts.py"

# lease helpers: seconds left of the lease (less a reserve), and a capped run of one step
lease_left() { echo $(( ${MMFAST_LEASE_BUDGET:-540} - ($(date +%s) - lease_start) - ${1:-0} )); }
capped() {  # capped SECONDS CMD...: SIGINT at SECONDS (pytest and the bench then still write what they have)
  local t=$1; shift
  if [ "$t" -lt 15 ]; then echo "skipped: $* (no lease time left)"; return 124; fi
  timeout -s INT -k 20 "$t" "$@"
}
lease_bench() {  # lease_bench NAME RESERVE CAP ARGS...: the bench into $OUT/bench-NAME, budget = min(CAP, left - RESERVE)
  local name=$1 reserve=$2 cap=$3; shift 3
  local t; t=$(lease_left "$reserve"); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 10 ]; then echo "skipped: bench $name (no lease time left)"; return 124; fi
  # the run in flight at the budget may finish for GRACE seconds more (the reserves below count it), never
  # past the lease's end
  local stop=$(( t + GRACE )) left; left=$(lease_left 0); [ "$stop" -gt "$left" ] && stop=$left
  [ "$stop" -lt "$t" ] && stop=$t
  mkdir -p "$OUT/bench-$name"
  echo "== bench $name: budget ${t} s, stopped at $stop s =="
  capped "$stop" python3 -m mmfast.bench --out "$OUT/bench-$name" --time-budget "$t" "$@" 2>&1 \
    | tee "$OUT/bench-$name/bench.log" | tr '\r' '\n' | grep -v '^mmfast.bench'
  return "${PIPESTATUS[0]}"
}
GRACE=20
LEASE_RESULTS=/tmp/mmfast-lease-results  # results.json copies for the goals table, outside $OUT
pack() {  # pack NAME: $OUT/NAME into $OUT/NAME.tar.gz now (results.json kept for the goals), the folder removed
  [ -d "$OUT/$1" ] || return 0
  mkdir -p "$LEASE_RESULTS"
  if [ -f "$OUT/$1/results.json" ]; then
    cp "$OUT/$1/results.json" "$LEASE_RESULTS/$1.json"
  else  # a run killed before it wrote its outputs: the records it measured, a line each (the goals read them)
    for f in "$OUT/$1"/records.partial.*.jsonl; do [ -f "$f" ] && cp "$f" "$LEASE_RESULTS/$1.jsonl"; done
  fi
  tar -czf "$OUT/$1.tar.gz" -C "$OUT/$1" . && rm -rf "${OUT:?}/$1"
}
# a bench's exit status 3: its --time-budget left runs out, nothing else went wrong (a planned cut, not a failure)
BUDGET_CUT=3

status=0
for stage in "${stages[@]}"; do
  case "$stage" in
    lease)
      rm -rf "$LEASE_RESULTS"
      xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${MMFAST_TEST_WORKERS:-8}")
      {
        echo "lease: budget ${MMFAST_LEASE_BUDGET:-540} s, started $(date -u +%H:%M:%S)"
        lease_rc=0
        done_at() { local rc=$1; echo "$2 rc=$rc at $(( $(date +%s) - lease_start )) s"; [ "$rc" -eq 0 ] || lease_rc=1; }
        bench_done() {  # (a bench cut by its budget lists the runs left out in its summary.md: expected here)
          if [ "$1" -eq "$BUDGET_CUT" ]; then
            echo "$2 rc=$1 (cut by its time budget, as planned; the runs left out are in its summary.md) at $(( $(date +%s) - lease_start )) s"
          else done_at "$1" "$2"; fi
        }
        # 1. the CUDA C++ build (a minute or so of nvcc) in the background, niced, beside the tests
        ( nice -n 5 timeout 300 python3 -c "$CUDA_LOAD" > "$OUT/cuda.log" 2>&1; r=$?; echo "build/load rc=$r at $(( $(date +%s) - lease_start )) s" >> "$OUT/cuda.log"; exit $r ) &
        build=$!
        # 2. native tests of everything but the cuda backend
        echo "== tests (not cuda) =="
        # shellcheck disable=SC2086
        # (timeline, of the default 540 s: these tests end by 150 s, the cuda tests by 210, the kernels by
        # 370 (budget 140 + grace), the model step by 480 (90 + grace), the graphs by 540; tuning after that)
        capped "$(lease_left 390)" python3 -m pytest ${MMFAST_LEASE_TESTS:-tests/test_norm.py tests/test_norm_api.py \
tests/test_adapter.py tests/test_swiglu.py tests/test_quick_gelu.py tests/test_loss.py tests/test_op_checks.py tests/test_op_layouts.py \
tests/test_patch.py tests/test_mlp_patch.py tests/test_fused_loss_patch.py tests/test_mma.py tests/test_tuning.py \
tests/test_bench.py::test_graph_case_times_every_direction_on_gpu} \
          -k "not cuda" -q -p no:cacheprovider $xdist --durations=10 > "$OUT/tests.log" 2>&1
        done_at $? tests; tail -n 3 "$OUT/tests.log"
        capped 60 python3 -c "$GRID"  # (compiles what the kernel suite's cases launch: not time lost)
        # 3. the cuda backend's tests, once the build is there
        wait "$build"; build_rc=$?; tail -n 2 "$OUT/cuda.log"; [ "$build_rc" -eq 0 ] || lease_rc=1
        # a failed build is not tried again by every later step (a minute of nvcc each)
        [ "$build_rc" -eq 0 ] || export MMFAST_CUDA_BUILD=0
        graph_providers=mmfast-triton$([ "$build_rc" -eq 0 ] && echo ,mmfast-cuda),torch-native,torch.compile,liger
        echo "== tests (cuda backend) =="
        [ "$build_rc" -eq 0 ] || echo "skipped: the CUDA C++ kernels did not build or load (cuda.log)"
        # shellcheck disable=SC2086
        # (not the nvcc compile report for sm_90a: the build above compiled the same sources)
        [ "$build_rc" -eq 0 ] && capped "$(lease_left 330)" python3 -m pytest $CUDA_TESTS \
          -k "cuda and not emulated and not compile_for_sm90a" \
          -q -p no:cacheprovider $xdist --durations=10 >> "$OUT/cuda.log" 2>&1
        done_at $? "cuda tests"; tail -n 3 "$OUT/cuda.log"
        # 4. kernels above the L2, both backends, and the backend table
        lease_bench kernels 170 140 --ops rms_norm,layer_norm,mma_adapter,swiglu,quick_gelu --sizes large \
          --backend-table "$OUT/bench-kernels/backend_table.json"
        bench_done $? kernels; pack bench-kernels
        # 5. the model step, LayerNorm tuning first; 6. the small shapes under CUDA graphs, each provider a process
        lease_bench model 60 90 --ops model
        bench_done $? model; pack bench-model
        lease_bench graphs 0 40 --ops rms_norm,layer_norm,mma_adapter --sizes small --providers "$graph_providers"
        bench_done $? graphs; pack bench-graphs
        # 7. the CUDA C++ backward's shared-memory stages (BWD_STAGES), about half a minute, if time is left
        mkdir -p "$OUT/tune"
        t=$(lease_left 10); [ "$t" -gt 45 ] && t=45
        # (optional: on the planned timeline no time is left for it, and its skip does not fail the stage)
        if [ "$build_rc" -eq 0 ] && [ "$t" -lt 15 ]; then
          echo "skipped: tune-cuda (no lease time left; optional)"
        elif [ "$build_rc" -eq 0 ]; then
          capped "$t" python3 benchmarks/tune_norm.py --backend cuda --out "$OUT/tune" > "$OUT/tune/tune-cuda.log" 2>&1
          done_at $? tune-cuda; tail -n 12 "$OUT/tune/tune-cuda.log"
        fi
        pack tune
        # 8. the rest of the time: the Triton backward's launches at the goal widths (a line per candidate, so a
        # cut run still tells; the JSON only when it finishes)
        # (outside $OUT, then into the tune tarball with the CUDA C++ tuning's files: a call cut here leaves
        # $OUT as it was, within the device tool's 8 files, but for the moment the new tarball is written)
        work=/tmp/mmfast-lease-tune; rm -rf "$work"; mkdir -p "$work"; tar -xzf "$OUT/tune.tar.gz" -C "$work" 2>/dev/null
        capped "$(lease_left 10)" python3 benchmarks/tune_norm.py --quick --directions bwd --out "$work" \
          > "$work/tune-triton.log" 2>&1
        r=$?; echo "tune-triton rc=$r$( [ "$r" -eq 124 ] || [ "$r" -eq 130 ] && echo " (cut by the lease: expected)") at $(( $(date +%s) - lease_start )) s"
        tail -n 12 "$work/tune-triton.log"; tar -czf "$OUT/tune.tar.gz.part" -C "$work" . && mv "$OUT/tune.tar.gz.part" "$OUT/tune.tar.gz"
        echo "== goals (python -m mmfast.bench.goals over the kernel, graph and model runs) =="
        # shellcheck disable=SC2046
        python3 -m mmfast.bench.goals $(ls "$LEASE_RESULTS"/bench-kernels.json* "$LEASE_RESULTS"/bench-graphs.json* \
          "$LEASE_RESULTS"/bench-model.json* 2>/dev/null)
        echo "lease: done at $(( $(date +%s) - lease_start )) s (goals not met do not fail the stage; a failed step does)"
        exit $lease_rc
      } 2>&1 | tee "$OUT/lease.log"
      rc=${PIPESTATUS[0]}
      for d in bench-kernels bench-model bench-graphs tune; do pack "$d"; done ;;
    cuda)
      {
        start=$(date +%s)
        python3 -c "$CUDA_LOAD"
        rc=$?
        echo "build/load: $(( $(date +%s) - start )) s"
        # (capped, and written to the log as they go: a hang still leaves its output before the device tool's
        # 10-minute cut; the console gets the tail)
        [ "${MMFAST_CUDA_COMPILE_CHECK:-1}" = 0 ] || timeout -k 10 180 python3 -m mmfast.kernels.cuda_compile_check
        # shellcheck disable=SC2086
        [ $rc -eq 0 ] && timeout -s INT -k 20 300 python3 -m pytest $CUDA_TESTS -q -p no:cacheprovider \
          -k "${MMFAST_CUDA_TESTS:-cuda}" --durations=10
        rc=$(( rc | $? ))
      } > "$OUT/cuda.log" 2>&1
      tail -n 40 "$OUT/cuda.log" ;;
    tests)
      # capped so that a hung kernel still leaves its log (the device tool kills a call at 10 minutes)
      # shellcheck disable=SC2086
      # (SIGINT: pytest still prints its summary; not the pytest-benchmark suite, whose GPU sizes take minutes:
      # the bench stages time those)
      timeout -s INT -k 30 "${MMFAST_TESTS_TIMEOUT:-420}" python3 -m pytest ${MMFAST_TESTS:-tests} -q -p no:cacheprovider \
        --deselect tests/test_bench.py::test_pytest_benchmark_cases_run --durations=15 2>&1 \
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
      # (each run stopped by SIGINT past its budget and a grace, so that a hang still leaves what was measured
      # before the device tool's 10-minute cut; the progress bar's \r-separated updates kept off the console,
      # whose last 12,000 characters are all that come back)
      budget=${MMFAST_BENCH_BUDGET:-420}; budget=${budget%.*}  # whole seconds, for the shell's arithmetic
      # shellcheck disable=SC2086
      timeout -s INT -k 20 $(( budget + 30 )) python3 -m mmfast.bench --ops "$ops" --out "$dir" --time-budget "$budget" \
        $sizes $extra 2>&1 | tee "$dir/bench.log" | tr '\r' '\n' | grep -v '^mmfast.bench'
      rc=${PIPESTATUS[0]}
      [ "$rc" -eq "$BUDGET_CUT" ] && { echo "(cut by --time-budget: the runs left out are in its summary.md)"; rc=0; }
      if [ "$suite" = kernels ]; then  # the CUDA-graph (small-shape) cases in a process of their own
        mkdir -p "$dir/graphs"
        timeout -s INT -k 20 90 python3 -m mmfast.bench --ops "$ops" --out "$dir/graphs" --sizes small --time-budget 60 \
          2>&1 | tee "$dir/graphs/bench.log" | tr '\r' '\n' | grep -v '^mmfast.bench'
        r=${PIPESTATUS[0]}
        [ "$r" -eq "$BUDGET_CUT" ] && { echo "(cut by --time-budget: the runs left out are in its summary.md)"; r=0; }
        rc=$(( rc | r ))
      fi
      tar -czf "$OUT/$stage.tar.gz" -C "$dir" . && rm -rf "$dir" ;;
    *)
      echo "unknown stage $stage"; rc=2 ;;
  esac
  echo "stage $stage: rc=$rc"
  [ "$rc" -ne 0 ] && status=1
done
exit $status
