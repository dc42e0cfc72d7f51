"""Shared scaffolding for the per-method adapter tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class Plain(nn.Module):
    """Linear, 3x3 grouped conv and 1x1 conv in a model transformers knows nothing about.

    ``grouped`` and ``out`` set the grouped conv's output channels and the classes, so a
    method can pick sizes its factorisation needs.
    """

    def __init__(self, grouped: int = 6, out: int = 10) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.grouped = nn.Conv2d(6, grouped, 3, padding=1, groups=2)
        self.point = nn.Conv2d(grouped, 8, 1)
        self.lin = nn.Linear(8, out)

    def forward(self, x):
        h = self.point(torch.relu(self.grouped(torch.relu(self.conv(x)))))
        return self.lin(h.mean(dim=(2, 3)))


def single_layer(layer_cls, config_cls, base: nn.Module, **kw):
    """``base`` wrapped in ``layer_cls`` holding one active adapter "default" built from ``config_cls(**kw)``."""
    layer = layer_cls(base)
    config = config_cls(**kw)
    layer.add("default", config, config.r, config.alpha)
    layer.active_adapters = ["default"]
    return layer


def tensor_shapes(layer) -> dict[str, tuple[int, ...]]:
    """File key suffix -> shape of adapter "default"'s tensors."""
    return {k: tuple(p.shape) for k, p in layer.adapter_tensors("default")}


def assert_merge_roundtrip(model, inputs) -> None:
    """Non-zero adapter; merged == unmerged; merging twice is a no-op; unmerge and
    merge_and_unload give the same outputs. ``inputs()`` builds the model's keyword inputs."""
    with torch.no_grad():
        base = model.get_base_model()
        with model.disable_adapter():
            plain = base(**inputs()).logits
        unmerged = model(**inputs()).logits
        assert (unmerged - plain).abs().max() > 1e-3
        model.merge_adapter()
        torch.testing.assert_close(model(**inputs()).logits, unmerged, atol=1e-5, rtol=1e-5)
        model.merge_adapter()  # a no-op
        torch.testing.assert_close(model(**inputs()).logits, unmerged, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(**inputs()).logits, unmerged, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.merge_and_unload()(**inputs()).logits, unmerged, atol=1e-5, rtol=1e-5)


