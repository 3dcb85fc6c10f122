"""The sampler settings every entry point starts from (sample.py, evaluate, the pipeline, training's
validation and export), in one place so they cannot drift apart, and the command-line flags that
sample.py and evaluate share for them. Light: imports torch only when checking a scheduler name.

DDPM's ancestral steps add fresh noise at every step (drawn from each image's own generator, so an
image still regenerates alone from its seed). On the default model they copy objects far less often
than deterministic DDIM, and more so with more steps (BENCHMARKS.md, "Sampler").
"""

SCHEDULER = "ddpm"
STEPS = 100
GUIDANCE = 3.0
LAYOUT_GUIDANCE = 0.05  # steer stated relations during the first steps (diffusion/layout_guidance.py)


def add_sampler_arguments(parser) -> None:
    """--steps, --guidance, --guidance-rescale, --scheduler and --layout-guidance, as sample.py and evaluate take them."""
    parser.add_argument("--steps", type=int, default=STEPS, help=f"denoising steps (default {STEPS})")
    parser.add_argument(
        "--guidance", type=float, default=GUIDANCE, help=f"classifier-free guidance scale; 1 = none (default {GUIDANCE:g})"
    )
    parser.add_argument(
        "--guidance-rescale", type=float, default=0.0,
        help="0..1: pull the guided prediction's std back to the conditional one's (Lin et al. 2024; default 0, off)",
    )
    parser.add_argument("--scheduler", default=SCHEDULER, help=f"ddpm, ddim, dpm++ or euler (default {SCHEDULER})")
    parser.add_argument(
        "--layout-guidance", type=float, default=LAYOUT_GUIDANCE,
        help="strength of the steering that makes the relations a prompt states ('left of', 'above', ...) hold "
        f"in its attention maps during the first steps (diffusion/layout_guidance.py); 0 = off (default {LAYOUT_GUIDANCE:g})",
    )


def check_sampler_arguments(args) -> None:
    """Raise UserError naming a bad sampler flag, before any model is loaded."""
    from diffusion.errors import UserError
    from diffusion.sampling import SCHEDULERS

    if args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance < 0:
        raise UserError(f"--guidance must be >= 0 (1 turns guidance off), got {args.guidance}")
    if not 0 <= args.guidance_rescale <= 1:
        raise UserError(f"--guidance-rescale must be in [0, 1] (0 turns it off), got {args.guidance_rescale}")
    if args.scheduler not in SCHEDULERS:
        raise UserError(f"unknown --scheduler {args.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
    if args.layout_guidance < 0:
        raise UserError(f"--layout-guidance must be >= 0 (0 turns it off), got {args.layout_guidance}")


def sampler_settings(args) -> dict:
    """The sampler settings an image was made with, as its manifest records them."""
    return {
        "scheduler": args.scheduler, "steps": args.steps, "guidance_scale": args.guidance,
        "guidance_rescale": args.guidance_rescale, "layout_guidance": args.layout_guidance,
    }
