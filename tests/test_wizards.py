"""Tests for the helper scripts: easy.sh, calibrate.sh and install.sh, and their .bat twins.

The .sh wizards are driven through stdin, in a copy of the scripts in a temporary folder, with a fake
interpreter (HYDRA_PYTHON / PYTHON) that records its arguments, so we assert the exact commands they
run. The .bat files cannot run here (no Windows); a static test checks that each .bat asks the same
questions, with the same defaults and in the same order, as its .sh twin.

Run: venv/bin/python -m pytest tests/test_wizards.py -q
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Terminal

REPO = Path(__file__).resolve().parents[1]
SEP = "\x1f"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# Records one line per call: "<name>\x1f<arg>\x1f<arg>...". $FAKE_NAME tells fakes apart. The wizards' answer
# checks (`python -m hydra.wizard ...`) run for real, with this project's hydra/, and are not recorded.
RECORDER = f"""#!/usr/bin/env bash
if [ "$1 $2" = "-m hydra.wizard" ]; then PYTHONPATH="{REPO}" exec "{sys.executable}" "$@"; fi
{{ printf '%s{SEP}' "$FAKE_NAME" "$@"; printf '\\n'; }} >> "$FAKE_LOG"
"""


def make_fake(path: Path, name: str, body: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(RECORDER.replace("$FAKE_NAME", name) + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def setup(tmp_path):
    """A copy of the scripts in tmp/repo, a fake interpreter in tmp/bin, and tmp/work as the cwd."""
    repo, work = tmp_path / "repo", tmp_path / "work"
    repo.mkdir()
    work.mkdir()
    for name in ("easy.sh", "calibrate.sh", "install.sh"):
        shutil.copy(REPO / name, repo / name)
    fake = make_fake(tmp_path / "bin" / "python", "python")
    log = tmp_path / "calls.log"
    env = {**os.environ, "HYDRA_PYTHON": str(fake), "FAKE_LOG": str(log)}
    env.pop("PYTHON", None)

    def run(script: str, stdin: str, **extra_env):
        proc = subprocess.run(["bash", str(repo / script)], input=stdin, cwd=work, env={**env, **extra_env},
                              capture_output=True, text=True, timeout=60)
        return proc, calls(log)

    return run, repo, work, tmp_path


def calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [line.split(SEP)[:-1] for line in log.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------
# easy.sh


def test_autotag_with_defaults(setup):
    run, _, work, _ = setup
    (work / "images").mkdir()
    proc, got = run("easy.sh", "autotag\n\nimages\n\n\nexit\n")
    assert proc.returncode == 0, proc.stderr
    assert got == [["python", "inference.py", "-t", "0.2", f"{work}/images"]]


def test_inference_alias_with_custom_threshold_and_recursion(setup):
    run, _, _, tmp = setup
    (tmp / "my pics").mkdir()
    proc, got = run("easy.sh", f"inference\n0.35\n{tmp}/my pics\ny\n\nexit\n")
    assert got == [["python", "inference.py", "-t", "0.35", "-r", f"{tmp}/my pics"]]


def test_autotag_uses_calibration_csv_when_present(setup):
    run, repo, work, _ = setup
    (repo / "calibration.csv").write_text("tag,threshold,cti\r\n")
    (work / "my pics").mkdir()
    # no threshold question: the answers are path (quoted, as drag and drop gives it), recursion and first tags
    proc, got = run("easy.sh", "autotag\n'my pics'\nn\n\nexit\n")
    assert got == [["python", "inference.py", "-t", "calibration.csv", f"{work}/my pics"]]
    assert "Using calibration.csv" in proc.stdout


@pytest.mark.parametrize("typed, prefix", [
    ("my_style", "my_style"),
    ("my_style, anthro", "my_style, anthro"),
    ('"my style" & 100%', "my style & 100%"),  # quotes dropped (the .bat cannot pass them), the rest as typed
])
def test_autotag_puts_the_tags_typed_first(setup, typed, prefix):
    run, _, work, _ = setup
    (work / "pics").mkdir()
    proc, got = run("easy.sh", f"autotag\n\npics\n\n{typed}\nexit\n")
    assert got == [["python", "inference.py", "-t", "0.2", "-p", prefix, f"{work}/pics"]]


def test_autotag_without_a_path_runs_nothing(setup):
    run, *_ = setup
    proc, got = run("easy.sh", "autotag\n\n\nexit\n")
    assert got == [] and "No path given." in proc.stdout


@pytest.mark.parametrize("choice, expect", [
    ("app", [["python", "app.py"]]),
    ("interactive", [["python", "inference.py"]]),
    ("nonsense", []),
    ("", []),
])
def test_menu_entries(setup, choice, expect):
    run, *_ = setup
    proc, got = run("easy.sh", f"{choice}\nexit\n")
    assert proc.returncode == 0 and got == expect
    if choice == "nonsense":
        assert "Unknown choice 'nonsense'." in proc.stdout


def test_exit_and_end_of_input_leave_cleanly(setup):
    run, *_ = setup
    for stdin in ("exit\n", ""):
        proc, got = run("easy.sh", stdin)
        assert proc.returncode == 0 and got == []


def test_update_runs_git_pull(setup):
    run, _, _, tmp = setup
    git = make_fake(tmp / "gitbin" / "git", "git")
    proc, got = run("easy.sh", "update\nexit\n", PATH=f"{git.parent}{os.pathsep}{os.environ['PATH']}")
    assert got == [["git", "pull"]]


def test_calibrate_from_the_menu_with_defaults(setup):
    run, *_ = setup
    proc, got = run("easy.sh", "calibrate\n" + "\n" * 6 + "\n" + "y\n" + "exit\n")
    assert got == [["python", "calibrate.py", "-m", "cti", "-s", "0.0", "-p", "0.098", "-r", "0.198",
                    "-R", "0.0", "1.0"]]


def test_missing_venv_runs_install_first(setup):
    run, repo, work, tmp = setup
    # a stand-in install.sh that creates venv/bin/python (a recorder) and notes that it ran
    (repo / "install.sh").write_text(
        f'echo installed >> "{tmp}/install.log"\n'
        f'mkdir -p venv/bin && cp "{tmp}/bin/python" venv/bin/python\n')
    (work / "x").mkdir()
    proc, got = run("easy.sh", "autotag\n\nx\n\n\nexit\n", HYDRA_PYTHON="")
    assert (tmp / "install.log").read_text() == "installed\n"
    assert got == [["python", "inference.py", "-t", "0.2", f"{work}/x"]]
    # second run: the venv exists, no install
    run("easy.sh", "exit\n", HYDRA_PYTHON="")
    assert (tmp / "install.log").read_text() == "installed\n"


def test_failed_install_stops_easy_mode(setup):
    run, repo, *_ = setup
    (repo / "install.sh").write_text("exit 1\n")
    proc, got = run("easy.sh", "autotag\n\nx\n\n\nexit\n", HYDRA_PYTHON="")
    assert proc.returncode == 1 and got == [] and "Installation failed" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# easy.sh at a terminal: drag and drop, re-asking, case


@pytest.fixture
def terminal(setup):
    run, repo, work, tmp = setup
    env = {**os.environ, "HYDRA_PYTHON": str(tmp / "bin" / "python"), "FAKE_LOG": str(tmp / "calls.log")}
    env.pop("PYTHON", None)
    return lambda script: Terminal(["bash", str(repo / script)], work, env), tmp


AUTOTAG_PROMPTS = ["What would you like to do? ", "Threshold, -1.0 to 1.0, lower gives more tags [0.2]: ",
                   "Image or folder to tag (drag and drop it here): ", "Include subfolders? (y/n) [n]: ",
                   "Tags to write first in every caption, e.g. a trigger word (ENTER for none): "]
TRICKY = "it's my (pics) 100%"  # a quote, spaces, parentheses and a percent sign


def dropped_forms(path: Path) -> dict[str, str]:
    """How terminals paste a dropped folder (each form ends in the space most of them add)."""
    text = str(path)
    return {
        "gnome-quoted": "'" + text.replace("'", "'\\''") + "' ",
        "windows-quoted": f'"{text}" ',
        "macos-escaped": re.sub(r"([ '()%])", r"\\\1", text) + " ",
        "file-url": path.as_uri() + " ",
        "file-url-localhost": path.as_uri().replace("file://", "file://localhost") + "  ",
        "typed-with-spaces": f"  {text}  ",
    }


@pytest.mark.parametrize("form", list(dropped_forms(Path("/x"))))
def test_dropped_paths_in_every_terminal_form(terminal, form):
    start, tmp = terminal
    folder = tmp / TRICKY
    folder.mkdir()
    answer = dropped_forms(folder)[form]
    term = start("easy.sh")
    for prompt, typed in zip(AUTOTAG_PROMPTS, ["autotag", "", answer, "y", ""]):
        term.expect(prompt)
        term.type(typed)
    term.expect(AUTOTAG_PROMPTS[0])
    term.type("exit")
    assert term.finish() == 0
    assert calls(tmp / "calls.log") == [["python", "inference.py", "-t", "0.2", "-r", str(folder)]]


def test_a_missing_path_is_asked_again(terminal):
    start, tmp = terminal
    (tmp / "work" / "pics").mkdir()
    term = start("easy.sh")
    for prompt, typed in zip(AUTOTAG_PROMPTS, ["autotag", "0.3", "'no such folder' "]):
        term.expect(prompt)
        term.type(typed)
    shown = term.expect(AUTOTAG_PROMPTS[2])  # asked again, saying what was not found
    assert f"Not found: {tmp}/work/no such folder." in shown
    term.type("pics")
    term.expect(AUTOTAG_PROMPTS[3])
    term.type("")
    term.expect(AUTOTAG_PROMPTS[4])
    term.type("")
    term.expect(AUTOTAG_PROMPTS[0])
    term.type("exit")
    assert term.finish() == 0
    assert calls(tmp / "calls.log") == [["python", "inference.py", "-t", "0.3", f"{tmp}/work/pics"]]


def test_numbers_and_answers_are_checked_where_typed(terminal):
    start, tmp = terminal
    (tmp / "work" / "pics").mkdir()
    term = start("easy.sh")
    term.expect(AUTOTAG_PROMPTS[0])
    term.type("  AutoTag")  # menu answers in any case, spaces around them
    for typed, why in [("2", "'2' is not a number from -1.0 to 1.0"), ("0.2.5", "'0.2.5' is not a number"),
                       ("nan", "'nan' is not a number")]:
        term.expect(AUTOTAG_PROMPTS[1])
        term.type(typed)
        assert why in term.expect(AUTOTAG_PROMPTS[1])
        term.pos -= len(AUTOTAG_PROMPTS[1])  # the re-asked prompt is the one answered next
    term.expect(AUTOTAG_PROMPTS[1])
    term.type("0,25")  # a decimal comma
    term.expect(AUTOTAG_PROMPTS[2])
    term.type("pics")
    term.expect(AUTOTAG_PROMPTS[3])
    term.type("maybe")
    assert "Please answer y or n (not 'maybe')." in term.expect(AUTOTAG_PROMPTS[3])
    term.type("YES")
    term.expect(AUTOTAG_PROMPTS[4])
    term.type("")
    term.expect(AUTOTAG_PROMPTS[0])
    term.type("EXIT")
    assert term.finish() == 0
    assert calls(tmp / "calls.log") == [["python", "inference.py", "-t", "0.25", "-r", f"{tmp}/work/pics"]]


@pytest.mark.parametrize("answer", ["n", "N", "no", "No", ""])
def test_no_in_any_spelling_means_no(setup, answer):
    run, _, work, _ = setup
    (work / "pics").mkdir()
    proc, got = run("easy.sh", f"autotag\n\npics\n{answer}\n\nexit\n")
    assert got == [["python", "inference.py", "-t", "0.2", f"{work}/pics"]]


def test_end_of_input_while_a_path_is_asked_again_runs_nothing(setup):
    run, *_ = setup
    proc, got = run("easy.sh", "autotag\n\nnowhere\n")
    assert proc.returncode == 0 and got == [] and "Not found:" in proc.stderr


# ---------------------------------------------------------------------------------------------------
# hydra/wizard.py, the answer checks both twins call


@pytest.mark.parametrize("answer, expected", [
    ("'/a/b c' ", "/a/b c"),
    ("'/a/it'\\''s' ", "/a/it's"),
    ('"C:\\x y\\p.png"', "C:\\x y\\p.png" if os.sep == "\\" else None),
    ("/a/b\\ c\\(1\\) ", "/a/b c(1)"),
    ("file:///a/b%20c/%C3%A9.png", "/a/b c/\u00e9.png"),
    ("file://localhost/a/b%2520c", "/a/b%20c"),
    ("  relative/x  ", "relative/x"),
])
def test_path_readings(answer, expected):
    from hydra.wizard import path_candidates

    found = path_candidates(answer)
    assert found[0] == answer.strip()
    if expected is not None:
        assert expected == found[-1]


def test_the_literal_name_wins_over_a_decoded_one(tmp_path):
    from hydra.wizard import existing_path

    (tmp_path / "a%20b").mkdir()  # a folder really named with a percent sign
    (tmp_path / "a b").mkdir()
    assert existing_path("a%20b", str(tmp_path)) == str(tmp_path / "a%20b")
    assert existing_path(f"{(tmp_path / 'a b').as_uri()}", "/") == str(tmp_path / "a b")


@pytest.mark.parametrize("argv, code, out", [
    (["number", "0.198", "0.0", "1.0"], 0, "0.198\n"),
    (["number", "1.5", "0.0", "1.0"], 1, ""),
    (["number", "-0.5", "0.0", "1.0"], 1, ""),
    (["number", "inf", "-1.0", "1.0"], 1, ""),
    (["number", "", "0.0", "1.0"], 1, ""),
    (["number", " 1e-1 ", "0.0", "1.0"], 0, "1e-1\n"),
    (["metric", "F0.5", ], 0, "f0.5\n"),
    (["metric", "f1.0@0.3"], 0, "f1.0@0.3\n"),
    (["metric", "f0"], 1, ""),
    (["metric", "ctii"], 1, ""),
    (["yesno", " Yes "], 0, "y\n"),
    (["yesno", "NO"], 0, "n\n"),
    (["yesno", "yes please"], 1, ""),
    (["path", "   ", "/"], 2, ""),
    (["path", "/no/such/path/anywhere", "/"], 1, ""),
    (["bogus", "x"], 64, ""),
])
def test_wizard_checks_from_the_command_line(argv, code, out):
    proc = subprocess.run([sys.executable, "-m", "hydra.wizard", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert (proc.returncode, proc.stdout) == (code, out), proc.stderr
    assert bool(proc.stderr) == (code not in (0, 2))


# ---------------------------------------------------------------------------------------------------
# calibrate.sh


def test_calibration_wizard_defaults(setup):
    run, *_ = setup
    proc, got = run("calibrate.sh", "\n" * 7 + "y\n")
    assert proc.returncode == 0, proc.stdout
    assert got == [["python", "calibrate.py", "-m", "cti", "-s", "0.0", "-p", "0.098", "-r", "0.198",
                    "-R", "0.0", "1.0"]]
    assert "python calibrate.py -m cti -s 0.0 -p 0.098 -r 0.198 -R 0.0 1.0\n" in proc.stdout


def test_calibration_wizard_custom_answers_and_excluded_tags(setup):
    run, *_ = setup
    stdin = "f0.5\n0.1\n0.2\n0.3\n0.05\n0.95\n3d_(artwork)\nfeline\n\nY\n"
    proc, got = run("calibrate.sh", stdin)
    assert got == [["python", "calibrate.py", "-m", "f0.5", "-s", "0.1", "-p", "0.2", "-r", "0.3",
                    "-R", "0.05", "0.95", "-x", "3d_(artwork)", "feline"]]
    assert ('python calibrate.py -m f0.5 -s 0.1 -p 0.2 -r 0.3 -R 0.05 0.95 -x "3d_(artwork)" "feline"\n'
            in proc.stdout)


@pytest.mark.parametrize("answer", ["n", "", "yes please"])
def test_calibration_wizard_cancels_unless_y(setup, answer):
    run, *_ = setup
    proc, got = run("calibrate.sh", "\n" * 7 + answer + "\n")
    assert proc.returncode == 1 and got == [] and "Cancelled." in proc.stdout


def test_calibration_wizard_asks_again_for_out_of_range_numbers(setup):
    """A minimum recall of 1.5 would calibrate no tag at all (and every later run would tag nothing)."""
    run, *_ = setup
    stdin = "CTII\nCTI\n\n\n1.5\n0.3\n0.6\n0.4\n0.9\n\nYes\n"
    proc, got = run("calibrate.sh", stdin)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert got == [["python", "calibrate.py", "-m", "cti", "-s", "0.0", "-p", "0.098", "-r", "0.3",
                    "-R", "0.6", "0.9"]]
    assert "'CTII' is not a metric" in proc.stderr
    assert "'1.5' is not a number from 0.0 to 1.0" in proc.stderr
    assert "'0.4' is not a number from 0.6 to 1.0" in proc.stderr  # the maximum is at least the minimum


def test_calibration_wizard_at_end_of_input_cancels(setup):
    run, *_ = setup
    proc, got = run("calibrate.sh", "j\n")
    assert proc.returncode == 1 and got == []


def test_calibration_wizard_reports_failure(setup):
    run, _, _, tmp = setup
    failing = make_fake(tmp / "bin2" / "python", "python", "exit 2\n")
    proc, got = run("calibrate.sh", "\n" * 7 + "y\n", HYDRA_PYTHON=str(failing))
    assert proc.returncode == 2 and len(got) == 1 and "Calibration failed" in proc.stdout


# ---------------------------------------------------------------------------------------------------
# install.sh

BASE_PYTHON_BODY = """case "$1" in
    --version) echo "Python $FAKE_VERSION" ;;
    -c) [ "$FAKE_VERSION_OK" = 1 ] ;;
    -m) if [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$FAKE_VENV_PY" "$3/bin/python"; fi ;;
esac
"""
VENV_PYTHON_BODY = """case "$1" in
    -m) [ "$FAKE_PIP_FAIL" != 1 ] ;;
