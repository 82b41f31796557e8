"""The PyTorch/diffusers engine: what users would otherwise run, and the oracle of the other backends.

It loads a diffusers checkpoint folder with diffusers/transformers and runs the shared recipe
(`mlx_sdxs.recipe`) in torch (NCHW, on cpu/cuda/mps). The three graph wrappers below are also what
`mlx_sdxs.backends.export` writes to CoreML and ONNX, so every backend agrees on one definition of "VAE
encode": image in [-1, 1] → latents already multiplied by the VAE's `scaling_factor` (UNet space),
and "VAE decode": UNet-space latents → image in [-1, 1].

Only the comparison backends and the exporters import this module; the MLX path never does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from mlx_sdxs import presets
from mlx_sdxs.errors import BackendUnavailable, WeightsError, read_json
from mlx_sdxs.recipe import Recipe, RecipeSettings
from mlx_sdxs.scheduler import OneStepScheduler, SchedulerConfig
from mlx_sdxs.tokenizer import MAX_LENGTH


class UNetEpsilon(torch.nn.Module):
    """UNet(sample, timestep, encoder_hidden_states) → ε as a plain tensor (an exportable signature)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class ControlledUNetEpsilon(torch.nn.Module):
    """ControlNet then UNet as one network: (sample, timestep, encoder_hidden_states, controlnet_cond (RGB in
    [0, 1]), conditioning_scale) → ε. The scale multiplies the residuals here, as diffusers does inside the
    ControlNet, so that it can be a tensor: an export input, or a CUDA graph's replayed value."""

    def __init__(self, unet: torch.nn.Module, controlnet: torch.nn.Module):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: torch.Tensor | float) -> torch.Tensor:
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                                    return_dict=False)
        return self.unet(sample, timestep, encoder_hidden_states,
                         down_block_additional_residuals=[d * conditioning_scale for d in down],
                         mid_block_additional_residual=mid * conditioning_scale, return_dict=False)[0]


class _VAEGraph(torch.nn.Module):
    """One direction of a VAE (TAESD or KL) in UNet-space latents."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.is_tiny = type(vae).__name__ == "AutoencoderTiny"
        self.scaling_factor = float(vae.config.scaling_factor)


class VAEEncoder(_VAEGraph):
    """Image in [-1, 1] (N, 3, H, W) → UNet-space latents: TAESD's, or the KL posterior mean, × scaling_factor."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encoder(image) if self.is_tiny else self.vae.encode(image).latent_dist.mean
        return latents * self.scaling_factor


class VAEDecoder(_VAEGraph):
    """UNet-space latents → image in [-1, 1] (÷ scaling_factor first)."""

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.scaling_factor
        return self.vae.decoder(latents) if self.is_tiny else self.vae.decode(latents, return_dict=False)[0]


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise WeightsError(f"{path}: missing ({what} of a diffusers checkpoint folder)")
    return path


def load_unet(checkpoint_dir: str | Path) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(_require(Path(checkpoint_dir) / "unet", "the UNet")).eval()


def load_controlnet(folder: str | Path) -> torch.nn.Module:
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(_require(Path(folder), "the ControlNet")).eval()


