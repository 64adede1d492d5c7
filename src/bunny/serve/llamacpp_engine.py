"""llama.cpp as bunny's CPU engine: `generate` / `stream` of `bunny.model.generation` run on
the GGUF + mmproj that `bunny export gguf` writes, through llama-cpp-python's public API.

The prompt is bunny's own: the processor renders the conversation (as on the torch path),
each `<image>` becomes llama.cpp's media marker, and llama.cpp's `mtmd` tokenizes the text
and encodes the images with the mmproj. Decoding stops at the processor's stop tokens and
stop strings, and the text is the processor's decoding of the new tokens, so a greedy answer
is the torch path's whenever the two engines pick the same tokens (tests compare them).

One llama.cpp context holds one conversation: requests run one at a time (a lock), and a
batch of prompts is answered prompt by prompt. `--engine llama.cpp` is chosen by the user,
never in place of the torch path.

(Over 400 lines: the engine, how it is opened from a checkpoint, and the server's scheduler
for it share one rule, one conversation per llama.cpp context, and read best together.)
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

from typing import TYPE_CHECKING

from bunny.errors import BunnyError
from bunny.model.templates import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from bunny.model.generation import SamplingSettings

ENGINES = ("torch", "llama.cpp")
CACHE_SUFFIX = ".llamacpp"  # the export cache beside a model folder: MODEL.llamacpp/
STAMP_FILE = "bunny_source-{outtype}.json"  # what each export was made from, one per outtype
# --dtype with --engine llama.cpp: the tensor type of the export it runs (default f32).
DTYPE_OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


_LOG_CALLBACK = None  # kept alive for as long as llama.cpp may call it
GGML_LOG_LEVEL_ERROR = 4


def _import_llama_cpp():
    global _LOG_CALLBACK
    try:
        import llama_cpp
        from llama_cpp import mtmd_cpp
    except ImportError:
        raise BunnyError("--engine llama.cpp needs llama-cpp-python (pip install llama-cpp-python); "
                         "or use --engine torch") from None
    if _LOG_CALLBACK is None:  # mtmd logs every image it encodes; keep its errors only
        def log(level, text, user_data):
            if level == GGML_LOG_LEVEL_ERROR:
                print(text.decode("utf-8", "replace"), end="", file=sys.stderr, flush=True)

        _LOG_CALLBACK = llama_cpp.llama_log_callback(log)
        mtmd_cpp.mtmd_log_set(_LOG_CALLBACK, None)
        mtmd_cpp.mtmd_helper_log_set(_LOG_CALLBACK, None)
    return llama_cpp, mtmd_cpp


class LlamaCppEngine:
    """A loaded GGUF (LLM) + mmproj (tower and projector) pair, answering prompts that a bunny
    processor rendered. `config` is the bunny checkpoint's config (ChatSession reads
    `projector_trained` from it)."""

    def __init__(self, gguf: str | os.PathLike, mmproj: str | os.PathLike, processor, config,
                 n_ctx: int = 4096, n_threads: int | None = None, kv_type: str = "f32"):
        llama_cpp, mtmd_cpp = _import_llama_cpp()
        gguf, mmproj = Path(gguf), Path(mmproj)
        for what, path in (("--gguf", gguf), ("--mmproj", mmproj)):
            if not path.is_file():
                raise BunnyError(f"{what} {path}: no such file")
        kv_types = {"f32": llama_cpp.GGML_TYPE_F32, "f16": llama_cpp.GGML_TYPE_F16}
        if kv_type not in kv_types:
            raise BunnyError(f"KV cache type {kv_type!r} is not valid; choose one of {', '.join(kv_types)}")
        self.processor, self.config, self.image_mode = processor, config, processor.image_mode
        self.gguf, self.mmproj = gguf, mmproj
        self.n_threads = n_threads = n_threads or len(os.sched_getaffinity(0))
        self._llama_cpp, self._mtmd = llama_cpp, mtmd_cpp
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=n_threads,
                                   n_threads_batch=n_threads, type_k=kv_types[kv_type], type_v=kv_types[kv_type],
                                   verbose=False)
        if self.llm.n_vocab() != len(processor.tokenizer):
            raise BunnyError(f"--gguf {gguf} has {self.llm.n_vocab()} tokens but the model's tokenizer "
                             f"{len(processor.tokenizer)}: the GGUF was not exported from this model")
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = n_threads
        self._ctx = mtmd_cpp.mtmd_init_from_file(str(mmproj).encode(), self.llm.model, params)
        if not self._ctx or not mtmd_cpp.mtmd_support_vision(self._ctx):
            raise BunnyError(f"--mmproj {mmproj}: llama.cpp could not load it as a vision projector "
                             f"for {gguf.name}")
        self._marker = mtmd_cpp.mtmd_default_marker().decode()
        self.lock = threading.Lock()

    def close(self) -> None:
        if self._ctx:
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None
        self.llm.close()

    # -- what chat and evaluation call (bunny.model.generation's generate / stream) ------------
    def generate(self, processor, prompts: list[str], images: list | None = None,
                 settings: SamplingSettings | None = None) -> list[str]:
        """Answers for templated prompts (one after another, in one llama.cpp context)."""
        from bunny.model.generation import SamplingSettings, cut_at_stop

        settings = settings or SamplingSettings()
        images = images or [[] for _ in prompts]
        if len(images) != len(prompts):
            raise BunnyError(f"{len(prompts)} prompts but {len(images)} image lists")
        stops = settings.stop_strings + processor.stop_strings
        answers = []
        for prompt, refs in zip(prompts, images):
            ids = list(self.token_ids(processor, prompt, _as_list(refs), settings))
            answers.append(cut_at_stop(processor.decode(ids), stops).strip())
        return answers

    def stream(self, processor, prompt: str, images: list | None = None,
               settings: SamplingSettings | None = None) -> Iterator[str]:
        """Text deltas of one answer; stop strings never appear (as generation.stream)."""
        from bunny.model.generation import SamplingSettings, text_deltas

        settings = settings or SamplingSettings()
        stops = [s for s in settings.stop_strings + processor.stop_strings if s]
        yield from text_deltas(self.token_ids(processor, prompt, _as_list(images), settings), processor, stops)

    def token_ids(self, processor, prompt: str, images: list, settings: SamplingSettings) -> Iterator[int]:
        """New token ids of one prompt, up to (not including) the first stop token; holds the
        lock until the generator ends or is closed."""
        if processor.image_mode != self.image_mode:
            raise BunnyError(f"image mode {processor.image_mode!r} differs from the exported mmproj's "
                             f"{self.image_mode!r}: llama.cpp preprocesses images as the export fixed them; "
                             f"use --engine torch for this benchmark")
        if prompt.count(IMAGE_PLACEHOLDER) != len(images):
            raise BunnyError(f"the prompt holds {prompt.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} "
                             f"placeholders but {len(images)} images were given")
        eos = set(processor.stop_token_ids())
        with self.lock:
            prompt_ids = self._prefill(prompt, images)
            if len(prompt_ids) + settings.max_new_tokens > self.llm.n_ctx():
                raise BunnyError(f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens "
                                 f"({settings.max_new_tokens}) exceed the llama.cpp context of "
                                 f"{self.llm.n_ctx()} tokens")
            if settings.seed is not None:
                self.llm.set_seed(settings.seed)
            greedy = settings.temperature <= 0
            tokens = self.llm.generate(prompt_ids, temp=0.0 if greedy else settings.temperature,
                                       top_p=1.0 if greedy else settings.top_p, top_k=0, min_p=0.0,
                                       typical_p=1.0, repeat_penalty=1.0)
            try:
                for _, token in zip(range(settings.max_new_tokens), tokens):
                    if token in eos:
                        return
                    yield token
            finally:
                tokens.close()

    # -- llama.cpp ---------------------------------------------------------------------------
    def _prefill(self, prompt: str, images: list) -> list[int]:
        """Run the prompt (text and images) from position 0; returns llama.cpp's view of the
        prompt's ids (image positions hold no real ids), which `Llama.generate` then finds cached."""
        from bunny.model.images import load_image

        llama_cpp, mtmd = self._llama_cpp, self._mtmd
        bitmaps = []
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            for ref in images:
                rgb = load_image(ref)
                data = rgb.tobytes()
                bitmap = mtmd.mtmd_bitmap_init(rgb.width, rgb.height, (ctypes.c_uint8 * len(data)).from_buffer_copy(data))
                if not bitmap:
                    raise BunnyError(f"llama.cpp could not take a {rgb.width}x{rgb.height} image")
                bitmaps.append(bitmap)
            text = mtmd.mtmd_input_text()
            encoded = prompt.replace(IMAGE_PLACEHOLDER, self._marker).encode()
            text.text, text.text_len, text.add_special, text.parse_special = encoded, len(encoded), True, True
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            status = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), array, len(bitmaps))
            if status != 0:
                raise BunnyError(f"llama.cpp could not tokenize the prompt with its {len(bitmaps)} images "
                                 f"(mtmd_tokenize returned {status})")
            llm = self.llm
            llm.reset()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
            n_chunks = mtmd.mtmd_input_chunks_size(chunks)
            for i in range(n_chunks):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    self._check_room(llm.n_tokens + n.value)
                    llm.eval([ptr[j] for j in range(n.value)])
                else:
                    if i == n_chunks - 1:
                        raise BunnyError("the prompt ends with an image: llama.cpp needs text after it to "
                                         "start the answer")
                    self._check_room(llm.n_tokens + mtmd.mtmd_input_chunk_get_n_tokens(chunk))
                    new_n_past = llama_cpp.llama_pos(0)
                    status = mtmd.mtmd_helper_eval_chunk_single(
                        self._ctx, llm.ctx, chunk, llama_cpp.llama_pos(llm.n_tokens), llama_cpp.llama_seq_id(0),
                        llm.n_batch, False, ctypes.byref(new_n_past))
                    if status != 0:
                        raise BunnyError(f"llama.cpp could not encode an image (status {status})")
                    llm.n_tokens = new_n_past.value
            return llm.input_ids[:llm.n_tokens].tolist()
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def _check_room(self, needed: int) -> None:
        if needed > self.llm.n_ctx():
            raise BunnyError(f"the prompt needs {needed} positions, over the llama.cpp context of {self.llm.n_ctx()}")


