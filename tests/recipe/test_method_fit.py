"""A method that does not fit the task's models or a quantized base is a recipe error at
its own line, reported with the rest before anything loads."""

from __future__ import annotations

import importlib.util

import pytest

from lora_cli.recipe import load_recipe
from tests.recipe._util import VALID, problems_of

LORA_KEYS = "  r: 4\n  lora_alpha: 8\n  target_modules: [query, value]\n  modules_to_save: [classifier]\n"


def test_p_tuning_on_an_image_task_names_the_method_line(write):
    text = VALID.replace("  method: lora\n" + LORA_KEYS, "  method: p_tuning\n  num_virtual_tokens: 4\n")
    problems = problems_of(write(text))
    assert problems == [
        "recipe.yaml:16: adapter.method: does not work with task image-classification: p_tuning is for "
        "causal-lm, seq-cls, seq2seq (got 'p_tuning'; use method lora for this task, or change the task)"
    ]


def test_xlora_is_for_causal_lm_only(write):
    text = VALID.replace("  method: lora\n" + LORA_KEYS, "  method: xlora\n")
    problems = problems_of(write(text))
    assert any("adapter.method: does not work with task image-classification: xlora is for causal-lm" in p
               for p in problems), problems


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is in the test extra; this checks the rule that needs it installed")


@needs_bnb
def test_a_quantized_base_refuses_other_methods_and_base_rewriting_starts(write):
    quantized = VALID.replace("data:\n", "  quantization: {bits: 4}\ndata:\n", 1)
    loha = quantized.replace("  method: lora\n" + LORA_KEYS, "  method: loha\n  r: 4\n  target_modules: [query]\n")
    problems = problems_of(write(loha, "loha.yaml"))
    assert any("loha.yaml:17: adapter.method: loha does not run on a quantized base" in p for p in problems), problems
    pissa = quantized.replace("  r: 4\n", "  r: 4\n  init_lora_weights: pissa_niter_2\n", 1)
    problems = problems_of(write(pissa, "pissa.yaml"))
    assert problems == [
        "pissa.yaml:19: adapter.init_lora_weights: rewrites the base weights, which model.quantization quantizes "
        "(got 'pissa_niter_2'; use true, gaussian or orthogonal with a quantized base (loftq quantizes a "
        "full-precision base itself))"
    ]
    assert load_recipe(write(quantized, "plain.yaml")).model.quantization.bits == 4
