"""One-step SDXS pipelines on MLX: txt2img, strength img2img, and the camera stream's engine.

No threads and no file I/O here: images come in and go out as numpy arrays (RGB uint8 at the API,
[-1, 1] NHWC inside). The camera stream is `recipe.Recipe` running on `MLXEngine`.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sdxs import frames, hub, lora, presets, runtime, smoke
from mlx_sdxs.errors import ConfigError, ImageError, ModelUnavailable, RandomWeightsWarning
from mlx_sdxs.models.unet import Conditioning
from mlx_sdxs.lora import LoraSpec
from mlx_sdxs.recipe import (DEFAULT_CONTROL_STRENGTH, LATENT_SCALE, Recipe, RecipeSettings, StreamGroup, one_step,
                             seed_noise)
from mlx_sdxs.scheduler import OneStepScheduler, SchedulerConfig
from mlx_sdxs.tokenizer import CLIPTokenizer, byte_level_tokenizer, load_tokenizer
from mlx_sdxs.weights import (build_model, load_controlnet, load_text_encoder, load_unet, load_vae, parameter_dtype,
                              prepare)

SDXS_MUD_WARNING = (
    "SDXS is distilled for t=999 only: img2img at strength < 1 degrades to 'mud' (IDKiro/sdxs issues #10, #24). "
    "Use stabilityai/sd-turbo for strength-based img2img, or leave the strength unset for SDXS."
)
_PROMPT_CACHE_SIZE = 32
#: Images per forward of the list API: batching gains little past the point where the device is busy, and a
#: 512² batch of 4 keeps the UNet's activations to a few GiB.
DEFAULT_BATCH_SIZE = 4
#: What txt2img/img2img return: RGB uint8 images, or the clean latents before the VAE (diffusers' "latent").
OUTPUT_TYPES = ("image", "latent")


class GeneratedImage(np.ndarray):
    """A result of txt2img/img2img: an `np.ndarray` to every caller, which also says whether random weights made
    it (`random_weights`: then it shows noise, not the prompt). Views and copies keep the flag."""

    random_weights: bool = False

    @classmethod
    def of(cls, array: np.ndarray, random_weights: bool) -> "GeneratedImage":
        image = np.asarray(array).view(cls)
        image.random_weights = random_weights
        return image

    def __array_finalize__(self, source: Any) -> None:
        self.random_weights = getattr(source, "random_weights", False)


def _per_image(**values: Any) -> tuple[bool, list[dict[str, Any]]]:
    """The per-image arguments as one dict per image: a list or tuple gives each image its own value, anything
    else serves every image. (Whether no argument was a list: a single call, rows.)"""
    lists = {name: list(value) for name, value in values.items() if isinstance(value, (list, tuple))}
    lengths = {len(value) for value in lists.values()}
    if len(lengths) > 1:
        given = ", ".join(f"{name}: {len(value)}" for name, value in lists.items())
        raise ValueError(f"the lists must have one length, one value per image (got {given})")
    count = lengths.pop() if lengths else 1
    if count == 0:
        raise ValueError(f"{', '.join(lists)}: an empty list makes no image")
    return not lists, [{name: lists[name][i] if name in lists else value for name, value in values.items()}
                       for i in range(count)]


def check_components(unet: nn.Module, vae: nn.Module, text_encoder: nn.Module,
                     controlnet: nn.Module | None = None) -> None:
    """Refuse parts that cannot work together, naming both, instead of producing a silently wrong image."""
    latent, unet_in = vae.config.latent_channels, unet.config.in_channels
    if latent != unet_in:
        raise ConfigError(f"the vae makes {latent}-channel latents but the unet takes {unet_in} channels "
                          "(in_channels): this VAE does not belong to this UNet")
    text_dim = text_encoder.config.hidden_size
    cross_dims = {level.cross_attention_dim for level in unet.config.down_levels}
    if cross_dims != {text_dim}:
        raise ConfigError(f"the text_encoder makes {text_dim}-wide embeddings but the unet attends to "
                          f"{sorted(cross_dims)} (cross_attention_dim): this text encoder does not belong to this UNet")
    shift = getattr(vae.config, "shift_factor", None)
    if shift not in (None, 0, 0.0):
        raise ConfigError(f"the vae has shift_factor={shift} (an SD3/FLUX latent space) but the unet is an SD-1/2 "
                          "UNet, whose latents are only scaled: this VAE does not belong to this UNet")
    if controlnet is not None:
        _check_controlnet(unet, text_encoder, controlnet)


def _check_controlnet(unet: nn.Module, text_encoder: nn.Module, controlnet: nn.Module) -> None:
    """A ControlNet reads the UNet's latent and text and adds a residual to each of its skips: all must fit."""
    residuals, skips = controlnet.skip_channels(), unet.skip_channels()
    if residuals != skips:
        raise ConfigError(f"the controlnet's residuals have {residuals} channels but the unet's skips {skips} "
                          "(block_out_channels, layers_per_block): this ControlNet was made for another UNet")
    if controlnet.config.in_channels != unet.config.in_channels:
        raise ConfigError(f"the controlnet takes {controlnet.config.in_channels}-channel latents but the unet "
                          f"{unet.config.in_channels} (in_channels): this ControlNet was made for another UNet")
    cross_dims = {level.cross_attention_dim for level in controlnet.config.down_levels}
    if cross_dims != {text_encoder.config.hidden_size}:
        raise ConfigError(f"the text_encoder makes {text_encoder.config.hidden_size}-wide embeddings but the "
                          f"controlnet attends to {sorted(cross_dims)} (cross_attention_dim): this ControlNet was "
                          "made for another text encoder")


