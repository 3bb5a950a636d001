@echo off
rem Calibration wizard (spec 5.4): asks for the calibrate.py options, shows the command, runs it on "y".
rem Twin of calibrate.sh: keep both line-for-line parallel (same prompts, same order, same defaults).
rem HYDRA_PYTHON overrides the interpreter (default venv\Scripts\python.exe).
setlocal
cd /d "%~dp0"
if not defined HYDRA_PYTHON set "HYDRA_PYTHON=venv\Scripts\python.exe"
set "PY=%HYDRA_PYTHON%"
set "VALID_OUT=%TEMP%\hydra-wizard-%RANDOM%.txt"
goto :start

rem ask VAR "prompt" default: read a line (ENTER = default)
:ask
set "ASK_PROMPT=%~2"
set "ASK_DEFAULT=%~3"
set "%~1="
set /p "%~1=%~2"
if not defined %~1 set "%~1=%~3"
goto :eof

rem valid VAR CHECK [ARG...]: until hydra\wizard.py's CHECK accepts %VAR%, say why and ask again;
rem VAR becomes the accepted form.
:valid
set "VALID_VALUE="
if defined %~1 call set "VALID_VALUE=%%%~1%%"
if defined VALID_VALUE set "VALID_VALUE=%VALID_VALUE:"=%"
rem the space keeps a trailing backslash from escaping the quote; the check strips it
"%PY%" -m hydra.wizard %2 "%VALID_VALUE% " %3 %4 > "%VALID_OUT%"
set "VALID_STATUS=%ERRORLEVEL%"
if "%VALID_STATUS%"=="0" goto :valid_ok
del "%VALID_OUT%" 2>nul
if not "%VALID_STATUS%"=="1" exit /b 1
call :ask %~1 "%ASK_PROMPT%" "%ASK_DEFAULT%"
goto :valid
:valid_ok
rem the answer comes back as UTF-8
for /f "tokens=2 delims=:." %%C in ('chcp') do set /a "VALID_CP=%%C"
chcp 65001 >nul
set /p "%~1=" < "%VALID_OUT%"
chcp %VALID_CP% >nul
del "%VALID_OUT%" 2>nul
exit /b 0

rem cancel: say so and leave with status 1
:cancel
echo Cancelled.
set "STATUS=1"
goto :end

:start
if exist "%PY%" goto :have_python
echo No virtual environment found. Run install.bat first.
set "STATUS=1"
goto :end
:have_python

echo JTP-3 Hydra calibration: choose a threshold per tag from the validation data.
echo Press ENTER to accept the default shown in [brackets].
call :ask METRIC "Metric (cti, f0.5, f1, f2, f<beta>, j, p4) [cti]: " cti
call :valid METRIC metric || goto :cancel
call :ask MIN_SCORE "Minimum score [0.0]: " 0.0
call :valid MIN_SCORE number -1.0 1.0 || goto :cancel
call :ask MIN_PRECISION "Minimum precision [0.098]: " 0.098
call :valid MIN_PRECISION number 0.0 1.0 || goto :cancel
call :ask MIN_RECALL "Minimum recall [0.198]: " 0.198
call :valid MIN_RECALL number 0.0 1.0 || goto :cancel
call :ask MIN_THRESHOLD "Minimum threshold [none]: " 0.0
call :valid MIN_THRESHOLD number 0.0 1.0 || goto :cancel
call :ask MAX_THRESHOLD "Maximum threshold [none]: " 1.0
call :valid MAX_THRESHOLD number "%MIN_THRESHOLD%" 1.0 || goto :cancel
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
call :valid OK yesno || goto :cancel
if not "%OK%"=="y" goto :cancel
"%PY%" calibrate.py -m "%METRIC%" -s "%MIN_SCORE%" -p "%MIN_PRECISION%" -r "%MIN_RECALL%" -R "%MIN_THRESHOLD%" "%MAX_THRESHOLD%" %XFLAG% %TAGS%
set "STATUS=%ERRORLEVEL%"
if "%STATUS%"=="0" echo Saved calibration.csv. Tagging now uses these per-tag thresholds.
if not "%STATUS%"=="0" echo Calibration failed; see the message above.
goto :end

:end
if not defined HYDRA_EASY pause
exit /b %STATUS%
