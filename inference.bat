@echo off
rem Run inference.py inside the virtual environment with all arguments passed through (spec 11).
rem Example: inference.bat -t 0.2 -r C:\pictures   (inference.bat --help lists every option)
setlocal
if exist "%~dp0venv\Scripts\activate.bat" goto :have_venv
echo No virtual environment found. Run install.bat first.
exit /b 1
:have_venv
call "%~dp0venv\Scripts\activate.bat"
python "%~dp0inference.py" %*
exit /b %ERRORLEVEL%
