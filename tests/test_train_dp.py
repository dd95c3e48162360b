"""Data parallelism under msrun (library/training/distributed.py, the loader's sharding, the
caches' exchange).

The default suite checks the pieces in-process: msrun's environment, the batch sharding, and the
cache exchange with two ranks simulated by threads. The acceptance test (marked `full`, run by
`make test-full`: 8.5 minutes here, plus 50 s for the failure test; two msrun workers compile on
2 cores) trains with msrun and 2 CPU workers and compares with one process accumulating the same
two batches.
"""

import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import ROOT, run_tool
from library.data.loader import BatchLoader, batches_per_rank, shard_positions
from library.training.world import World, world_from_env
from library.errors import UserError


# --- msrun's environment ------------------------------------------------------------------------

def test_world_from_env():
    assert world_from_env({}) == World(0, 1, 0)
    assert not world_from_env({}).distributed and world_from_env({}).is_main
    env = {"MS_ROLE": "MS_WORKER", "RANK_ID": "1", "RANK_SIZE": "2", "MS_WORKER_NUM": "2",
           "DEVICE_ID": "1"}
    w = world_from_env(env)
    assert (w.rank, w.size, w.local_rank, w.distributed, w.is_main) == (1, 2, 1, True, False)
    # RANK_SIZE missing: the group size is MS_WORKER_NUM
    assert world_from_env({**env, "RANK_SIZE": ""}).size == 2
    # the scheduler process (MS_ROLE=MS_SCHED) and a plain run are single processes
    assert world_from_env({**env, "MS_ROLE": "MS_SCHED"}) == World()
    with pytest.raises(UserError, match="RANK_ID"):
        world_from_env({**env, "RANK_ID": "x"})
    with pytest.raises(UserError, match="outside a group of 2"):
        world_from_env({**env, "RANK_ID": "2"})


# --- sharding -------------------------------------------------------------------------------------

def test_shard_positions_round_robin_and_padding():
    assert shard_positions(5, 0, 1) == [0, 1, 2, 3, 4]
    assert shard_positions(5, 0, 2) == [0, 2, 4] and shard_positions(5, 1, 2) == [1, 3, 5]
    assert batches_per_rank(5, 2) == 3 and batches_per_rank(4, 2) == 2 and batches_per_rank(1, 4) == 1
    # from a resume round: position 2 starts the second round of two
    assert shard_positions(5, 1, 2, start=2) == [3, 5]
    for n, size in ((7, 3), (6, 3), (2, 4)):
        shares = [shard_positions(n, r, size) for r in range(size)]
        assert {len(s) for s in shares} == {batches_per_rank(n, size)}
        every = sorted(p for s in shares for p in s)
        assert every == list(range(len(every)))          # no position twice, none skipped
        assert {p % n for p in every} == set(range(n))   # every batch runs


@pytest.fixture(scope="module")
def five_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_data") / "img" / "1_sks"
    root.mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (64, 64), (40 * i, 20, 200)).save(root / f"{i}.png")
    return root.parent


def _group(data_dir, seed=4):
    from library.data.config import resolve_dataset_configs
    from library.data.dataset import build_dataset_groups
    from library.training.args import parse_args
    _, args = parse_args(["--train_data_dir", str(data_dir), "--resolution", "64",
                          "--train_batch_size", "1"])
    return build_dataset_groups(resolve_dataset_configs(args), seed=seed)[0]