def _as_list(images) -> list:
    return [] if images is None else list(images)


# -- opening an engine ----------------------------------------------------------------------
def add_engine_arguments(parser) -> None:
    """--engine, --gguf, --mmproj for a command that runs a model (chat, serve, eval run)."""
    parser.add_argument("--engine", choices=ENGINES, default="torch",
                        help="torch (default) or llama.cpp: the model's GGUF export run by llama-cpp-python "
                             "(CPU; exported once into MODEL.llamacpp/ beside the checkpoint)")
    parser.add_argument("--gguf", help="--engine llama.cpp: this LLM GGUF instead of the cached export "
                                       "(with --mmproj; --model gives the tokenizer and template)")
    parser.add_argument("--mmproj", help="--engine llama.cpp: the tower + projector GGUF that goes with --gguf")


def check_engine_arguments(args, unsupported: dict[str, object]) -> None:
    """Refuse options the chosen engine does not take (never dropped silently). `unsupported`:
    option name -> value, options that only the torch engine takes."""
    if args.engine != "llama.cpp":
        given = [name for name, value in (("--gguf", args.gguf), ("--mmproj", args.mmproj)) if value]
        if given:
            raise BunnyError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} "
                             f"to --engine llama.cpp only")
        return
    given = [name for name, value in unsupported.items() if value not in (None, False, "cpu")]
    if given:
        raise BunnyError(f"--engine llama.cpp does not take {', '.join(given)} (it runs the GGUF on the CPU, "
                         f"one prompt at a time); use --engine torch for {'them' if len(given) > 1 else 'it'}")


