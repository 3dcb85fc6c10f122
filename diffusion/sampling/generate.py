"""Generating many images to files: plan (prompt, seed) jobs, run them in batches, save maps beside them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from diffusion.errors import UserError
from diffusion.maps.aggregate import MapSettings
from diffusion.maps.export import save_image_with_maps, save_pair, slug
from diffusion.maps.format import attn_folder
from diffusion.sampling.pipeline import TextToImagePipeline
from diffusion.sampling.settings import EditSettings, SamplerSettings


@dataclass(frozen=True)
class Job:
    prompt: str
    seed: int

    @property
    def file_name(self) -> str:
        return f"{slug(self.prompt)}_seed{self.seed}.png"


@dataclass(frozen=True)
class EditJob:
    """A prompt, its edited prompt (the prompt itself for a re-weight alone) and the seed of both."""

    prompt: str
    edited: str
    seed: int

    @property
    def stem(self) -> str:
        """<prompt>_to_<edited prompt>_seed<N>, or <prompt>_reweighted_seed<N>: apart from the prompt's own samples."""
        tail = "reweighted" if self.edited == self.prompt else f"to_{slug(self.edited)}"
        return f"{slug(self.prompt)}_{tail}_seed{self.seed}"

    @property
    def source_name(self) -> str:
        return f"{self.stem}.png"

    @property
    def file_name(self) -> str:
        """The edited image's."""
        return f"{self.stem}_edited.png"

    @property
    def pair_name(self) -> str:
        """The side-by-side picture, in the folder's pairs/ (so that it is not taken for a sample)."""
        return f"{PAIRS_FOLDER}/{self.stem}.png"


PAIRS_FOLDER = "pairs"


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


def check_outputs_free(jobs: list[Job] | list[EditJob], out_dir: Path, overwrite: bool) -> None:
    """Refuse to overwrite earlier images (or their maps, or an edit's pair picture) unless asked to."""
    if overwrite:
        return
    names = [name for j in jobs for name in ([j.source_name, j.file_name, j.pair_name] if isinstance(j, EditJob) else [j.file_name])]
    taken = [name for name in dict.fromkeys(names) if (out_dir / name).exists() or attn_folder(out_dir / name).exists()]
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


def generate_edits(
    pipe: TextToImagePipeline,
    jobs: list[EditJob],
    out_dir: Path,
    settings: SamplerSettings,
    edit: EditSettings,
    batch_size: int,
    negative_prompt: str = "",
    maps: MapSettings | None = None,
    extra_manifest: dict | None = None,
    progress: bool = True,
) -> list[Path]:
    """Sample each job's prompt and its edit side by side (pipe.edit), in batches of `batch_size` pairs, and write
    both images (with maps when `maps` is set; each manifest records the edit) and the pair's picture."""
    (out_dir / PAIRS_FOLDER).mkdir(parents=True, exist_ok=True)
    written = []
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    steps_bar = tqdm(total=len(batches) * settings.steps, desc="editing", unit="step", disable=not progress)
    for batch in batches:
        output = pipe.edit(
            [j.prompt for j in batch], [j.edited for j in batch], [j.seed for j in batch], edit, settings,
            negative_prompt=negative_prompt, return_attention=maps is not None, map_settings=maps,
            callback=lambda i, t: steps_bar.update(1),
        )
        for k, job in enumerate(batch):
            common = {"seed": job.seed, **settings.manifest(), "negative_prompt": negative_prompt, **(extra_manifest or {})}
            records = {
                job.source_name: {"role": "source", "edited_image": job.file_name, "edited_prompt": job.edited},
                job.file_name: {"role": "edited", "source_image": job.source_name, "source_prompt": job.prompt,
                                "alignment": output.alignments[k].described, **edit.manifest()},
            }
            for name, result in ((job.source_name, output.source), (job.file_name, output.edited)):
                attention = result.attention[k] if result.attention is not None and job.prompt else None
                save_image_with_maps(result.images[k], attention, out_dir / name, {**common, "edit": records[name]})
                written.append(out_dir / name)
            save_pair(out_dir / job.source_name, out_dir / job.file_name, out_dir / job.pair_name, job.prompt, job.edited)
    steps_bar.close()
    return written
