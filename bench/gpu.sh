#!/usr/bin/env bash
# One command for a CUDA machine: makes (or reuses) the environment, then runs real-size
# random-weight training steps (SD1.5 512 px and SDXL 1024 px with ours and diffusers' reference
# scripts, a Flux-class transformer at 1024 px with our core in bf16 and fp8) and writes
# bench_gpu/results.json + table.md (it/s, peak VRAM by torch and nvidia-smi, MFU, the memory
# estimator's prediction beside each row). Whole run: under 8 minutes on an H100. See
# bench/README.md, "GPU run (bench/gpu.sh)".
#
#   bash bench/gpu.sh                  # install what is missing, then run the plan
#   bash bench/gpu.sh --dry-run        # which Python, what it would install, the plan and commands
#   bash bench/gpu.sh --quick          # fewer steps;  --models sd15,flux,sdxl  --budget-s S
#   bash bench/gpu.sh --setup-only     # only make the environment
#
# The environment, first that works: $BENCH_PYTHON; $BENCH_VENV (default .venv-bench, made by
# bench/setup_env.sh); .venv-gpu (made here before); python3 — each must import torch (with CUDA),
# torchvision, diffusers, transformers, accelerate, peft, safetensors and PIL. Otherwise, where a
# Python with CUDA torch exists (a GPU image), .venv-gpu is made on top of it and only what is
# missing is installed: from wheels in .whl/ when there are any (offline machines), else from the
# package registry, with torch pinned ($BENCH_BASE_PYTHON names that Python). Where no CUDA torch exists, bench/setup_env.sh installs the
# registry's default (CUDA) torch 2.11 + torchvision + the rest into $BENCH_VENV.
# Outputs under bench_gpu/; with $OUT set (the device tool), copies of the results go there too.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
START=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
OUTPUT="${BENCH_GPU_OUTPUT:-bench_gpu}"
mkdir -p "$OUTPUT"
[ -f "$OUTPUT/.gitignore" ] || printf '# written by bench/gpu.sh\n*\n' > "$OUTPUT/.gitignore"
exec > >(tee "$OUTPUT/gpu.log") 2>&1
DRY=0 SETUP_ONLY=0 ARGS=()
for a in "$@"; do
    case "$a" in --dry-run) DRY=1; ARGS+=("$a") ;; --setup-only) SETUP_ONLY=1 ;; *) ARGS+=("$a") ;; esac
done
log() { echo "[gpu.sh $(( $(date +%s) - START ))s] $*"; }
MODULES="${BENCH_GPU_MODULES:-torch torchvision diffusers transformers accelerate peft safetensors PIL}"
GPU_VENV="$ROOT/.venv-gpu"

# check PY: prints "missing=<modules that do not import> cuda=<True|False|none> torch=<version>"; false if
# PY cannot run.
check() {
    [ -x "$(command -v "$1" 2>/dev/null || echo "$1")" ] || return 1
    "$1" - $MODULES <<'EOF' 2>/dev/null
import importlib, sys
missing = []
for m in sys.argv[1:]:  # imported, not only found: a torchvision built for another torch fails here
    try:
        importlib.import_module(m)
    except Exception:
        missing.append(m)
cuda, version = "none", ""
if "torch" not in missing:
    import torch
    cuda, version = str(torch.cuda.is_available()), torch.__version__
print(f"missing={','.join(missing)} cuda={cuda} torch={version}")
EOF
}

usable() {  # PY has every module and sees a GPU (BENCH_GPU_ALLOW_CPU=1: any device, for checking setup here)
    local s
    s="$(check "$1")" || return 1
    case "$s" in missing=\ cuda=True*) return 0 ;; missing=\ cuda=False*) [ -n "${BENCH_GPU_ALLOW_CPU:-}" ] ;; *) return 1 ;; esac
}

pip_name() { case "$1" in PIL) echo pillow ;; *) echo "$1" ;; esac; }

