#!/usr/bin/env bash
# The whole test suite (what CI runs, via .ci/run): the core's unit tests in .venv, then every host we
# support, each against its own source copy in its own virtual environment (created when missing):
#
#   ComfyUI 0.3.64, the oldest supported   COMFYUI_DIR          (../shared/comfyui)       .venv-comfyui
#   ComfyUI 0.33, the current one          COMFYUI_CURRENT_DIR  (../shared/comfyui-0.33)  .venv-comfyui-current
#   Automatic1111 WebUI 1.10               A1111_DIR            (../shared/a1111)         .venv-a1111
#     (+ its repositories/)                A1111_REPOSITORIES   ($A1111_DIR/repositories)
#   Forge (lllyasviel's, 2.0.1v1.10.1)     FORGE_DIR            (../shared/forge)         .venv-forge
#     (+ its repositories/huggingface_guess, which its launcher clones)
#
# Each ComfyUI gets tests/integration and tests/browser (the live view in Debian's chromium, installed
# when missing and possible, else that test skips with the reason). A host whose copy is missing is
# skipped with one line saying what, why and which variable enables it; under CI=true a missing host is
# an error that names it, so CI can never pass by skipping. Point a variable at your own copy to test
# against it, e.g. `COMFYUI_DIR=/path/to/ComfyUI bash tools/test.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
shared="$(cd .. && pwd)/shared"
failed=0
missing_hosts=()

fail() { echo "FAILED: $*" >&2; failed=1; }

# host_missing WHAT WHY HOW: one line, and an error under CI.
host_missing() {
  if [ -n "${CI:-}" ]; then
    echo "ERROR $1: $2 (CI must test every supported host; $3)" >&2
    missing_hosts+=("$1")
  else
    echo "SKIPPED $1: $2 ($3)"
  fi
}

bash tools/setup_env.sh || { echo "FAILED: could not set up .venv" >&2; exit 1; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

comfy_old="${COMFYUI_DIR:-$shared/comfyui}"
comfy_new="${COMFYUI_CURRENT_DIR:-$shared/comfyui-0.33}"
a1111="${A1111_DIR:-$shared/a1111}"
repos="${A1111_REPOSITORIES:-$a1111/repositories}"
forge="${FORGE_DIR:-$shared/forge}"

# The hosts' venvs are built in the background while the core's tests run (pip mostly waits on the
# disk), one after the other (pip's cache is shared) and at the lowest CPU and I/O priority, so the unit
# tests keep their time; each host waits for its own result, and the WebUI suites for the whole chain
# (their own set-up then finds their venvs current).
setup_logs="$(mktemp -d)"
low=(nice -n 19)
ionice -c 3 true >/dev/null 2>&1 && low+=(ionice -c 3)  # where the system lets us
prebuild() {  # prebuild NAME COMMAND...: run one set-up, keep its output and exit status
  local name="$1"
  shift
  "${low[@]}" "$@" >"$setup_logs/$name.log" 2>&1
  echo $? >"$setup_logs/$name.rc"
}
(
  [ -f "$comfy_old/main.py" ] && prebuild comfyui-old env COMFYUI_DIR="$comfy_old" COMFYUI_VENV=.venv-comfyui \
    bash tools/setup_comfyui_env.sh
  [ -f "$comfy_new/main.py" ] && prebuild comfyui-new env COMFYUI_DIR="$comfy_new" \
    COMFYUI_VENV=.venv-comfyui-current bash tools/setup_comfyui_env.sh
  prebuild browser bash tools/setup_browser.sh
  [ -f "$a1111/launch.py" ] && prebuild a1111 env A1111_DIR="$a1111" A1111_REPOSITORIES="$repos" \
    bash tools/setup_a1111_env.sh
  [ -f "$forge/launch.py" ] && prebuild forge env FORGE_DIR="$forge" bash tools/setup_forge_env.sh
  true
) &
prebuild_pid=$!
# setup_result NAME: wait for that set-up, print its output, return its exit status
setup_result() {
  while [ ! -f "$setup_logs/$1.rc" ] && kill -0 "$prebuild_pid" 2>/dev/null; do sleep 2; done
  cat "$setup_logs/$1.log" 2>/dev/null
  return "$(cat "$setup_logs/$1.rc" 2>/dev/null || echo 1)"
}
unit_tests=(tests --ignore=tests/integration --ignore=tests/browser --ignore=tests/a1111 --ignore=tests/forge)
.venv/bin/python -m pytest -q -m "not slow" --durations=10 "${unit_tests[@]}" "$@" || fail "unit tests"
# the embedded model trained for hundreds of steps (marked slow): apart, so the unit tests stay quick
.venv/bin/python -m pytest -q -m slow --durations=5 "${unit_tests[@]}" "$@" || fail "slow training tests"

# The two ComfyUI versions' suites (integration + browser) run side by side, one CPU thread each, their
# output printed when both are done; each failure is one line in the suite's .fail file.
comfy_logs="$(mktemp -d)"
declare -A comfy_pid=() comfy_head=()
comfyui_suite() {  # comfyui_suite NAME DIR VENV SETUP LABEL ARGS...
  local name="$1" dir="$2" venv="$3" setup="$4" label="$5"
  shift 5
  local failures="$comfy_logs/$name.fail"
  setup_result "$setup" || { echo "setting up $venv for $dir" >>"$failures"; return; }
  COMFYUI_DIR="$dir" OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q --durations=15 tests/integration "$@" \
    || echo "tests/integration on $label" >>"$failures"
  setup_result browser
  COMFYUI_DIR="$dir" OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q tests/browser "$@" \
    || echo "tests/browser on $label" >>"$failures"
}
start_comfyui() {  # start_comfyui NAME LABEL DIR VAR VENV SETUP ARGS...
  local name="$1" label="$2" dir="$3" var="$4" venv="$5" setup="$6"
  shift 6
  if [ ! -f "$dir/main.py" ]; then
    host_missing "tests/integration + tests/browser on $label" "no ComfyUI at $dir" \
      "set $var to a ComfyUI folder to run them"
    return
  fi
  comfy_head[$name]="== ComfyUI $label: $dir ($(sed -n 's/^__version__ *= *//p' "$dir/comfyui_version.py" | tr -d "\"'"))"
  comfyui_suite "$name" "$dir" "$venv" "$setup" "$label" "$@" >"$comfy_logs/$name.log" 2>&1 &
  comfy_pid[$name]=$!
}
finish_comfyui() {  # finish_comfyui NAME: wait for a started suite, print its output, record its failures
  local name="$1" line
  [ -n "${comfy_pid[$name]:-}" ] || return 0
  wait "${comfy_pid[$name]}"
  echo "${comfy_head[$name]}"
  cat "$comfy_logs/$name.log"
  if [ -f "$comfy_logs/$name.fail" ]; then
    while read -r line; do fail "$line"; done <"$comfy_logs/$name.fail"
  fi
}
start_comfyui old "0.3.64 (oldest supported)" "$comfy_old" COMFYUI_DIR .venv-comfyui comfyui-old "$@"
start_comfyui new "current (0.33)" "$comfy_new" COMFYUI_CURRENT_DIR .venv-comfyui-current comfyui-new "$@"
finish_comfyui old
finish_comfyui new
wait "$prebuild_pid"

