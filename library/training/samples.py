"""Sample images during training: kohya's --sample_prompts, --sample_every_n_steps,
--sample_every_n_epochs, --sample_at_first and --sample_sampler.

    prompts = load_sample_prompts(args.sample_prompts)   # at parse time: a bad line fails early
    sampler = TrainingSampler(args, models)              # in the run, after the LoRA is applied
    sampler(step, epoch)                                 # kohya's sample_images: samples if due

What kohya does and this follows (train_util.py:6254-6586, sdxl_train_util.py:380-383):
- triggers: step 0 only with --sample_at_first; with --sample_every_n_epochs, only at the end of
  epochs that are multiples of it (step triggers are ignored); otherwise at optimizer steps that
  are multiples of --sample_every_n_steps (not at epoch ends);
- prompt files: .txt lines with in-prompt options (--w --h --d --s --l --n --ss), or .toml
  ([prompt] defaults and [[prompt.subset]] entries), or .json (a list of dicts or of lines);
- the images are made by the training models as they are (the LoRA unmerged, multiplier 1), with
  training's text encoding (--max_token_length, (word:1.2) weighting, no mean re-normalisation),
  size conditioning original = target = (h, w), crop (0, 0), and the sampler configured as
  kohya's training samples (`samplers.PRESETS["training"]`); v-prediction with
  --v_parameterization;
- files: <output_dir>/sample/[<output_name>_]<e{epoch:06d} | {step:06d}>_<index:02d>_<time>[_<seed>].png
  (the seed only when the prompt gives one).

Differences, all deliberate: a prompt without --w/--h is 1024x1024 (kohya uses 512x512 even for
SDXL, which SDXL renders badly); an unknown in-prompt option, dict key, sampler name or file
suffix is an error naming the file and line (kohya ignores the first three and falls back to
DDIM); options are read only after the prompt text (kohya also matches the prompt text itself,
so a prompt starting "n ..." becomes a negative prompt).

The models are put in eval mode while sampling (LoRA dropouts off) and each cell's mode is
restored afterwards. One Pipeline is kept for the run, so each image size compiles its UNet step
once and later samplings reuse it.
"""

import json
import logging
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from library.errors import UserError, read_utf8
from library.generation.prompts import DEFAULT_SIZE, parse_line_options

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5
DEFAULT_SAMPLER = "ddim"
MIN_SIZE = 64                # kohya rounds sizes down to a multiple of 8, at least 64
SAMPLE_DIR = "sample"


@dataclass(frozen=True)
class SamplePrompt:
    """One training sample. seed None: a new random seed each time (as kohya); sampler None:
    --sample_sampler."""
    index: int               # position in the prompt file: kohya's "enum", part of the file name
    prompt: str
    negative_prompt: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    seed: Optional[int] = None
    sampler: Optional[str] = None


def _steps(value):
    return max(1, min(1000, int(value)))    # kohya clamps --s to 1..1000


def _size(value):
    value = int(value)
    return max(MIN_SIZE, value - value % 8)


# kohya's line_to_prompt_dict options -> (dict key, value pattern, converter). Keys are the dict
# keys of .toml/.json prompts, so both forms go through one table.
_LINE_OPTIONS = {
    "w": ("width", r"\d+", int), "h": ("height", r"\d+", int), "d": ("seed", r"\d+", int),
    "s": ("sample_steps", r"\d+", int), "l": ("scale", r"[\d.]+", float),
    "n": ("negative_prompt", r".+", str), "ss": ("sample_sampler", r".+", str),
    "cn": ("controlnet_image", r".+", str),
    "g": ("guidance_scale", r"[\d.]+", float), "ctr": ("cfg_trunc_ratio", r".+", float),
    "rcfg": ("renorm_cfg", r".+", float), "fs": ("flow_shift", r".+", str),
}
# Keys kohya reads for other model families only: they change nothing for SDXL there either.
_NO_EFFECT = {"guidance_scale", "cfg_trunc_ratio", "renorm_cfg", "flow_shift"}
_KEY_TYPES = {"prompt": str, "negative_prompt": str, "width": int, "height": int,
              "sample_steps": int, "scale": (int, float), "seed": int, "sample_sampler": str,
              "controlnet_image": str, "guidance_scale": (int, float),
              "cfg_trunc_ratio": (int, float), "renorm_cfg": (int, float), "flow_shift": (int, float, str)}


def parse_sample_line(raw, where):
    """kohya's line_to_prompt_dict, strictly (unknown options and bad values are errors).
    Returns the dict form."""
    text, values = parse_line_options(raw, _LINE_OPTIONS, where)
    return {"prompt": text, **values}


