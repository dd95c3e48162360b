"""Where this process stands in an msrun job (its rank, the group size), read from the
environment msrun sets: no MindSpore here, so the trainer plans its steps and checks its options
before MindSpore is imported. library/training/distributed.py brings communication up."""

from dataclasses import dataclass

from library.errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place: global rank and group size, and its rank within its node (the
    first worker of each node writes the cache files there)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        """The process that writes files (LoRA, logs, loss curve) and shows progress."""
        return self.rank == 0

    @property
    def distributed(self):
        return self.size > 1


def world_from_env(environ):
    """The World msrun declares in `environ` (no communication needed: the step counts are
    planned from it before any model loads). A single process when not under msrun."""
    if environ.get("MS_ROLE") != "MS_WORKER" or "RANK_ID" not in environ:
        return World()
    try:
        rank = int(environ["RANK_ID"])
        size = int(environ.get("RANK_SIZE") or environ["MS_WORKER_NUM"])
    except (KeyError, ValueError):
        raise UserError("msrun's environment is incomplete or malformed (RANK_ID "
                        f"{environ.get('RANK_ID')!r}, RANK_SIZE {environ.get('RANK_SIZE')!r}, "
                        f"MS_WORKER_NUM {environ.get('MS_WORKER_NUM')!r}): start the run with "
                        "msrun, or without any of these variables") from None
    if not 0 <= rank < size:
        raise UserError(f"msrun gave rank {rank} outside a group of {size}")
    # msrun's DEVICE_ID is the device index within the node; init() asks MindSpore instead
    return World(rank, size, int(environ.get("DEVICE_ID", rank)))
