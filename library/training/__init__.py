"""The trainer: sdxl_train_network.py's run, kohya's train step, and what it needs around it.

Host code (numpy; no MindSpore, so bad input fails before it is imported):
    args.py               kohya's options and --config_file
    plan.py               prepare(): every check that needs no model, the dataset, the step counts
    noise_draws.py        the DDPM schedule and each step's random draws (NoiseSampler)
    loss_options.py       LossOptions and the per-timestep tables (min-SNR, debiased, huber c)
    optimizer_options.py  --optimizer_type / --optimizer_args -> the optimizer to build
    schedules.py          LRSchedule: each step's learning rates
    batches.py            BatchAssembler: a loader batch -> the step's input arrays
    world.py, filenames.py, state.py, saving.py, run_metadata.py, logs.py, interrupts.py
                          msrun's ranks, kohya's file names, state folders, save groups, ss_* keys,
                          the run log, Ctrl-C
Graph code (Cells run inside the compiled step) and the run:
    forward_diffusion.py  draws -> noisy latents and the target
    losses.py             DiffusionLoss
    optimizer_cells.py    AdamW, Lion, SGDNesterov, Adafactor, Prodigy over flat buffers (flat.py)
    grad_ops.py, loss_scale_policy.py   clipping and the fp16 loss scale; what a skipped step does
    step.py               GradStep and ApplyStep: the train step's two graphs
    compile.py, compile_cache.py   compiling them once per run, and across runs
    graph_stats.py        the operators a compiled graph launches (benches and tests count them)
    distributed.py        msrun: joining the job, the gradient mean, replica checks
    cache_encoders.py     the models as the caches' encode functions
    build.py              models, dtypes, caches, LoRA, optimizer, schedule, step cells
    checkpoints.py        saves, their rotation, state folders, --resume
    loop.py               train(): the epochs and steps
    samples.py, validation.py   sample images and validation loss during training
"""
