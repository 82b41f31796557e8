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

from mlx_sdxs import frames, hub, lora, presets, runtime
from mlx_sdxs.errors import ConfigError, ImageError
from mlx_sdxs.models.unet import Conditioning
from mlx_sdxs.lora import LoraSpec
from mlx_sdxs.recipe import DEFAULT_CONTROL_STRENGTH, LATENT_SCALE, Recipe, RecipeSettings, seed_noise
from mlx_sdxs.scheduler import OneStepScheduler, SchedulerConfig
from mlx_sdxs.tokenizer import CLIPTokenizer, byte_level_tokenizer, load_tokenizer
from mlx_sdxs.weights import (build_model, load_controlnet, load_text_encoder, load_unet, load_vae, parameter_dtype,
                              prepare)

SDXS_MUD_WARNING = (
    "SDXS is distilled for t=999 only: img2img at strength < 1 degrades to 'mud' (IDKiro/sdxs issues #10, #24). "
    "Use stabilityai/sd-turbo for strength-based img2img, or leave --strength unset for SDXS."
)
_PROMPT_CACHE_SIZE = 32


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
        self._prompts: OrderedDict[str, mx.array] = OrderedDict()

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str = hub.DEFAULT_MODEL, dtype: mx.Dtype | None = None, vae: str | None = None,
                        weights_root: str | Path | None = None, offline: bool | None = None,
                        kernels: str | None = None, loras: Sequence[LoraSpec | str] = ()) -> "SDXSPipeline":
        """A Hub repo id, a family name (`hub.FAMILY`: with its ControlNet or LoRA), a local diffusers checkpoint,
        a converted folder, or "random"/"random-tiny"; `loras` ("FILE_OR_REPO[:SCALE]" or `LoraSpec`) merged on top."""
        dtype = dtype or runtime.default_dtype()
        specs = [LoraSpec.parse(s) if isinstance(s, str) else s for s in loras]
        family = hub.family_model(model)
        if family is not None and family.lora is not None:
            specs.insert(0, LoraSpec(family.lora))
        paths = [(hub.lora_path(spec.source, offline), spec) for spec in specs]
        if model in presets.RANDOM_MODELS:
            pipeline = cls.random(model, dtype=dtype, kernels=kernels)
        else:
            folder = hub.resolve(model, runtime.dtype_name(dtype), vae,
                                 Path(weights_root) if weights_root else None, offline)
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
            label=presets.RANDOM_LABEL if presets.is_random_checkpoint(folder) else None,
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

    @classmethod
    def random(cls, model: str = "random", seed: int = 0, dtype: mx.Dtype | None = None,
               kernels: str | None = None) -> "SDXSPipeline":
        """Random weights in a real checkpoint's shape, for running everything offline. Not a trained model."""
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
    def encode_prompt(self, prompt: str) -> mx.array:
        """CLIP embeddings (1, 77, D) in float32, computed once per prompt and kept in a small LRU cache."""
        if prompt in self._prompts:
            self._prompts.move_to_end(prompt)
            return self._prompts[prompt]
        if self.tokenizer.is_truncated(prompt):
            warnings.warn(f"prompt is longer than the text encoder's {self.tokenizer.max_length} tokens and was "
                          f"truncated: {prompt[:60]!r}…", stacklevel=2)
        ids = mx.array(self.tokenizer([prompt]))
        embeds = self.text_encoder(ids).astype(mx.float32)
        mx.eval(embeds)
        self._prompts[prompt] = embeds
        if len(self._prompts) > _PROMPT_CACHE_SIZE:
            self._prompts.popitem(last=False)
        return embeds

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

    def predict_noise(self, noisy: mx.array, timestep: int, embeds: mx.array,
                      control: tuple[mx.array, float | mx.array] | None = None) -> mx.array:
        """One UNet call (after the ControlNet's, given `control`: an RGB image in [0, 1], NHWC at the image
        size, and its strength); inputs are cast to the UNet's dtype, ε comes back as float32."""
        noisy, embeds, t = noisy.astype(self.dtype), embeds.astype(self.dtype), mx.array([timestep])
        residuals = None
        if control is not None:
            residuals = self._controlnet()(noisy, t, embeds, control[0], control[1])
        return self.unet(noisy, t, embeds, residuals).astype(mx.float32)

    def _controlnet(self) -> nn.Module:
        if self.controlnet is None:
            raise ConfigError(f"{self.name} has no ControlNet: a control image needs a model with one, e.g. "
                              "--model sdxs-512-dreamshaper-sketch")
        return self.controlnet

    def _control(self, image: np.ndarray | None, strength: float,
                 size: tuple[int, int]) -> tuple[mx.array, float] | None:
        """`predict_noise`'s `control` for an RGB uint8 control image (as the ControlNet takes it: see
        `frames.control_image`): the image fitted to `size`, NHWC in [0, 1], and its strength; None without one."""
        if image is None:
            return None
        self._controlnet()
        frames.check_frame(image, "control image")
        return mx.array(frames.fit(image, size)[None].astype(np.float32) / 255.0), strength

    def noise(self, seed: int, size: int | tuple[int, int]) -> mx.array:
        return mx.array(seed_noise(seed, frames.as_size(size), self.latent_channels))

    @property
    def _vae_dtype(self) -> mx.Dtype:
        return parameter_dtype(self.vae)  # float32 under a float16 runtime when the VAE must upcast

    # --- user-facing generation ---------------------------------------------------------------
    def txt2img(self, prompt: str, seed: int = 0, size: int | tuple[int, int] = 512,
                noise: np.ndarray | None = None, control_image: np.ndarray | None = None,
                control_strength: float = DEFAULT_CONTROL_STRENGTH) -> np.ndarray:
        """One step from pure noise (guidance 0) → RGB uint8 (height, width, 3); with a ControlNet, guided by
        `control_image` (RGB uint8 as the ControlNet takes it, e.g. white strokes on black for the Sketch
        model: see `frames.control_image`) at `control_strength`."""
        size = self.check_size(size)
        control = self._control(control_image, control_strength, size)
        latent = self.noise(seed, size) if noise is None else mx.array(noise, dtype=mx.float32)
        timestep = self.scheduler.one_step_timestep()
        eps = self.predict_noise(latent, timestep, self.encode_prompt(prompt), control)
        return frames.from_model_output(np.array(self.decode(self.scheduler.predict_x0(latent, eps, timestep))),
                                        bgr=False)

    def img2img(self, image: np.ndarray, prompt: str, strength: float | None = None, seed: int = 0,
                size: int | tuple[int, int] = 512, noise: np.ndarray | None = None,
                control_image: np.ndarray | None = None,
                control_strength: float = DEFAULT_CONTROL_STRENGTH) -> np.ndarray:
        """One step from an RGB uint8 image (centre-cropped to the aspect of `size`, resized) → RGB uint8.

        `strength=None` runs at the model's one-step timestep (SDXS: t=999, as the camera does);
        a strength in (0, 1] picks t = timesteps₅₀[int(50·(1−strength))] (SD-Turbo style). `control_image`
        and `control_strength` as in `txt2img`.
        """
        size = self.check_size(size)
        frames.check_frame(image, "RGB image")
        if strength is not None and strength < 1.0 and self.is_sdxs:
            warnings.warn(SDXS_MUD_WARNING, stacklevel=2)
        control = self._control(control_image, control_strength, size)
        timestep = self.scheduler.one_step_timestep(strength)
        latent = self.encode(mx.array(frames.to_model_input(image, size, bgr=False)))
        noise = self.noise(seed, size) if noise is None else mx.array(noise, dtype=mx.float32)
        noisy = self.scheduler.add_noise(latent, noise, timestep)
        eps = self.predict_noise(noisy, timestep, self.encode_prompt(prompt), control)
        return frames.from_model_output(np.array(self.decode(self.scheduler.predict_x0(noisy, eps, timestep))),
                                        bgr=False)

    @property
    def is_sdxs(self) -> bool:
        return "sdxs" in self.name.lower() or self.label == presets.RANDOM_LABEL

    def stream(self, settings: RecipeSettings, prompt: str | None = None) -> Recipe:
        """The camera recipe on this pipeline (fixed noise, feedback, prompt morph)."""
        self.check_size(settings.render_size)
        return Recipe(MLXEngine(self), settings, prompt)

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
    MLX retraces it for a new render size and never for a knob, whose values come in as arrays. What
    depends only on the timestep (the time embedding's projections) is computed once per stream, and
    what depends only on the conditioning (each cross-attention's keys and values) once per change.

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
        """`step` (`recipe.denoise`) compiled whole, with this engine bound and the feedback as an array."""
        compiled = mx.compile(lambda timestep, *arrays: step(self, timestep, *arrays))

        def run(engine, timestep: int, frame, previous, noise, feedback: float, conditioning, control=None, clock=None):
            if control is not None:
                control = (control[0], mx.array(control[1], dtype=mx.float32))
            return compiled(timestep, frame, previous, noise, mx.array(feedback, dtype=mx.float32), conditioning,
                            control)

        return run

    def upload(self, frame: np.ndarray) -> mx.array:
        return mx.array(frame)

    def image_in(self, frame: mx.array) -> mx.array:
        return frame[None, :, :, ::-1].astype(mx.float32) * (2.0 / 255.0) - 1.0

    def image_out(self, image: mx.array) -> mx.array:
        return mx.clip((image[0, :, :, ::-1] + 1.0) * 127.5 + 0.5, 0, 255).astype(mx.uint8)

    def download(self, frame: mx.array) -> np.ndarray:
        mx.eval(frame)  # waits with the GIL released
        return np.array(frame)

    def from_nhwc(self, array: np.ndarray) -> mx.array:
        return mx.array(array, dtype=mx.float32)

    def to_nhwc(self, array: mx.array) -> np.ndarray:
        return np.array(array)

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

    def encode_prompt(self, prompt: str) -> np.ndarray:
        return np.array(self.pipeline.encode_prompt(prompt))

    def prompt_truncated(self, prompt: str) -> bool:
        return self.pipeline.tokenizer.is_truncated(prompt)

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