# The two WebUI suites run side by side (each in its own venv, each server on a free port), their output
# printed when both are done: exit 97 from a suite is its venv's set-up failing, anything else its tests.
webui_logs="$(mktemp -d)"
declare -A webui_pid=()
a1111_suite() {
  A1111_DIR="$a1111" A1111_REPOSITORIES="$repos" bash tools/setup_a1111_env.sh || return 97
  A1111_DIR="$a1111" A1111_REPOSITORIES="$repos" .venv-a1111/bin/python -m pytest -q tests/a1111 "$@"
}
forge_suite() {
  FORGE_DIR="$forge" bash tools/setup_forge_env.sh || return 97
  FORGE_DIR="$forge" .venv-forge/bin/python -m pytest -q tests/forge "$@"
}
start_webui() {  # start_webui NAME SUITE ARGS...
  local name="$1" suite="$2"
  shift 2
  "$suite" "$@" >"$webui_logs/$name.log" 2>&1 &
  webui_pid[$name]=$!
}
finish_webui() {  # finish_webui NAME VENV TESTS: wait for a started suite, print its output, record a failure
  local name="$1" rc
  [ -n "${webui_pid[$name]:-}" ] || return 0
  wait "${webui_pid[$name]}"
  rc=$?
  echo "== $3 ($2)"
  cat "$webui_logs/$name.log"
  [ "$rc" -eq 0 ] || { [ "$rc" -eq 97 ] && fail "setting up $2"; } || fail "$3"
}

# Automatic1111 WebUI extension (tests/a1111); its setup also reads CLIP-L's config from a ComfyUI copy.
if [ ! -f "$a1111/launch.py" ]; then
  host_missing "tests/a1111" "no Automatic1111 WebUI at $a1111" "set A1111_DIR to a WebUI 1.10 folder to run them"
elif [ ! -d "$repos/stable-diffusion-stability-ai" ]; then
  host_missing "tests/a1111" "the WebUI cannot start without its repositories ($repos is missing)" \
    "set A1111_REPOSITORIES to a folder holding them, see scripts/README.md"
elif [ ! -f "$comfy_old/comfy/sd1_clip_config.json" ]; then
  host_missing "tests/a1111" "its offline CLIP-L config comes from a ComfyUI copy, and there is none" \
    "set COMFYUI_DIR to a ComfyUI folder"
else
  start_webui a1111 a1111_suite "$@"
fi

# Forge WebUI (tests/forge): the same extension on Forge's ForgeDiffusionEngine, in its own venv.
if [ ! -f "$forge/launch.py" ] || [ ! -d "$forge/backend/diffusion_engine" ]; then
  host_missing "tests/forge" "no Forge WebUI at $forge" "set FORGE_DIR to a Forge folder to run them"
elif [ ! -d "$forge/repositories/huggingface_guess/huggingface_guess" ]; then
  host_missing "tests/forge" "Forge cannot load a checkpoint without repositories/huggingface_guess (missing in $forge)" \
    "place the repository its launcher clones there, see ../shared/FORGE_NOTES.md"
else
  start_webui forge forge_suite "$@"
fi
finish_webui a1111 .venv-a1111 tests/a1111
finish_webui forge .venv-forge tests/forge

if [ "${#missing_hosts[@]}" -gt 0 ]; then
  fail "missing host copies under CI: ${missing_hosts[*]}"
fi
exit "$failed"
