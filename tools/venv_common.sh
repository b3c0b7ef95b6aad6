# Sourced by the setup scripts (tools/setup_comfyui_env.sh, tools/setup_a1111_env.sh,
# bench/setup_env.sh): one way to make a virtual environment around a fixed torch set that no
# later install may replace, and to skip the work when a stamp says nothing changed.

# venv_is_current STAMP WANT VENV: true when FORCE is unset and STAMP holds WANT for a usable VENV.
venv_is_current() {
    [ -z "${FORCE:-}" ] && [ -f "$1" ] && [ "$(cat "$1")" = "$2" ] && [ -x "$3/bin/python" ]
}

# install_torch_set VPY "torch==X torchvision==Y ...": installs the set first and on its own,
# unless exactly those versions are already there.
install_torch_set() {
    local vpy="$1" set="$2"
    # shellcheck disable=SC2086
    if ! "$vpy" - $set <<'PYEOF' 2>/dev/null
import importlib.metadata as m, sys
want = dict(spec.split("==") for spec in sys.argv[1:])
sys.exit(0 if all(m.version(k).split("+")[0] == v for k, v in want.items()) else 1)
PYEOF
    then
        # shellcheck disable=SC2086
        "$vpy" -m pip install $set
    fi
}

# pip_keeping_torch VPY "torch==X ..." PIP_ARGS...: pip install with a constraints file that
# pins the torch set, so that no requirement pulls another torch.
pip_keeping_torch() {
    local vpy="$1" set="$2" cons status
    shift 2
    cons="$(mktemp)"
    printf '%s\n' $set > "$cons"
    status=0
    "$vpy" -m pip install -c "$cons" "$@" || status=$?
    rm -f "$cons"
    return "$status"
}
