"""
Checkpoints off the box while training, and back onto a fresh machine.

In a trainer (each rank builds one; only one process per node uploads):

    pusher = CheckpointPusher(args.push_to)        # None: does nothing
    save_checkpoint(checkpoint_dir, step, ...)     # atomic, meta last
    pusher.push(checkpoint_dir, step)              # returns at once: a background thread uploads
    pusher.close(args.push_wait)                   # at exit: waits (bounded), says what is still unpushed

On a fresh machine:

    python -m nanochat.hub pull s3://bucket/run1 [--source base] [--model-tag d24] [--step N]
    python -m scripts.base_train --depth=24 ... --resume-from-step last

The remote mirrors $NANOCHAT_BASE_DIR: URL/base_checkpoints/d24/{model,optim,meta}_<step>..., URL/tokenizer/...,
so one URL holds every stage of a run and `pull` puts the files back where the trainers look for them.

URLs: any fsspec URL (`file://`, `memory://`, `s3://` with s3fs, `gs://` with gcsfs, `az://` ...): fsspec gives one
API over all of them, each with its own credentials (AWS profile, gcloud login ...), and the cloud packages stay
optional. `hf://org/name[/folder]`: a model repo on the Hugging Face hub (created private if missing) through
huggingface_hub, one commit per checkpoint, so its files appear together; $HF_ENDPOINT and $HF_TOKEN are honoured.

A checkpoint is complete on the remote once its meta file is there: it goes last (within one commit on the hub).
Uploads that fail are logged and retried with exponential backoff; after the last try the checkpoint stays local
only (said loudly) and the next one is tried. Training never waits for an upload, except for the bounded wait
at exit. On several nodes each node's first process uploads its node's optimizer shards; `pull` only takes a
step whose shards are all there.
"""

import argparse
import filecmp
import json
import os
import posixpath
import queue
import re
import shutil
import sys
import tempfile
import threading
import time

import fsspec
import huggingface_hub
from huggingface_hub.errors import RepositoryNotFoundError

from nanochat.checkpoint_manager import CHECKPOINT_DIRS, meta_path, model_path, optim_path
from nanochat.common import get_base_dir
from nanochat.download import hf_endpoint
from nanochat.fileio import atomic_open
from nanochat.training import find_checkpoint

TOKENIZER_DIR = "tokenizer"
STEP_FILE = re.compile(r"(model|meta|optim)_(\d+)(?:_rank(\d+))?\.(pt|json)")
HUB_URL = re.compile(r"hf://([A-Za-z0-9][\w.-]*/[\w.-]+)(/.*)?")


class PushError(ValueError):
    """A user error about a push/pull URL or what it holds (the CLI prints it in one line)."""


# -----------------------------------------------------------------------------
# Remotes: the same three calls over fsspec and over the hub

class FsspecRemote:
    """Any fsspec URL. Files go one by one in the order given (meta last)."""

    def __init__(self, url):
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.root = self.root.rstrip("/")

    def path(self, rel):
        return f"{self.root}/{rel}"

    def list(self):
        """Every file under the URL, relative to it ('/'-separated)."""
        if not self.fs.exists(self.root):
            return []
        return sorted(posixpath.relpath(p, self.root) for p in self.fs.find(self.root))

    def upload(self, files, done):
        """files: [(local path, relative remote path)]; `done`: the relative paths already uploaded by an earlier
        attempt of this job (skipped, and each finished file is added)."""
        for local, rel in files:
            if rel in done:
                continue
            parent = posixpath.dirname(self.path(rel))
            if parent:
                self.fs.makedirs(parent, exist_ok=True)
            self.fs.put_file(local, self.path(rel))
            done.add(rel)

    def remove(self, rel):
        if self.fs.exists(self.path(rel)):
            self.fs.rm_file(self.path(rel))

    def download(self, rel, local):
        with self.fs.open(self.path(rel), "rb") as src, atomic_open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


class HubRemote:
    """hf://org/name[/folder]: a model repo, created (private) on the first upload; one commit per job."""

    def __init__(self, url):
        match = HUB_URL.fullmatch(url)
        if match is None:
            raise PushError(f"a hub URL is hf://<org>/<name>[/<folder>], got {url!r}")
        self.url = url
        self.repo_id, folder = match.group(1), (match.group(2) or "").strip("/")
        self.prefix = f"{folder}/" if folder else ""
        self.api = huggingface_hub.HfApi(endpoint=hf_endpoint(), token=os.environ.get("HF_TOKEN") or None)
        self.repo_ready = False

    def list(self):
        try:
            files = self.api.list_repo_files(self.repo_id)
        except RepositoryNotFoundError:
            return []
        return sorted(f[len(self.prefix):] for f in files if f.startswith(self.prefix))

    def upload(self, files, done):
        if not self.repo_ready:
            self.api.create_repo(self.repo_id, private=True, exist_ok=True)
            self.repo_ready = True
        operations = [huggingface_hub.CommitOperationAdd(path_in_repo=self.prefix + rel, path_or_fileobj=local)
                      for local, rel in files]
        steps = sorted({m.group(2) for _, rel in files if (m := STEP_FILE.fullmatch(posixpath.basename(rel)))})
        self.api.create_commit(self.repo_id, operations, commit_message=f"nanochat checkpoint step {', '.join(steps)}")
        done.update(rel for _, rel in files)

    def remove(self, rel):
        pass  # a commit replaces a step's files all at once: nothing to un-publish first

    def download(self, rel, local):
        staging = tempfile.mkdtemp(prefix=".pull-", dir=os.path.dirname(local))
        try:
            staged = self.api.hf_hub_download(self.repo_id, self.prefix + rel, local_dir=staging)
            os.replace(staged, local)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def open_remote(url):
    """The remote for a URL; PushError when fsspec does not know its protocol or its package is missing."""
    if url.startswith("hf://"):
        return HubRemote(url)
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise PushError(f"unknown storage protocol {protocol}:// in {url!r} (fsspec knows: file, memory, s3, gs, "
                        f"az, ... and hf:// for the Hugging Face hub)") from None
    except ImportError as e:
        raise PushError(f"{protocol}:// needs a package that is not installed ({e}); e.g. pip install s3fs for "
                        f"s3://, gcsfs for gs://") from None
    return FsspecRemote(url)


def push_url(text):
    """argparse type of --push-to: the URL, checked before any training happens."""
    try:
        open_remote(text)
    except PushError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_push_arguments(parser):
    """--push-to URL and --push-wait SECONDS, the same in every trainer."""
    parser.add_argument("--push-to", type=push_url, default=None, metavar="URL",
                        help="upload every checkpoint (and the tokenizer) in the background as it is saved: an fsspec "
                             "URL (file://, s3://, gs://, memory://...) or hf://org/name; restore on another machine "
                             "with `python -m nanochat.hub pull URL`")
    parser.add_argument("--push-wait", type=float, default=600, metavar="SECONDS",
                        help="at exit, wait at most this long for uploads still running, then say what is unpushed")


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
    every call does nothing."""

    retries = 8            # attempts per checkpoint
    backoff_seconds = 2.0  # wait backoff * 2**(attempt - 1) between attempts, at most max_backoff_seconds
    max_backoff_seconds = 300.0

    def __init__(self, url):
        self.url = url
        ranks = node_leader_ranks() if url else None
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
        with open(meta_local, encoding="utf-8") as f:
            needed = expected_shards(json.load(f)) if shards else 0
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
    pusher = CheckpointPusher(url)
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
