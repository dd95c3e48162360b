"""Image generation shared by sdxl_gen_img.py and training-time samples.

Host side (no MindSpore):
    args.py       the generator's options: kohya's sdxl_gen_img parser, and what it refuses
    prompts.py    kohya's prompt-file lines, in-prompt options (also for training samples), and
                  the token chunks and weights the text encoders and mean re-normalisation need
    samplers.py   kohya's sampler set as numpy functions over a UNet callable (`samplers.sample`)
    requests.py   what the pipeline is asked for and gives back; the size rules
    png.py        arrays <-> images, PNG files with kohya's and A1111's metadata
Graph side:
    networks.py   the LoRAs a run applies, unmerged, merged or pre-calculated; --vae
    guidance.py   the compiled UNet step with classifier-free guidance
    pipeline.py   Pipeline: text, conditioning, sampling, VAE, with its graphs kept for the run
    cli.py        sdxl_gen_img.py's run: requests from prompts and options, images to files
"""