def test_loader_shards_whole_batches_with_global_keys(five_images):
    group = _group(five_images)
    single = [(b[0]["batch_key"], b[0]["path"]) for b in BatchLoader(group, 4).epoch(2)]
    ranks = [BatchLoader(group, 4, rank=r, world_size=2) for r in range(2)]
    shares = [[(b[0]["batch_key"], b[0]["path"]) for b in loader.epoch(2)] for loader in ranks]
    assert [len(loader) for loader in ranks] == [3, 3] and len(single) == 5
    # rank r runs global positions r, r+2, ...; the sixth position repeats the epoch's first batch
    # with its own key (so its own noise)
    assert shares[0] == [single[0], single[2], single[4]]
    assert shares[1][:2] == [single[1], single[3]]
    assert shares[1][2] == ((2, 5), single[0][1])
    # the position to resume from is the next round, the same on both ranks
    assert ranks[0].state_dict() == ranks[1].state_dict() == {"seed": 4, "epoch": 3, "batch": 0}
    it = ranks[1].epoch(1)
    next(it)
    assert ranks[1].state_dict()["batch"] == 2


# --- the caches' exchange, with two ranks simulated by threads -------------------------------------

class ThreadShare:
    """A `share` whose all_reduce_sum meets the other threads' calls, as a collective does."""

    def __init__(self, rank, size, state):
        self.rank, self.size, self.local_rank = rank, size, rank
        self.state = state

    def all_reduce_sum(self, array):
        s = self.state
        s["parts"][self.rank] = np.asarray(array, np.float32)
        s["barrier"].wait()
        total = np.sum([s["parts"][r] for r in range(self.size)], axis=0).astype(np.float32)
        s["barrier"].wait()
        return total


def _run_ranks(size, fn):
    state = {"parts": {}, "barrier": threading.Barrier(size)}
    results, errors = [None] * size, []

    def run(rank):
        try:
            results[rank] = fn(ThreadShare(rank, size, state))
        except Exception as e:      # surfaced below, with the rank
            errors.append((rank, e))
            state["barrier"].abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def _fake_encoders():
    def encode_images(batch, seeds):
        b = np.asarray(batch, np.float32)
        return np.stack([np.full((4, 8, 8), b[i].mean() + s % 97, np.float32) for i, s in enumerate(seeds)])

    def encode_text(captions):
        return (np.stack([np.full((77, 16), len(c), np.float32) for c in captions]),
                np.stack([np.full((8,), hash(c) % 13, np.float32) for c in captions]))
    return encode_images, encode_text


@pytest.mark.parametrize("to_disk", [False, True])
def test_cache_exchange_gives_every_rank_the_whole_cache(five_images, to_disk, tmp_path):
    import shutil
    from library.data.cache import build_latent_cache, build_text_cache
    data = tmp_path / "img"
    shutil.copytree(five_images, data)
    group = _group(data)
    enc_img, enc_txt = _fake_encoders()
    records = [r for _, r in group.records()]

    def build(share=None):
        lat = build_latent_cache(group, enc_img, "vae", to_disk=to_disk, batch_size=2, progress=False,
                                 share=share)
        txt = build_text_cache(group, enc_txt, "te", to_disk=to_disk, batch_size=1, progress=False, share=share)
        return lat, txt

    ranks = _run_ranks(2, build)
    files = sorted(os.listdir(data / "1_sks"))
    if to_disk:
        for f in files:
            if f.endswith(".npz"):
                os.unlink(data / "1_sks" / f)
    single_lat, single_txt = build()
    # each rank encoded its share only (5 images in VAE batches of 2 -> batches of 2, 2, 1)
    assert sorted(lat.encoded_images for lat, _ in ranks) == [2, 3]
    assert sum(txt.encoded_captions for _, txt in ranks) == single_txt.encoded_captions
    for lat, txt in ranks:
        for r in records:
            np.testing.assert_array_equal(lat.get(r), single_lat.get(r))
            for a, b in zip(txt.get(r), single_txt.get(r)):
                np.testing.assert_array_equal(a, b)
    if to_disk:
        assert len([f for f in files if f.endswith(".npz")]) == 10
        # a second run finds every entry on disk, on both ranks, and encodes nothing
        again = _run_ranks(2, build)
        assert [(lat.hits, lat.encoded_images, txt.encoded_captions) for lat, txt in again] == [(5, 0, 0)] * 2