def perturb_trainable(model, seed: int = 2) -> None:
    """Add seeded noise to every trainable tensor, so no adapter factor stays zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)


def assert_merge_matches_peft(ours, x, build_base, folder, atol: float = 1e-5) -> None:
    """On a plain model called as ``model(x)``: merging changes every adapted weight and not
    the output, unmerging restores the weights, and the merged weights equal what PEFT's
    ``merge_and_unload`` makes of the same adapter file (``build_base()``: a fresh base)."""
    import peft

    def out(model):
        with torch.no_grad():
            return model(x)

    layers = dict(ours.adapter_layers())
    pristine = {p: layer.base_weight().detach().clone() for p, layer in layers.items()}
    unmerged = out(ours)
    ours.merge_adapter()
    assert all(not torch.equal(layer.base_weight(), pristine[p]) for p, layer in layers.items())
    torch.testing.assert_close(out(ours), unmerged, atol=atol, rtol=0)
    ours.unmerge_adapter()
    for path, layer in layers.items():
        torch.testing.assert_close(layer.base_weight(), pristine[path], atol=atol, rtol=0)
    torch.testing.assert_close(out(ours), unmerged, atol=atol, rtol=0)

    ours.save_pretrained(folder)
    theirs = peft.PeftModel.from_pretrained(build_base(), folder).merge_and_unload()
    plain = ours.merge_and_unload(safe_merge=True)
    torch.testing.assert_close(out(plain), unmerged, atol=atol, rtol=0)
    for path in layers:
        torch.testing.assert_close(merged_weight(plain, path), merged_weight(theirs, path), atol=atol, rtol=0)


def merged_weight(model, path: str) -> torch.Tensor:
    """The weight an adapter at ``path`` (live path, ``...attn.base_layer.out_proj`` for an
    attention's out_proj) was merged into, in a plain model: ``in_proj_weight`` of attention."""
    module = model.get_submodule(path.replace(".base_layer.", "."))
    return module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight


def assert_module_dropout_only_in_training(layer, x) -> None:
    """With module_dropout 0.5 the adapter is skipped about half the time in training, never in eval."""
    base = layer.base_layer(x)
    layer.train()
    skipped = sum(torch.equal(layer(x), base) for _ in range(100))
    assert 25 < skipped < 75
    layer.eval()
    assert not any(torch.equal(layer(x), base) for _ in range(20))


@dataclass
class Output:
    """The two fields of a transformers model output the adapter tests read."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class Conv1dNet(nn.Module):
    """A signal classifier of two ``torch.nn.Conv1d`` layers (channels first) and a head:
    the layer kind transformers' GPT-2 ``Conv1D`` is not. Called like a transformers model."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv1d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 8, 3, stride=2, padding=1)
        self.classifier = nn.Linear(8, 3)

    def forward(self, input_values, labels=None):
        h = torch.relu(self.conv2(torch.relu(self.conv1(input_values))))
        logits = self.classifier(h.mean(dim=-1))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return Output(logits, loss)


class Conv3dNet(nn.Module):
    """A video classifier of two ``nn.Conv3d`` layers and a head, called like a transformers model."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv3d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv3d(6, 6, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.classifier = nn.Linear(6, 3)

    def forward(self, input_values, labels=None):
        h = torch.relu(self.conv2(torch.relu(self.conv1(input_values))))
        logits = self.classifier(h.mean(dim=(2, 3, 4)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return Output(logits, loss)


class GroupedConvNet(nn.Module):
    """A classifier whose first layer is a grouped ``nn.Conv2d`` (groups=2)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.classifier = nn.Linear(8, 3)

    def forward(self, input_values, labels=None):
        logits = self.classifier(torch.relu(self.grouped(input_values)).mean(dim=(2, 3)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return Output(logits, loss)


class AttentionNet(nn.Module):
    """Self-attention with ``nn.MultiheadAttention`` (batch first) over a sequence, then a head."""

    def __init__(self, seed: int = 0, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.classifier = nn.Linear(dim, 3)

    def forward(self, input_values, labels=None):
        h, _ = self.attn(input_values, input_values, input_values, need_weights=False)
        logits = self.classifier(h.mean(dim=1))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return Output(logits, loss)


# ------------------------------------------- small plain models, by name: (build, targets, input)


def _seeded_sequential(layers_of) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*layers_of())


def conv2d_net() -> nn.Sequential:
    return _seeded_sequential(lambda: (nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, padding=1)))


def conv1d_net() -> nn.Sequential:
    """``torch.nn.Conv1d`` (channels first), not GPT-2's Conv1D."""
    return _seeded_sequential(lambda: (nn.Conv1d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv1d(6, 4, 1)))


def embedding_net() -> nn.Sequential:
    return _seeded_sequential(lambda: (nn.Embedding(12, 6, padding_idx=0), nn.Linear(6, 3)))


def grouped2d_net() -> nn.Sequential:
    return _seeded_sequential(lambda: (nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(6, 4, 1)))


def grouped1d_net() -> nn.Sequential:
    return _seeded_sequential(lambda: (nn.Conv1d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Conv1d(6, 4, 1)))


def conv3d_net() -> nn.Sequential:
    return _seeded_sequential(lambda: (nn.Conv3d(3, 6, 3, padding=1), nn.ReLU(),
                                       nn.Conv3d(6, 4, (1, 3, 3), stride=(1, 2, 2))))


def conv1d_taps_net() -> nn.Sequential:
    """A padded k=3 conv, a strided grouped k=3 conv and a k=1 conv (``torch.nn.Conv1d``): every
    factor layout LoHa and LoKr have on Conv1d."""
    return _seeded_sequential(lambda: (nn.Conv1d(64, 16, 3, padding=1), nn.ReLU(),
                                       nn.Conv1d(16, 32, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                                       nn.Conv1d(32, 6, 1)))


def dilated_conv2d_net() -> nn.Sequential:
    return _seeded_sequential(lambda: (nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                                       nn.Conv2d(6, 4, 3, stride=2, dilation=2, padding=2)))


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch first) over a sequence, then a linear layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.attn(x, x, x, need_weights=False)[0])


def seeded_randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


NETS = {
    "conv2d": (conv2d_net, ["0", "2"], lambda: seeded_randn(2, 3, 8, 8)),
    "conv1d": (conv1d_net, ["0", "2"], lambda: seeded_randn(2, 3, 10)),
    "embedding": (embedding_net, ["0"], lambda: torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(1))),
    "grouped2d": (grouped2d_net, ["0"], lambda: seeded_randn(2, 4, 6, 6)),
    "grouped1d": (grouped1d_net, ["0"], lambda: seeded_randn(2, 4, 10)),
    "conv3d": (conv3d_net, ["0", "2"], lambda: seeded_randn(2, 3, 4, 6, 6)),
    "attention": (SelfAttention, ["attn"], lambda: seeded_randn(2, 5, 8)),
    "conv1d-taps": (conv1d_taps_net, ["0", "2", "4"], lambda: seeded_randn(2, 64, 10)),
    "conv2d-dilated": (dilated_conv2d_net, ["0", "2"], lambda: seeded_randn(2, 3, 8, 8)),
    "plain": (Plain, ["conv", "grouped", "point", "lin"], lambda: seeded_randn(2, 4, 6, 6)),
}
"""Models transformers knows nothing about, called as ``model(x)``: name -> (build, the
modules to target, build the input)."""
