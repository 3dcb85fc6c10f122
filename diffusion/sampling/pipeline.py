"""The text-to-image pipeline: load an exported model, call it with prompts, get images and maps.

A `diffusers.DiffusionPipeline`, so `save_pretrained` / `from_pretrained` read and write the
usual folder (model_index.json + unet/ + scheduler/ + text_encoder/ + tokenizer/).

    pipe = TextToImagePipeline.from_run("outputs/runs/cpu")
    out = pipe(["a red circle"], seeds=[0], settings=SamplerSettings(steps=50), return_attention=True)
    out.images[0].save("red.png"); out.attention[0].words  # ['a', 'red', 'circle']
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

# Models exported before the sub-packages name `diffusion.unet` in their model_index.json, and
# diffusers loads a component's class only from a module already imported.
import diffusion.unet  # noqa: F401
from diffusion.devices import sampling_autocast, to_host
from diffusion.errors import UserError
from diffusion.maps.aggregate import AttentionAggregator, AttentionMaps, MapSettings
from diffusion.model.unet import UNet
from diffusion.sampling.layout_guidance import LayoutGuidance, RelationTargets
from diffusion.sampling.loop import OnStep, SamplingHook, sample, seed_layouts
from diffusion.sampling.schedulers import make_sampling_scheduler
from diffusion.sampling.settings import SamplerSettings
from diffusion.text.encoder import TextEncoder
from diffusion.text.prompt_tokens import PromptTokens, prompt_tokens


class ModelLoadError(UserError, OSError):
    """A --model folder that is neither a run folder nor an exported model."""


@dataclass
class ImageAttention:
    """The maps of one image: arrays (T, S, S) over its kept tokens, plus the token -> word key."""

    tokens: PromptTokens
    global_map: torch.Tensor  # (T, S, S)
    layers: dict[str, torch.Tensor]  # layer name -> (T, S, S)
    snapshots: dict[int, torch.Tensor]  # step index -> (T, S, S)
    snapshot_images: dict[int, Image.Image]  # step index -> the step's estimate of the clean image
    steps_aggregated: list[int]
    layer_resolutions: dict[str, int]
    settings: MapSettings

    def word_maps(self, maps: torch.Tensor | None = None) -> torch.Tensor:
        """(W, S, S): each word's map, the mean of its tokens' maps."""
        maps = self.global_map if maps is None else maps
        if not self.tokens.words:
            return maps.new_zeros((0, *maps.shape[1:]))
        return torch.stack([maps[self.tokens.token_indices(w)].mean(0) for w in range(len(self.tokens.words))])


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    attention: list[ImageAttention] | None


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, S, S) in [-1, 1], on the host -> PIL images."""
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


def find_model_dir(path: str | Path) -> Path:
    """A run folder (holding model/) or an exported model folder itself."""
    path = Path(path)
    for candidate in (path / "model", path):
        if (candidate / "model_index.json").is_file():
            return candidate
    if (path / "checkpoints").is_dir():
        raise ModelLoadError(
            f"{path} is a run folder without an exported model (training has not finished). Finish or resume it "
            f"with: python train.py --output-dir {path} --resume latest"
        )
    raise ModelLoadError(
        f"{path} is not a run folder or an exported model: expected {path}/model/model_index.json or "
        f"{path}/model_index.json. Pass --model the folder that train.py wrote (outputs/runs/<name>)."
    )


