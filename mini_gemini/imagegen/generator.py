"""Image generation from the prompts that Mini-Gemini writes, with Stable Diffusion XL (diffusers).

When asked for a picture, a generation-tuned MGM model answers with an image prompt between <h> and </h>;
that prompt, with a negative prompt of common defects, is rendered by SDXL base 1.0.

    gen = ImageGenerator()                      # nothing is loaded yet
    prompt = extract_image_prompt(reply)        # None when the model wrote no <h>...</h>
    if prompt:
        image = gen.generate(prompt, seed=0)    # loads the pipeline on first use

Errors that a user can act on (model not downloaded, out of memory, ...) are raised as ImageGenError with
a message that says what to do.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from ..constants import DEFAULT_SDXL, IMAGE_PROMPT_CLOSE, IMAGE_PROMPT_OPEN
from ..errors import ImageGenError

log = logging.getLogger(__name__)
HUB_PROBE_S = 3.0           # how long check_source waits for the hub's host to answer
RETRY_UNREACHABLE_S = 300.0  # a hub found unreachable is not tried again before this (seconds)

# Things we do not want in the picture; SDXL steers away from them (classifier-free guidance). Kept short
# enough to fit CLIP's 77-token window, so that no part of it is cut off.
NEGATIVE_PROMPT = ", ".join([
    "low quality", "worst quality", "blurry", "out of focus", "grainy", "jpeg artifacts", "overexposed",
    "oversaturated", "watermark", "signature", "text", "logo", "cropped", "out of frame", "deformed",
    "distorted", "bad anatomy", "bad proportions", "extra fingers", "missing fingers", "extra limbs",
    "poorly drawn",
])

Progress = Callable[[float, str], None]


class FittedPrompt(NamedTuple):
    """A prompt as SDXL will read it: `text` (what is drawn), `tokens` (its CLIP tokens, start and end
    marks left out), `limit` (the most tokens SDXL reads) and `cut` (whether `text` is shorter than the
    prompt given)."""
    text: str
    tokens: int
    limit: int
    cut: bool


def fit_to_tokens(text: str, count: Callable[[str], int], limit: int) -> FittedPrompt:
    """The longest start of `text` that `count` says has at most `limit` tokens, cut after a whole word
    (inside a word only when its first word alone is too long)."""
    text = text.strip()
    n = count(text)
    if n <= limit:
        return FittedPrompt(text, n, limit, False)

    def longest(ends: list[int]) -> int:
        # tokens never span whitespace, so the count only grows with more words: bisect over cut points
        lo, hi = 0, len(ends)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(text[:ends[mid - 1]]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return ends[lo - 1] if lo else 0

    end = longest([m.end() for m in re.finditer(r"\S+", text)])
    if not end:  # one long word: cut it by characters
        end = longest(list(range(1, len(text) + 1)))
    fitted = text[:end].rstrip()
    return FittedPrompt(fitted, count(fitted), limit, True)

# The last complete pair: an opening tag, then text with no other opening tag, then the closing tag.
_PAIR = re.compile(re.escape(IMAGE_PROMPT_OPEN) + r"((?:(?!" + re.escape(IMAGE_PROMPT_OPEN) + r").)*?)"
                   + re.escape(IMAGE_PROMPT_CLOSE), re.DOTALL)


def extract_image_prompt(text: str) -> str | None:
    """The stripped text of the last complete <h>...</h> pair in `text`, or None when there is none or it
    is blank. An unclosed <h> at the end (an answer cut off mid-prompt) does not count."""
    if not text:
        return None
    pairs = _PAIR.findall(text)
    if not pairs:
        return None
    prompt = pairs[-1].strip()
    return prompt or None




def _offline() -> bool:
    """Whether the Hugging Face hub may not be called (HF_HUB_OFFLINE, as huggingface_hub reads it)."""
    import os
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float) -> bool:
    """Whether a TCP connection to the hub's host (HF_ENDPOINT, default huggingface.co) opens within `timeout` s."""
    import socket
    from urllib.parse import urlsplit
    try:
        from huggingface_hub import constants
        endpoint = urlsplit(constants.ENDPOINT)
    except Exception:  # noqa: BLE001 - no huggingface_hub: nothing could be downloaded anyway
        return False
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _download_hint(model: str) -> str:
    return (f"Download it once with `hf download {model}` (on a machine with internet access, then copy the "
            f"Hugging Face cache), or pass a local folder that holds model_index.json with --sdxl DIR.")