def export_outtype(dtype: str | None, gguf: str | os.PathLike | None) -> str:
    """The export type `--engine llama.cpp` runs for `--dtype` (f32 without one); refused with --gguf,
    whose file's own types run."""
    if dtype is None:
        return "f32"
    if gguf is not None:
        raise BunnyError(f"--dtype {dtype} picks the type of the export --engine llama.cpp makes and runs; "
                         "with --gguf the file's own types run: give one or the other")
    if dtype not in DTYPE_OUTTYPES:
        raise BunnyError(f"--dtype {dtype!r} is not one of {', '.join(DTYPE_OUTTYPES)}")
    return DTYPE_OUTTYPES[dtype]


def open_engine(model: str | os.PathLike, gguf: str | os.PathLike | None = None,
                mmproj: str | os.PathLike | None = None, outtype: str = "f32", template: str | None = None,
                n_ctx: int = 4096, n_threads: int | None = None) -> tuple[LlamaCppEngine, object]:
    """(engine, processor) for a bunny checkpoint folder `model`.

    Without `gguf` / `mmproj` the model is exported once (`bunny export gguf`, `outtype`) into
    MODEL.llamacpp/ beside it and reused while the checkpoint's files are unchanged. With both,
    that pair runs (e.g. an f16 or llama-quantize'd export of `model`); `model` still gives the
    processor (tokenizer, template, stop strings), whose weights are not read."""
    from bunny.model.config import BunnyConfig
    from bunny.model.loading import checkpoint_kind
    from bunny.model.processor import BunnyProcessor

    folder = Path(model)
    if not folder.is_dir():
        raise BunnyError(f"--engine llama.cpp runs a local bunny checkpoint folder; {model} is not a folder")
    kind = checkpoint_kind(folder)
    if kind != "bunny":
        raise BunnyError(f"--engine llama.cpp runs a bunny checkpoint; {folder} is a {kind} checkpoint "
                         f"(convert a reference one with `bunny convert reference`)")
    if (gguf is None) != (mmproj is None):
        raise BunnyError("--gguf and --mmproj go together: give both, or neither to export the model once")
    if gguf is None:
        gguf, mmproj = cached_export(folder, outtype)
    processor = BunnyProcessor.from_pretrained(folder)
    if template is not None:
        processor.template = template
    config = BunnyConfig.from_pretrained(folder)
    return LlamaCppEngine(gguf, mmproj, processor, config, n_ctx=n_ctx, n_threads=n_threads), processor