def load_vae(checkpoint_dir: str | Path) -> torch.nn.Module:
    """AutoencoderTiny (TAESD) or AutoencoderKL, whichever `vae/config.json` names."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    folder = _require(Path(checkpoint_dir) / "vae", "the VAE")
    class_name = read_json(folder / "config.json", "the VAE config of a diffusers checkpoint").get("_class_name")
    classes = {"AutoencoderTiny": AutoencoderTiny, "AutoencoderKL": AutoencoderKL}
    if class_name not in classes:
        raise WeightsError(f"{folder / 'config.json'}: _class_name {class_name!r} is not a supported VAE "
                           f"({', '.join(classes)})")
    return classes[class_name].from_pretrained(folder).eval()


def load_scheduler(checkpoint_dir: str | Path) -> OneStepScheduler:
    return OneStepScheduler(SchedulerConfig.from_file(Path(checkpoint_dir) / "scheduler" / "scheduler_config.json"))


class ClipPromptEncoder:
    """Prompt → (CLIP last hidden state (1, 77, D), whether the prompt was cut to fit), with transformers'
    CLIPTokenizer + CLIPTextModel."""

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPTextModel, CLIPTokenizer

        checkpoint_dir = Path(checkpoint_dir)
        self.tokenizer = CLIPTokenizer.from_pretrained(_require(checkpoint_dir / "tokenizer", "the tokenizer"))
        folder = _require(checkpoint_dir / "text_encoder", "the text encoder")
        self.model = CLIPTextModel.from_pretrained(folder).to(device=device, dtype=dtype).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, prompt: str) -> tuple[np.ndarray, bool]:
        ids = self.tokenizer(prompt).input_ids  # bos … eos, whole: one tokenisation answers both
        truncated = len(ids) > MAX_LENGTH
        if truncated:  # as truncation=True cuts: bos, the first MAX_LENGTH − 2 tokens, eos
            ids = ids[: MAX_LENGTH - 1] + ids[-1:]
        ids = torch.tensor([ids + [self.tokenizer.pad_token_id] * (MAX_LENGTH - len(ids))])
        return self.model(ids.to(self.device))[0].float().cpu().numpy(), truncated


def check_device(device: str) -> None:
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if device not in available:
        raise BackendUnavailable(f"torch device must be one of {', '.join(available)}, not {device!r}")
    if not available[device]:
        raise BackendUnavailable(f"torch device {device!r} is not available on this machine (try device 'cpu')")


class TorchEngine:
    """The recipe's engine in PyTorch on a diffusers checkpoint folder (NCHW tensors). With `cuda_graph` (CUDA
    only) the whole frame step is captured once as a CUDA graph and replayed: the strongest torch path a
    user would pick, the one MLX is measured against."""

    def __init__(self, checkpoint_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 cuda_graph: bool = False, controlnet_dir: str | Path | None = None):
        """`controlnet_dir`: a ControlNet folder (default: the checkpoint's `controlnet/`, if it has one)."""
        check_device(device)
        if cuda_graph and device != "cuda":
            raise BackendUnavailable(f"a CUDA graph needs the cuda device, not {device!r}")
        self.name = f"torch-{device}" + ("-graph" if cuda_graph else "")
        self.label = presets.weights_label(checkpoint_dir)
        self.device, self.dtype, self.cuda_graph = device, dtype, cuda_graph
        #: A batch of streams is padded to a bucket on an accelerator, split on the CPU (`recipe.batch_plan`).
        self.pad_batches = device != "cpu"
        controlnet_dir = controlnet_dir or presets.controlnet_folder(checkpoint_dir)
        self.controlled = controlnet_dir is not None
        unet = load_unet(checkpoint_dir)
        self.unet = (ControlledUNetEpsilon(unet, load_controlnet(controlnet_dir)) if self.controlled
                     else UNetEpsilon(unet)).to(device=device, dtype=dtype)
        vae = load_vae(checkpoint_dir).to(device=device, dtype=dtype)
        self.encoder, self.decoder = VAEEncoder(vae), VAEDecoder(vae)
        self.prompt_encoder = ClipPromptEncoder(checkpoint_dir, device, dtype)
        self.scheduler = load_scheduler(checkpoint_dir)
        self.latent_channels = int(vae.config.latent_channels)

    @property
    def threads(self) -> int:
        """torch's intra-op CPU threads."""
        return torch.get_num_threads()

    def check_thread(self) -> None:
        """torch has no per-thread streams to respect."""

    def upload(self, frame: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(frame).to(self.device, non_blocking=True)

    def image_in(self, frames: torch.Tensor) -> torch.Tensor:
        return frames.flip(-1).permute(0, 3, 1, 2).float() * (2.0 / 255.0) - 1.0

    def image_out(self, image: torch.Tensor) -> torch.Tensor:
        return ((image.float() + 1.0) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).flip(-1)

    def download(self, frames: torch.Tensor) -> np.ndarray:
        return frames.contiguous().cpu().numpy()

    def concat(self, arrays: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat(list(arrays))

    def condition(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds

    def start(self, arrays: Sequence[torch.Tensor]) -> None:
        """torch queues device work as it goes: nothing to start."""

    def frame_step(self, step: Callable) -> Callable:
        """`step` as it is, or (with `cuda_graph`) captured once per input shape and replayed."""
        return CudaGraphStep(self, step) if self.cuda_graph else step

    def from_nhwc(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2))).to(self.device, torch.float32)

    def to_nhwc(self, array: torch.Tensor) -> np.ndarray:
        return array.float().permute(0, 2, 3, 1).cpu().numpy()

    @torch.inference_mode()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image.to(self.dtype)).float()

    @torch.inference_mode()
    def predict_noise(self, noisy: torch.Tensor, timestep: int, embeds: torch.Tensor, control=None) -> torch.Tensor:
        """`embeds` is the conditioning (`condition` keeps the embeddings as they are); `control` (image in [0, 1],
        strength) runs the ControlNet first."""
        t = torch.full((1,), float(timestep), device=self.device, dtype=self.dtype)
        noisy, embeds = noisy.to(self.dtype), embeds.to(self.dtype)
        if control is None:
            return self.unet(noisy, t, embeds).float()
        return self.unet(noisy, t, embeds, control[0].to(self.dtype), control[1]).float()

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent.to(self.dtype)).float()

    def encode_prompt(self, prompt: str) -> tuple[np.ndarray, bool]:
        return self.prompt_encoder(prompt)

    def from_embeds(self, embeds: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(embeds)).to(self.device, torch.float32)

    def sync(self, arrays: Sequence[torch.Tensor]) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        elif self.device == "mps":
            torch.mps.synchronize()

    def close(self) -> None:
        self.unet = self.encoder = self.decoder = self.prompt_encoder = None
        if self.device == "cuda":
            torch.cuda.empty_cache()