# venv_on BASE: .venv-gpu that sees BASE's packages (also when BASE is itself a venv, where
# --system-site-packages alone would reach only the interpreter's own site-packages).
venv_on() {
    local base="$1"
    [ -x "$GPU_VENV/bin/python" ] || "$base" -m venv --system-site-packages "$GPU_VENV" || return 1
    local site
    site="$("$GPU_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$base" -c 'import site, sysconfig; print("\n".join(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()])))' > "$site/_bench_gpu_base.pth"
}

install_missing() {  # install_missing PY MODULES...: only what is missing, torch kept as it is
    local py="$1"; shift
    local names=() m cons tv
    for m in "$@"; do names+=("$(pip_name "$m")"); done
    cons="$(mktemp)"
    tv="$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null)" && echo "torch==$tv" > "$cons"
    if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
        log "installing ${names[*]} from .whl/ (offline)"
        "$py" -m pip install -q --no-index --find-links "$ROOT/.whl" -c "$cons" "${names[@]}"
    else
        log "installing ${names[*]} from the package registry"
        "$py" -m pip install -q -c "$cons" "${names[@]}"
    fi
    local rc=$?
    rm -f "$cons"
    return $rc
}

PY=""
for cand in "${BENCH_PYTHON:-}" "${BENCH_VENV:-$ROOT/.venv-bench}/bin/python" "$GPU_VENV/bin/python" python3; do
    [ -n "$cand" ] || continue
    if usable "$cand"; then PY="$cand"; break; fi
    log "not usable as it is: $cand ($(check "$cand" || echo 'cannot run'))"
done
if [ -z "$PY" ]; then
    BASE=""
    for cand in "${BENCH_BASE_PYTHON:-}" "$GPU_VENV/bin/python" python3 "${BENCH_VENV:-$ROOT/.venv-bench}/bin/python"; do
        [ -n "$cand" ] || continue
        s="$(check "$cand")" || continue
        case "$s" in *cuda=True*) BASE="$cand"; break ;; *cuda=False*) [ -n "${BENCH_GPU_ALLOW_CPU:-}" ] && { BASE="$cand"; break; } ;; esac
    done
    if [ -n "$BASE" ]; then
        s="$(check "$BASE")"; missing="${s#missing=}"; missing="${missing%% *}"
        log "plan: .venv-gpu on $BASE ($s), install ${missing//,/ }"
        if [ "$DRY" = 0 ]; then
            if [ "$BASE" != "$GPU_VENV/bin/python" ]; then venv_on "$BASE" || { log "could not make $GPU_VENV"; exit 1; }; fi
            # shellcheck disable=SC2086
            install_missing "$GPU_VENV/bin/python" ${missing//,/ } || { log "install failed"; exit 1; }
            PY="$GPU_VENV/bin/python"
        fi
    else
        log "plan: no CUDA torch found: bash bench/setup_env.sh (the registry's torch 2.11 + torchvision + the rest)"
        if [ "$DRY" = 0 ]; then
            bash "$ROOT/bench/setup_env.sh" || { log "bench/setup_env.sh failed"; exit 1; }
            PY="${BENCH_VENV:-$ROOT/.venv-bench}/bin/python"
        fi
    fi
    if [ "$DRY" = 0 ] && ! usable "$PY"; then
        log "still not usable: $PY ($(check "$PY" || echo 'cannot run'))"
        exit 1
    fi
fi
PY="${PY:-python3}"
log "python: $PY ($(check "$PY" || echo '?'))"
[ "$SETUP_ONLY" = 1 ] && exit 0
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# What is left of the 8 minutes goes to the plan (installs included), unless --budget-s says otherwise.
SPENT=$(( $(date +%s) - START ))
LEFT=$(( 450 - SPENT ))
export BENCH_GPU_BUDGET_S="${BENCH_GPU_BUDGET_S:-$(( LEFT > 60 ? LEFT : 60 ))}"
"$PY" -m bench.gpu --output "$OUTPUT" --python "$PY" "${ARGS[@]}"
rc=$?
log "done (exit $rc)"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] && [ "$DRY" = 0 ]; then sleep 0.2; cp "$OUTPUT/gpu.log" "$OUT/gpu.log"; fi
exit $rc