class TextToImagePipeline(DiffusionPipeline):
    def __init__(self, unet: UNet, scheduler, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        self._encoder: TextEncoder | None = None

    @classmethod
    def from_run(cls, path: str | Path, device: str | torch.device = "cpu") -> TextToImagePipeline:
        """Load from a run folder or an exported model (what train.py writes)."""
        folder = find_model_dir(path)
        try:
            pipe = cls.from_pretrained(folder)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"{folder}: could not load the exported model ({error})") from error
        width = pipe.text_encoder.config.hidden_size
        if pipe.unet.config.text_place_layers:
            width *= 2  # the placer reads each token's last state and its input embedding
        if pipe.unet.config.context_dim != width:
            raise ModelLoadError(
                f"{folder}: the UNet expects text states of width {pipe.unet.config.context_dim} but the text "
                f"encoder gives {width}; the model folder mixes parts of different runs"
            )
        pipe.unet.eval()
        pipe.text_encoder.requires_grad_(False)  # a loaded model is for sampling
        return pipe.to(device)

    @property
    def encoder(self) -> TextEncoder:
        """The tokenizer and text tower as one TextEncoder, built once (again only if either is replaced)."""
        e = self._encoder
        if e is None or e.model is not self.text_encoder or e.tokenizer is not self.tokenizer:
            # A UNet with a text placer reads each token's input embedding beside its last state.
            input_embeddings = bool(self.unet.config.text_place_layers)
            self._encoder = TextEncoder(self.tokenizer, self.text_encoder, input_embeddings)
        return self._encoder

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.encode(prompts)

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        seeds: list[int],
        settings: SamplerSettings = SamplerSettings(),
        negative_prompt: str = "",
        return_attention: bool = False,
        map_settings: MapSettings | None = None,
        callback=None,
    ) -> PipelineOutput:
        """One image per (prompt, seed) pair, all in one batch, sampled as `settings` says (its
        scheduler shares the trained noise schedule). `callback(i, t)` runs after every step."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        # Prompts and the negative (or empty) prompt in one pass of the text encoder.
        states, masks = self.encode([*prompts, negative_prompt])  # (B + 1, T, D), (B + 1, T)
        context, mask = states[:-1], masks[:-1]  # (B, T, D), (B, T)
        null_context, null_mask = states[-1:], masks[-1:]  # (1, T, D), (1, T)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        hooks: list[SamplingHook] = []
        if settings.layout_guidance > 0:
            tokens = [prompt_tokens(self.tokenizer, p, self.encoder.max_length) for p in prompts]
            targets = RelationTargets(tokens, context.shape[1])
            hooks.append(LayoutGuidance(targets, strength=settings.layout_guidance, num_steps=settings.steps))
        aggregator = None
        if return_attention:
            aggregator = AttentionAggregator(len(prompts), self.unet.config.sample_size, map_settings)
            hooks.append(aggregator)
        if callback is not None:
            hooks.append(OnStep(callback))
        scheduler = make_sampling_scheduler(settings.scheduler, self.scheduler.config)
        with sampling_autocast(context.device):
            images = sample(
                self.unet, scheduler, context, mask, null_context, null_mask, generators,
                num_steps=settings.steps, guidance_scale=settings.guidance, hooks=hooks,
                layouts=seed_layouts(seeds, self.unet.config.text_place_layouts).to(context.device),
            )
        # What the caller gets crosses to the host here, and only here: images, maps, snapshots.
        images, maps = to_host((images, aggregator.result() if aggregator else None))
        attention = self._per_image(maps, prompts, aggregator.settings) if aggregator else None
        return PipelineOutput(images=to_pil(images), attention=attention)

    def _per_image(self, maps: AttentionMaps, prompts: list[str], settings: MapSettings) -> list[ImageAttention]:
        """Split batch maps into each image's own, keeping only its prompt's kept tokens."""
        resolutions = self.unet.cross_attention_layers
        max_length = self.encoder.max_length
        result = []
        for b, prompt in enumerate(prompts):
            tokens = prompt_tokens(self.tokenizer, prompt, max_length)
            kept = slice(0, tokens.end_token + 1)
            result.append(
                ImageAttention(
                    tokens=tokens,
                    global_map=maps.global_map[b, kept],
                    layers={name: m[b, kept] for name, m in maps.layers.items()},
                    snapshots={i: m[b, kept] for i, m in maps.snapshots.items()},
                    snapshot_images={i: to_pil(x0[b : b + 1])[0] for i, x0 in maps.denoised.items()},
                    steps_aggregated=maps.steps_aggregated,
                    layer_resolutions=resolutions,
                    settings=settings,
                )
            )
        return result
