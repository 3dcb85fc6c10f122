"""The text-to-image pipeline: load an exported model, call it with prompts, get images and maps.

A `diffusers.DiffusionPipeline`, so `save_pretrained` / `from_pretrained` read and write the
usual folder (model_index.json + unet/ + scheduler/ + text_encoder/ + tokenizer/).

    pipe = TextToImagePipeline.from_run("outputs/runs/cpu")
    out = pipe(["a red circle"], seeds=[0], settings=SamplerSettings(steps=50), return_attention=True)
    out.images[0].save("red.png"); out.attention[0].tokens.words  # ['a', 'red', 'circle']
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from diffusion.devices import sampling_autocast, to_host
from diffusion.maps.aggregate import AttentionAggregator, AttentionMaps, ImageAttention, MapSettings
from diffusion.model.unet import UNet
from diffusion.runs import CONFIG_FILE, MODEL_INDEX_FILE, ModelLoadError, find_model_dir
from diffusion.sampling.edit import Alignment, PromptToPrompt
from diffusion.sampling.layout_guidance import UNTIL, LayoutGuidance, RelationTargets
from diffusion.sampling.loop import OnStep, SamplingHook, sample, seed_layouts
from diffusion.sampling.schedulers import make_sampling_scheduler
from diffusion.sampling.settings import EditSettings, SamplerSettings
from diffusion.text.encoder import TextEncoder
from diffusion.text.prompt_tokens import prompt_tokens

OLD_UNET_MODULE = "diffusion.unet"  # the UNet's module in exports made before the package had sub-packages (removed)


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    attention: list[ImageAttention] | None


@dataclass
class EditOutput:
    """`TextToImagePipeline.edit`'s result: the prompts' images and their edits', in the same order."""

    source: PipelineOutput
    edited: PipelineOutput
    alignments: list[Alignment]  # how each edit's words took the source's maps


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, S, S) in [-1, 1], on the host -> PIL images."""
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


def check_not_retired(folder: Path) -> None:
    """Refuse, by name, an export whose model_index.json names the UNet module this package no longer has."""
    try:
        module = json.loads((folder / MODEL_INDEX_FILE).read_text())["unet"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return  # a damaged index: from_pretrained says what it lacks
    if module == OLD_UNET_MODULE:
        raise ModelLoadError(
            f"{folder} was exported before the package had sub-packages (its {MODEL_INDEX_FILE} names the removed "
            f"module {OLD_UNET_MODULE}) and cannot be loaded; re-make it by training: "
            f"python train.py --config {folder / CONFIG_FILE}"
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
        check_not_retired(folder)
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

    def layout_guidance(
        self, prompts: list[str], strength: float, num_steps: int, until: float = UNTIL, follow: torch.Tensor | None = None
    ) -> LayoutGuidance:
        """The hook that moves x_t at the first `until` of `num_steps` steps until the prompts' stated relations
        hold; `follow` (B,): the row whose step each row takes (LayoutGuidance)."""
        max_length = self.encoder.max_length
        tokens = [prompt_tokens(self.tokenizer, p, max_length) for p in prompts]
        return LayoutGuidance(RelationTargets(tokens, max_length), strength, num_steps, until, follow=follow)

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
        hooks: Sequence[SamplingHook] = (),
    ) -> PipelineOutput:
        """One image per (prompt, seed) pair, all in one batch, sampled as `settings` says (its
        scheduler shares the trained noise schedule). `callback(i, t)` runs after every step; `hooks`
        are the caller's own sampling hooks (diffusion.sampling.loop), run after layout guidance."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per prompt")
        return self._sample(prompts, seeds, settings, negative_prompt, return_attention, map_settings, callback, list(hooks))

    @torch.no_grad()
    def edit(
        self,
        prompts: list[str],
        edited: list[str],
        seeds: list[int],
        edit: EditSettings = EditSettings(),
        settings: SamplerSettings = SamplerSettings(),
        negative_prompt: str = "",
        return_attention: bool = False,
        map_settings: MapSettings | None = None,
        callback=None,
    ) -> EditOutput:
        """Prompt-to-prompt (diffusion.sampling.edit): each prompt and its edited prompt sampled side by side
        from one seed, the edit taking the prompt's attention as `edit` says. An edited prompt equal to its
        prompt with `edit.reweight` set re-weights words alone."""
        if not len(prompts) == len(edited) == len(seeds):
            raise ValueError(f"got {len(prompts)} prompts, {len(edited)} edited prompts and {len(seeds)} seeds; give one of each per image")
        max_length = self.encoder.max_length
        control = PromptToPrompt(
            [prompt_tokens(self.tokenizer, p, max_length) for p in prompts],
            [prompt_tokens(self.tokenizer, p, max_length) for p in edited], edit, settings.steps, max_length,
        )
        out = self._sample(
            [*prompts, *edited], [*seeds, *seeds], settings, negative_prompt, return_attention, map_settings, callback,
            [control], control,
        )
        n = len(prompts)
        split = [PipelineOutput(out.images[rows], out.attention[rows] if out.attention else None) for rows in (slice(0, n), slice(n, None))]
        return EditOutput(*split, control.alignments)

    def _sample(
        self, prompts: list[str], seeds: list[int], settings: SamplerSettings, negative_prompt: str, return_attention: bool,
        map_settings: MapSettings | None, callback, hooks: list[SamplingHook], pairs: PromptToPrompt | None = None,
    ) -> PipelineOutput:
        """`__call__`'s work; with `pairs`, the batch is n sources then their n edits, which follow the sources."""
        # Prompts and the negative (or empty) prompt in one pass of the text encoder.
        states, masks = self.encode([*prompts, negative_prompt])  # (B + 1, T, D), (B + 1, T)
        context, mask = states[:-1], masks[:-1]  # (B, T, D), (B, T)
        null_context, null_mask = states[-1:], masks[-1:]  # (1, T, D), (1, T)
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        if settings.layout_guidance > 0:
            follow = None if pairs is None else torch.arange(len(prompts), device=context.device) % pairs.n  # an edit takes its source's step
            hooks.insert(0, self.layout_guidance(prompts, settings.layout_guidance, settings.steps, follow=follow))
        aggregator = None
        if return_attention:
            aggregator = AttentionAggregator(len(prompts), self.unet.config.sample_size, map_settings)
            hooks.append(aggregator)
        if callback is not None:
            hooks.append(OnStep(callback))
        scheduler = make_sampling_scheduler(settings.scheduler, self.scheduler.config)
        with sampling_autocast(context.device):
            centres = None
            if pairs is not None and self.unet.placer is not None:
                centres = pairs.follow_centres(self.unet.placer.centres(context, mask))  # (B, T, K, 2)
            images = sample(
                self.unet, scheduler, context, mask, null_context, null_mask, generators,
                num_steps=settings.steps, guidance_scale=settings.guidance, hooks=hooks,
                layouts=seed_layouts(seeds, self.unet.config.text_place_layouts).to(context.device), centres=centres,
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
                    heads={name: m[b, :, kept] for name, m in maps.heads.items()},
                    snapshots={i: m[b, kept] for i, m in maps.snapshots.items()},
                    snapshot_images={i: to_pil(x0[b : b + 1])[0] for i, x0 in maps.denoised.items()},
                    steps_aggregated=maps.steps_aggregated,
                    layer_resolutions=resolutions,
                    settings=settings,
                )
            )
        return result
