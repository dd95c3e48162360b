"""What a training state remembers of its dataset, so that `--resume` onto a dataset that changed
says so: the state's data position (epoch, batch) indexes the batches of the dataset it was
saved with, and would silently mean other images.

    record = dataset_record(train_group)        # saved in train_state.json
    for line in dataset_changes(record, train_group): logger.warning(line)

Each image is known by its path, size and modification time (a stat, not a hash: cheap for any
dataset size; an edit that keeps both is missed, as with --skip_cache_check).
"""

import os


def _files(group):
    files = {}
    for _, record in group.records():
        try:
            st = os.stat(record.path)
            files[record.path] = [st.st_size, st.st_mtime_ns]
        except OSError:     # gone since the dataset was built: the loader will say so
            files[record.path] = None
    return files


def dataset_record(group):
    return {"images": _files(group), "batches_per_epoch": group.num_batches()}


def _names(paths):
    shown = ", ".join(sorted(paths)[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def dataset_changes(saved, group, position):
    """Warning lines for what differs between the state's dataset and this run's, and how the
    saved position `position` ({"epoch", "batch"}) maps onto this run's batches."""
    now = _files(group)
    before = saved["images"]
    added = [p for p in now if p not in before]
    removed = [p for p in before if p not in now]
    edited = [p for p in now if p in before and now[p] != before[p]]
    lines = []
    if added or removed or edited:
        parts = [f"{len(paths)} {what} ({_names(paths)})" for what, paths in (
            ("added", added), ("removed", removed), ("changed", edited)) if paths]
        lines.append(f"--resume: the dataset differs from the saved run's: images "
                     f"{'; '.join(parts)}. The run continues, but not as the saved run would have")
    batches, saved_batches = group.num_batches(), saved["batches_per_epoch"]
    if batches != saved_batches:
        at, epoch = position["batch"], position["epoch"]
        maps = (f"continues at batch {at} of {batches} in this run's order of epoch {epoch}, so "
                "some of that epoch's images are seen twice or not at all" if at < batches else
                f"is past this run's {batches}, so epoch {epoch} counts as done")
        lines.append(f"--resume: the saved run had {saved_batches} batches per epoch, this one has "
                     f"{batches}: the saved position, batch {at} of epoch {epoch}, {maps}")
    return lines
