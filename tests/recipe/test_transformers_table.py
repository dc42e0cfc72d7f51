"""The table of transformers' facts a recipe check reads instead of importing transformers."""

from __future__ import annotations

import pytest

from lora_cli.recipe import transformers_table as tt
from lora_cli.recipe.training import check_value


def test_table_matches_installed_transformers():
    """Fails after an upgrade of transformers: run `python -m lora_cli.recipe.transformers_table`."""
    from lora_cli.recipe import transformers_facts as table

    assert tt.installed_version() == table.TRANSFORMERS_VERSION
    fields, defaults = tt.read_transformers()
    assert {name: tt.encode(a) for name, a in fields.items()} == table.FIELDS
    assert defaults == table.DEFAULTS
    assert tt.read_model_types() == table.MODEL_TYPES


SAMPLES = [1, 0, -3, 2.5, True, False, None, "no", "steps", "epoch", "adamw_torch", "cosine", "all",
           "bogus", [], ["a"], [1], {"a": 1}, "full_shard"]


def test_decoded_annotations_judge_values_as_the_real_ones():
    fields, _ = tt.read_transformers()
    table, _ = tt.training_arguments()
    assert table.keys() == fields.keys()
    for name, annotation in fields.items():
        for value in SAMPLES:
            assert check_value(value, tt.decode(tt.encode(annotation))) == check_value(value, annotation), (name, value)
            assert check_value(value, table[name]) == check_value(value, annotation), (name, value)


def test_other_transformers_version_reads_the_class(monkeypatch):
    monkeypatch.setattr(tt, "installed_version", lambda: "0.0.1")
    tt.training_arguments.cache_clear()
    tt.model_types.cache_clear()
    try:
        fields, _ = tt.training_arguments()
        assert tt._table() is None
        assert fields == tt.read_transformers()[0] and "learning_rate" in fields
        assert "vit" in tt.model_types()
    finally:
        tt.training_arguments.cache_clear()
        tt.model_types.cache_clear()


@pytest.mark.parametrize("spec", ["bogus", ["bogus"]])
def test_unknown_spec_is_refused(spec):
    with pytest.raises((KeyError, ValueError)):
        tt.decode(spec)
