"""kohya's names for what a run writes into --output_dir, and its rules for letting old ones go.

    <name>.safetensors                  the final LoRA (name: --output_name, else "last")
    <name>-000003.safetensors           after epoch 3 (else "epoch-000003")
    <name>-step00000100.safetensors     after step 100 (else "at-step00000100")
    <name>-state, <name>-000003-state, <name>-step00000100-state   the matching state folders
    <name>-interrupted.safetensors, <name>-interrupted-state         (this port) after Ctrl-C
"""

DEFAULT_LAST_NAME, DEFAULT_EPOCH_NAME, DEFAULT_STEP_NAME = "last", "epoch", "at"


def last_name(args):
    return f"{args.output_name or DEFAULT_LAST_NAME}.safetensors"


def epoch_name(args, epoch):
    return f"{args.output_name or DEFAULT_EPOCH_NAME}-{epoch:06d}.safetensors"


def step_name(args, step):
    return f"{args.output_name or DEFAULT_STEP_NAME}-step{step:08d}.safetensors"


def last_state_name(args):
    return f"{args.output_name or DEFAULT_LAST_NAME}-state"


def epoch_state_name(args, epoch):
    return f"{args.output_name or DEFAULT_EPOCH_NAME}-{epoch:06d}-state"


def step_state_name(args, step):
    return f"{args.output_name or DEFAULT_STEP_NAME}-step{step:08d}-state"


def step_to_remove(args, step, keep):
    """kohya's get_remove_step_no: the step save that keeping the last `keep` steps lets go."""
    if not keep:
        return None
    stale = step - keep - 1
    stale -= stale % args.save_every_n_steps
    return stale if stale > 0 else None


def epoch_to_remove(args, epoch, keep):
    """The epoch save that keeping the last `keep` epoch saves lets go."""
    if not keep:
        return None
    stale = epoch - args.save_every_n_epochs * keep
    return stale if stale > 0 else None


def interrupted_name(args):
    """What a run stopped by Ctrl-C / SIGTERM saves (library.training.interrupts)."""
    return f"{args.output_name or DEFAULT_LAST_NAME}-interrupted.safetensors"


def interrupted_state_name(args):
    return f"{args.output_name or DEFAULT_LAST_NAME}-interrupted-state"
