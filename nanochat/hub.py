"""
Checkpoints off the box while training, and back onto a fresh machine.

In a trainer (each rank builds one; only one process per node uploads):

    add_push_arguments(parser)                     # nanochat.remote: --push-to URL (checked as parsed), --push-wait
    pusher = CheckpointPusher(args.push_to)        # None: does nothing
    save_checkpoint(checkpoint_dir, step, ...)     # atomic, meta last
    pusher.push(checkpoint_dir, step)              # returns at once: a background thread uploads
    pusher.close(args.push_wait)                   # at exit: waits (bounded), says what is still unpushed

On a fresh machine:

    python -m nanochat.hub pull s3://bucket/run1 [--source base] [--model-tag d24] [--step N]
    python -m scripts.base_train --depth=24 ... --resume-from-step last

The remote mirrors $NANOCHAT_BASE_DIR: URL/base_checkpoints/d24/{model,optim,meta}_<step>..., URL/tokenizer/...,
so one URL holds every stage of a run and `pull` puts the files back where the trainers look for them.

URLs (nanochat.remote): any fsspec URL (`file://`, `memory://`, `s3://`, `gs://` ...) or `hf://org/name[/folder]`.

A checkpoint is complete on the remote once its meta file is there: it goes last (within one commit on the hub).
Uploads that fail are logged and retried with exponential backoff; after the last try the checkpoint stays local
only (said loudly) and the next one is tried. Training never waits for an upload, except for the bounded wait
at exit. On several nodes each node's first process uploads its node's optimizer shards; `pull` only takes a
step whose shards are all there.
"""

import argparse
import filecmp
import os
import posixpath
import queue
import sys
import threading
import time

from nanochat.checkpoint_manager import CHECKPOINT_DIRS, meta_path, model_path, optim_path, read_meta
from nanochat.common import get_base_dir
from nanochat.remote import STEP_FILE, PushError, open_remote
from nanochat.training import find_checkpoint

TOKENIZER_DIR = "tokenizer"


# -----------------------------------------------------------------------------
# What a process uploads for one saved step

def node_leader_ranks():
    """The optimizer-shard ranks this process uploads: all of its node's (torchrun numbers ranks node by node) when
    it is the node's first process, else None (it uploads nothing)."""
    if int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return None
    rank = int(os.environ.get("RANK", 0))
    return range(rank, rank + int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def relative_to_base(path):
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(get_base_dir()))
    if rel.startswith(".."):
        raise PushError(f"{path} is not under NANOCHAT_BASE_DIR ({get_base_dir()}): the remote mirrors that folder")
    return rel.replace(os.sep, "/")


def step_files(checkpoint_dir, step, ranks, with_model):
    """[(local, remote-relative)] of one saved step: model, this node's optimizer shards, meta last."""
    folder = relative_to_base(checkpoint_dir)
    paths = [optim_path(checkpoint_dir, step, r) for r in ranks]
    if with_model:
        paths = [model_path(checkpoint_dir, step)] + paths + [meta_path(checkpoint_dir, step)]
    return [(p, f"{folder}/{os.path.basename(p)}") for p in paths if os.path.exists(p)]


def tokenizer_files():
    folder = os.path.join(get_base_dir(), TOKENIZER_DIR)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [(os.path.join(folder, n), f"{TOKENIZER_DIR}/{n}") for n in names
            if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]


# -----------------------------------------------------------------------------
# The background uploader

