"""Damaged and hostile adapter files: each is a clear UserInputError naming the file, never
a traceback, and nothing in them is ever unpickled beyond plain tensors."""

from __future__ import annotations

import json
import os
import pickle
import re

import pytest
import torch

from lora_cli.adapters import AdapterModel, LoraConfig, get_adapter_model
from lora_cli.adapters.config import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig
from lora_cli.adapters.tensor_files import AdapterFileError, read_adapter_weights
from lora_cli.errors import AdapterConfigError, NonFiniteError, UserInputError
from tests.helpers import tiny_opt

INPUTS = {"input_ids": torch.arange(2, 10).reshape(1, 8)}


@pytest.fixture
def saved(tmp_path):
    """A real adapter folder (config + safetensors) and the logits it gives."""
    model = get_adapter_model(tiny_opt(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        logits = model(**INPUTS).logits
    return tmp_path / "adapter", logits


# ------------------------------------------------------------------ safetensors
@pytest.mark.parametrize("damage", ["truncated", "zero-byte", "random", "header-only"])
def test_damaged_safetensors_is_a_clear_user_error(saved, damage):
    folder, _ = saved
    file = folder / WEIGHTS_NAME
    data = file.read_bytes()
    file.write_bytes({
        "truncated": data[: len(data) // 2],
        "zero-byte": b"",
        "random": os.urandom(4096),
        "header-only": data[:20],
    }[damage])
    with pytest.raises(AdapterFileError, match="truncated or corrupt safetensors file") as info:
        AdapterModel.from_pretrained(tiny_opt(), folder)
    message = str(info.value)
    assert isinstance(info.value, UserInputError) and info.value.exit_code == 2
    assert str(file) in message and "re-save the adapter" in message and "train it again" in message


def test_missing_weights_names_both_formats(saved):
    folder, _ = saved
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(UserInputError, match=r"no adapter_model\.safetensors \(nor PEFT's legacy adapter_model\.bin\)"):
        AdapterModel.from_pretrained(tiny_opt(), folder)


# ------------------------------------------------------------------ pickles (.bin)
class _RunsCode:
    """Unpickling this calls os.system: the attack a .bin file can carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _as_bin(folder):
    """Swap the safetensors file for PEFT's legacy pickle format, as PEFT writes it."""
    from safetensors.torch import load_file

    state = load_file(folder / WEIGHTS_NAME)
    (folder / WEIGHTS_NAME).unlink()
    return state


def test_plain_tensor_bin_loads_like_safetensors(saved):
    folder, logits = saved
    state = _as_bin(folder)
    torch.save(state, folder / "adapter_model.bin")  # what PEFT's save_pretrained(safe_serialization=False) does
    loaded = AdapterModel.from_pretrained(tiny_opt(), folder)
    with torch.no_grad():
        assert torch.allclose(loaded(**INPUTS).logits, logits, atol=1e-6)


@pytest.mark.parametrize("how", ["torch.save", "raw pickle", "legacy torch.save"])
def test_code_running_pickle_is_refused_and_never_run(saved, tmp_path, how):
    folder, _ = saved
    state = _as_bin(folder)
    marker = tmp_path / "PWNED"
    bin_file = folder / "adapter_model.bin"
    if how == "torch.save":
        torch.save({**state, "payload": _RunsCode(marker)}, bin_file)
    elif how == "legacy torch.save":
        torch.save({**state, "payload": _RunsCode(marker)}, bin_file, _use_new_zipfile_serialization=False)
    else:
        bin_file.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(AdapterFileError, match="loracli never unpickles such objects, because loading them can run code") as info:
        AdapterModel.from_pretrained(tiny_opt(), folder)
    assert not marker.exists(), "the pickle payload ran"
    message = str(info.value)
    assert str(bin_file) in message and "safe_serialization=True" in message
    assert "weights_only" not in message  # torch's advice to retry unsafely is never passed on


@pytest.mark.parametrize("damage", ["truncated", "zero-byte"])
def test_damaged_bin_is_truncated_or_corrupt(saved, damage):
    folder, _ = saved
    state = _as_bin(folder)
    bin_file = folder / "adapter_model.bin"
    torch.save(state, bin_file)
    data = bin_file.read_bytes()
    bin_file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(AdapterFileError, match="truncated or corrupt PyTorch weights file") as info:
        read_adapter_weights(folder)
    assert str(bin_file) in str(info.value) and "weights_only" not in str(info.value)


@pytest.mark.parametrize("content", [torch.ones(3), {"a": 1}, [torch.ones(2)]])
def test_bin_that_is_not_a_tensor_dict_is_refused(saved, content):
    folder, _ = saved
    _as_bin(folder)
    torch.save(content, folder / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="not an adapter state dict"):
        read_adapter_weights(folder)


# ------------------------------------------------------------------ adapter_config.json
def _write_config(folder, text: str | bytes) -> None:
    path = folder / CONFIG_NAME
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", r"not valid UTF-8 JSON"),
        (b"\xff\xfe\x00 binary", r"not valid UTF-8 JSON"),
        ("[" * 50_000, r"not valid UTF-8 JSON"),
        ('[{"peft_type": "LORA"}]', r"expected a JSON object .* found a JSON list"),
        ('"LORA"', r"found a JSON string"),
        ('{"r": 4, "target_modules": ["q_proj"]}', r"no 'peft_type' key.*Add \"peft_type\": one of ADALORA, LOHA, LOKR, LORA"),
        ('{"peft_type": "PROMPT_TUNING"}', r"key 'peft_type': unknown adapter method 'PROMPT_TUNING'; loracli loads ADALORA"),
        ('{"peft_type": 7}', r"'peft_type' must be a string"),
        ('{"peft_type": "LORA", "r": "four", "target_modules": ["q_proj"]}', r"(?s)invalid lora adapter config.*- r: must be an integer"),
        ('{"peft_type": "LORA", "lora_alpha": [1], "target_modules": ["q_proj"]}', r"- lora_alpha: must be a number"),
        ('{"peft_type": "LORA", "target_modules": 5}', r"- target_modules: must be a list of module names"),
        ('{"peft_type": "LORA", "rank_pattern": [], "target_modules": ["q_proj"]}', r"- rank_pattern: must be a mapping"),
    ],
)
def test_malformed_adapter_config_names_file_and_key(saved, text, expected):
    folder, _ = saved
    _write_config(folder, text)
    with pytest.raises(UserInputError, match=expected) as info:
        AdapterModel.from_pretrained(tiny_opt(), folder)
    assert str(info.value).startswith(str(folder / CONFIG_NAME))


def test_config_problems_stay_adapter_config_errors(saved):
    folder, _ = saved
    data = json.loads((folder / CONFIG_NAME).read_text())
    _write_config(folder, json.dumps(data | {"r": 0, "lora_dropout": 2}))
    with pytest.raises(AdapterConfigError, match=r"\(2 problems\)") as info:
        AdapterConfig.from_pretrained(folder)
    assert [p.key for p in info.value.problems] == ["r", "lora_dropout"]
    # built in code (no file), the error keeps its plain form
    with pytest.raises(AdapterConfigError, match=r"^invalid lora config"):
        LoraConfig(r=0)


def test_peft_written_bin_adapter_loads(tmp_path):
    """PEFT's legacy .bin (save_pretrained(safe_serialization=False)) is a plain tensor dict:
    it loads through torch.load(weights_only=True) with PEFT's logits."""
    import peft

    model = peft.get_peft_model(
        tiny_opt(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path / "peft", safe_serialization=False)
    assert (tmp_path / "peft" / "adapter_model.bin").is_file() and not (tmp_path / "peft" / WEIGHTS_NAME).exists()
    with torch.no_grad():
        expected = model(**INPUTS).logits
        ours = AdapterModel.from_pretrained(tiny_opt(), tmp_path / "peft")(**INPUTS).logits
    assert torch.allclose(ours, expected, atol=1e-5)


# ------------------------------------------------------------------ non-finite values
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_tensor_is_refused_naming_file_and_tensor(saved, fmt, value):
    """A diverged or edited adapter is refused when it is read, naming the file and the tensor, before any
    verb computes with it (convert's SVD, combine, merge...)."""
    from safetensors.torch import load_file, save_file

    folder, _ = saved
    state = load_file(folder / WEIGHTS_NAME)
    key = sorted(k for k in state if k.endswith("lora_B.weight"))[-1]
    state[key][1, 2] = value
    if fmt == "bin":
        (folder / WEIGHTS_NAME).unlink()
        torch.save(state, folder / "adapter_model.bin")
    else:
        save_file(state, folder / WEIGHTS_NAME)
    word = "NaN" if value != value else "inf"
    with pytest.raises(AdapterFileError, match=rf"adapter_model\.{'bin' if fmt == 'bin' else 'safetensors'}: "
                                                rf"tensor {re.escape(key)} holds 1 {word} of"):
        read_adapter_weights(folder)
    with pytest.raises(AdapterFileError, match="damaged"):
        AdapterModel.from_pretrained(tiny_opt(), folder)


def test_finite_adapters_load_including_half_precision_and_integer_tensors(saved, tmp_path):
    """The check reads floating tensors only: an adapter in float16 with large (finite) values and integer
    buffers still loads."""
    from safetensors.torch import load_file, save_file

    folder, _ = saved
    state = {k: (v * 1000).half() for k, v in load_file(folder / WEIGHTS_NAME).items()}
    state["extra.index"] = torch.arange(4)
    save_file(state, tmp_path / WEIGHTS_NAME)
    assert set(read_adapter_weights(tmp_path)) == set(state)


def test_non_finite_weights_are_never_written(tmp_path):
    model = get_adapter_model(tiny_opt(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        next(iter(model.live_adapter_tensors().values())).fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"came out non-finite: base_model\.model\..* holds .* inf"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ------------------------------------------------------------------ writes cut short
def test_a_write_cut_short_leaves_the_earlier_file_and_no_partial_one(tmp_path, monkeypatch):
    """The engine's own files (a rewritten start for --resume, the base weights beside an adapter,
    the adapter itself) are written whole or not at all: a disk that fills up mid-write leaves the
    earlier file as it was and no temporary file beside it."""
    from lora_cli.adapters import base_weights, state
    from lora_cli.adapters.methods.lora import base_rewrites

    torch.manual_seed(0)
    model = get_adapter_model(tiny_opt(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa_niter_2"))
    start = tmp_path / "start.safetensors"
    assert base_rewrites.save_initial_state(model, start)
    model.save_pretrained(tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in [start, *(tmp_path / "adapter").iterdir()]}

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    for module in (base_rewrites, base_weights, state):
        monkeypatch.setattr(module, "save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        base_rewrites.save_initial_state(model, start)
    with pytest.raises(OSError, match="No space"):
        base_weights.write_base_weights(tmp_path / "adapter", {"w": torch.ones(2)})
    with pytest.raises(OSError, match="No space"):
        model.save_pretrained(tmp_path / "adapter")
    after = {p.name: p.read_bytes() for p in [*tmp_path.iterdir(), *(tmp_path / "adapter").iterdir()] if p.is_file()}
    assert after == before