class CudaGraphStep:
    """A recipe step captured as one CUDA graph: inputs are copied into static tensors, the graph replays,
    and the outputs are cloned out (the next replay overwrites them). Recaptured when a shape changes."""

    def __init__(self, engine: TorchEngine, step: Callable):
        self.engine, self.step = engine, step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[torch.Tensor] = []
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    def _capture(self, timestep: int, tensors: list[torch.Tensor]) -> None:
        self.inputs = [t.clone() for t in tensors]
        args = (*self.inputs[:5], tuple(self.inputs[5:]) or None)  # the step's arguments: `control` a pair or None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm up outside the graph (cuDNN/cuBLAS pick their algorithms)
                self.step(self.engine, timestep, *args)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.outputs = self.step(self.engine, timestep, *args)

    def __call__(self, engine: TorchEngine, timestep: int, frames, previous, noise, feedback, conditioning,
                 control=None, clock=None):
        tensors = [frames, previous, noise, feedback, conditioning]
        if control is not None:
            tensors += list(control)
        if self.graph is None or len(tensors) != len(self.inputs) or any(
                a.shape != b.shape for a, b in zip(tensors, self.inputs)):
            self._capture(timestep, tensors)
        for static, tensor in zip(self.inputs, tensors):
            static.copy_(tensor)
        self.graph.replay()
        return tuple(t.clone() for t in self.outputs)


def torch_dtype(name: str, device: str) -> torch.dtype:
    """The `--dtype` as a torch dtype; "auto" is float32 on the CPU and float16 on an accelerator."""
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    return getattr(torch, name)


def torch_stream(checkpoint_dir: str | Path, settings: RecipeSettings = RecipeSettings(), device: str = "cpu",
                 dtype: torch.dtype = torch.float32, prompt: str | None = None, cuda_graph: bool = False) -> Recipe:
    """The camera recipe in PyTorch on a diffusers checkpoint folder."""
    return Recipe(TorchEngine(checkpoint_dir, device, dtype, cuda_graph), settings, prompt)
