"""The Typer commands, one module per verb (``train.py``, ``eval.py``, ...), and what they share.

Part of the command-line layer: ``cli.py`` registers each module's command on the app;
``args.py`` holds arguments several verbs take, ``output.py`` how they print, ``logs.py`` how
warnings and log records reach the terminal. Heavy imports stay inside the command functions so
that ``loracli --help`` and a bad recipe answer without importing torch.
"""
