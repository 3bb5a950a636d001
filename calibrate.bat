@echo off
rem Calibration wizard (spec 5.4): asks for the calibrate.py options, shows the command, runs it on "y".
rem Twin of calibrate.sh: keep both line-for-line parallel (same prompts, same order, same defaults).
rem HYDRA_PYTHON overrides the interpreter (default venv\Scripts\python.exe).
setlocal
cd /d "%~dp0"
if not defined HYDRA_PYTHON set "HYDRA_PYTHON=venv\Scripts\python.exe"
set "PY=%HYDRA_PYTHON%"
if exist "%PY%" goto :have_python
echo No virtual environment found. Run install.bat first.
set "STATUS=1"
goto :end
:have_python

echo JTP-3 Hydra calibration: choose a threshold per tag from the validation data.
echo Press ENTER to accept the default shown in [brackets].
call :ask METRIC "Metric (cti, f0.5, f1, f2, f<beta>, j, p4) [cti]: " cti
call :ask MIN_SCORE "Minimum score [0.0]: " 0.0
call :ask MIN_PRECISION "Minimum precision [0.098]: " 0.098
call :ask MIN_RECALL "Minimum recall [0.198]: " 0.198
call :ask MIN_THRESHOLD "Minimum threshold [none]: " 0.0
call :ask MAX_THRESHOLD "Maximum threshold [none]: " 1.0
echo Enter tags to exclude, one per line, then an empty line to finish.
echo Tags are in e621 format, e.g. 3d_(artwork). Use vulva tags instead of pussy tags.
set "TAGS="
:tag_loop
call :ask TAG "Exclude tag: " ""
if not defined TAG goto :tags_done
set TAGS=%TAGS% "%TAG%"
goto :tag_loop
:tags_done
set "XFLAG="
if defined TAGS set "XFLAG=-x"
echo.
echo python calibrate.py -m %METRIC% -s %MIN_SCORE% -p %MIN_PRECISION% -r %MIN_RECALL% -R %MIN_THRESHOLD% %MAX_THRESHOLD% %XFLAG%%TAGS%
call :ask OK "Ok? (y/n) " n
if /i not "%OK%"=="y" echo Cancelled.& set "STATUS=1"& goto :end
"%PY%" calibrate.py -m "%METRIC%" -s "%MIN_SCORE%" -p "%MIN_PRECISION%" -r "%MIN_RECALL%" -R "%MIN_THRESHOLD%" "%MAX_THRESHOLD%" %XFLAG% %TAGS%
set "STATUS=%ERRORLEVEL%"
if "%STATUS%"=="0" echo Saved calibration.csv. Tagging now uses these per-tag thresholds.
if not "%STATUS%"=="0" echo Calibration failed; see the message above.
goto :end

rem ask VAR "prompt" default: read a line (ENTER = default)
:ask
set "%~1="
set /p "%~1=%~2"
if not defined %~1 set "%~1=%~3"
goto :eof

:end
if not defined HYDRA_EASY pause
exit /b %STATUS%
