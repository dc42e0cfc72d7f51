"""`loracli compare`: effective rank against the engine's own deltas, the table in every
format, runs without train.json, and the overlaid figure."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch

from lora_cli import rundir as rd
from lora_cli.evaluation.compare import (
    TRAIN_STATS_FILE,
    compare_runs,
    csv_text,
    markdown_table,
    summarize_run,
)
from lora_cli.evaluation.compare_plot import plot_comparison
from lora_cli.evaluation.effective_rank import (
    adapter_effective_rank,
    energy_rank,
    group_layers,
    layer_singular_values,
)
from tests.inference.conftest import METHODS, make_adapter_model
from tests.inference.runs_fixture import make_run
from tests.training._util import loracli, write_recipe


# ------------------------------------------------------------------ effective rank
def test_energy_rank_counts_the_values_holding_99_percent():
    assert energy_rank(torch.tensor([10.0, 10.0, 10.0])) == 3
    assert energy_rank(torch.tensor([10.0, 0.5, 0.1])) == 1  # 100 of 100.26 is > 99 %
    assert energy_rank(torch.tensor([1.0, 1.0, 0.0, 0.0])) == 2
    assert energy_rank(torch.zeros(4)) == 0  # an untrained LoRA (B = 0) has no update


def test_low_rank_update_of_known_spectrum():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 6))
    v, _ = torch.linalg.qr(torch.randn(30, 6))
    spectrum = torch.tensor([5.0, 4.0, 3.0, 1e-3, 1e-3, 1e-3])
    b, a = u * spectrum, v.T  # dW = B A has exactly these singular values
    values = layer_singular_values({"lora_A.weight": a, "lora_B.weight": b})
    assert torch.allclose(torch.sort(values, descending=True).values, spectrum.double(), atol=1e-6)
    assert energy_rank(values) == 3
    # AdaLoRA's E zeroes pruned triplets: they drop out of the rank
    e = torch.tensor([[1.0], [0.0], [1.0], [0.0], [0.0], [0.0]])
    assert energy_rank(layer_singular_values({"lora_A": a, "lora_B": b, "lora_E": e})) == 2


@pytest.mark.parametrize("method", METHODS)
def test_rank_matches_the_engines_delta(method, tmp_path):
    """Rebuilt from the saved file by PEFT key names == SVD of the engine's get_delta_weight."""
    model = make_adapter_model(method)
    model.save_pretrained(tmp_path)
    layers = dict(model.adapter_layers())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle, torch.no_grad():
        groups = group_layers(handle.keys())
        assert len(groups) == len(layers) == 4
        for path, keys in groups.items():
            ours = layer_singular_values({f: handle.get_tensor(k) for f, k in keys.items()})
            delta = layers[path.removeprefix("base_model.model.")].get_delta_weight("default")
            truth = torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))
            n = min(len(ours), len(truth))
            ours = torch.sort(ours, descending=True).values[:n]
            assert torch.allclose(ours / ours[0], truth[:n] / truth[0], atol=1e-6)
            assert energy_rank(ours) == energy_rank(truth)
    mean, count = adapter_effective_rank(tmp_path / "adapter_model.safetensors")
    assert count == 4 and mean >= 1
    if method in ("lora", "adalora"):
        assert mean <= 4  # B A of rank r = 4 (init_r for AdaLoRA)


# ---------------------------------------------------------------------- the table
@pytest.fixture
def old_runs(tmp_path, imagefolder):
    """Two runs as `train` wrote them before train.json existed, one with the Trainer's totals."""
    runs = [make_run(tmp_path / "runs", "alpha", imagefolder, "lora"),
            make_run(tmp_path / "runs", "=HYPERLINK(1)|x", imagefolder, "loha")]
    rd.write_json(runs[0] / rd.EVAL_FILE, {"accuracy": 0.75, "macro_f1": 0.7})
    lines = [{"step": s, "loss": 2.0 - s / 4} for s in (1, 2, 3, 4)]
    lines += [{"step": 4, "eval_accuracy": 0.75}, {"step": 4, "train_runtime": 12.5, "train_samples_per_second": 8.0}]
    (runs[0] / rd.METRICS_FILE).write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return runs


