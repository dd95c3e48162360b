"""Image generation shared by sdxl_gen_img.py and training-time samples.

samplers.py: kohya's sampler set as numpy functions over a UNet callable (`samplers.sample`).
prompts.py: kohya's prompt-file lines, in-prompt options, (word:1.2) weighting, and the token
chunks and weights that the text encoders and the mean re-normalisation need.
Neither imports MindSpore; the pipeline that runs the models sits on top of them.
"""
