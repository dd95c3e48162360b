"""What the generation pipeline is asked for and gives back: one image's request, the run's
options, a generated image with its metadata, the timings; and the size rules (SDXL sizes are
multiples of 32; kohya's highres-fix first-pass size). Plain Python: the CLI checks requests
with these before MindSpore is imported.
"""

from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np

from library.errors import UserError
from library.generation.prompts import DEFAULT_SIZE

LATENT_CHANNELS = 4
DOWNSAMPLING = 8


@dataclass
class ImageRequest:
    """One image to make. None in a conditioning field means kohya's default (original size =
    target size, negative original = original, crop 0)."""
    prompt: str
    seed: int
    negative_prompt: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = 50
    scale: float = 7.5
    sampler: str = "ddim"
    original_width: Optional[int] = None
    original_height: Optional[int] = None
    original_width_negative: Optional[int] = None
    original_height_negative: Optional[int] = None
    crop_top: Optional[int] = None
    crop_left: Optional[int] = None
    init_image: Any = None          # PIL image (or (4, h, w) latents) for img2img
    strength: float = 0.8           # img2img strength (kohya's default 0.8)
    network_muls: Optional[tuple] = None   # per-LoRA multipliers (--am); None: the defaults
    clip_prompt: Optional[str] = None      # metadata only, as kohya
    raw_prompt: Optional[str] = None       # metadata only: the prompt line as written
    index: int = 0                  # caller's running number (kohya's global_step)
    source_name: Optional[str] = None      # img2img source file name (--use_original_file_name)

    def batch_key(self):
        return (self.width, self.height, self.original_width, self.original_height,
                self.original_width_negative, self.original_height_negative, self.crop_top,
                self.crop_left, self.steps, self.scale, self.sampler,
                self.strength if self.init_image is not None else None,
                self.init_image is not None, self.network_muls)


@dataclass
class GenerationOptions:
    batch_size: int = 1
    max_embeddings_multiples: int = 1
    text_rule: str = "generator"            # "generator" (77n chunks, mean re-normalised) or "training"
    max_token_length: Optional[int] = None  # training rule only
    sampler_preset: str = "generator"       # samplers.PRESETS: "generator" or "training"
    prediction_type: str = "epsilon"
    eta: float = 0.0
    highres_fix_scale: Optional[float] = None
    highres_fix_steps: int = 28
    highres_fix_strength: Optional[float] = None
    highres_fix_latents_upscaling: bool = False
    highres_fix_save_1st: bool = False
    vae_batch_size: Optional[float] = None  # kohya's: None = the batch; < 1 = a ratio of it
    compile: bool = True                    # ms.jit the guided UNet step (False: PyNative)
    static_shapes: bool = False             # one compiled graph per input shape
    model_name: Optional[str] = None        # for the metadata


@dataclass
class GeneratedImage:
    image: Any                  # PIL.Image
    latents: np.ndarray         # (4, h, w) final latents (VAE scale applied, before decode)
    request: ImageRequest
    stage: str = ""             # "" ; highres fix: "0" first pass, "1" final
    metadata: dict = field(default_factory=dict)   # PNG text chunks, in writing order
    batch_position: int = 0     # place in its batch (kohya's file names use it)

    @property
    def seed(self):
        return self.request.seed


@dataclass
class GenerationStats:
    graphs: List[tuple] = field(default_factory=list)   # compiled step signatures
    compile_seconds: float = 0.0    # first calls of each graph, minus one ordinary step each
    step_seconds: List[float] = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0            # wall time of generate() calls, compile included

    @property
    def median_step(self):
        return float(np.median(self.step_seconds)) if self.step_seconds else 0.0

    @property
    def seconds_per_image(self):
        return (self.seconds - self.compile_seconds) / self.images if self.images else 0.0

    def summary(self):
        return (f"{self.images} image(s) in {self.seconds:.1f} s: {len(self.graphs)} graph(s) "
                f"compiled in {self.compile_seconds:.1f} s, then {self.seconds_per_image:.2f} s/image "
                f"({self.median_step * 1000:.0f} ms per UNet step)")


# SDXL's UNet halves the latent (1/8 of the image) twice and adds the skip connections back, so
# the latent's sides must divide by 4: the image's by 32. Checked before anything loads; otherwise
# MindSpore fails deep in the UNet with a shape error.
SIZE_MULTIPLE = 32


def check_size(width, height, what="image size"):
    if width <= 0 or height <= 0 or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        fix = f"e.g. {max(SIZE_MULTIPLE, width - width % SIZE_MULTIPLE)}x" \
              f"{max(SIZE_MULTIPLE, height - height % SIZE_MULTIPLE)}"
        raise UserError(f"{what} {width}x{height}: width and height must be positive multiples of "
                        f"{SIZE_MULTIPLE} for SDXL ({fix})")


def highres_first_size(width, height, scale):
    """kohya's first-pass size: int(x * scale + 0.5), rounded down to a multiple of 32."""
    w, h = int(width * scale + 0.5), int(height * scale + 0.5)
    return w - w % 32, h - h % 32


def scaled(value, scale):
    return None if value is None else int(value * scale + 0.5)
