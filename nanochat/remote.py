"""
Where pushed checkpoints go: the same three calls (list, upload, download) over any fsspec URL and over the
Hugging Face hub. No torch here: nanochat.cli's --push-to checks a URL with open_remote while the trainers parse
their flags, before they import torch (a bad URL is refused at once, not after the model is built).

- fsspec (`file://`, `memory://`, `s3://` with s3fs, `gs://` with gcsfs, `az://` ...): one API over all of them,
  each with its own credentials (AWS profile, gcloud login ...); the cloud packages stay optional;
- `hf://org/name[/folder]`: a model repo through huggingface_hub, created private if missing, one commit per
  upload (its files appear together); $HF_ENDPOINT (nanochat.download.hf_endpoint) and $HF_TOKEN are honoured.
"""

import argparse
import os
import posixpath
import re
import shutil
import tempfile

import fsspec
import huggingface_hub
from huggingface_hub.errors import RepositoryNotFoundError

from nanochat.cli import UserError, float_at_least
from nanochat.download import hf_endpoint
from nanochat.fileio import atomic_open

STEP_FILE = re.compile(r"(model|meta|optim)_(\d+)(?:_rank(\d+))?\.(pt|json)")
HUB_URL = re.compile(r"hf://([A-Za-z0-9][\w.-]*/[\w.-]+)(/.*)?")


class PushError(UserError):
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


# -----------------------------------------------------------------------------
# The --push-to / --push-wait flags (every trainer's; nanochat.hub.CheckpointPusher takes them)

def push_url(text):
    """--push-to: a URL this module can write to (a known protocol whose package is installed)."""
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
    parser.add_argument("--push-wait", type=float_at_least(0), default=600, metavar="SECONDS",
                        help="at exit, wait at most this long for uploads still running, then say what is unpushed")
