"""lmms-eval plugin: `lmms-eval --model bunny --model_args pretrained=PATH --batch_size 8 --tasks mme`.

The batch size goes in lmms-eval's own `--batch_size` (lmms-eval always passes it to the
model: a `batch_size` in `--model_args` as well is a duplicate keyword). lmms-eval cannot
share the project's locked environment; `make lmms-env` builds one beside it
(docs/evaluation.md).

lmms-eval (>= 0.4, registry_v2) discovers plugins through the entry-point group
`lmms_eval.models`; the entry point's object is a `ModelManifest`, or a callable returning
one, that names the model class by import path. `manifest()` below is that callable:

    [project.entry-points."lmms_eval.models"]
    bunny = "bunny.eval.lmms_plugin:manifest"

lmms-eval is imported lazily: `BunnyLmms` holds all the logic and needs nothing of it;
`Bunny` (what lmms-eval instantiates) is built on first access as a subclass of both
`BunnyLmms` and `lmms_eval.api.model.lmms`.
"""
from __future__ import annotations

import json

from bunny.errors import BunnyError

IMAGE_TOKEN = "<image>"


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="bunny", simple_class_path="bunny.eval.lmms_plugin.Bunny")


class BunnyLmms:
    """The adapter: lmms-eval requests in, our model's answers out (`is_simple` protocol:
    `request.args` tuples, visuals from `doc_to_visual(self.task_dict[task][split][doc_id])`)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = 1,
                 template: str | None = None, max_new_tokens: int | str = 128, model=None, **kwargs):
        import torch

        from bunny.model.loading import load_pretrained

        # lmms-eval passes these generically: trust_remote_code is accepted but never honoured
        # (bunny never runs checkpoint code), device_map is replaced by `device`.
        unknown = sorted(set(kwargs) - {"dtype", "trust_remote_code", "device_map"})
        if unknown:
            raise BunnyError(f"bunny (lmms-eval): unknown model_args {', '.join(unknown)}; valid: "
                             f"pretrained, device, batch_size, template, max_new_tokens")
        self.pretrained = str(pretrained)
        super().__init__()  # lmms.__init__ when mixed in (rank, cache hook, task_dict)
        if not hasattr(self, "task_dict"):
            self.task_dict = {}
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        dtype = kwargs.get("dtype")
        if dtype not in (None, "auto") and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise BunnyError(f"bunny (lmms-eval): dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        dtype = None if dtype in (None, "auto") else getattr(torch, str(dtype))
        self.model, self.processor = model or load_pretrained(pretrained, device=device, template=template,
                                                              dtype=dtype)

    # -- prompts --------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        return [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]

    def _prompt(self, context: str, n_images: int) -> str:
        """The chat prompt: "<image>\\n" per image before the context, unless the task's
        context already places its own placeholders."""
        if IMAGE_TOKEN in context:
            if context.count(IMAGE_TOKEN) != n_images:
                raise BunnyError(f"the context holds {context.count(IMAGE_TOKEN)} {IMAGE_TOKEN} "
                                 f"placeholders for {n_images} images")
            content = [{"type": "text", "text": context}]
        else:
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": context}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True)

    def _settings(self, gen_kwargs: dict):
        from bunny.model.generation import SamplingSettings

        kwargs = dict(gen_kwargs or {})
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kwargs.get("temperature") or 0.0)
        if not kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        return SamplingSettings(max_new_tokens=int(kwargs.get("max_new_tokens") or self.max_new_tokens),
                                temperature=temperature, top_p=float(kwargs.get("top_p") or 1.0),
                                stop_strings=until)

    # -- lmms API -------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        """Answers in request order; batches share generation settings and are formed from
        requests sorted by context length (longest first)."""
        from tqdm import tqdm

        from bunny.model.generation import generate

        items = []
        for i, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            key = json.dumps(gen_kwargs or {}, sort_keys=True, default=str)
            items.append((i, self._prompt(context, len(visuals)), visuals, gen_kwargs, key))
        groups: dict[str, list] = {}
        for item in items:
            groups.setdefault(item[4], []).append(item)
        answers: list[str | None] = [None] * len(items)
        bar = tqdm(total=len(items), desc="bunny", disable=getattr(self, "rank", 0) != 0)
        for group in groups.values():
            group.sort(key=lambda it: -len(self.processor.tokenize(it[1])))
            settings = self._settings(group[0][3])
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                images = [it[2] for it in chunk]
                texts = generate(self.model, self.processor, [it[1] for it in chunk],
                                 images if any(images) else None, settings)
                for it, text in zip(chunk, texts):
                    answers[it[0]] = text
                    self._cache("generate_until", requests[it[0]], text)
                bar.update(len(chunk))
        bar.close()
        return answers

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation's tokens, whether greedy decoding
        would produce exactly them), the continuation being the assistant's answer."""
        import torch

        out = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            continuation = doc_to_target if isinstance(doc_to_target, str) else \
                doc_to_target(self.task_dict[task][split][doc_id])
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            prompt = self._prompt(context, len(visuals))
            inputs = self.processor(text=[prompt], images=visuals or None).to(self.model.device)
            target = self.processor.tokenizer(" " + continuation.lstrip(), add_special_tokens=False).input_ids
            if not target:
                raise BunnyError(f"empty continuation for doc {doc_id} of {task}")
            target_t = torch.tensor([target], device=self.model.device)
            ids = torch.cat([inputs["input_ids"], target_t], dim=1)
            mask = torch.ones_like(ids)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, pixel_values=inputs.get("pixel_values"),
                                    attention_mask=mask).logits
            # Position t predicts token t + 1: the continuation is predicted from n_ctx - 1 on.
            n_ctx = inputs["input_ids"].shape[1]
            scores = torch.log_softmax(logits[0, n_ctx - 1:-1].float(), dim=-1)
            logprob = float(scores.gather(-1, target_t[0, :, None]).sum())
            greedy = bool((scores.argmax(-1) == target_t[0]).all())
            out.append((logprob, greedy))
            self._cache("loglikelihood", request, (logprob, greedy))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("bunny: multi-round generation is not supported")

    def _cache(self, kind: str, request, result) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None:
            hook.add_partial(kind, request.args, result)


def _build_lmms_class():
    try:
        from lmms_eval.api.model import lmms
    except ImportError:
        raise BunnyError("the lmms-eval plugin needs lmms-eval: pip install lmms-eval") from None

    class Bunny(BunnyLmms, lmms):
        """Bunny models for lmms-eval (`--model bunny`)."""

    Bunny.__module__ = __name__
    return Bunny


def __getattr__(name: str):
    if name == "Bunny":
        cls = _build_lmms_class()
        globals()["Bunny"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