class SDXSPipeline:
    """The three models, the tokenizer and the scheduler of one checkpoint (and its ControlNet, if it has one),
    with cached prompt embeddings."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, tokenizer: CLIPTokenizer,
                 scheduler: OneStepScheduler, dtype: mx.Dtype = mx.float32, name: str = "", label: str | None = None,
                 controlnet: nn.Module | None = None):
        check_components(unet, vae, text_encoder, controlnet)
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.controlnet = controlnet
        self.scheduler, self.dtype, self.name = scheduler, dtype, name
        #: Shown on every output when set (random-weight models say so).
        self.label = label
        self.latent_channels = unet.config.in_channels
        self.scaling_factor = vae.config.scaling_factor
        # The UNet halves the latent once per level below the first: sizes must divide by this.
        self.size_multiple = LATENT_SCALE * 2 ** (len(unet.config.block_out_channels) - 1)
        self._prompts: OrderedDict[str, tuple[mx.array, bool]] = OrderedDict()
        self._engine: MLXEngine | None = None

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str = hub.DEFAULT_MODEL, dtype: mx.Dtype | None = None, vae: str | None = None,
                        weights_root: str | Path | None = None, offline: bool | None = None,
                        kernels: str | None = None, loras: Sequence[LoraSpec | str] = ()) -> "SDXSPipeline":
        """A Hub repo id, a family name (`hub.FAMILY`: with its ControlNet or LoRA), a local diffusers checkpoint,
        a converted folder, or a random-weight model (`presets.RANDOM_MODELS`); `loras` ("FILE_OR_REPO[:SCALE]" or
        `LoraSpec`) merged on top. A known model that cannot be had offline runs as random weights in its shape,
        with a `RandomWeightsWarning` (`hub.random_stand_in`); `random_weights` then says so."""
        dtype = dtype or runtime.default_dtype()
        model = smoke.model(model)
        paths = [(hub.lora_path(spec.source, offline), spec)
                 for spec in (LoraSpec.parse(s) if isinstance(s, str) else s for s in loras)]
        if model not in presets.RANDOM_MODELS:
            family = hub.family_model(model)
            try:
                folder = hub.resolve(model, runtime.dtype_name(dtype), vae,
                                     Path(weights_root) if weights_root else None, offline)
                if family is not None and family.lora is not None:
                    paths.insert(0, (hub.lora_path(family.lora, offline), LoraSpec(family.lora)))
            except ModelUnavailable as exc:
                model = hub.random_stand_in(model, exc)
        if model in presets.RANDOM_MODELS:
            pipeline = cls.random(model, dtype=dtype, kernels=kernels)
        else:
            pipeline = cls.from_weights(folder, dtype, name=model, kernels=kernels)
        pipeline.merge_loras(paths)
        return pipeline

    @classmethod
    def from_weights(cls, folder: str | Path, dtype: mx.Dtype | None = None, name: str | None = None,
                     kernels: str | None = None,
                     loras: Sequence[tuple[Path, LoraSpec]] = ()) -> "SDXSPipeline":
        """Load a converted MLX weights folder (see `mlx_sdxs.convert`), cast to `dtype` (default: this
        machine's runtime dtype, so any converted dtype serves), with each LoRA (its file or folder and its
        spec) merged into the loaded weights — never into the folder."""
        folder = Path(folder)
        dtype = dtype or runtime.default_dtype()
        controlnet = presets.controlnet_folder(folder)
        pipeline = cls(
            load_unet(folder / "unet", dtype, kernels),
            load_vae(folder / "vae", dtype, kernels),
            load_text_encoder(folder / "text_encoder", dtype, kernels),
            load_tokenizer(folder / "tokenizer"),
            OneStepScheduler(SchedulerConfig.from_file(folder / "scheduler" / "scheduler_config.json")),
            dtype,
            name=name or folder.name,
            label=presets.weights_label(folder),
            controlnet=load_controlnet(controlnet, dtype, kernels) if controlnet is not None else None,
        )
        pipeline.merge_loras(loras)
        return pipeline

    def merge_loras(self, loras: Sequence[tuple[Path, LoraSpec]]) -> None:
        """Merge each LoRA (its file or folder, and its spec) into the UNet and text encoder weights in memory;
        the name says which. Before any prompt is encoded: cached embeddings would predate the merge."""
        for path, spec in loras:
            lora.merge({"unet": self.unet, "text_encoder": self.text_encoder}, lora.read(path), spec.scale, str(path))
            self.name += f" + LoRA {spec.source}@{spec.scale:g}"
        self._prompts.clear()
        self._engine = None  # its time conditioning predates the merge too

    @property
    def random_weights(self) -> bool:
        """Whether this is random weights (asked for, or standing in for a model offline), not a trained model."""
        return self.label == presets.RANDOM_LABEL

    @classmethod
    def random(cls, model: str = "random", seed: int = 0, dtype: mx.Dtype | None = None,
               kernels: str | None = None) -> "SDXSPipeline":
        """Random weights in a real checkpoint's shape (`model`: a `presets.RANDOM_MODELS` name or a preset), for
        running everything offline. Not a trained model."""
        preset = presets.RANDOM_MODELS.get(model, model)
        configs = presets.configs(preset)
        dtype = dtype or runtime.default_dtype()
        mx.random.seed(seed)
        components = [c for c in ("unet", "vae", "text_encoder", "controlnet") if c in configs]
        models = {c: prepare(build_model(configs[c], c), dtype, kernels) for c in components}
        scheduler = OneStepScheduler(SchedulerConfig.from_dict(configs["scheduler"]))
        return cls(models["unet"], models["vae"], models["text_encoder"], byte_level_tokenizer(), scheduler, dtype,
                   name=f"{model} ({preset} shape)", label=presets.RANDOM_LABEL, controlnet=models.get("controlnet"))

    # --- building blocks ---------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> tuple[mx.array, bool]:
        """CLIP embeddings (1, 77, D) in float32 and whether the prompt was cut to the text encoder's window,
        from one tokenisation; computed once per prompt and kept in a small LRU cache."""
        if prompt in self._prompts:
            self._prompts.move_to_end(prompt)
            return self._prompts[prompt]
        ids, truncated = self.tokenizer.tokenize(prompt)
        embeds = self.text_encoder(mx.array(ids)).astype(mx.float32)
        mx.eval(embeds)
        self._prompts[prompt] = embeds, truncated
        if len(self._prompts) > _PROMPT_CACHE_SIZE:
            self._prompts.popitem(last=False)
        return embeds, truncated

    def check_size(self, size: int | tuple[int, int]) -> tuple[int, int]:
        """(width, height), each a positive multiple of what the UNet's downsampling needs."""
        width, height = frames.as_size(size)
        for side in (width, height):
            if side < self.size_multiple or side % self.size_multiple:
                raise ImageError(f"size {width}x{height}: each side must be a positive multiple of "
                                 f"{self.size_multiple} for this model")
        return width, height

    def encode(self, image: mx.array) -> mx.array:
        """[-1, 1] NHWC image → float32 UNet-space latent (scaled)."""
        latent = self.vae.encode(image.astype(self._vae_dtype)) * self.scaling_factor
        return latent.astype(mx.float32)

    def decode(self, latent: mx.array) -> mx.array:
        """UNet-space latent → [-1, 1] NHWC image, float32."""
        return self.vae.decode((latent / self.scaling_factor).astype(self._vae_dtype)).astype(mx.float32)

    def _controlnet(self) -> nn.Module:
        if self.controlnet is None:
            raise ConfigError(f"{self.name} has no ControlNet: a control image needs a model with one, e.g. "
                              "model 'sdxs-512-dreamshaper-sketch' (offline: its random stand-in "
                              f"{presets.random_model('sdxs-512-dreamshaper-sketch')!r}, or 'random-tiny-sketch')")
        return self.controlnet

    def _control(self, batch: list[dict[str, Any]], size: tuple[int, int]) -> tuple[mx.array, mx.array] | None:
        """`MLXEngine.predict_noise`'s `control` for a batch's RGB uint8 control images (as the ControlNet takes
        them: see `frames.control_image`): the images fitted to `size`, NHWC in [0, 1], and their strengths as a
        (B, 1, 1, 1) array; None without control images."""
        if batch[0]["control_image"] is None:
            return None
        images = np.stack([frames.fit(row["control_image"], size) for row in batch]).astype(np.float32) / 255.0
        strengths = np.array([row["control_strength"] for row in batch], np.float32).reshape(-1, 1, 1, 1)
        return mx.array(images), mx.array(strengths)

    def noise(self, seed: int, size: int | tuple[int, int]) -> mx.array:
        return mx.array(seed_noise(seed, frames.as_size(size), self.latent_channels))

    def _row_noise(self, row: dict[str, Any], size: tuple[int, int]) -> mx.array:
        """A row's unit noise: its `noise` or its seed's."""
        return self.noise(row["seed"], size) if row["noise"] is None else mx.array(row["noise"], dtype=mx.float32)

    @property
    def _vae_dtype(self) -> mx.Dtype:
        return parameter_dtype(self.vae)  # float32 under a float16 runtime when the VAE must upcast

    # --- user-facing generation ---------------------------------------------------------------
    def txt2img(self, prompt: str | Sequence[str], seed: int | Sequence[int] = 0, size: int | tuple[int, int] = 512,
                noise: np.ndarray | Sequence[np.ndarray] | None = None,
                control_image: np.ndarray | Sequence[np.ndarray] | None = None,
                control_strength: float | Sequence[float] = DEFAULT_CONTROL_STRENGTH,
                batch_size: int = DEFAULT_BATCH_SIZE, output_type: str = "image") -> GeneratedImage | list[GeneratedImage]:
        """One step from pure noise (guidance 0) → RGB uint8 (height, width, 3), as diffusers'
        StableDiffusionPipeline makes it with the checkpoint's scheduler from the same noise (SDXS's Euler with
        trailing spacing starts from σ_max·noise: the UNet sees √(1−ᾱ)·noise; see `scheduler`). With a
        ControlNet, guided by `control_image` (RGB uint8 as the ControlNet takes it, e.g. white strokes on black
        for the Sketch model: see `frames.control_image`) at `control_strength`.

        A list of prompts, seeds, noises, control images or strengths (a single value serves every image) gives
        a list of images, made `batch_size` at a time, each the image its single call makes. `noise`: unit
        normal NHWC (1, h/8, w/8, C) instead of the seed's. `output_type="latent"`: the clean latent, float32
        (1, h/8, w/8, C), before the VAE. Each result is a `GeneratedImage`, an `np.ndarray` that says whether
        random weights made it.
        """
        size = self.check_size(size)
        timestep = self.scheduler.one_step_timestep()
        single, rows = _per_image(prompt=prompt, seed=seed, noise=noise, control_image=control_image,
                                  control_strength=control_strength)
        images = self._generate(rows, size, timestep, lambda batch, noise: self.scheduler.start_noise(noise, timestep),
                                batch_size, output_type)
        return images[0] if single else images

    def img2img(self, image: np.ndarray | Sequence[np.ndarray], prompt: str | Sequence[str],
                strength: float | None = None, seed: int | Sequence[int] = 0, size: int | tuple[int, int] = 512,
                noise: np.ndarray | Sequence[np.ndarray] | None = None,
                control_image: np.ndarray | Sequence[np.ndarray] | None = None,
                control_strength: float | Sequence[float] = DEFAULT_CONTROL_STRENGTH,
                batch_size: int = DEFAULT_BATCH_SIZE, output_type: str = "image") -> GeneratedImage | list[GeneratedImage]:
        """One step from an RGB uint8 image (centre-cropped to the aspect of `size`, resized) → RGB uint8, as
        diffusers' StableDiffusionImg2ImgPipeline makes it from the same noise: the image's latent noised to t
        (√ᾱ·latent + √(1−ᾱ)·noise, what Euler's x0 + σ·noise scaled by 1/√(σ²+1) is), then the one step.

        `strength=None` runs at the model's one-step timestep (SDXS: t=999, as the camera does; diffusers'
        strength 1 with one step: the image still shows through, at √ᾱ₉₉₉ = 0.068); a strength in (0, 1] picks
        t = timesteps₅₀[int(50·(1−strength))] (SD-Turbo style). Lists of images (and of the other per-image
        arguments), `control_image`, `control_strength`, `batch_size` and `output_type` as in `txt2img`.
        """
        size = self.check_size(size)
        if strength is not None and strength < 1.0 and self.is_sdxs:
            warnings.warn(SDXS_MUD_WARNING, stacklevel=2)
        timestep = self.scheduler.one_step_timestep(strength)
        single, rows = _per_image(image=image, prompt=prompt, seed=seed, noise=noise, control_image=control_image,
                                  control_strength=control_strength)
        for row in rows:
            frames.check_frame(row["image"], "RGB image")

        def start(batch: list[dict[str, Any]], noise: mx.array) -> mx.array:
            images = np.concatenate([frames.to_model_input(row["image"], size, bgr=False) for row in batch])
            return self.scheduler.add_noise(self.encode(mx.array(images)), noise, timestep)

        images = self._generate(rows, size, timestep, start, batch_size, output_type)
        return images[0] if single else images

    def _generate(self, rows: list[dict[str, Any]], size: tuple[int, int], timestep: int,
                  start: Callable[[list[dict[str, Any]], mx.array], mx.array], batch_size: int,
                  output_type: str) -> list[GeneratedImage]:
        """Each row's result, `batch_size` rows at a time: `start(rows, noise)` gives a batch's noisy latents,
        then the recipe's one step (`recipe.one_step`) and, for images, the VAE. Every row is checked first."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, not {output_type!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {batch_size!r}")
        if len({row["control_image"] is None for row in rows}) > 1:
            raise ValueError("control_image: give one for every image or for none")
        latent_shape = (1, size[1] // LATENT_SCALE, size[0] // LATENT_SCALE, self.latent_channels)
        for row in rows:
            if row["noise"] is not None and np.shape(row["noise"]) != latent_shape:
                raise ValueError(f"noise must have the latent's shape {latent_shape} (NHWC), "
                                 f"not {np.shape(row['noise'])}")
            if row["control_image"] is not None:
                self._controlnet()
                frames.check_frame(row["control_image"], "control image")
        self.scheduler.check_one_step()
        if self.random_weights:
            warnings.warn(RandomWeightsWarning(f"{self.name} has random weights, not a trained model: its images "
                                               "are noise-like, whatever the prompt"), stacklevel=3)
        embeds = {}
        for prompt in dict.fromkeys(row["prompt"] for row in rows):
            embeds[prompt], truncated = self.encode_prompt(prompt)
            if truncated:
                warnings.warn(f"prompt is longer than the text encoder's {self.tokenizer.max_length} tokens and was "
                              f"truncated: {prompt[:60]!r}…", stacklevel=3)
        engine = self._engine = self._engine or MLXEngine(self)
        results = []
        for first in range(0, len(rows), batch_size):
            batch = rows[first : first + batch_size]
            noisy = start(batch, mx.concatenate([self._row_noise(row, size) for row in batch]))
            conditioning = engine.condition(mx.concatenate([embeds[row["prompt"]] for row in batch]))
            latents = one_step(engine, timestep, noisy, conditioning, self._control(batch, size))
            if output_type == "latent":
                outputs = [latent[None] for latent in np.array(latents)]
            else:
                outputs = [frames.from_model_output(image, bgr=False) for image in np.array(self.decode(latents))]
            results += [GeneratedImage.of(output, self.random_weights) for output in outputs]
        return results

    @property
    def is_sdxs(self) -> bool:
        return "sdxs" in self.name.lower() or self.random_weights

    def stream(self, settings: RecipeSettings, prompt: str | None = None) -> Recipe:
        """The camera recipe on this pipeline (fixed noise, feedback, prompt morph)."""
        return Recipe(MLXEngine(self), settings, prompt)

    def stream_group(self, pad: bool | None = None) -> StreamGroup:
        """Several camera streams on this pipeline, each with its own prompt, seed and knobs, their frames
        run as batches of one compiled step (see `recipe.StreamGroup`; `pad`: see `recipe.batch_plan`,
        default: on a GPU). Each stream's output is what it would get alone.

        >>> import numpy as np
        >>> pipe = SDXSPipeline.random("random-tiny")
        >>> group = pipe.stream_group()
        >>> fox = group.join(RecipeSettings(render_size=64), "a red fox")
        >>> whale = group.join(RecipeSettings(render_size=64, seed=7, feedback=0.3), "a blue whale")
        >>> webcam = np.zeros((120, 160, 3), np.uint8)      # uint8 BGR, any size: centre-cropped, resized
        >>> out = group.process({fox: webcam, whale: webcam[::-1]})
        >>> out[fox].shape, out[whale].dtype
        ((64, 64, 3), dtype('uint8'))
        >>> whale.set_prompt("a whale, oil painting")       # morphs over this stream's next frames; none cut off
        ()
        >>> out = group.process({whale: webcam})             # a stream with no new frame is left out
        >>> group.leave(fox)
        """
        return StreamGroup(MLXEngine(self), pad)

    def describe(self) -> str:
        """dtype and kernel policy, for every output that reports timings."""
        return f"{runtime.dtype_name(self.dtype)}, {self.unet.ops.name} kernels"

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": runtime.dtype_name(self.dtype), "label": self.label,
                "kernels": self.unet.ops.name, "unet_parameters": _count(self.unet),
                "vae": type(self.vae).__name__, "text_encoder_parameters": _count(self.text_encoder),
                "controlnet_parameters": _count(self.controlnet) if self.controlnet is not None else None}


class MLXEngine:
    """The recipe's engine on an `SDXSPipeline`: NHWC `mx.array`s, lazily built, evaluated by `sync`.

    A frame is one `mx.compile`d function (`frame_step`): uint8 in, uint8 out, every elementwise chain fused;
    MLX retraces it for a new batch size or render size and never for a knob, whose values come in as
    arrays. What depends only on the timestep (the time embedding's projections) is computed once per
    engine, and what depends only on the conditioning (each cross-attention's keys and values) once per
    change. A batch of streams is padded to a bucket only on a GPU, where the device waits on the host and
    a padded row costs little (`recipe.batch_plan`); on the CPU it is split instead.

    MLX graphs belong to the stream of the thread that built them. Once this engine is used inside a
    `runtime.thread_stream()` (the camera's inference thread), a call from any other thread raises
    `StreamOwnershipError` until that stream is released."""

    def __init__(self, pipeline: SDXSPipeline):
        self.pipeline = pipeline
        self.name = f"mlx-{mx.default_device().type.name} ({pipeline.describe()})"
        self.scheduler = pipeline.scheduler
        self.latent_channels = pipeline.latent_channels
        self.label = pipeline.label
        self._owner: runtime.OwnedStream | None = None
        self.pad_batches = runtime.on_gpu()
        self._time: dict[tuple[int, int], list[mx.array]] = {}
        #: The networks that take a conditioning: the UNet, and the ControlNet when there is one.
        self._networks = [pipeline.unet] + ([pipeline.controlnet] if pipeline.controlnet is not None else [])
        self._text = mx.compile(lambda embeds: [network.text_conditioning(embeds) for network in self._networks])

    @property
    def controlled(self) -> bool:
        return self.pipeline.controlnet is not None

    def worker(self):
        return runtime.worker_thread()

    def check_thread(self) -> None:
        current = runtime.current_stream()
        owner = self._owner
        if owner is not None and not owner.released and owner is not current:
            owner.check(f"the MLX stream of {self.name}")
        self._owner = current

    def frame_step(self, step: Callable) -> Callable:
        """`step` (`recipe.denoise`) compiled whole with this engine bound: traced once per batch size, render
        size and timestep (every other input is an array)."""
        compiled = mx.compile(lambda timestep, *arrays: step(self, timestep, *arrays))

        def run(engine, timestep: int, frames, previous, noise, feedback, conditioning, control=None, clock=None):
            return compiled(timestep, frames, previous, noise, feedback, conditioning, control)

        return run

    def check_size(self, size: tuple[int, int]) -> None:
        self.pipeline.check_size(size)

    def upload(self, frames: np.ndarray) -> mx.array:
        return mx.array(frames)

    def image_in(self, frames: mx.array) -> mx.array:
        return frames[..., ::-1].astype(mx.float32) * (2.0 / 255.0) - 1.0

    def image_out(self, image: mx.array) -> mx.array:
        return mx.clip((image[..., ::-1] + 1.0) * 127.5 + 0.5, 0, 255).astype(mx.uint8)

    def download(self, frame: mx.array) -> np.ndarray:
        mx.eval(frame)  # waits with the GIL released
        return np.array(frame)

    def from_nhwc(self, array: np.ndarray) -> mx.array:
        return mx.array(array, dtype=mx.float32)

    def to_nhwc(self, array: mx.array) -> np.ndarray:
        return np.array(array)

    def concat(self, arrays: Sequence[mx.array]) -> mx.array:
        return mx.concatenate(arrays)

    def encode(self, image: mx.array) -> mx.array:
        return self.pipeline.encode(image)

    def condition(self, embeds: mx.array) -> list[list[tuple[mx.array, mx.array]]]:
        """Per network (the UNet, then the ControlNet): every cross-attention's keys and values."""
        return self._text(embeds)

    def _time_conditioning(self, network: int, timestep: int) -> list[mx.array]:
        key = (network, timestep)
        if key not in self._time:  # evaluated at once: a constant of the compiled frame, not a step of it
            self._time[key] = self._networks[network].time_conditioning(timestep)
            mx.eval(self._time[key])
        return self._time[key]

    def predict_noise(self, noisy: mx.array, timestep: int, conditioning: list,
                      control: tuple[mx.array, mx.array] | None = None) -> mx.array:
        noisy = noisy.astype(self.pipeline.dtype)
        conds = [Conditioning(self._time_conditioning(i, timestep), text) for i, text in enumerate(conditioning)]
        residuals = None
        if control is not None:
            residuals = self.pipeline.controlnet.residuals(noisy, conds[1], control[0], control[1])
        return self.pipeline.unet.predict(noisy, conds[0], residuals).astype(mx.float32)

    def decode(self, latent: mx.array) -> mx.array:
        return self.pipeline.decode(latent)

    def encode_prompt(self, prompt: str) -> tuple[np.ndarray, bool]:
        embeds, truncated = self.pipeline.encode_prompt(prompt)
        return np.array(embeds), truncated

    def from_embeds(self, embeds: np.ndarray) -> mx.array:
        return mx.array(embeds, dtype=mx.float32)

    def start(self, arrays: Sequence[mx.array]) -> None:
        mx.async_eval(*arrays)

    def sync(self, arrays: Sequence[mx.array]) -> None:
        mx.eval(*arrays)

    def close(self) -> None:
        """The pipeline is shared between streams and stays loaded."""


def _count(module: nn.Module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(module.parameters()))

