"""bunny: lightweight multimodal LLMs in the data-centric style of the Bunny paper."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import bunny` must not pull torch in for the pure parts (eval scoring, select).
    if name in ("BunnyConfig",):
        from bunny.model.config import BunnyConfig

        return BunnyConfig
    if name in ("BunnyForConditionalGeneration",):
        from bunny.model.modeling import BunnyForConditionalGeneration

        return BunnyForConditionalGeneration
    if name in ("BunnyProcessor",):
        from bunny.model.processor import BunnyProcessor

        return BunnyProcessor
    if name == "load_pretrained":
        from bunny.model.loading import load_pretrained

        return load_pretrained
    raise AttributeError(name)
