"""Images out of and into the pipeline: arrays <-> PIL images as kohya converts them, and PNG
files with kohya's text chunks plus the A1111 `parameters` chunk other tools read, written
atomically."""

import io

import numpy as np

from library.generation import samplers
from library.safetensors_io import write_atomically


def image_to_array(image, width, height):
    """PIL image -> (3, height, width) float32 in [-1, 1], LANCZOS-resized when the size differs."""
    from PIL import Image
    image = image.convert("RGB") if image.mode != "RGB" else image
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return (np.asarray(image, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1)


def array_to_image(array):
    """(3, H, W) in [-1, 1] -> PIL RGB: (x / 2 + 0.5) clipped to [0, 1], x255, rounded (kohya)."""
    from PIL import Image
    arr = np.clip(array.transpose(1, 2, 0) / 2 + 0.5, 0.0, 1.0)
    return Image.fromarray((arr * 255).round().astype(np.uint8))


A1111_SAMPLER = {"ddim": "DDIM", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a", "heun": "Heun",
                 "dpm_2": "DPM2", "dpm_2_a": "DPM2 a", "dpmsolver++": "DPM++ 2M", "pndm": "PNDM",
                 "dpmsolver": "DPM-Solver", "dpmsingle": "DPM++ 2S"}


def _quote(value):
    """A1111 infotext quoting for a value that holds ',', ':' or quotes."""
    text = str(value)
    if any(c in text for c in ",:\"\n"):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def png_metadata(request, width, height, stage="", options=None, networks=None, muls=None):
    """PNG text chunks: kohya's keys (sdxl_gen_img.py:2356-2380; its img2img reads `prompt` and
    `negative-prompt` back), then an A1111-style `parameters` chunk that A1111, Forge, ComfyUI
    readers and civitai show. Values are kohya's: the seed as given (not seed - 1 for a saved
    highres first pass), the sampler name as typed, the conditioning sizes resolved."""
    r = request
    oh = r.original_height if r.original_height is not None else height
    ow = r.original_width if r.original_width is not None else width
    md = {
        "prompt": r.prompt, "seed": str(r.seed), "sampler": r.sampler, "steps": str(r.steps),
        "scale": str(r.scale), "negative-prompt": r.negative_prompt,
    }
    if r.clip_prompt is not None:
        md["clip-prompt"] = r.clip_prompt
    if r.raw_prompt is not None:
        md["raw-prompt"] = r.raw_prompt
    md.update({
        "original-height": str(oh), "original-width": str(ow),
        "original-height-negative": str(r.original_height_negative if r.original_height_negative is not None else oh),
        "original-width-negative": str(r.original_width_negative if r.original_width_negative is not None else ow),
        "crop-top": str(r.crop_top or 0), "crop-left": str(r.crop_left or 0),
        "width": str(width), "height": str(height),
    })
    params = [("Steps", r.steps), ("Sampler", A1111_SAMPLER.get(samplers.canonical_name(r.sampler), r.sampler)),
              ("CFG scale", r.scale), ("Seed", r.seed), ("Size", f"{width}x{height}")]
    if options is not None and options.model_name:
        params.append(("Model", options.model_name))
    if r.init_image is not None:
        params.append(("Denoising strength", r.strength))
    if options is not None and options.highres_fix_scale and stage == "1":
        params += [("Hires upscale", round(1 / options.highres_fix_scale, 4)),
                   ("Hires steps", r.steps),
                   ("Hires upscaler", "Latent" if options.highres_fix_latents_upscaling else "Lanczos")]
    if ow != width or oh != height:
        params.append(("Original size", f"{ow}x{oh}"))
    if networks:
        loras = ", ".join(f"{name}: {m:g}" for name, m in zip(networks, muls))
        md["networks"] = loras
        params.append(("Lora", loras))
    params.append(("Generator", "sdxl_gen_img (MindSpore port of kohya-ss/sd-scripts)"))
    text = r.prompt + "\nNegative prompt: " + r.negative_prompt + "\n"
    md["parameters"] = text + ", ".join(f"{k}: {_quote(v)}" for k, v in params)
    return md


def png_info(metadata):
    """PIL PngInfo with one tEXt (or iTXt, for non-Latin-1 text) chunk per key."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for k, v in metadata.items():
        try:
            v.encode("latin-1")
            info.add_text(k, v)
        except UnicodeEncodeError:
            info.add_itxt(k, v)
    return info


def write_png(path, result):
    """Write a GeneratedImage as a PNG with its text metadata, atomically (a temp file, then a
    rename), so a killed run never leaves a cut-off image under the final name."""
    buf = io.BytesIO()
    result.image.save(buf, format="PNG", pnginfo=png_info(result.metadata))
    write_atomically(path, [buf.getvalue()])
    return path
