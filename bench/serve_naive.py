"""The baseline: one run, one process, one forward per request, as a user writes it without loracli.

    python -m bench.serve_naive --run runs/image-0 --port 9001 [--merged merged/image-0] [--threads 1]

Same HTTP stack as ``loracli serve`` (Starlette on uvicorn) and the same preprocessing
(``predict``'s image decoder and eval transforms; the tokenizer), so what differs is the
batching: each request is one forward (or one ``generate``) of batch 1, one at a time
under a lock. ``--merged`` serves a folder written by ``loracli merge`` (plain transformers)
instead of the run's adapter model.

    POST /classify   multipart "image" file, or JSON {"text"}   -> {"label", "probability"}
    POST /generate   JSON {"prompt", "max_tokens"}              -> {"text", "completion_tokens"}
"""

from __future__ import annotations

import argparse
import threading

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def load(run: str | None, merged: str | None):
    """(model, processor, id2label, kind) from a run directory or a merged folder."""
    if run:
        from lora_cli.inference.loading import load_run

        loaded = load_run(run)
        kind = {"image-classification": "image", "seq-cls": "text"}.get(loaded.recipe.task, "lm")
        return loaded.model, loaded.processor, loaded.id2label, kind
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(merged)
    if config.model_type == "vit":
        model, processor, kind = AutoModelForImageClassification.from_pretrained(merged), AutoImageProcessor.from_pretrained(merged), "image"
    elif getattr(config, "id2label", None) and config.architectures and "SequenceClassification" in config.architectures[0]:
        model, processor, kind = AutoModelForSequenceClassification.from_pretrained(merged), AutoTokenizer.from_pretrained(merged), "text"
    else:
        model, processor, kind = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged), "lm"
    return model.eval(), processor, {int(k): v for k, v in config.id2label.items()}, kind


def build(model, processor, id2label, kind) -> Starlette:
    from lora_cli.tasks.data.images import load_image
    from lora_cli.tasks.image_classification import eval_pixels

    lock = threading.Lock()

    def classify_one(inputs: dict) -> dict:
        with lock, torch.inference_mode():
            probs = model(**inputs).logits.float().softmax(-1)[0]
        p, i = probs.max(-1)
        return {"label": id2label[int(i)], "probability": float(p)}

    def generate_one(prompt: str, max_tokens: int) -> dict:
        ids = processor(prompt, return_tensors="pt")
        with lock, torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=processor.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        return {"text": processor.decode(new, skip_special_tokens=True), "completion_tokens": int(new.numel())}

    async def classify(request: Request) -> JSONResponse:
        if kind == "image":
            form = await request.form()
            data = await form["image"].read()
            pixels = await run_in_threadpool(lambda: eval_pixels(processor, load_image(data)))
            inputs = {"pixel_values": pixels[None]}
        else:
            inputs = dict(processor((await request.json())["text"], truncation=True, return_tensors="pt"))
        return JSONResponse(await run_in_threadpool(classify_one, inputs))

    async def generate(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse(await run_in_threadpool(generate_one, body["prompt"], int(body["max_tokens"])))

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/classify", classify, methods=["POST"]), Route("/generate", generate, methods=["POST"]),
                             Route("/health", health)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_naive", description=__doc__)
    parser.add_argument("--run")
    parser.add_argument("--merged")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    app = build(*load(args.run, args.merged))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