def _to_prompt(entry, index, where):
    for key, value in entry.items():
        if key not in _KEY_TYPES:
            raise UserError(f"{where}: unknown key {key!r}; known: {', '.join(_KEY_TYPES)}")
        types = _KEY_TYPES[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise UserError(f"{where}: {key} = {value!r} has the wrong type")
    if "prompt" not in entry:
        raise UserError(f"{where}: no `prompt`")
    if "controlnet_image" in entry:
        raise UserError(f"{where}: ControlNet samples (controlnet_image, --cn) are not supported")
    for key in _NO_EFFECT & set(entry):
        logger.warning("%s: %s has no effect on SDXL samples (kohya ignores it too)", where, key)
    sampler = entry.get("sample_sampler")
    if sampler is not None:
        from library.generation.samplers import canonical_name
        sampler = sampler.strip().lower()       # kohya lower-cases the name
        try:
            canonical_name(sampler)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return SamplePrompt(
        index=index, prompt=entry["prompt"], negative_prompt=entry.get("negative_prompt") or "",
        width=_size(entry.get("width", DEFAULT_SIZE)), height=_size(entry.get("height", DEFAULT_SIZE)),
        steps=_steps(entry["sample_steps"]) if "sample_steps" in entry else DEFAULT_STEPS,
        scale=float(entry.get("scale", DEFAULT_SCALE)), seed=entry.get("seed"), sampler=sampler)


def load_sample_prompts(path):
    """The SamplePrompts of a .txt, .toml or .json prompt file (kohya's load_prompts)."""
    import toml
    lower = path.lower()
    if not lower.endswith((".txt", ".toml", ".json")):
        raise UserError(f"--sample_prompts {path}: use a .txt, .toml or .json file")
    text = read_utf8(path, "--sample_prompts file")
    items = []      # (entry dict or line, where)
    if lower.endswith(".txt"):
        items = [(line, f"{path}:{n}") for n, line in enumerate(text.splitlines(), 1)
                 if line.strip() and line[0] != "#"]
    elif lower.endswith(".toml"):
        try:
            data = toml.loads(text)
        except toml.TomlDecodeError as e:
            raise UserError(f"--sample_prompts {path} is not valid TOML: {e}") from None
        common = dict(data.get("prompt", {}))
        subsets = common.pop("subset", None)
        if not isinstance(subsets, list) or set(data) != {"prompt"}:
            raise UserError(f"--sample_prompts {path}: expected a [prompt] table with "
                            f"[[prompt.subset]] entries")
        for n, subset in enumerate(subsets):
            both = sorted(set(common) & set(subset))
            if both:    # kohya fails here with "dict() got multiple values for keyword argument"
                raise UserError(f"{path}: [[prompt.subset]] {n + 1} repeats {', '.join(both)} "
                                f"from [prompt]; set each key in one place")
            items.append(({**common, **subset}, f"{path}: [[prompt.subset]] {n + 1}"))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--sample_prompts {path} is not valid JSON: {e}") from None
        if not isinstance(data, list):
            raise UserError(f"--sample_prompts {path}: expected a list of prompts")
        items = [(item, f"{path}: item {n + 1}") for n, item in enumerate(data)]
    prompts = []
    for index, (item, where) in enumerate(items):
        if isinstance(item, str):
            item = parse_sample_line(item, where)
        elif not isinstance(item, dict):
            raise UserError(f"{where}: a prompt is a string or a table, not {type(item).__name__}")
        prompts.append(_to_prompt(item, index, where))
    if not prompts:
        raise UserError(f"--sample_prompts {path} has no prompts")
    return prompts


# --- when, and where ----------------------------------------------------------------------------

def check_sample_options(args):
    """Parse-time checks; kohya's rule that a trigger <= 0 means off (verify_training_args)."""
    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            logger.warning("--%s %d <= 0: sampling by it is off (as kohya)", name, value)
            setattr(args, name, None)
    triggered = args.sample_at_first or args.sample_every_n_steps or args.sample_every_n_epochs
    if triggered and not args.sample_prompts:
        raise UserError("--sample_at_first / --sample_every_n_steps / --sample_every_n_epochs need "
                        "--sample_prompts (a .txt, .toml or .json prompt file)")
    if not args.sample_prompts:
        return []
    prompts = load_sample_prompts(args.sample_prompts)
    from library.generation.requests import check_size
    from library.generation.samplers import schedule
    for p in prompts:   # e.g. pndm needs 4 steps: fail now, not at the first sampling
        try:
            check_size(p.width, p.height, "--w/--h")
            schedule(p.sampler or args.sample_sampler, p.steps)
        except UserError as e:
            raise UserError(f"--sample_prompts {args.sample_prompts}, prompt {p.index + 1}: {e}") from None
    if not triggered:
        logger.warning("--sample_prompts is set but no --sample_every_n_steps, "
                       "--sample_every_n_epochs or --sample_at_first: no samples will be made")
    return prompts


def is_due(args, step, epoch=None):
    """kohya's sample_images_common: epoch is None after an optimizer step, else the finished
    epoch (1-based; 0 for the call before training)."""
    if step == 0:
        return bool(args.sample_at_first)
    if args.sample_every_n_epochs:
        return epoch is not None and epoch % args.sample_every_n_epochs == 0
    if args.sample_every_n_steps:
        return epoch is None and step % args.sample_every_n_steps == 0
    return False


def sample_file_name(output_name, index, seed, step, epoch=None, when=None):
    """kohya's name: [<output_name>_]<e{epoch:06d} | {step:06d}>_<index:02d>_<YYYYmmddHHMMSS>[_<seed>].png"""
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(when))
    prefix = "" if output_name is None else f"{output_name}_"
    suffix = "" if seed is None else f"_{seed}"
    return f"{prefix}{number}_{index:02d}_{stamp}{suffix}.png"


