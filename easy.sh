#!/usr/bin/env bash
# Easy mode (spec 11): a menu for tagging folders, the web app, calibration and interactive tagging.
# Twin of easy.bat: keep both line-for-line parallel (same prompts, same order, same defaults).
# HYDRA_PYTHON overrides the interpreter (default venv/bin/python); the tests use it to record commands.
ORIG_DIR=$PWD
cd "$(dirname "$0")" || exit 1
PY=${HYDRA_PYTHON:-venv/bin/python}
export HYDRA_PYTHON=$PY

ask() {  # ask VAR "prompt" default: read a line (ENTER = default); fails at end of input
    local answer status
    ASKED=("$2" "$3")  # for `valid`, which asks again
    read -r -p "$2" answer
    status=$?
    answer=${answer%$'\r'}
    printf -v "$1" '%s' "${answer:-$3}"
    return $status
}

valid() {  # valid VAR CHECK [ARG...]: until hydra/wizard.py's CHECK accepts $VAR, say why and ask again;
    local value status  # VAR becomes the accepted form. Fails at end of input or on an empty path.
    while true; do
        value=$("$PY" -m hydra.wizard "$2" "${!1}" "${@:3}")
        status=$?
        if [ $status -eq 0 ]; then
            printf -v "$1" '%s' "$value"
            return 0
        fi
        [ $status -eq 1 ] && ask "$1" "${ASKED[@]}" || return 1
    done
}

lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

autotag() {
    if [ -f calibration.csv ]; then
        echo "Using calibration.csv for the per-tag thresholds."
        THRESHOLD=calibration.csv
    else
        ask THRESHOLD "Threshold, -1.0 to 1.0, lower gives more tags [0.2]: " 0.2
        valid THRESHOLD number -1.0 1.0 || return
    fi
    ask TARGET "Image or folder to tag (drag and drop it here): " ""
    # quotes, backslash escapes and file:// URLs from drag and drop are undone; a missing path is asked again
    if ! valid TARGET path "$ORIG_DIR"; then
        echo "No path given."
        return
    fi
    ask RECURSE "Include subfolders? (y/n) [n]: " n
    valid RECURSE yesno || return
    RFLAG=()
    if [ "$RECURSE" = "y" ]; then
        RFLAG=(-r)
    fi
    ask PREFIX "Tags to write first in every caption, e.g. a trigger word (ENTER for none): " "" || return
    # quotes would end -p's argument early in easy.bat; both twins write the tags without them
    PREFIX=${PREFIX//\"/}
    PFLAG=()
    if [ -n "$PREFIX" ]; then
        PFLAG=(-p "$PREFIX")
    fi
    "$PY" inference.py -t "$THRESHOLD" "${RFLAG[@]}" "${PFLAG[@]}" "$TARGET"
}

app() {
    echo "Starting the web interface. Open the URL it prints in your browser; press Ctrl+C to stop."
    "$PY" app.py
}

update() {
    git pull || echo "Update failed. Is git installed, and is this folder a git clone?"
}

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "First run: installing JTP-3 Hydra into venv/ ..."
    if ! bash install.sh; then
        echo "Installation failed; see the messages above."
        exit 1
    fi
fi

echo "JTP-3 Hydra easy mode"
while true; do
    echo
    echo "  autotag      write .txt tag files for an image or a folder"
    echo "  app          start the web interface"
    echo "  calibrate    choose per-tag thresholds, saved as calibration.csv"
    echo "  interactive  tag images one at a time"
    echo "  update       update this folder with git pull"
    echo "  exit"
    ask CHOICE "What would you like to do? " "" || exit 0
    case "$(lower "$CHOICE")" in
        autotag | inference) autotag ;;
        app) app ;;
        calibrate) bash calibrate.sh ;;
        interactive) "$PY" inference.py ;;
        update) update ;;
        exit) exit 0 ;;
        "") ;;
        *) echo "Unknown choice '$CHOICE'." ;;
    esac
done
