"""`bunny chat` (and the serving commands)."""
from __future__ import annotations


def add_parsers(sub, groups) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (or answer one --prompt)")
    p.add_argument("--model", required=True, help="checkpoint folder, reference checkpoint, or smollm2-135m")
    p.add_argument("--image", help="image file to talk about")
    p.add_argument("--prompt", help="answer this one question, print the answer and exit")
    p.add_argument("--template", help="override the checkpoint's template (bunny, phi3, llama, minicpm, plain, native)")
    p.add_argument("--model-base", help="base LLM for stage-1 / LoRA reference checkpoints")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_chat)


def _chat(args) -> int:
    from bunny.model.generation import SamplingSettings
    from bunny.model.loading import load_pretrained
    from bunny.serve.chat import run_chat

    model, processor = load_pretrained(args.model, device=args.device, model_base=args.model_base,
                                       template=args.template)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.seed)
    return run_chat(model, processor, settings, image=args.image, prompt=args.prompt)