esac
"""


@pytest.fixture
def install(setup):
    run, repo, _, tmp = setup
    (repo / "requirements.txt").write_text("numpy\n")
    base = make_fake(tmp / "bin" / "base-python", "base", BASE_PYTHON_BODY)
    venv_py = make_fake(tmp / "bin" / "venv-python", "venv", VENV_PYTHON_BODY)

    def run_install(version="3.12.1", ok=True, pip_fail=False):
        return run("install.sh", "", PYTHON=str(base), FAKE_VERSION=version, FAKE_VERSION_OK=str(int(ok)),
                   FAKE_VENV_PY=str(venv_py), FAKE_PIP_FAIL=str(int(pip_fail)))

    return run_install, repo, venv_py


CHECK = ["-c", "import sys; sys.exit(sys.version_info < (3, 11))"]
PIP = ["venv", "-m", "pip", "install", "-r", "requirements.txt"]


def test_install_refuses_python_older_than_3_11(install):
    run_install, repo, _ = install
    proc, got = run_install(version="3.10.12", ok=False)
    assert proc.returncode == 1
    assert "Python 3.10.12" in proc.stdout and "needs Python 3.11 or newer" in proc.stdout
    assert got == [["base", "--version"], ["base", *CHECK]]
    assert not (repo / "venv").exists()


def test_fresh_install_creates_the_venv_and_installs(install):
    run_install, repo, _ = install
    proc, got = run_install()
    assert proc.returncode == 0 and "Installation complete." in proc.stdout
    assert got == [["base", "--version"], ["base", *CHECK], ["base", "-m", "venv", "venv"], PIP]
    assert (repo / "venv" / "bin" / "python").exists()


def test_rerun_reuses_a_healthy_venv(install):
    run_install, repo, venv_py = install
    (repo / "venv" / "bin").mkdir(parents=True)
    shutil.copy(venv_py, repo / "venv" / "bin" / "python")
    (repo / "venv" / "marker").write_text("keep me")
    proc, got = run_install()
    assert proc.returncode == 0 and "Reusing the virtual environment" in proc.stdout
    assert ["base", "-m", "venv", "venv"] not in got and got[-1] == PIP
    assert (repo / "venv" / "marker").read_text() == "keep me"


def test_failed_install_removes_only_a_venv_it_created(install):
    run_install, repo, venv_py = install
    proc, _ = run_install(pip_fail=True)
    assert proc.returncode == 1 and "Removed the incomplete venv/." in proc.stdout
    assert not (repo / "venv").exists()
    # an existing healthy venv is kept when the package update fails
    (repo / "venv" / "bin").mkdir(parents=True)
    shutil.copy(venv_py, repo / "venv" / "bin" / "python")
    proc, _ = run_install(pip_fail=True)
    assert proc.returncode == 1 and (repo / "venv" / "bin" / "python").exists()


def test_broken_venv_is_created_again(install):
    run_install, repo, _ = install
    (repo / "venv").mkdir()  # no interpreter inside
    proc, got = run_install()
    assert proc.returncode == 0 and "does not work" in proc.stdout
    assert ["base", "-m", "venv", "venv"] in got


# ---------------------------------------------------------------------------------------------------
# the .bat twins (static: no Windows here)


def asks(text: str) -> list[tuple[str, str, str]]:
    """(variable, prompt, default) of every `ask` call, in order."""
    return re.findall(r'^\s*(?:while |call :)?ask (\w+) "([^"]*)" ("[^"]*"|\S*)', text, re.M)


def messages(text: str, bat: bool) -> list[str]:
    """Every echoed message, normalised: variables as {NAME}, venv\\ as venv/."""
    if bat:
        found = re.findall(r"\becho(?:\.|\s+([^&\n]*))", text)  # a message ends at "&" (next command)
    else:
        found = re.findall(r'\becho(?:\s+"([^"]*)")?\s*(?:$|;|\))', text, re.M)
    out = []
    for msg in found:
        msg = re.sub(r"%(\w+)%|\$\{?(\w+)\}?", lambda m: "{" + (m[1] or m[2]) + "}", msg.strip())
        msg = msg.replace("venv\\", "venv/").replace('\\"', '"')
        out.append(re.sub(r"\./install\.sh|install\.bat", "{install}", msg))
    return [m for m in out if not m.startswith("off")]


PAIRS = ["easy", "calibrate", "install"]
# lines that are rightly platform-specific (how to pick another Python; the preview's tag list)
PLATFORM = re.compile(r"^e\.g\. |^Could not create venv/\.|python calibrate\.py")


@pytest.mark.parametrize("name", PAIRS)
def test_bat_twin_asks_the_same_questions(name):
    sh = (REPO / f"{name}.sh").read_text(encoding="utf-8")
    bat = (REPO / f"{name}.bat").read_text(encoding="utf-8")
    assert asks(sh) == asks(bat)
    assert [m for m in messages(sh, False) if not PLATFORM.search(m)] == \
        [m for m in messages(bat, True) if not PLATFORM.search(m)]
    assert "line-for-line parallel" in sh and "line-for-line parallel" in bat


def checks(text: str) -> list[tuple[str, str]]:
    """(variable, check and its arguments) of every `valid` call, in order, variables as {NAME}."""
    found = re.findall(r'^\s*(?:call :|if ! )?valid (\w+) ([^|;\r\n]*?)\s*(?:\|\||;|$)', text, re.M)
    norm = lambda a: re.sub(r'%(\w+)%|\$(\w+)', lambda m: "{" + (m[1] or m[2]) + "}", a)  # noqa: E731
    return [(v, norm(a)) for v, a in found]


@pytest.mark.parametrize("name", ["easy", "calibrate"])
def test_bat_twin_checks_the_same_answers(name):
    sh = (REPO / f"{name}.sh").read_text(encoding="utf-8")
    bat = (REPO / f"{name}.bat").read_text(encoding="utf-8")
    assert checks(sh) == checks(bat) and len(checks(sh)) >= 3
    asked = [a[0] for a in asks(sh)]
    assert all(v in asked for v, _ in checks(sh))  # every check follows a question
    # both twins run the same checker, and the .bat reads its UTF-8 answer back under code page 65001
    assert '-m hydra.wizard "$2"' in sh and "-m hydra.wizard %2" in bat and "chcp 65001" in bat


def test_calibrate_twins_preview_the_same_command():
    sh = (REPO / "calibrate.sh").read_text(encoding="utf-8")
    bat = (REPO / "calibrate.bat").read_text(encoding="utf-8")
    sh_preview = [m for m in messages(sh, False) if m.startswith("python calibrate.py")]
    bat_preview = [m for m in messages(bat, True) if m.startswith("python calibrate.py")]
    stem = ("python calibrate.py -m {METRIC} -s {MIN_SCORE} -p {MIN_PRECISION} -r {MIN_RECALL} "
            "-R {MIN_THRESHOLD} {MAX_THRESHOLD}")
    assert len(sh_preview) == len(bat_preview) == 1
    assert sh_preview[0].startswith(stem) and bat_preview[0].startswith(stem)


def test_wizard_prompts_follow_the_spec():
    prompts = asks((REPO / "calibrate.sh").read_text(encoding="utf-8"))
    assert [(p[0], p[2]) for p in prompts] == [
        ("METRIC", "cti"), ("MIN_SCORE", "0.0"), ("MIN_PRECISION", "0.098"), ("MIN_RECALL", "0.198"),
        ("MIN_THRESHOLD", "0.0"), ("MAX_THRESHOLD", "1.0"), ("TAG", '""'), ("OK", "n")]
    assert "cti, f0.5, f1, f2, f<beta>, j, p4" in prompts[0][1] and prompts[-1][1] == "Ok? (y/n) "


def test_bat_files_use_crlf_and_pass_arguments_through():
    for path in REPO.glob("*.bat"):
        data = path.read_bytes()
        assert data.count(b"\n") == data.count(b"\r\n"), f"{path.name} must use CRLF line endings"
    assert 'inference.py" %*' in (REPO / "inference.bat").read_text()
    assert "python app.py" in (REPO / "app.bat").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cu128" in (REPO / "install.bat").read_text()


def test_easy_twins_pass_the_first_tags_as_p():
    sh = (REPO / "easy.sh").read_text(encoding="utf-8")
    bat = (REPO / "easy.bat").read_text(encoding="utf-8")
    assert 'PFLAG=(-p "$PREFIX")' in sh and '"${RFLAG[@]}" "${PFLAG[@]}" "$TARGET"' in sh
    assert 'set PFLAG=-p "%PREFIX%"' in bat and '%RFLAG% %PFLAG% "%TARGET%"' in bat
    assert 'PREFIX=${PREFIX//\\"/}' in sh and 'set "PREFIX=%PREFIX:"=%"' in bat  # both drop quotes