# --- making them ----------------------------------------------------------------------------------

@contextmanager
def eval_mode(*cells):
    """Every cell under `cells` in eval mode (LoRA dropouts off), each restored to its own mode
    and phase afterwards. Restoring per cell matters: the compiled train step was traced with
    these modes, and MindSpore keys its graph cache on the outer cell's phase only, so it would
    not retrace if a child cell's mode stayed changed."""
    saved = [(cell, cell.training, cell.phase) for root in cells
             for _, cell in root.cells_and_names()]
    try:
        for root in cells:
            root.set_train(False)
        yield
    finally:
        for cell, mode, phase in saved:     # set_train would recurse; restore cell by cell
            cell.add_flags(training=mode)
            cell.phase = phase


class TrainingSampler:
    """Makes and writes the samples that are due; holds one Pipeline for the whole run."""

    def __init__(self, args, models, log=None, writer=True):
        self.args = args
        self.models = models
        self.log = log          # a RunLog: one "sample" event per sampling
        # under msrun only rank 0 (the writer) samples; the others have nothing to do
        self.prompts = load_sample_prompts(args.sample_prompts) \
            if args.sample_prompts and writer else []
        self.folder = os.path.join(args.output_dir, SAMPLE_DIR)
        self.pipe = None
        self.written = []
        self._random = random.SystemRandom()    # a prompt without --d gets a fresh seed (kohya)

    def _pipeline(self):
        from library.generation.pipeline import Pipeline
        from library.generation.requests import GenerationOptions
        a = self.args
        options = GenerationOptions(
            batch_size=1, text_rule="training", max_token_length=a.max_token_length,
            sampler_preset="training",
            prediction_type="v_prediction" if a.v_parameterization else "epsilon",
            compile=not a.pynative, static_shapes=a.static_shapes,
            model_name=os.path.splitext(os.path.basename(
                str(a.pretrained_model_name_or_path).rstrip("/")))[0])
        return Pipeline(self.models, options)

    def requests(self):
        from library.generation.requests import ImageRequest
        return [ImageRequest(
            prompt=p.prompt, negative_prompt=p.negative_prompt, width=p.width, height=p.height,
            steps=p.steps, scale=p.scale, sampler=p.sampler or self.args.sample_sampler,
            seed=p.seed if p.seed is not None else self._random.randint(0, 2 ** 31 - 1),
            index=p.index) for p in self.prompts]

    def __call__(self, step, epoch=None):
        """Samples if due at this point (kohya's sample_images); returns the files written."""
        if not self.prompts or not is_due(self.args, step, epoch):
            return []
        m = self.models
        start = time.time()
        written = []
        with eval_mode(m.unet, m.text_encoder1, m.text_encoder2):
            if self.pipe is None:
                self.pipe = self._pipeline()     # its constructor sets eval mode too
            by_index = {p.index: p for p in self.prompts}

            def write(result):
                given_seed = by_index[result.request.index].seed
                name = sample_file_name(self.args.output_name, result.request.index, given_seed,
                                        step, epoch)
                written.append(_write_png(self.folder, name, result))

            self.pipe.generate(self.requests(), on_image=write)
        self.written += written
        if self.log is not None:
            self.log.event("sample", step=step, epoch=epoch, files=written,
                           seconds=time.time() - start, graphs=len(self.pipe.stats.graphs))
        logger.info("wrote %d sample image(s) to %s in %.1f s", len(written), self.folder,
                    time.time() - start)
        return written


def _write_png(folder, name, result):
    from library.generation.png import write_png
    os.makedirs(folder, exist_ok=True)
    return write_png(os.path.join(folder, name), result)


def add_sample_arguments(parser):
    """kohya's sample options (train_util.py:4175-4196), with its names and defaults."""
    from library.generation.samplers import SAMPLER_NAMES
    a = parser.add_argument
    a("--sample_every_n_steps", type=int, default=None,
      help="make samples every N optimizer steps (<= 0: off)")
    a("--sample_every_n_epochs", type=int, default=None,
      help="make samples every N epochs; when set, --sample_every_n_steps is ignored (as kohya)")
    a("--sample_at_first", action="store_true", help="make samples before training starts")
    a("--sample_prompts", type=str, default=None,
      help="prompt file (.txt, .toml or .json) with kohya's in-prompt options --w --h --d --s "
           "--l --n --ss; a prompt without --w/--h is 1024x1024 (kohya: 512x512)")
    a("--sample_sampler", type=str, default=DEFAULT_SAMPLER, choices=list(SAMPLER_NAMES),
      help="sampler of the samples (a prompt's --ss overrides it)")
