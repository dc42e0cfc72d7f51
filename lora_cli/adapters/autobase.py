"""The base model an adapter folder names, loaded as PEFT's ``AutoPeftModel`` does.

``adapter_config.json`` records ``base_model_name_or_path`` (a hub id or a local folder),
its ``revision`` and the ``task_type``; the task type picks the transformers Auto class:

    SEQ_CLS -> AutoModelForSequenceClassification    CAUSAL_LM -> AutoModelForCausalLM
    SEQ_2_SEQ_LM -> AutoModelForSeq2SeqLM             TOKEN_CLS -> AutoModelForTokenClassification
    QUESTION_ANS -> AutoModelForQuestionAnswering     FEATURE_EXTRACTION -> AutoModel

Without a task type (loracli's image classifiers) the class named in the base's own
``config.json`` (``architectures``) is used, else ``AutoModel``. A tokenizer saved beside
the adapter with more tokens than the base's embeddings makes the embeddings grow to it
(the adapter was trained with added tokens).

transformers is imported when a base is loaded, not when the engine is: the engine itself
needs torch only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lora_cli.errors import UserInputError

AUTO_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def base_model_class(transformers: Any, task_type: str | None, base: str, revision: str | None) -> Any:
    """The transformers class that loads ``base`` for ``task_type``."""
    if task_type is not None:
        return getattr(transformers, AUTO_CLASSES[task_type])
    config = transformers.AutoConfig.from_pretrained(base, revision=revision)
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_base_model(config: Any, adapter_dir: Path, **kwargs: Any) -> nn.Module:
    """The base model ``config`` (an AdapterConfig read from ``adapter_dir``) was trained on."""
    base = config.base_model_name_or_path
    where = adapter_dir / "adapter_config.json"
    if not base:
        raise UserInputError(
            f"{where} has no base_model_name_or_path, so the base model is unknown; pass it: "
            "AdapterModel.from_pretrained(base_model, adapter_dir)"
        )
    import transformers  # here, not at the top: the engine imports torch only (module docstring)
    try:
        cls = base_model_class(transformers, config.task_type, base, config.revision)
        model = cls.from_pretrained(base, revision=config.revision, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise UserInputError(
            f"{where}: the base model {base!r} (revision {config.revision or 'default'}) cannot be loaded ({first}). "
            "Download it (or go online), fix base_model_name_or_path, or pass the base model yourself: "
            "AdapterModel.from_pretrained(base_model, adapter_dir)"
        ) from None
    if any((adapter_dir / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = transformers.AutoTokenizer.from_pretrained(adapter_dir)
        embeddings = model.get_input_embeddings()
        if embeddings is not None and len(tokenizer) > embeddings.num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
    return model
