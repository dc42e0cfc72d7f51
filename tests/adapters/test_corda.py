"""CorDA (init_lora_weights: corda) against PEFT's: the same adapter and base weights.

PEFT hooks one unpadded sample per forward; the same batches of one sample give both
sides the same covariances, so A, B and the residual base W - s B A must match exactly.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda

from lora_cli.adapters import AdapterModel, LoraConfig, get_adapter_model
from lora_cli.adapters.methods.lora.corda import collect_covariances, preprocess_corda
from lora_cli.errors import AdapterConfigError, TargetingError, UserInputError
from tests.adapters.test_eva import tiny_llama
from tests.helpers import tiny_gpt2, tiny_vit


def samples(n: int = 6, vocab: int = 64, length: int = 40, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (1, length), generator=g)} for _ in range(n)]


def both(base, targets, corda, batches, r=4, alpha=8):
    theirs_base = copy.deepcopy(base)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="corda",
                             corda_config=CordaConfig(**corda))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_preprocess_corda(theirs_base, config, run_model=lambda: [theirs_base(**b) for b in batches])
        theirs = peft.get_peft_model(theirs_base, config)
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                             init_lora_weights="corda", corda_config=corda))
    ranks = preprocess_corda(ours, batches)
    return theirs, ours, ranks


def assert_same(theirs, ours, atol=1e-6, adapter_atol=1e-6):
    expected = peft.get_peft_model_state_dict(theirs)
    got = ours.get_adapter_state_dict("default")
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=adapter_atol, msg=key)
    theirs_base = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items() if "base_layer" in k}
    ours_base = {k: v for k, v in ours.base_model.state_dict().items() if "base_layer" in k}
    assert sorted(ours_base) == sorted(theirs_base)
    for key, tensor in theirs_base.items():
        torch.testing.assert_close(ours_base[key], tensor, rtol=0, atol=atol, msg=key)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_llama_adapter_and_base_equal_peft(method):
    base = tiny_llama()
    theirs, ours, ranks = both(base, ["q_proj", "v_proj", "o_proj", "down_proj"], {"corda_method": method}, samples())
    assert_same(theirs, ours)
    assert set(ranks.values()) == {4}
    layer = ours.base_model.get_submodule("model.layers.0.self_attn.q_proj")
    assert not torch.equal(layer.base_layer.weight, base.get_submodule("model.layers.0.self_attn.q_proj").weight)
    ids = samples(1)[0]["input_ids"]
    with torch.no_grad():  # W' + s B A = W: the model starts as the base
        torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_gpt2_conv1d_equal_peft():
    base = tiny_gpt2()
    theirs, ours, _ = both(base, ["c_attn", "c_fc"], {"corda_method": "kpm"}, samples(vocab=99))
    assert_same(theirs, ours)


def test_padding_is_left_out_of_the_covariance():
    base = tiny_llama()
    model = get_adapter_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights="corda"))
    ids = samples(2, length=10)
    padded = [{"input_ids": torch.cat([b["input_ids"], torch.zeros(1, 5, dtype=torch.long)], 1),
               "attention_mask": torch.cat([torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], 1)}
              for b in ids]
    clean = collect_covariances(model, ids)
    masked = collect_covariances(model, padded)
    for key in clean:
        torch.testing.assert_close(masked[key], clean[key], atol=1e-5, rtol=1e-4)


def test_covariance_and_cache_files_are_written_and_reused(tmp_path):
    """PEFT's files: a covariance file PEFT wrote gives the same start here, and a cache makes
    the batches unnecessary."""
    base = tiny_llama()
    batches = samples()
    cov_file, cache_file = tmp_path / "cov.pt", tmp_path / "cache.pt"
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights="corda",
                             corda_config=CordaConfig(covariance_file=str(cov_file)))
    theirs_base = copy.deepcopy(base)
    peft_preprocess_corda(theirs_base, config, run_model=lambda: [theirs_base(**b) for b in batches])
    theirs = peft.get_peft_model(theirs_base, config)
    assert cov_file.is_file()
    settings = {"covariance_file": str(cov_file), "cache_file": str(cache_file)}
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"],
                                                             init_lora_weights="corda", corda_config=settings))
    preprocess_corda(ours, None)  # everything from PEFT's covariance file
    assert_same(theirs, ours)
    assert cache_file.is_file()
    again = get_adapter_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"],
                                                              init_lora_weights="corda",
                                                              corda_config={"cache_file": str(cache_file)}))
    preprocess_corda(again, None)
    assert_same(theirs, again)
    other_rank = get_adapter_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights="corda",
                                                                   corda_config={"cache_file": str(cache_file)}))
    with pytest.raises(UserInputError, match="another layer shape or rank.*delete corda_config.cache_file"):
        preprocess_corda(other_rank, None)


def test_saved_adapter_loads_in_peft_on_the_original_base(tmp_path):
    """Saved relative to the untouched base (rank 2r: the start folded in), PEFT and loracli
    load it on the original weights and give the trained model's logits."""
    base = tiny_llama()
    _, ours, _ = both(base, ["q_proj", "v_proj"], {"corda_method": "ipm"}, samples())
    with torch.no_grad():  # "training": the factors move away from their start
        for _, layer in ours.adapter_layers():
            layer.lora_A["default"].add_(0.05 * torch.randn_like(layer.lora_A["default"]))
            layer.lora_B["default"].add_(0.05 * torch.randn_like(layer.lora_B["default"]))
    ours.save_pretrained(tmp_path, convert_to_original_base=True)
    ids = samples(1)[0]["input_ids"]
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        here = AdapterModel.from_pretrained(copy.deepcopy(base), tmp_path)
        torch.testing.assert_close(here(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_corda_refuses_convolutions():
    with pytest.raises(TargetingError, match="corda.*Linear and GPT-2 Conv1D layers only"):
        get_adapter_model(tiny_vit(), LoraConfig(r=4, target_modules=["projection"], init_lora_weights="corda"))


@pytest.mark.parametrize(
    ("corda", "match"),
    [
        ({"corda_method": "xpm"}, r"corda_method.*'ipm' or 'kpm'"),
        ({"verbose": 1}, r"verbose.*true or false"),
        ({"cache": "x"}, r"cache.*not among the CorDA settings"),
    ],
)
def test_bad_corda_config_is_refused(corda, match):
    with pytest.raises(AdapterConfigError, match=match):
        LoraConfig(init_lora_weights="corda", corda_config=corda)


def test_corda_without_data_or_files_is_refused():
    model = get_adapter_model(tiny_llama(), LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights="corda"))
    with pytest.raises(UserInputError, match="needs calibration batches"):
        preprocess_corda(model, None)


def _padded_batches(rows: int = 4, n: int = 8, vocab: int = 64, seed: int = 2):
    """(the samples alone, the same samples in right-padded batches of ``rows``): lengths 9..40."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(9, 41, (n,), generator=g).tolist()
    alone = [{"input_ids": torch.randint(0, vocab, (1, n_tok), generator=g)} for n_tok in lengths]
    batches = []
    for start in range(0, n, rows):
        group = alone[start:start + rows]
        width = max(s["input_ids"].shape[1] for s in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for i, s in enumerate(group):
            ids[i, :s["input_ids"].shape[1]] = s["input_ids"][0]
            mask[i, :s["input_ids"].shape[1]] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return alone, batches


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_padded_batches_of_four_match_peft_one_sample_per_forward(method, tmp_path):
    """The covariance is a mean over samples, each scaled by its own max as PEFT's per-sample
    forwards scale it: batching (and padding) the same samples changes only float rounding."""
    base = tiny_llama()
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    alone, batches = _padded_batches()
    assert len(batches) == 2 and all(b["input_ids"].shape[0] == 4 for b in batches)
    assert all((b["attention_mask"] == 0).any() for b in batches)  # real padding in every batch
    theirs_base = copy.deepcopy(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=method, covariance_file=str(tmp_path / "c.pt")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_preprocess_corda(theirs_base, config, run_model=lambda: [theirs_base(**b) for b in alone])
        theirs = peft.get_peft_model(theirs_base, config)
    ours = get_adapter_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                             init_lora_weights="corda", corda_config={"corda_method": method}))
    covariances = collect_covariances(ours, batches)
    for path, expected in torch.load(tmp_path / "c.pt", weights_only=True).items():
        # batched matmuls and another summation order: float32 rounding only (was 1e-2 relative per forward)
        torch.testing.assert_close(covariances[path], expected, rtol=0, atol=1e-6 * expected.abs().max().item())
    preprocess_corda(ours, batches)
    # the decomposition amplifies that rounding (kpm most: its smallest components are the least stable)
    assert_same(theirs, ours, atol=2e-5, adapter_atol=5e-4)
