#!/usr/bin/env bash
# Install JTP-3 Hydra (spec 11): check Python >= 3.11, create venv/, install requirements.txt into it.
# Safe to rerun: a working venv/ is reused (and its packages updated); a venv/ this run created is removed
# again if the installation fails.
# Twin of install.bat: keep both line-for-line parallel (same messages, same order).
# PYTHON picks the interpreter that creates the venv (default: python3, else python).
cd "$(dirname "$0")" || exit 1
if [ -z "$PYTHON" ]; then
    PYTHON=python3
    command -v python3 >/dev/null 2>&1 || PYTHON=python
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "Python was not found. Install Python 3.11 or newer, then run this again."
    exit 1
fi
"$PYTHON" --version
if ! "$PYTHON" -c "import sys; sys.exit(sys.version_info < (3, 11))"; then
    echo "JTP-3 Hydra needs Python 3.11 or newer. Install it, then run this again,"
    echo "e.g. PYTHON=python3.12 ./install.sh"
    exit 1
fi

VENV_PY=venv/bin/python
CREATED=0
if [ -d venv ] && "$VENV_PY" -c "import sys; sys.exit(sys.version_info < (3, 11))" >/dev/null 2>&1; then
    echo "Reusing the virtual environment in venv/."
else
    if [ -e venv ]; then
        echo "venv/ exists but does not work; creating it again."
        rm -rf venv
    fi
    echo "Creating a virtual environment in venv/ ..."
    if ! "$PYTHON" -m venv venv; then
        echo "Could not create venv/. On Debian or Ubuntu, install python3-venv first."
        rm -rf venv
        exit 1
    fi
    CREATED=1
fi
echo "Installing requirements, this can take a while ..."
if ! "$VENV_PY" -m pip install -r requirements.txt; then
    echo "Installation failed; see the messages above."
    if [ $CREATED -eq 1 ]; then
        rm -rf venv
        echo "Removed the incomplete venv/."
    fi
    exit 1
fi
echo "Installation complete."
