"""What reaches the terminal besides a command's own lines: log records, warnings, third-party banners.

Set up once per command by ``cli.main_options``: one ``warning: ...`` line per warning or log
record (user data neutralised), other packages' deprecation notices and import-time banners
only with ``--debug``, and transformers' progress bars and load reports off from the moment
transformers is imported (not before: a recipe check does not import it).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from pathlib import Path

from lora_cli.commands.output import err, shown
from lora_cli.safe_text import terminal_text

STATE = {"debug": False}
"""Whether this command runs with --debug (read by the filters and by ``cli``'s error report)."""

PACKAGE = Path(__file__).resolve().parent.parent
"""lora_cli's folder: its own warnings are always shown."""


# Start-up lines third-party packages log on import, not addressed to our users (shown with
# --debug), by logger name and the start of the message:
# - DeepSpeed prints "Setting accelerator to CPU ..." (to stdout, breaking --json) whenever it
#   is imported, and transformers' save_pretrained imports it through accelerate's
#   unwrap_model whenever it is installed, so merge and train would open with it.
# - bitsandbytes (imported by the Trainer through peft, and by quantized runs), on a CPU with
#   AVX512-BF16, asks the `kernels` package for a CPU kernel from the Hub when it is imported:
#   kernels warns that it skips the publisher trust check of
#   `kernels-community/quantization-bitsandbytes` (offline), and bitsandbytes that the kernel
#   failed to load. Its fallback computes the same results, and most runs quantize nothing.
_BANNERS = {
    "DeepSpeed": ("Setting accelerator to", "Setting ds_accelerator to"),
    "kernels._internals.hf_hub": ("Skipping publisher trust check for",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


class _BannerFilter(logging.Filter):
    """Drops the known banner records of one third-party logger unless --debug.

    A filter on the logger that makes the record (filters of a parent logger do not see its
    children's records), not a level: DeepSpeed resets its logger's level when it is
    imported, but keeps the filters, so this works whenever the package gets imported, and
    its other warnings still reach the user."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return STATE["debug"] or not str(record.msg).lstrip().startswith(self.prefixes)


def silence_banners() -> None:
    for name, prefixes in _BANNERS.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, _BannerFilter) for f in target.filters):
            target.addFilter(_BannerFilter(prefixes))



def quiet_transformers(hf_logging) -> None:
    if STATE["debug"]:  # a later command of the same process asked for everything
        return
    # transformers' per-file "Loading weights" bars are noise around our own progress
    hf_logging.disable_progress_bar()
    # its load reports ("classifier.weight MISSING") describe the head loracli adds itself
    hf_logging.set_verbosity_error()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then(module)`` once, right after the module ``name`` is first imported."""

    def __init__(self, name: str, then) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # the other finders find it; this one only wraps what they found
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            self.then(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def after_import(name: str, then) -> None:
    """``then(module)`` now if ``name`` is imported already, else right after it is (once)."""
    if name in sys.modules:
        then(sys.modules[name])
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, then))


def log_to_stderr(debug: bool) -> None:
    """One stderr handler of ours on the root logger (replacing ours from an earlier call in
    the same process, leaving any other handler, such as pytest's, in place)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_loracli", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler._loracli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if debug else _PlainFormatter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)


class _PlainFormatter(logging.Formatter):
    """``warning: message`` lines, user data neutralised (the logger's name only with --debug)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {terminal_text(record.getMessage())}"


THIRD_PARTY_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``warning:`` line each; other packages' deprecation notices (nothing a
    loracli user can act on) only with --debug, which also shows where a warning came from."""
    ours = Path(filename).resolve().is_relative_to(PACKAGE)
    if STATE["debug"]:
        err.print(f"[yellow]warning:[/yellow] {shown(str(message))} ({shown(str(filename))}:{lineno}, "
                  f"{category.__name__})", highlight=False, soft_wrap=True)
    elif ours or not issubclass(category, THIRD_PARTY_NOISE):
        err.print(f"[yellow]warning:[/yellow] {shown(str(message))}", highlight=False, soft_wrap=True)
