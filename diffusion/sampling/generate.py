"""Generating many images to files: plan (prompt, seed) jobs, run them in batches, save maps beside them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from diffusion.errors import UserError
from diffusion.maps.aggregate import MapSettings
from diffusion.maps.export import save_image_with_maps, slug
from diffusion.maps.format import attn_folder
from diffusion.sampling.pipeline import TextToImagePipeline
from diffusion.sampling.settings import SamplerSettings


@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int

    @property
    def file_name(self) -> str:
        return f"{slug(self.prompt)}_seed{self.seed}.png"


def parse_seeds(text: str) -> list[int]:
    """'7' -> [7]; '0-3' -> [0, 1, 2, 3]; '1,5,9-10' -> [1, 5, 9, 10]."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                low, high = part.rsplit("-", 1)
                seeds.extend(range(int(low), int(high) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise UserError(f"--seeds {text!r}: write seeds as 7, 0-15 or 1,5,9-12") from None
    if not seeds:
        raise UserError(f"--seeds {text!r} names no seed (is the range reversed?)")
    return seeds


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--prompts-file {path} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"--prompts-file {path} holds no prompt (one per line; # starts a comment)")
    return prompts


def warn_about_split_words(pipe: TextToImagePipeline, prompts: list[str]) -> None:
    """Name the words of each prompt that the tokenizer splits into several tokens: not whole words of its
    vocabulary, so often words the model saw rarely or never (a misspelling, a word outside the captions)."""
    from diffusion.text.prompt_tokens import prompt_tokens

    for prompt in dict.fromkeys(prompts):
        tokens = prompt_tokens(pipe.tokenizer, prompt, pipe.encoder.max_length)
        split = [f"{word!r} ({len(tokens.token_indices(w))} tokens)" for w, word in enumerate(tokens.words)
                 if len(tokens.token_indices(w)) > 1]
        if split:
            warnings.warn(
                f"Prompt {prompt!r}: words split into several tokens, so not whole words of the tokenizer's vocabulary "
                f"and likely ones the model saw rarely or never: {', '.join(split)}; each one's map is the mean of its tokens' maps",
                stacklevel=2,
            )


def plan_jobs(prompts: list[str], seeds: list[int]) -> list[Job]:
    return [Job(prompt, seed) for prompt in prompts for seed in seeds]


def check_outputs_free(jobs: list[Job], out_dir: Path, overwrite: bool) -> None:
    """Refuse to overwrite earlier images (or their maps) unless asked to."""
    if overwrite:
        return
    taken = [j.file_name for j in jobs if (out_dir / j.file_name).exists() or attn_folder(out_dir / j.file_name).exists()]
    if taken:
        raise UserError(
            f"{len(taken)} output(s) already exist in {out_dir} (e.g. {taken[0]}); choose another --out, "
            "other seeds, or pass --overwrite to replace them"
        )


def generate(
    pipe: TextToImagePipeline,
    jobs: list[Job],
    out_dir: Path,
    settings: SamplerSettings,
    batch_size: int,
    negative_prompt: str = "",
    maps: MapSettings | None = None,
    extra_manifest: dict | None = None,
    progress: bool = True,
) -> list[Path]:
    """Sample every job in batches of `batch_size` and write images (and maps when `maps` is set);
    each manifest records the job's seed, the sampler settings and `extra_manifest`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(j.prompt == "" for j in jobs):
        warnings.warn("an empty prompt samples the unconditional model; it has no words, so no word maps")
    written = []
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    steps_bar = tqdm(total=len(batches) * settings.steps, desc="sampling", unit="step", disable=not progress)
    for batch in batches:
        output = pipe(
            [j.prompt for j in batch], [j.seed for j in batch], settings, negative_prompt=negative_prompt,
            return_attention=maps is not None, map_settings=maps, callback=lambda i, t: steps_bar.update(1),
        )
        for k, job in enumerate(batch):
            attention = output.attention[k] if output.attention is not None and job.prompt else None
            path = out_dir / job.file_name
            extra = {"seed": job.seed, **settings.manifest(), "negative_prompt": negative_prompt, **(extra_manifest or {})}
            save_image_with_maps(output.images[k], attention, path, extra)
            written.append(path)
    steps_bar.close()
    return written