def test_cache_disk_hits_must_hold_on_every_rank(five_images, tmp_path):
    """A file valid for one rank only (nodes without a shared disk) is recomputed by all, so
    every rank runs the same exchange."""
    import shutil
    from library.data.cache import build_latent_cache
    data = tmp_path / "img"
    shutil.copytree(five_images, data)
    group = _group(data)
    enc_img, _ = _fake_encoders()
    build_latent_cache(group, enc_img, "vae", to_disk=True, progress=False)
    results = _run_ranks(2, lambda share: build_latent_cache(
        group, enc_img, "vae" if share.rank == 0 else "other-vae", to_disk=True, progress=False, share=share))
    assert [c.hits for c in results] == [0, 0] and sum(c.encoded_images for c in results) == 5


# --- acceptance: msrun with two CPU workers ---------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun(workers, script_args, log_dir, check=True):
    """`msrun` from this venv with the venv on PATH (msrun starts `python` from PATH)."""
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=bindir + os.pathsep + os.environ["PATH"])
    proc = subprocess.run([os.path.join(bindir, "msrun"), f"--worker_num={workers}",
                           f"--local_worker_num={workers}", f"--master_port={_free_port()}",
                           "--join=True", f"--log_dir={log_dir}", *map(str, script_args)],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        logs = "".join(open(os.path.join(log_dir, f)).read()[-3000:] for f in sorted(os.listdir(log_dir)))
        raise AssertionError(f"msrun failed ({proc.returncode}):\n{proc.stderr[-2000:]}\n{logs}")
    return proc


def _read_log(path):
    lines = [json.loads(x) for x in open(path)]
    return [x for x in lines if "step" in x and "event" not in x], [x for x in lines if "event" in x]


@pytest.fixture(scope="module")
def four_captioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_accept") / "img" / "1_sks"
    root.mkdir(parents=True)
    for i, color in enumerate([(210, 40, 40), (40, 60, 210), (40, 170, 60), (200, 200, 30)]):
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse([8 + 4 * i, 10, 50, 54 - 3 * i], fill=color)
        img.save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a circle, colour {i}")
    return root.parent


@pytest.mark.full
def test_msrun_two_workers_equal_one_process_accumulating(tiny_ckpt, four_captioned, tmp_path):
    """msrun, 2 CPU workers, batch 1 each, 3 steps, against one process with
    --gradient_accumulation_steps 2 over the same batches: the same LoRA within 1e-5 relative,
    both ranks' copies identical (checked by the trainer at the save), the same average loss,
    and only rank 0 writes files."""
    from library.safetensors_io import SafetensorsFile
    common = ["sdxl_train_network.py", "--pretrained_model_name_or_path", tiny_ckpt,
              "--train_data_dir", four_captioned, "--resolution", "64", "--caption_extension", ".txt",
              "--network_module", "networks.lora", "--network_dim", "4", "--network_train_unet_only",
              "--cache_latents", "--cache_text_encoder_outputs", "--max_data_loader_n_workers", "0",
              "--seed", "7", "--learning_rate", "1e-3", "--max_train_steps", "3", "--output_name", "lora",
              "--train_batch_size", "1"]
    dp_out, one_out = tmp_path / "dp", tmp_path / "one"
    msrun(2, [*common, "--output_dir", dp_out], tmp_path / "msrun_logs")
    run_tool(*common, "--output_dir", one_out, "--gradient_accumulation_steps", "2")

    assert sorted(os.listdir(dp_out)) == ["lora.safetensors", "lora_log.jsonl", "lora_loss.png"]
    dp, one = SafetensorsFile(dp_out / "lora.safetensors"), SafetensorsFile(one_out / "lora.safetensors")
    assert sorted(dp.keys()) == sorted(one.keys())
    trained = 0
    for key in one.keys():
        a, b = dp.get(key).astype(np.float64), one.get(key).astype(np.float64)
        scale = max(np.abs(b).max(), 1e-12)
        assert np.abs(a - b).max() / scale <= 1e-5, key
        trained += key.endswith("lora_up.weight") and np.abs(b).max() > 0
    assert trained > 0

    steps, events = _read_log(dp_out / "lora_log.jsonl")
    one_steps, _ = _read_log(one_out / "lora_log.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3]
    # the logged loss is the mean over the ranks: its running average is the single run's
    np.testing.assert_allclose([s["loss/average"] for s in steps],
                               [s["loss/average"] for s in one_steps], rtol=1e-5)
    replicas = [e for e in events if e["event"] == "replicas"]
    assert replicas and replicas[-1]["ranks"] == 2 and replicas[-1]["max_relative_difference"] == 0.0
    # 4 batches over 2 ranks: 2 steps per epoch, so 3 steps run 2 epochs
    start = next(e for e in events if e["event"] == "start")
    assert start["num_epochs"] == 2


@pytest.mark.full
def test_msrun_failed_rank_stops_the_job(tmp_path):
    """A rank that fails makes msrun fail within a minute (the workers join the job before
    parsing anything, so msrun's scheduler never waits for a worker that died early), and the
    rank's log names it and the error."""
    logs = tmp_path / "logs"
    proc = msrun(2, ["sdxl_train_network.py", "--pretrained_model_name_or_path", tmp_path / "missing.safetensors",
                     "--network_module", "networks.lora", "--output_dir", tmp_path / "out",
                     "--train_data_dir", tmp_path], logs, check=False)
    assert proc.returncode != 0
    assert "Distributed job exited with exception" in proc.stdout + proc.stderr
    # the first rank to fail names itself and the error; msrun may kill the other one before
    # it gets there
    failed = [f for f in sorted(logs.glob("worker_*.log")) if "of 2 stopped" in f.read_text()]
    assert failed, "no worker log names its rank"
    text = failed[0].read_text()
    assert f"rank {failed[0].stem[-1]} of 2 stopped" in text and "missing.safetensors: file not found" in text


def test_step_counts_follow_the_world_size(tiny_ckpt, five_images, tmp_path, monkeypatch):
    """kohya: an epoch is ceil(batches / processes / accumulation) steps, and --max_train_epochs
    converts with it. 5 batches over 2 ranks: 3 each (the padded share)."""
    from library.training.args import parse_args
    from library.training.plan import prepare

    def plan(*extra):
        _, args = parse_args(["--pretrained_model_name_or_path", str(tiny_ckpt), "--train_data_dir",
                              str(five_images), "--resolution", "64", "--network_module", "networks.lora",
                              "--output_dir", str(tmp_path), "--seed", "1", *extra])
        return prepare(args)

    assert plan("--max_train_epochs", "2").num_update_steps_per_epoch == 5
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("RANK_ID", "0")
    monkeypatch.setenv("RANK_SIZE", "2")
    p = plan("--max_train_epochs", "2")
    assert (p.num_update_steps_per_epoch, p.args.max_train_steps) == (3, 6)
    p = plan("--max_train_epochs", "2", "--gradient_accumulation_steps", "2")
    assert (p.num_update_steps_per_epoch, p.args.max_train_steps) == (2, 4)
    p = plan("--max_train_steps", "7")
    assert (p.num_update_steps_per_epoch, p.num_epochs) == (3, 3)


def test_rank0_int_sends_a_32_bit_seed_exactly(monkeypatch):
    """A drawn seed reaches every rank whole (float32 alone would round it above 2**24)."""
    from library.training import distributed
    seed = 0xFEDCBA98
    sent = {}

    def fake_sum(world, array):         # rank 0's contribution plus rank 1's zeros
        sent[world.rank] = array
        return np.asarray(array, np.float32) + 0 if world.rank == 0 else sent[0]

    monkeypatch.setattr(distributed, "all_reduce_sum", fake_sum)
    assert distributed.rank0_int(World(0, 2), seed) == seed
    assert distributed.rank0_int(World(1, 2), 12345) == seed
    assert sent[1].tolist() == [0, 0]
    assert distributed.rank0_int(World(), 77) == 77