def cached_export(folder: Path, outtype: str = "f32") -> tuple[Path, Path]:
    """The GGUF pair of `folder` in FOLDER.llamacpp/, exported now if missing or older than the
    checkpoint's files (their names, sizes and modification times are recorded)."""
    from bunny.atomic import atomic_write
    from bunny.convert.export_gguf import export_gguf

    cache = folder.with_name(folder.name + CACHE_SUFFIX)
    llm, proj = cache / f"model-{outtype}.gguf", cache / f"mmproj-model-{outtype}.gguf"
    stamp = {"outtype": outtype, "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns]
                                           for p in sorted(folder.iterdir()) if p.is_file()}}
    stamp_file = cache / STAMP_FILE.format(outtype=outtype)
    try:
        current = json.loads(stamp_file.read_text()) if stamp_file.is_file() else None
    except json.JSONDecodeError:
        current = None
    if current == stamp and llm.is_file() and proj.is_file():
        return llm, proj
    export_gguf(folder, cache, outtype)  # this outtype's two files replaced atomically
    atomic_write(stamp_file, json.dumps(stamp, indent=1) + "\n")
    return llm, proj


# -- serving ------------------------------------------------------------------------------------
class EnginePrompt:
    """What the server's request preparation hands the llama.cpp scheduler in place of pixel
    values: the rendered prompt text and its images."""

    def __init__(self, text: str, images: list):
        self.text, self.images = text, images


class _ServingProcessor:
    """The processor as the server's request preparation calls it: ids of the prompt (for the
    usage counts, as the torch path counts them) and an EnginePrompt for the scheduler."""

    def __init__(self, processor):
        self._processor = processor

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, text: list[str], images: list | None = None, **_):
        import torch

        return {"input_ids": torch.tensor([self._processor.tokenize(text[0])]),
                "pixel_values": EnginePrompt(text[0], list(images[0]) if images else [])}


class LlamaCppScheduler:
    """The server's scheduler for the llama.cpp engine: one request at a time, in arrival order,
    on one worker thread (the engine has one context); up to `max_queue` wait."""

    def __init__(self, engine: LlamaCppEngine, processor, max_queue: int = 64):
        import collections

        if max_queue < 1:
            raise BunnyError(f"max_queue must be at least 1, got {max_queue}")
        self.engine, self.processor, self.max_queue = engine, processor, max_queue
        self._waiting = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.active = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="bunny-llamacpp", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the waiting requests, then end the worker."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job) -> None:
        from bunny.serve.batching import QueueFull

        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests waiting")
            self._waiting.append(job)
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._stopping:
                    self._cv.wait()
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            self.active = 1
            try:
                self._run(job)
            finally:
                self.active = 0

    def _run(self, job) -> None:
        from bunny.model.generation import cut_at_stop, safe_stream_length
        from bunny.serve.batching import Event

        prompt: EnginePrompt = job.pixel_values
        settings = job.settings
        stops = [s for s in settings.stop_strings + self.processor.stop_strings if s]
        ids, shown, reason = [], "", "length"
        try:
            tokens = self.engine.token_ids(self.processor, prompt.text, prompt.images, settings)
            try:
                for token in tokens:
                    if job.cancelled:
                        reason = "cancelled"
                        break
                    ids.append(token)
                    text = self.processor.decode(ids)
                    final = cut_at_stop(text, stops)
                    if final != text:
                        reason = "stop"
                        break
                    safe = text[:safe_stream_length(text, stops)]
                    if len(safe) > len(shown):
                        job.on_event(Event(text=safe[len(shown):], completion_tokens=len(ids)))
                        shown = safe
            finally:
                tokens.close()
            if reason == "length" and len(ids) < settings.max_new_tokens:
                reason = "stop"  # ended at a stop token
            final = cut_at_stop(self.processor.decode(ids), stops)
            delta = final[len(shown):] if len(final) > len(shown) else ""
            job.on_event(Event(text=delta, finish_reason=reason, completion_tokens=len(ids)))
        except Exception as exc:  # reported to the client as a 500; the worker goes on
            job.on_event(Event(finish_reason="error", error=str(exc), completion_tokens=len(ids)))


def serving(engine: LlamaCppEngine, processor, max_queue: int = 64):
    """(model, processor, scheduler) for `create_app` with the llama.cpp engine."""
    return engine, _ServingProcessor(processor), LlamaCppScheduler(engine, processor, max_queue)