class CheckpointPusher:
    """Uploads saved checkpoints to `url` from a background thread; url None (or not a node's first process):
    every call does nothing. ranks: the optimizer shards to upload (default: this node's, in a running trainer)."""

    retries = 8            # attempts per checkpoint
    backoff_seconds = 2.0  # wait backoff * 2**(attempt - 1) between attempts, at most max_backoff_seconds
    max_backoff_seconds = 300.0

    def __init__(self, url, ranks=None):
        self.url = url
        ranks = (ranks or node_leader_ranks()) if url else None
        self.active = ranks is not None
        self.ranks, self.owns_model = ranks, ranks is not None and ranks.start == 0
        self.lock = threading.Lock()
        self.pending, self.pushed, self.failed = [], [], []  # labels like "base_checkpoints/d12 step 500"
        if self.active:
            self.remote = open_remote(url)
            self.jobs = queue.Queue()
            self.thread = threading.Thread(target=self._work, name="checkpoint-pusher", daemon=True)
            self.thread.start()

    def push(self, checkpoint_dir, step):
        """Queue the files of a checkpoint that was just saved; returns immediately."""
        if not self.active:
            return
        files = step_files(checkpoint_dir, step, self.ranks, self.owns_model)
        if self.owns_model:  # a fresh machine needs the tokenizer too: with every checkpoint (small), before the meta
            files = files[:-1] + tokenizer_files() + files[-1:]
        label = f"{relative_to_base(checkpoint_dir)} step {step}"
        with self.lock:
            self.pending.append(label)
            backlog = len(self.pending)
        if backlog > 2:
            self.log(f"{backlog} checkpoints waiting to upload (saving faster than uploading?)")
        self.jobs.put((label, files))

    def log(self, message):
        print(f"[push {self.url}] {message}", flush=True)

    def _work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            label, files = job
            ok = self._upload_with_retries(label, files)
            with self.lock:
                self.pending.remove(label)
                (self.pushed if ok else self.failed).append(label)

    def _upload_with_retries(self, label, files):
        done = set()
        metas = [rel for _, rel in files if posixpath.basename(rel).startswith("meta_")]
        for attempt in range(1, self.retries + 1):
            t0 = time.time()
            try:
                for rel in metas:  # re-saving a step: un-publish the old one before its files change
                    self.remote.remove(rel)
                self.remote.upload(files, done)
                size = sum(os.path.getsize(local) for local, _ in files)
                self.log(f"pushed {label} ({size / 2 ** 20:.1f} MiB in {time.time() - t0:.1f}s)")
                return True
            except Exception as e:  # any failure of the remote: log, wait, try again; training goes on
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                if attempt == self.retries:
                    self.log(f"ERROR: giving up on {label} after {attempt} attempts ({reason}); it is on local disk "
                             f"only: push it later with `python -m nanochat.hub push {self.url} ...`")
                    return False
                delay = min(self.backoff_seconds * 2 ** (attempt - 1), self.max_backoff_seconds)
                self.log(f"upload of {label} failed (attempt {attempt}/{self.retries}: {reason}); "
                         f"retrying in {delay:g}s")
                time.sleep(delay)

    def close(self, timeout=600):
        """Wait at most `timeout` seconds (None: no limit) for queued uploads; returns the labels still unpushed
        (queued, uploading or given up on), and says so."""
        if not self.active:
            return []
        self.jobs.put(None)
        self.thread.join(timeout)
        with self.lock:
            unpushed, pushed = self.pending + self.failed, list(self.pushed)
        if unpushed:
            self.log(f"WARNING: still unpushed at exit: {'; '.join(unpushed)}. They are on local disk only; upload "
                     f"them with `python -m nanochat.hub push {self.url} --source KIND --model-tag TAG --step N`")
        else:
            self.log(f"all {len(pushed)} checkpoint(s) pushed")
        return unpushed


# -----------------------------------------------------------------------------
# Pull: a remote checkpoint folder (and the tokenizer) back into $NANOCHAT_BASE_DIR

def remote_folders(files):
    """{(checkpoints dir, tag): {step: [file names]}} from a remote listing."""
    folders = {}
    for rel in files:
        parts = rel.split("/")
        match = STEP_FILE.fullmatch(parts[-1])
        if len(parts) == 3 and parts[0] in CHECKPOINT_DIRS.values() and match:
            folders.setdefault((parts[0], parts[1]), {}).setdefault(int(match.group(2)), []).append(parts[-1])
    return folders


def choose_folder(folders, url, source, model_tag):
    wanted = {k: v for k, v in folders.items()
              if (source is None or k[0] == CHECKPOINT_DIRS[source]) and (model_tag is None or k[1] == model_tag)}
    if len(wanted) == 1:
        return next(iter(wanted.items()))
    there = ", ".join(f"{d}/{t}" for d, t in sorted(folders)) or "no checkpoints"
    kinds = {v: k for k, v in CHECKPOINT_DIRS.items()}
    if not wanted:
        raise PushError(f"{url} has no checkpoint folder matching --source {source} --model-tag {model_tag} "
                        f"(it has: {there})")
    choices = "; ".join(f"--source {kinds[d]} --model-tag {t}" for d, t in sorted(wanted))
    raise PushError(f"{url} holds several checkpoint folders ({there}): pick one with {choices}")


def expected_shards(meta):
    """Optimizer shards a step saved with its optimizer needs: one per rank of the run that saved it."""
    return meta.get("world_size") or len(meta.get("dataloader_state_dicts") or [None])


