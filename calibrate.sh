#!/usr/bin/env bash
# Calibration wizard (spec 5.4): asks for the calibrate.py options, shows the command, runs it on "y".
# Twin of calibrate.bat: keep both line-for-line parallel (same prompts, same order, same defaults).
# HYDRA_PYTHON overrides the interpreter (default venv/bin/python); the tests use it to record commands.
cd "$(dirname "$0")" || exit 1
PY=${HYDRA_PYTHON:-venv/bin/python}

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
    local value status  # VAR becomes the accepted form. Fails at end of input.
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

cancel() {
    echo "Cancelled."
    exit 1
}

if ! command -v "$PY" >/dev/null 2>&1; then
    echo "No virtual environment found. Run ./install.sh first."
    exit 1
fi

echo "JTP-3 Hydra calibration: choose a threshold per tag from the validation data."
echo "Press ENTER to accept the default shown in [brackets]."
ask METRIC "Metric (cti, f0.5, f1, f2, f<beta>, j, p4) [cti]: " cti
valid METRIC metric || cancel
ask MIN_SCORE "Minimum score [0.0]: " 0.0
valid MIN_SCORE number -1.0 1.0 || cancel
ask MIN_PRECISION "Minimum precision [0.098]: " 0.098
valid MIN_PRECISION number 0.0 1.0 || cancel
ask MIN_RECALL "Minimum recall [0.198]: " 0.198
valid MIN_RECALL number 0.0 1.0 || cancel
ask MIN_THRESHOLD "Minimum threshold [none]: " 0.0
valid MIN_THRESHOLD number 0.0 1.0 || cancel
ask MAX_THRESHOLD "Maximum threshold [none]: " 1.0
valid MAX_THRESHOLD number "$MIN_THRESHOLD" 1.0 || cancel
echo "Enter tags to exclude, one per line, then an empty line to finish."
echo "Tags are in e621 format, e.g. 3d_(artwork). Use vulva tags instead of pussy tags."
TAGS=()
PREVIEW_TAGS=""
while ask TAG "Exclude tag: " "" && [ -n "$TAG" ]; do
    TAGS+=("$TAG")
    PREVIEW_TAGS="$PREVIEW_TAGS \"$TAG\""
done
ARGS=(-m "$METRIC" -s "$MIN_SCORE" -p "$MIN_PRECISION" -r "$MIN_RECALL" -R "$MIN_THRESHOLD" "$MAX_THRESHOLD")
if [ ${#TAGS[@]} -gt 0 ]; then
    ARGS+=(-x "${TAGS[@]}")
    PREVIEW_TAGS=" -x$PREVIEW_TAGS"
fi
echo
echo "python calibrate.py -m $METRIC -s $MIN_SCORE -p $MIN_PRECISION -r $MIN_RECALL -R $MIN_THRESHOLD $MAX_THRESHOLD$PREVIEW_TAGS"
ask OK "Ok? (y/n) " n
valid OK yesno || cancel
if [ "$OK" != "y" ]; then
    cancel
fi
"$PY" calibrate.py "${ARGS[@]}"
STATUS=$?
if [ $STATUS -eq 0 ]; then
    echo "Saved calibration.csv. Tagging now uses these per-tag thresholds."
else
    echo "Calibration failed; see the message above."
fi
exit $STATUS
