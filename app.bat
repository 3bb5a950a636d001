@echo off
rem Start the JTP-3 Hydra web interface (spec 11) inside the virtual environment.
cd /d "%~dp0"
if exist venv\Scripts\activate.bat goto :have_venv
echo No virtual environment found. Run install.bat first.
pause
exit /b 1
:have_venv
call venv\Scripts\activate.bat
echo Starting the JTP-3 Hydra web interface. Loading the model takes a moment.
echo When it prints a local URL, such as http://127.0.0.1:7860, open it in your browser.
echo The link is not shared publicly. Close this window or press Ctrl+C to stop.
python app.py %*
pause
