"""loracli's benchmarks: an adapter's training step against PEFT and against the frozen base.

Run everything with ``python -m bench`` (or ``make bench``). Figures are ratios of medians
of interleaved runs in one process, never absolute times: see bench/README.md.
"""
