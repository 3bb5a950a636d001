@echo off
rem Easy mode (spec 11): a menu for tagging folders, the web app, calibration and interactive tagging.
rem Twin of easy.sh: keep both line-for-line parallel (same prompts, same order, same defaults).
rem HYDRA_PYTHON overrides the interpreter (default venv\Scripts\python.exe).
setlocal
set "ORIG_DIR=%CD%"
cd /d "%~dp0"
if not defined HYDRA_PYTHON set "HYDRA_PYTHON=venv\Scripts\python.exe"
set "PY=%HYDRA_PYTHON%"
set "HYDRA_EASY=1"
goto :start

rem ask VAR "prompt" default: read a line (ENTER = default)
:ask
set "%~1="
set /p "%~1=%~2"
if not defined %~1 set "%~1=%~3"
goto :eof

:autotag
if not exist calibration.csv goto :ask_threshold
echo Using calibration.csv for the per-tag thresholds.
set "THRESHOLD=calibration.csv"
goto :ask_target
:ask_threshold
call :ask THRESHOLD "Threshold, -1.0 to 1.0, lower gives more tags [0.2]: " 0.2
:ask_target
call :ask TARGET "Image or folder to tag (drag and drop it here): " ""
if defined TARGET goto :have_target
echo No path given.
goto :eof
:have_target
rem drag and drop may add quotes
set "TARGET=%TARGET:"=%"
pushd "%ORIG_DIR%"
for %%I in ("%TARGET%") do set "TARGET=%%~fI"
popd
call :ask RECURSE "Include subfolders? (y/n) [n]: " n
set "RFLAG="
if /i "%RECURSE%"=="y" set "RFLAG=-r"
"%PY%" inference.py -t "%THRESHOLD%" %RFLAG% "%TARGET%"
goto :eof

:app
echo Starting the web interface. Open the URL it prints in your browser; press Ctrl+C to stop.
"%PY%" app.py
goto :eof

:update
git pull
if errorlevel 1 echo Update failed. Is git installed, and is this folder a git clone?
goto :eof

:start
if exist "%PY%" goto :installed
echo First run: installing JTP-3 Hydra into venv\ ...
call install.bat
if not errorlevel 1 goto :installed
echo Installation failed; see the messages above.
pause
exit /b 1
:installed

echo JTP-3 Hydra easy mode
:menu
echo.
echo   autotag      write .txt tag files for an image or a folder
echo   app          start the web interface
echo   calibrate    choose per-tag thresholds, saved as calibration.csv
echo   interactive  tag images one at a time
echo   update       update this folder with git pull
echo   exit
call :ask CHOICE "What would you like to do? " ""
if /i "%CHOICE%"=="autotag" call :autotag & goto :menu
if /i "%CHOICE%"=="inference" call :autotag & goto :menu
if /i "%CHOICE%"=="app" call :app & goto :menu
if /i "%CHOICE%"=="calibrate" call calibrate.bat & goto :menu
if /i "%CHOICE%"=="interactive" "%PY%" inference.py & goto :menu
if /i "%CHOICE%"=="update" call :update & goto :menu
if /i "%CHOICE%"=="exit" exit /b 0
if defined CHOICE echo Unknown choice '%CHOICE%'.
goto :menu