def pull(url, source=None, model_tag=None, step=None, force=False):
    """Download one checkpoint step (the latest complete one unless `step`) and the tokenizer into
    $NANOCHAT_BASE_DIR; meta last. Returns (local checkpoint dir, step)."""
    remote = open_remote(url)
    files = remote.list()
    (folder_dir, tag), steps = choose_folder(remote_folders(files), url, source, model_tag)
    folder = f"{folder_dir}/{tag}"
    complete = sorted(s for s, names in steps.items() if f"meta_{s:06d}.json" in names and f"model_{s:06d}.pt" in names)
    if step is not None and step not in complete:
        raise PushError(f"{url}/{folder} has no complete step {step} (complete: {complete or 'none'})")
    local_dir = os.path.join(get_base_dir(), folder_dir, tag)
    os.makedirs(local_dir, exist_ok=True)
    for candidate in ([step] if step is not None else complete[::-1]):
        meta_local = meta_path(local_dir, candidate) + ".pulling"
        remote.download(f"{folder}/meta_{candidate:06d}.json", meta_local)
        shards = sorted(n for n in steps[candidate] if n.startswith(f"optim_{candidate:06d}_rank"))
        needed = expected_shards(read_meta(meta_local)) if shards else 0
        if len(shards) >= needed:
            break
        os.remove(meta_local)
        print(f"{folder} step {candidate}: {len(shards)} of {needed} optimizer shards uploaded so far; "
              f"{'trying an earlier step' if step is None else 'incomplete'}")
    else:
        raise PushError(f"{url}/{folder} has no step with all its files (still uploading?)")
    pull_tokenizer(remote, files, force)
    for name in [f"model_{candidate:06d}.pt"] + shards:
        print(f"pulling {folder}/{name}")
        remote.download(f"{folder}/{name}", os.path.join(local_dir, name))
    os.replace(meta_local, meta_path(local_dir, candidate))  # published last, as save_checkpoint does
    print(f"Pulled {url}/{folder} step {candidate} into {local_dir}")
    return local_dir, candidate


def pull_tokenizer(remote, files, force):
    """The remote's tokenizer into $NANOCHAT_BASE_DIR/tokenizer; a different local one is kept unless `force`."""
    names = [rel for rel in files if rel.startswith(f"{TOKENIZER_DIR}/") and rel.count("/") == 1]
    if not names:
        print("NOTE: the remote has no tokenizer/ (the trainers push it with their first checkpoint)")
        return
    local_dir = os.path.join(get_base_dir(), TOKENIZER_DIR)
    os.makedirs(local_dir, exist_ok=True)
    for rel in names:
        local = os.path.join(get_base_dir(), *rel.split("/"))
        if not os.path.exists(local) or force:
            remote.download(rel, local)
            continue
        fetched = local + ".remote"
        remote.download(rel, fetched)
        same = filecmp.cmp(local, fetched, shallow=False)
        os.remove(fetched)
        if not same:
            raise PushError(f"{local} differs from the remote's {rel}: the checkpoint needs the tokenizer it was "
                            f"trained with. Move yours away, or pass --force to overwrite it")


def push_existing(url, source, model_tag=None, step=None, timeout=None):
    """Upload a checkpoint already on disk (e.g. a run started without --push-to). Returns what is unpushed."""
    checkpoint_dir, _, step = find_checkpoint(source, model_tag, step)
    # every shard on disk: this process is not the run that saved them, and the run may have had many ranks
    pusher = CheckpointPusher(url, ranks=range(expected_shards(read_meta(meta_path(checkpoint_dir, step)))))
    pusher.push(checkpoint_dir, step)
    return pusher.close(timeout)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Checkpoints to and from remote storage (fsspec URLs, hf://org/name)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in [("pull", "restore a checkpoint folder (and the tokenizer) into $NANOCHAT_BASE_DIR"),
                       ("push", "upload a checkpoint that is already on disk")]:
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument("url", help="fsspec URL (file://, s3://, gs://, memory://...) or hf://org/name[/folder]")
        sub.add_argument("--source", choices=list(CHECKPOINT_DIRS), default=None if name == "pull" else "base",
                         help="which checkpoints (pull: needed only when the remote holds several folders)")
        sub.add_argument("--model-tag", default=None, help="checkpoint folder name, e.g. d12")
        sub.add_argument("--step", type=int, default=None, help="step (default: the latest complete one)")
    commands.choices["pull"].add_argument("--force", action="store_true",
                                          help="overwrite a local tokenizer that differs from the remote's")
    args = parser.parse_args(argv)
    try:
        if args.command == "pull":
            pull(args.url, args.source, args.model_tag, args.step, args.force)
            return 0
        return 1 if push_existing(args.url, args.source, args.model_tag, args.step) else 0
    except (PushError, FileNotFoundError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
