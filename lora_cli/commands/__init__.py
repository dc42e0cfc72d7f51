"""Typer commands of the verbs beyond train / eval / merge / predict, one module each.

Part of the command-line layer: ``cli.py`` registers each module's command on the app.
Heavy imports stay inside the command functions so that ``loracli --help`` stays fast.
"""
