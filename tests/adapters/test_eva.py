"""EVA (init_lora_weights: eva) against PEFT's: the same components, the same ranks.

PEFT's incremental PCA is deterministic given the batches (a seeded randomized SVD and
fixed signs), so both sides must agree exactly on the same activations: the same rank per
layer after the redistribution, the same rank_pattern / alpha_pattern, and the same A.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.config import EvaConfig
from peft.tuners.lora.eva import initialize_lora_eva_weights

from lora_cli.adapters import AdapterModel, LoraConfig, get_adapter_model
from lora_cli.adapters.methods.lora.eva import (
    IncrementalSVD,
    get_eva_state_dict,
    initialize_eva_weights,
    load_eva_state_dict,
)
from lora_cli.errors import AdapterConfigError, UserInputError
from tests.helpers import tiny_gpt2


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def lm_batches(n: int = 6, vocab: int = 64, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Padded causal-LM batches: padding and ignored labels must be left out of the SVD."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (4, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 9:] = 0
        labels = ids.clone()
        labels[mask == 0] = -100
        labels[1, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def both(base, targets, eva, batches, r=4, alpha=8, **extra):
    """(PEFT model, our model) with EVA run on the same batches."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(**eva), **extra))
        initialize_lora_eva_weights(theirs, batches, show_progress_bar=False)
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="eva", eva_config=eva, **extra))
    ranks = initialize_eva_weights(ours, batches)
    return theirs, ours, ranks


def assert_same(theirs, ours):
    expected = peft.get_peft_model_state_dict(theirs)
    got = ours.get_adapter_state_dict("default")
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=1e-6, msg=key)
    pc, oc = theirs.peft_config["default"], ours.peft_config["default"]
    assert oc.rank_pattern == pc.rank_pattern
    assert oc.alpha_pattern == pytest.approx(pc.alpha_pattern)


@pytest.mark.parametrize("rho", [1.0, 2.0])
def test_llama_ranks_and_components_equal_peft(rho):
    """q/k/v share their input (one SVD for the three), o/up/down do not: redistribution moves ranks."""
    base = tiny_llama()
    theirs, ours, ranks = both(base, LLAMA_TARGETS, {"rho": rho, "tau": 0.9}, lm_batches())
    assert_same(theirs, ours)
    assert sum(ranks.values()) == 4 * len(ranks)  # the budget is kept
    if rho == 1.0:
        assert set(ranks.values()) == {4}
    else:
        assert ours.peft_config["default"].rank_pattern, "rho 2 should move ranks on these activations"
    # A is non-zero and B zero: the model starts as the base
    layer = ours.base_model.get_submodule("model.layers.0.self_attn.o_proj")
    assert layer.lora_A["default"].abs().sum() > 0
    ids = lm_batches(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits)


def test_gpt2_conv1d_without_scaling_adjustment_equals_peft():
    base = tiny_gpt2()
    batches = lm_batches(vocab=99)
    theirs, ours, _ = both(base, ["c_attn", "c_proj", "c_fc"], {"rho": 2.0, "tau": 0.9, "adjust_scaling_factors": False},
                           batches)
    assert_same(theirs, ours)
    assert ours.peft_config["default"].alpha_pattern == {}


def test_whiten_and_no_label_mask_equal_peft():
    """Whitening on layers with distinct inputs (PEFT whitens a shared SVD in place, twice
    for the layers that share it; here each layer's A is whitened once)."""
    base = tiny_llama()
    theirs, ours, _ = both(base, ["o_proj", "down_proj"], {"rho": 2.0, "tau": 0.9, "whiten": True,
                                                           "use_label_mask": False}, lm_batches())
    assert_same(theirs, ours)


def test_label_mask_changes_the_components():
    base = tiny_llama()
    batches = lm_batches()
    for b in batches:
        b["labels"][:, :6] = -100
    masked = get_eva_state_dict(_model(base, {"tau": 0.9}), batches)
    unmasked = get_eva_state_dict(_model(base, {"tau": 0.9, "use_label_mask": False}), batches)
    key = "model.layers.0.self_attn.o_proj"
    assert not torch.allclose(masked[key], unmasked[key][: masked[key].shape[0]], atol=1e-3)


def _model(base, eva, targets=("o_proj", "down_proj"), r=4) -> AdapterModel:
    return get_adapter_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=8, target_modules=list(targets),
                                                             init_lora_weights="eva", eva_config=eva))


