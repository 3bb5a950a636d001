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
rem VAR becomes the accepted form. Fails (errorlevel 1) on an empty path.
:valid
set "VALID_VALUE="
if defined %~1 call set "VALID_VALUE=%%%~1%%"
if defined VALID_VALUE set "VALID_VALUE=%VALID_VALUE:"=%"
rem the space keeps a trailing backslash (C:\pics\) from escaping the quote; the check strips it
"%PY%" -m hydra.wizard %2 "%VALID_VALUE% " %3 %4 > "%VALID_OUT%"
set "VALID_STATUS=%ERRORLEVEL%"
if "%VALID_STATUS%"=="0" goto :valid_ok
del "%VALID_OUT%" 2>nul
if not "%VALID_STATUS%"=="1" exit /b 1
call :ask %~1 "%ASK_PROMPT%" "%ASK_DEFAULT%"
goto :valid
:valid_ok
rem the answer comes back as UTF-8, so non-ASCII paths survive
for /f "tokens=2 delims=:." %%C in ('chcp') do set /a "VALID_CP=%%C"
chcp 65001 >nul
set /p "%~1=" < "%VALID_OUT%"
chcp %VALID_CP% >nul
del "%VALID_OUT%" 2>nul
exit /b 0

:autotag
if not exist calibration.csv goto :ask_threshold
echo Using calibration.csv for the per-tag thresholds.
set "THRESHOLD=calibration.csv"
goto :ask_target
:ask_threshold
call :ask THRESHOLD "Threshold, -1.0 to 1.0, lower gives more tags [0.2]: " 0.2
call :valid THRESHOLD number -1.0 1.0 || goto :eof
:ask_target
call :ask TARGET "Image or folder to tag (drag and drop it here): " ""
rem quotes and file:// URLs from drag and drop are undone; a missing path is asked again
call :valid TARGET path "%ORIG_DIR%"
if not errorlevel 1 goto :have_target
echo No path given.
goto :eof
:have_target
call :ask RECURSE "Include subfolders? (y/n) [n]: " n
call :valid RECURSE yesno || goto :eof
set "RFLAG="
if "%RECURSE%"=="y" set "RFLAG=-r"
call :ask PREFIX "Tags to write first in every caption, e.g. a trigger word (ENTER for none): " ""
rem quotes would end -p's argument early in easy.bat; both twins write the tags without them
if defined PREFIX set "PREFIX=%PREFIX:"=%"
set "PFLAG="
if defined PREFIX set PFLAG=-p "%PREFIX%"
"%PY%" inference.py -t "%THRESHOLD%" %RFLAG% %PFLAG% "%TARGET%"
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
rem menu answers are case-insensitive (if /i) and may have spaces around them
if defined CHOICE for /f "tokens=1" %%C in ("%CHOICE%") do set "CHOICE=%%C"
if /i "%CHOICE%"=="autotag" call :autotag & goto :menu
if /i "%CHOICE%"=="inference" call :autotag & goto :menu
if /i "%CHOICE%"=="app" call :app & goto :menu
if /i "%CHOICE%"=="calibrate" call calibrate.bat & goto :menu
if /i "%CHOICE%"=="interactive" "%PY%" inference.py & goto :menu
if /i "%CHOICE%"=="update" call :update & goto :menu
if /i "%CHOICE%"=="exit" exit /b 0
if defined CHOICE echo Unknown choice '%CHOICE%'.
goto :menu
