"""`python -m bench.quickstart`: the one source of the quickstart figures README quotes (read from
the runs' own records; nothing is timed here), and README quoting them from it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bench.quickstart import Run, machine, read_run, readme_row, table

ROOT = Path(__file__).resolve().parents[1]
HOST = {"cpu": "AMD EPYC", "cores": "2", "vector": "avx2 fma", "torch": "2.14.1", "kernels": "AVX2", "threads": "2"}
ROW = re.compile(r"^\| \d{4}-\d{2}-\d{2} \| .+ \| torch \S+ \| \d\.\d{4}.* \| \d+ s \| \d+ s \|$")


def test_figures_come_from_the_runs_records(tmp_path):
    run = tmp_path / "round-1"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"accuracy": 0.95556, "macro_f1": 0.95}))
    (run / "train.json").write_text(json.dumps({"wall_time_s": 14.06, "samples_per_second": 612.34}))
    first = read_run(run, "round 1", 37.61, {})
    assert first == Run("round 1", "auto", 0, 0.95556, 37.61, 14.06, 612.34)
    runs = [first, Run("round 2", "auto", 0, 0.95556, 36.4, 13.9, 620.0),
            Run("kernels default", "default", 0, 0.9472, 80.0, 40.0, 200.0)]
    assert "| round 1 | AVX2 | 2 | 0.9556 | 37.6 | 14.1 | 612.3 |" in table(runs, HOST)
    assert "| kernels default | default | 2 | 0.9472 |" in table(runs, HOST)
    row = readme_row(runs, HOST, "2026-12-07")
    assert row == ("| 2026-12-07 | AMD EPYC, 2 cores, AVX2 | torch 2.14.1 | 0.9556 (0.9472-0.9556 across kernels / "
                   "threads) | 37 s | 14 s |")
    assert ROW.match(row)


def test_machine_names_the_cpu_and_torch():
    import torch

    host = machine()
    assert host["torch"] == torch.__version__ and int(host["cores"]) >= 1 and host["kernels"]


def test_readme_quotes_the_quickstart_once_from_the_script():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = [line for line in readme.splitlines() if ROW.match(line)]
    assert len(rows) >= 1, "README's quickstart table has no row in bench.quickstart's format"
    assert "python -m bench.quickstart" in readme
    quickstart = readme[readme.index("`make quickstart` then runs"):readme.index("## Recipes")]
    assert "deterministic" not in quickstart  # the same on one machine, not across machines
    assert [row for row in rows if row in quickstart], "the quickstart section holds no row of the script"
    prose = [line for line in quickstart.splitlines() if not line.startswith("|")]
    assert not [line for line in prose if re.search(r"\b0\.9\d{2,4}\b", line)], "accuracy quoted outside the table"


def test_compare_table_reads_trainable_params_from_train_json(tmp_path):
    from bench.quickstart import compare_table

    run = tmp_path / "lora"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"accuracy": 0.9611}))
    (run / "train.json").write_text(json.dumps({"wall_time_s": 101.2, "samples_per_second": 28.4,
                                                "trainable_params": 155146}))
    lora = read_run(run, "DINOv2-S, LoRA", 150.0, {})
    lora.cpu_s = 230.4
    assert lora.trainable == 155146
    assert "| DINOv2-S, LoRA | 0.9611 | 155,146 | 101 s | 230 s |" in compare_table([lora])