def test_rows_of_runs_without_the_new_stats(old_runs):
    first, second = compare_runs(old_runs)
    assert (first["method"], first["rank_alpha"], second["method"], second["rank_alpha"]) == ("lora", "4/8", "loha", "4/8")
    assert first["accuracy"] == 0.75 and first["macro_f1"] == 0.7
    assert first["wall_time_s"] == 12.5 and first["samples_per_second"] == 8.0  # from metrics.jsonl
    assert first["adapter_bytes"] == (old_runs[0] / "adapter" / "adapter_model.safetensors").stat().st_size
    assert first["effective_rank"] is not None and first["effective_rank_layers"] == 4
    for key in ("peak_memory_bytes", "trainable_params", "trainable_percent"):
        assert first[key] is None
    assert second["accuracy"] is None and second["wall_time_s"] is None


def test_markdown_and_csv(old_runs):
    md = markdown_table(compare_runs(old_runs)).splitlines()
    assert md[0].startswith("| run | method | rank/alpha | trainable | trainable % | adapter size | eff. rank |")
    assert "accuracy" in md[0] and "perplexity" not in md[0]  # only metrics some run has
    assert md[2].startswith("| alpha | lora | 4/8 | n/a | n/a |") and "| 0.7500 |" in md[2]
    assert "=HYPERLINK(1)\\|x" in md[3]  # a | in a run name does not open a column
    rows = list(csv.DictReader(io.StringIO(csv_text(compare_runs(old_runs)))))
    assert rows[0]["accuracy"] == "0.75" and rows[0]["peak_memory_bytes"] == "n/a"
    assert rows[1]["run"] == "'=HYPERLINK(1)|x"  # a spreadsheet shows it as text


def test_cli_formats_and_plot(old_runs, monkeypatch, capsys):
    assert loracli(monkeypatch, "compare", *old_runs, "--json") == 0
    out, errors = capsys.readouterr()
    rows = json.loads(out)
    assert [r["run"] for r in rows] == ["alpha", "=HYPERLINK(1)|x"]
    figure = old_runs[0].parent / "compare.png"
    assert not figure.exists() and "wrote" not in errors  # data formats write no figure unless --plot asks
    assert loracli(monkeypatch, "compare", *old_runs) == 0  # the table: and the figure beside the runs
    assert figure.is_file() and figure.read_bytes()[:4] == b"\x89PNG" and "compare.png" in capsys.readouterr().err
    assert loracli(monkeypatch, "compare", *old_runs, "--plot", old_runs[0].parent / "f" / "c.png") == 0
    out, _ = capsys.readouterr()
    assert "alpha" in out and "n/a" in out and (old_runs[0].parent / "f" / "c.png").is_file()
    assert loracli(monkeypatch, "compare", *old_runs, "--md", "--csv") == 2
    assert "at most one of --md, --csv and --json" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["--json", "--md", "--csv"])
def test_data_formats_leave_another_comparisons_figure_alone(old_runs, tmp_path, imagefolder, monkeypatch, capsys,
                                                            fmt):
    others = [make_run(tmp_path / "runs", name, imagefolder) for name in ("c", "d")]
    for run in others:
        (run / rd.METRICS_FILE).write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert loracli(monkeypatch, "compare", *others) == 0  # c against d: runs/compare.png
    figure = tmp_path / "runs" / "compare.png"
    theirs = figure.read_bytes()
    capsys.readouterr()
    assert loracli(monkeypatch, "compare", *old_runs, fmt) == 0  # alpha against =HYPERLINK: no figure asked for
    assert figure.read_bytes() == theirs and "wrote" not in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.is_file()) == ["compare.png"]
    assert loracli(monkeypatch, "compare", *old_runs, fmt, "--plot", tmp_path / "ab.png") == 0  # asked: written
    assert (tmp_path / "ab.png").is_file() and figure.read_bytes() == theirs