def _is_local(model: str) -> bool:
    """Whether `model` names a folder rather than a hub id ("owner/name")."""
    if Path(model).expanduser().exists():
        return True
    return model.startswith(("/", ".", "~")) or "\\" in model or ":" in model or model.count("/") > 1


def _find_cause(exc: BaseException, names: tuple[str, ...]) -> BaseException | None:
    """The first exception in `exc`'s cause/context chain whose class (or a base class) is named in `names`
    (names, not classes, so that huggingface_hub's error classes need not be importable)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(cls.__name__ in names for cls in type(exc).__mro__):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _module_bytes(pipe) -> int:
    """Bytes of all weights in the pipeline's torch modules."""
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in component.parameters())
            total += sum(t.numel() * t.element_size() for t in component.buffers())
    return total


def _cuda_free_bytes(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    # Memory that torch's caching allocator holds but does not use is free for us too.
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class ImageGenerator:
    """Stable Diffusion XL text-to-image, loaded on first use and safe to share between threads.

    model: a hub id (default SDXL base 1.0) or a local diffusers folder. device: "cuda", "cuda:1", "cpu",
    ... (default: CUDA when available). dtype: default float16 on CUDA, float32 elsewhere.
    offload: "auto" (model CPU offload when the GPU has too little free memory), "always" or "never".

    `generate(prompt, ...)` returns a PIL image; prompts are cut to what CLIP reads (`fit_prompt`). Raises
    `ImageGenError` (what to do, in one sentence) when the pipeline cannot be loaded or run; a failed load is
    remembered (`unavailable`) until its cause changes, so the hub is not asked again on every try.
    """

    def __init__(self, model: str = DEFAULT_SDXL, device: str | None = None, dtype: torch.dtype | None = None,
                 offload: str = "auto"):
        if offload not in ("auto", "always", "never"):
            raise ValueError(f"offload must be 'auto', 'always' or 'never', not {offload!r}")
        self.model = str(model)
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype if dtype is not None else (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.offload = offload
        self.offloaded = False          # whether model CPU offload is in use (set by load)
        self.last_seed: int | None = None
        self.last_prompt: str | None = None  # the text the last generate() drew (see fit_prompt)
        self._pipe = None
        self.failure: ImageGenError | None = None  # why the last load failed; kept until its cause changes
        self._failed_state = None
        self._failed_until = float("inf")  # a hub found unreachable is tried again after this (time.monotonic)
        # Re-entrant, so that generate() can load while holding it; one diffusion at a time per pipeline.
        self._lock = threading.RLock()

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    # ----------------------------------------------------------------------------------------- loading

    def load(self, progress: Progress | None = None) -> "ImageGenerator":
        """Load the pipeline (once; later calls return at once). Raises ImageGenError on failure, after
        which the generator is left unloaded and load() can be called again."""
        with self._lock:
            if self._pipe is not None:
                return self
            state = self._source_state()
            if self.failure is not None and state == self._failed_state and time.monotonic() < self._failed_until:
                raise self.failure  # nothing changed since it failed: no second trip to the hub
            report = progress or (lambda fraction, message: None)
            report(0.0, f"Loading Stable Diffusion XL from {self.model}")
            try:
                pipe = self._from_pretrained()
            except ImageGenError as e:
                self.failure, self._failed_state, self._failed_until = e, state, float("inf")
                raise
            self.failure = None
            report(0.8, f"Moving Stable Diffusion XL to {self.device}")
            try:
                self._place(pipe)
            except Exception as e:
                del pipe
                self._free_cuda()
                raise ImageGenError(f"Could not put Stable Diffusion XL on {self.device}: {type(e).__name__}: {e}. "
                                    "Try CPU offload (offload='always') or another device.") from e
            # SDXL has no safety checker to disable (unlike SD 1.x), so nothing to do about one here.
            pipe.set_progress_bar_config(disable=True)  # progress goes through our callback instead
            self._pipe = pipe
            report(1.0, "Stable Diffusion XL is ready")
            return self

    @property
    def unavailable(self) -> str | None:
        """Why image generation cannot work now (the last load failure, or `check_source`'s finding, while its
        cause stands), or None."""
        with self._lock:
            if self.failure is not None and self._source_state() == self._failed_state:
                if time.monotonic() < self._failed_until:
                    return str(self.failure)
            return None

    def check_source(self, timeout: float = HUB_PROBE_S) -> str | None:
        """Find out, without loading anything, whether the pipeline can be had: diffusers is installed, and the
        model is a local diffusers folder, or a hub id that is in the Hugging Face cache or can be fetched
        (HF_HUB_OFFLINE unset and the hub's host answers within `timeout` seconds). When it cannot, the reason is
        kept as a failed load: `unavailable` says it and `load` raises it at once, until its cause changes (a
        hub found unreachable is tried again after RETRY_UNREACHABLE_S). Returns the reason, or None."""
        with self._lock:
            if self._pipe is not None:
                return None
            state = self._source_state()
            until = float("inf")
            if importlib.util.find_spec("diffusers") is None:
                why = "Image generation needs diffusers: `pip install diffusers accelerate`."
            elif _is_local(self.model):
                folder = Path(self.model).expanduser()
                why = None if (folder / "model_index.json").is_file() else \
                    f"The Stable Diffusion XL folder {self.model!r} does not exist or holds no model_index.json. " \
                    f"{_download_hint(DEFAULT_SDXL)}"
            elif state[1]:  # the pipeline's index is in the Hugging Face cache
                why = None
            elif _offline():
                why = (f"Stable Diffusion XL ({self.model}) is not downloaded, and this server is offline "
                       f"(HF_HUB_OFFLINE). {_download_hint(self.model)}")
            elif not _hub_reachable(timeout):
                why = (f"Stable Diffusion XL ({self.model}) is not downloaded and the Hugging Face hub cannot be "
                       f"reached from here. {_download_hint(self.model)}")
                until = time.monotonic() + RETRY_UNREACHABLE_S
            else:
                why = None
            if why is not None:
                log.info("image generation unavailable: %s", why)
                self.failure, self._failed_state, self._failed_until = ImageGenError(why), state, until
            return why

    def _source_state(self) -> tuple:
        """A cheap local fingerprint of what loading depends on: the folder (local source) or whether the
        pipeline's index is in the Hugging Face cache and whether the hub may be reached (hub id)."""
        import os
        if _is_local(self.model):
            index = Path(self.model).expanduser() / "model_index.json"
            return ("local", index.is_file() and index.stat().st_mtime)
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = isinstance(try_to_load_from_cache(self.model, "model_index.json"), str)
        except Exception:  # noqa: BLE001 - an odd id: treat as not cached
            cached = False
        return ("hub", cached, os.environ.get("HF_HUB_OFFLINE", ""))

    def _from_pretrained(self):
        try:
            from diffusers import StableDiffusionXLPipeline
        except ImportError as e:
            raise ImageGenError("Image generation needs diffusers: `pip install diffusers accelerate`.") from e

        source = self.model
        if _is_local(source):
            folder = Path(source).expanduser()
            if not folder.is_dir():
                raise ImageGenError(f"The Stable Diffusion XL folder {source!r} does not exist. Download the model "
                                    f"with `hf download {DEFAULT_SDXL} --local-dir {source}`, or pass the folder "
                                    "that holds model_index.json with --sdxl DIR.")
            if not (folder / "model_index.json").is_file():
                raise ImageGenError(f"{source!r} is not a diffusers pipeline folder (it has no model_index.json). "
                                    f"Pass the folder that `hf download {DEFAULT_SDXL} --local-dir DIR` made.")
            source = str(folder)

        # diffusers >= 0.36 calls the argument `dtype` and warns about `torch_dtype`; older ones know only the latter.
        import diffusers.pipelines.pipeline_utils as pipeline_utils
        dtype_kw = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
        kwargs = {dtype_kw: self.dtype}
        try:
            if self.dtype == torch.float16:
                # The hub repo ships half-size fp16 weights; use them when there, else convert the fp32 ones.
                try:
                    return StableDiffusionXLPipeline.from_pretrained(source, variant="fp16", **kwargs)
                except (OSError, ValueError):
                    pass
            return StableDiffusionXLPipeline.from_pretrained(source, **kwargs)
        except Exception as e:
            raise self._load_error(e) from e

    def _load_error(self, e: Exception) -> ImageGenError:
        cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if _find_cause(e, ("GatedRepoError",)):
            return ImageGenError(f"{self.model!r} needs a Hugging Face login with access granted: run `hf auth "
                                 f"login`, or pass a local folder with --sdxl DIR. ({cause})")
        if _find_cause(e, ("RepositoryNotFoundError",)):
            return ImageGenError(f"There is no model {self.model!r} on the Hugging Face hub. Check the name, or "
                                 f"pass a local folder with --sdxl DIR; the default is {DEFAULT_SDXL}. ({cause})")
        if isinstance(e, OSError) or _find_cause(e, ("LocalEntryNotFoundError", "OfflineModeIsEnabled")):
            log.info("loading %s failed: %s", self.model, cause)  # the library's own words go to the log
            return ImageGenError(f"Stable Diffusion XL ({self.model}) is not downloaded and cannot be fetched "
                                 f"from here. {_download_hint(self.model)}")
        return ImageGenError(f"Could not load Stable Diffusion XL from {self.model!r}: {cause}. Pass a hub id such as "
                             f"{DEFAULT_SDXL} or a local diffusers folder with --sdxl DIR.")

    def _place(self, pipe) -> None:
        """Move the pipeline to the device, or spread it with model CPU offload when memory is short."""
        self.offloaded = False
        if self.device.type != "cuda" or self.offload == "never":
            pipe.to(self.device)
            return
        if self.offload == "auto":
            weights = _module_bytes(pipe)
            # Activations (and the fp32 VAE decode of a 1024 px image) need room beyond the weights.
            needed = weights + max(512 << 20, int(0.6 * weights))
            if _cuda_free_bytes(self.device) >= needed:
                pipe.to(self.device)
                return
        try:
            import accelerate  # noqa: F401  (enable_model_cpu_offload needs it)
        except ImportError as e:
            raise ImageGenError("Offloading SDXL to the CPU needs accelerate: `pip install accelerate`.") from e
        # Whole sub-models move to the GPU only while they run: a little slower, far less GPU memory.
        pipe.enable_model_cpu_offload(device=self.device)
        if hasattr(pipe.vae, "enable_tiling"):
            pipe.vae.enable_tiling()  # decode large images in tiles: the VAE decode is the memory peak
        self.offloaded = True

    def unload(self) -> None:
        """Free the pipeline (and its GPU memory); the next use loads it again."""
        with self._lock:
            self._pipe = None
            self.offloaded = False
            self._free_cuda()

    def _free_cuda(self) -> None:
        if self.device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -------------------------------------------------------------------------------------- generation

    def native_size(self) -> int:
        """The side in pixels the loaded model was trained at (1024 for SDXL)."""
        pipe = self._pipe
        if pipe is None:
            raise ImageGenError("The image model is not loaded yet; call load() first.")
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    def fit_prompt(self, prompt: str, progress: Progress | None = None) -> FittedPrompt:
        """`prompt` cut to what SDXL reads: its text encoders see at most model_max_length (77) CLIP tokens,
        start and end marks included, and diffusers silently drops the rest. Counted with the pipeline's
        own tokenizers (loading the pipeline if needed); cut after the last whole word that fits."""
        with self._lock:
            if self._pipe is None:
                self.load(progress)
            tokenizers = [t for t in (getattr(self._pipe, "tokenizer", None), getattr(self._pipe, "tokenizer_2", None))
                          if t is not None]
        if not tokenizers:
            return FittedPrompt(prompt.strip(), 0, 0, False)
        limit = min(int(t.model_max_length) - t.num_special_tokens_to_add() for t in tokenizers)

        def count(text: str) -> int:
            return max(len(t(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)
                       for t in tokenizers)
        return fit_to_tokens(prompt, count, limit)

    def generate(self, prompt: str, *, negative_prompt: str | None = NEGATIVE_PROMPT, steps: int = 30,
                 guidance: float = 5.0, seed: int | None = None, width: int | None = None,
                 height: int | None = None, progress: Progress | None = None):
        """Render `prompt` and return a PIL image. The same seed (and settings) gives the same image; with
        seed=None a random one is drawn (kept in `last_seed`). width/height default to the model's native
        size and are rounded to a multiple of 8. Concurrent calls run one after another. A prompt longer than
        SDXL reads is cut as `fit_prompt` does; `last_prompt` holds the text drawn."""
        if not prompt or not prompt.strip():
            raise ImageGenError("The image prompt is empty: there is nothing to draw.")
        if int(steps) < 1:
            raise ImageGenError(f"steps must be at least 1, not {steps}.")
        steps = int(steps)
        report = progress or (lambda fraction, message: None)
        with self._lock:
            if self._pipe is None:
                report(0.0, "Loading Stable Diffusion XL (first use)")
                self.load()
            prompt = self.fit_prompt(prompt).text
            if negative_prompt:
                negative_prompt = self.fit_prompt(negative_prompt).text
            self.last_prompt = prompt
            pipe = self._pipe
            native = self.native_size()
            width = _round8(width if width is not None else native)
            height = _round8(height if height is not None else native)
            seed = secrets.randbelow(2**31) if seed is None else int(seed)
            self.last_seed = seed
            # The noise is drawn on the CPU (diffusers moves it to the UNet's device): the same seed gives the same
            # picture on any device, with or without CPU offload.
            generator = torch.Generator(device="cpu").manual_seed(seed)

            def on_step_end(_pipe, step, _timestep, callback_kwargs):
                total = getattr(_pipe, "num_timesteps", None) or steps
                # Steps fill 0..95 %; the VAE decode after the last step takes the rest.
                report(0.95 * (step + 1) / total, f"Drawing: step {step + 1}/{total}")
                return callback_kwargs

            try:
                with torch.inference_mode():
                    out = pipe(prompt=prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                               guidance_scale=float(guidance), width=width, height=height, generator=generator,
                               callback_on_step_end=on_step_end)
            except torch.cuda.OutOfMemoryError as e:
                self._free_cuda()
                raise ImageGenError(f"The GPU ran out of memory while drawing a {width}x{height} image. Try a smaller "
                                    "size, or CPU offload (offload='always').") from e
            except ImageGenError:
                raise
            except Exception as e:
                raise ImageGenError(f"Image generation failed: {type(e).__name__}: {e}") from e
            image = out.images[0]
            report(1.0, "Image ready")
            return image


def _round8(size: int) -> int:
    """Nearest multiple of 8 (at least 8): SDXL's VAE works on 8 x 8 pixel cells."""
    return max(8, int(round(int(size) / 8)) * 8)
