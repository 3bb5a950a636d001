@echo off
rem Install JTP-3 Hydra (spec 11): check Python >= 3.11, create venv\, install requirements.txt into it.
rem Safe to rerun: a working venv\ is reused (and its packages updated); a venv\ this run created is removed
rem again if the installation fails.
rem Twin of install.sh: keep both line-for-line parallel (same messages, same order).
rem PYTHON picks the interpreter that creates the venv (default: python).
setlocal
cd /d "%~dp0"
if not defined PYTHON set "PYTHON=python"
"%PYTHON%" --version >nul 2>&1
if not errorlevel 1 goto :have_python
echo Python was not found. Install Python 3.11 or newer, then run this again.
goto :fail
:have_python
"%PYTHON%" --version
"%PYTHON%" -c "import sys; sys.exit(sys.version_info < (3, 11))"
if not errorlevel 1 goto :version_ok
echo JTP-3 Hydra needs Python 3.11 or newer. Install it, then run this again,
echo e.g. set PYTHON=C:\Python312\python.exe and run install.bat
goto :fail
:version_ok

set "VENV_PY=venv\Scripts\python.exe"
set "CREATED=0"
if not exist venv goto :create
"%VENV_PY%" -c "import sys; sys.exit(sys.version_info < (3, 11))" >nul 2>&1
if errorlevel 1 goto :recreate
echo Reusing the virtual environment in venv\.
goto :install
:recreate
echo venv\ exists but does not work; creating it again.
rmdir /s /q venv
:create
echo Creating a virtual environment in venv\ ...
"%PYTHON%" -m venv venv
if not errorlevel 1 goto :created
echo Could not create venv\.
if exist venv rmdir /s /q venv
goto :fail
:created
set "CREATED=1"
:install
echo Installing requirements, this can take a while ...
rem the CUDA 12.8 index supplies GPU builds of torch on Windows, as the original installer does
"%VENV_PY%" -m pip install -r requirements.txt --extra-index-url https://download.pytorch.org/whl/cu128
if not errorlevel 1 goto :done
echo Installation failed; see the messages above.
if "%CREATED%"=="1" rmdir /s /q venv
if "%CREATED%"=="1" echo Removed the incomplete venv\.
goto :fail
:done
echo Installation complete.
if not defined HYDRA_EASY pause
exit /b 0
:fail
if not defined HYDRA_EASY pause
exit /b 1