def test_rank_zero_removes_the_adapter_and_peft_loads_the_result(tmp_path):
    """A layer EVA gives no rank is not adapted: not saved, not a target, and PEFT loads the rest."""
    base = tiny_llama()
    model = _model(base, {"tau": 0.9})
    state = get_eva_state_dict(model, lm_batches())
    keep = "model.layers.0.self_attn.o_proj"
    dropped = "model.layers.1.mlp.down_proj"
    state[keep] = torch.cat([state[keep], torch.randn(2, 32)])[:6]  # rank 6 there
    state[dropped] = state[dropped][:0]
    ranks = load_eva_state_dict(model, state)
    assert ranks[dropped] == 0 and ranks[keep] == 6
    assert dropped not in model.targets["default"]
    assert not hasattr(model.base_model.get_submodule(dropped), "lora_A")
    config = model.peft_config["default"]
    assert config.rank_pattern[keep] == 6 and config.alpha_pattern[keep] == pytest.approx(12.0)
    with torch.no_grad():  # a non-zero delta, so equal logits mean equal adapters
        for _, layer in model.adapter_layers():
            layer.lora_B["default"].normal_()
    model.save_pretrained(tmp_path)
    ids = lm_batches(1)[0]["input_ids"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    ours = AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_peft_eva_adapter_loads_here(tmp_path):
    base = tiny_llama()
    theirs, _, _ = both(base, LLAMA_TARGETS, {"rho": 2.0, "tau": 0.9}, lm_batches())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_()
    theirs.save_pretrained(tmp_path)
    ours = AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = lm_batches(1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_incremental_svd_matches_a_full_svd_of_all_rows():
    rows = torch.randn(120, 10, generator=torch.Generator().manual_seed(3)) * 0.5 ** torch.arange(10.0)
    svd = IncrementalSVD(k=3)
    for part in rows.split(40):
        svd.update(part, tau=0.99)
    _, s, vh = torch.linalg.svd(rows - rows.mean(0), full_matrices=False)
    cos = torch.nn.functional.cosine_similarity(svd.components.float(), vh[:3]).abs()
    assert cos.min() > 0.999
    torch.testing.assert_close(svd.singular_values.float(), s[:3], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("eva", "match"),
    [
        ({"rho": 0.5}, r"rho.*>= 1\.0"),
        ({"tau": 1.5}, r"tau.*between 0\.0 and 1\.0"),
        ({"whiten": "yes"}, r"whiten.*true or false"),
        ({"rhoo": 2}, r"rhoo.*not among the EVA settings.*rho"),
    ],
)
def test_bad_eva_config_is_refused(eva, match):
    with pytest.raises(AdapterConfigError, match=match):
        LoraConfig(init_lora_weights="eva", eva_config=eva)


def test_eva_config_needs_the_eva_init():
    with pytest.raises(AdapterConfigError, match="eva_config.*only used with init_lora_weights: eva"):
        LoraConfig(init_lora_weights=True, eva_config={"rho": 2})


def test_more_components_than_inputs_is_a_clear_error():
    model = _model(tiny_llama(), {"rho": 10.0}, r=4)
    with pytest.raises(UserInputError, match=r"r \* rho = 40 components.*only 32 inputs"):
        initialize_eva_weights(model, lm_batches(2))


def test_no_batches_and_wrong_init_are_refused():
    model = _model(tiny_llama(), {})
    with pytest.raises(UserInputError, match="at least one calibration batch"):
        initialize_eva_weights(model, [])
    plain = get_adapter_model(tiny_llama(), LoraConfig(r=4, target_modules=["o_proj"]))
    with pytest.raises(UserInputError, match="init_lora_weights='eva'"):
        initialize_eva_weights(plain, lm_batches(1))


def test_batches_too_small_for_the_components_are_refused_before_the_passes():
    """Before: 100 passes over the one batch, every one skipped, then "did not converge". Now: refused after
    the one forward that finds which layers share inputs, naming what EVA needs (k token rows per batch)."""
    model = _model(tiny_llama(), {"rho": 2.0}, r=8)  # 16 components per layer
    ids = torch.arange(1, 11).view(1, 10)
    one_row = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}]  # 10 tokens
    forwards = []

    def forward(m, batch):
        forwards.append(1)
        return m(**batch)

    with pytest.raises(UserInputError, match=r"EVA needs at least 16 token rows in a calibration batch "
                                             r"\(r 8 x eva_config.rho 2.0\) for model\.layers\.0\..*; the largest of "
                                             r"the 1 batch\(es\) gives 10\. .*more training rows or a larger "
                                             r"training.per_device_train_batch_size"):
        initialize_eva_weights(model, one_row, forward=forward)
    assert len(forwards) <= 1


def test_images_too_few_for_the_components_are_refused_after_one_forward():
    """Image batches carry no token mask: the rows are counted in the first forward (17 per tiny-ViT image)."""
    from tests.helpers import tiny_vit

    model = get_adapter_model(tiny_vit(), LoraConfig(r=16, target_modules=["query", "value"],
                                                     init_lora_weights="eva", eva_config={"rho": 2.0}))
    one_image = [{"pixel_values": torch.randn(1, 3, 32, 32)}]
    with pytest.raises(UserInputError, match=r"EVA needs at least 32 token rows .* gives 17\."):
        initialize_eva_weights(model, one_image)