def test_not_a_run_is_bad_input(old_runs, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    assert loracli(monkeypatch, "compare", old_runs[0], tmp_path / "empty", "--no-plot") == 2
    message = capsys.readouterr().err
    assert "not a run directory" in message and "empty" in message and "loracli train" in message


def test_plot_without_curves_writes_nothing(old_runs, tmp_path):
    assert plot_comparison([old_runs[1]], ["x"], tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()


# -------------------------------------------------------------- the rank column
SAVED_CONFIGS = {  # method -> (adapter_config.json as saved, the method and rank/alpha columns)
    "lora": ({"peft_type": "LORA", "r": 16, "lora_alpha": 32}, ("lora", "16/32")),
    "dora": ({"peft_type": "LORA", "r": 8, "lora_alpha": 8, "use_dora": True}, ("dora", "8/8")),
    "adalora": ({"peft_type": "ADALORA", "r": 8, "init_r": 12, "target_r": 8, "lora_alpha": 8}, ("adalora", "12->8/8")),
    "loha": ({"peft_type": "LOHA", "r": 4, "alpha": 8}, ("loha", "4/8")),
    "lokr": ({"peft_type": "LOKR", "r": 4, "alpha": 4}, ("lokr", "4/4")),
    "trainable_tokens": ({"peft_type": "TRAINABLE_TOKENS", "token_indices": [5, 6, 7]},
                         ("trainable_tokens", "3 tokens")),
    "p_tuning": ({"peft_type": "P_TUNING", "num_virtual_tokens": 20, "encoder_hidden_size": 64},
                 ("p_tuning", "20 virtual tokens")),
    "xlora": ({"peft_type": "XLORA", "adapters": {"0": "/runs/a/adapter", "1": "/runs/b/adapter"}},
              ("xlora", "2 experts")),
}


def test_every_method_has_a_meaningful_rank_column(tmp_path):
    """The rank/alpha column comes from each method's config class: a method without a rank shows its
    own size (was None/None for trainable tokens, p-tuning and X-LoRA)."""
    from lora_cli.adapters import available_methods

    assert set(available_methods()) <= set(SAVED_CONFIGS)
    for name, (saved, columns) in SAVED_CONFIGS.items():
        (tmp_path / name / rd.ADAPTER_DIR).mkdir(parents=True)
        (tmp_path / name / rd.ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(saved))
        row = summarize_run(tmp_path / name)
        assert (row["method"], row["rank_alpha"]) == columns, name
    table = markdown_table([summarize_run(tmp_path / name) for name in SAVED_CONFIGS])
    assert "None" not in table and "| 2 experts |" in table


# ------------------------------------------------------------ a real (tiny) run
@pytest.mark.slow
def test_trained_run_records_train_stats(tmp_path, imagefolder, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", imagefolder, tmp_path / "run")
    assert loracli(monkeypatch, "train", recipe) == 0
    stats = json.loads((tmp_path / "run" / TRAIN_STATS_FILE).read_text())
    assert stats["optimizer_steps"] == 4 and stats["train_samples"] == 16  # 4 steps x batch 4 (24 rows)
    assert stats["peak_memory_kind"] == "peak_rss" and stats["peak_memory_bytes"] > 50 * 2**20
    rate, wall = stats["samples_per_second"], stats["wall_time_s"]
    assert wall > 0 and abs(rate * wall - 16) <= rate * 0.0005 + 0.001 * wall + 1e-9  # both rounded to 3 places
    assert 0 < stats["trainable_params"] < stats["all_params"]
    row = summarize_run(tmp_path / "run")
    assert row["trainable_params"] == stats["trainable_params"] and row["peak_memory_bytes"] == stats["peak_memory_bytes"]
    assert row["accuracy"] is not None and 1 <= row["effective_rank"] <= 4
