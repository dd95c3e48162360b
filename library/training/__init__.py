"""Training components: noise, losses, optimizers, LR schedules (the train step and loop build on them)."""
