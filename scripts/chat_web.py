"""
Serve a trained model: nanochat's chat UI and an OpenAI-compatible API, with concurrent users batched together.

    python -m scripts.chat_web                        # the latest SFT model on http://0.0.0.0:8000/
    python -m scripts.chat_web -i base -g d4 --port 8001 --max-batch 16
    python -m scripts.chat_web -n 8                   # one replica per GPU, requests go to the least busy one
    python -m scripts.chat_web --api-key secret       # clients must send Authorization: Bearer secret

Then open the page, or point any OpenAI client at http://HOST:PORT/v1 (see README "Serving").
Requests that arrive together are decoded together (continuous batching, nanochat.batching); -t/-k/-m are the
defaults for requests that do not set temperature / top_k / max_tokens.
"""

import argparse
import logging
import os
import sys

import torch
import uvicorn

from nanochat.batching import ReplicaPool, Scheduler
from nanochat.chat_format import model_think_default
from nanochat.checkpoint_manager import load_model
from nanochat.common import autodetect_device_type, compute_init
from nanochat.engine import Engine
from nanochat.web_search import SEARCH_DOCS_ENV, SEARCH_URL_ENV, provider_from_env
from nanochat.web_server import create_app


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def fail(message):
    """A user error: one line, exit status 2."""
    print(f"chat_web: error: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("-i", "--source", default="sft",
                        help="which checkpoints to load: base|mid|sft|rl|dpo,"
                             " or a published model: an exported Hugging Face folder or a hub repo id (org/name)")
    parser.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest d<N>)")
    parser.add_argument("-s", "--step", type=int, default=None, help="step (default: the last one)")
    parser.add_argument("-n", "--num-gpus", type=int, default=1, help="model replicas, one per GPU (CPU: 1)")
    parser.add_argument("-t", "--temperature", type=float, default=0.8, help="default temperature")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="default top-k (0 = off)")
    parser.add_argument("-m", "--max-tokens", type=int, default=512, help="default max tokens per reply")
    parser.add_argument("-p", "--port", type=int, default=8000, help="port")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (127.0.0.1: this machine only)")
    parser.add_argument("--device-type", default="", choices=["", "cuda", "cpu", "mps"], help="empty = autodetect")
    parser.add_argument("--dtype", default="", choices=["", "float32", "bfloat16"],
                        help="compute dtype (empty = bf16 where the hardware is fast at it, else fp32)")
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer <key> on the API")
    parser.add_argument("--max-batch", type=int, default=32, help="sequences decoded together per replica")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting per replica before 429")
    parser.add_argument("--prefill-chunk", type=int, default=256,
                        help="prompt tokens prefilled per step (bounds how long a new prompt stalls the others)")
    parser.add_argument("--search-docs", default=None,
                        help=f"folder requests with search auto/force (and the web_search tool) search offline "
                             f"(default ${SEARCH_DOCS_ENV}; ${SEARCH_URL_ENV} selects an HTTP search API instead)")
    parser.add_argument("--tools", default="calculator", choices=["calculator", "python", "none"],
                        help="the tool the model's <|python_start|> blocks run")
    parser.add_argument("--model-name", default=None, help="model id in the API (default: nanochat-SOURCE-TAG)")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.dtype and os.environ.get("NANOCHAT_DTYPE") != args.dtype:
        # the compute dtype is fixed when nanochat.common is imported: start again with it set
        os.environ["NANOCHAT_DTYPE"] = args.dtype
        os.execv(sys.executable, [sys.executable, "-m", "scripts.chat_web", *argv])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device_type = args.device_type or autodetect_device_type()
    if device_type != "cuda" and args.num_gpus != 1:
        fail(f"-n/--num-gpus {args.num_gpus}: only CUDA runs several replicas; use -n 1 on {device_type}")
    if device_type == "cuda" and args.num_gpus > torch.cuda.device_count():
        fail(f"-n {args.num_gpus} replicas asked for, but only {torch.cuda.device_count()} GPUs are visible")
    if args.max_batch < 1 or args.max_queue < 1 or args.prefill_chunk < 1:
        fail("--max-batch, --max-queue and --prefill-chunk must be at least 1")
    compute_init(device_type)
    devices = [torch.device("cuda", i) for i in range(args.num_gpus)] if device_type == "cuda" else [torch.device(device_type)]
    schedulers, tokenizer, meta = [], None, None
    search_provider = provider_from_env(args.search_docs)  # one index for every replica (it has its own lock)
    for i, device in enumerate(devices):
        try:
            model, tokenizer, meta = load_model(args.source, device, "eval", model_tag=args.model_tag, step=args.step)
        except (FileNotFoundError, ValueError) as e:
            fail(f"cannot load the {args.source} model: {e}")
        engine = Engine(model, tokenizer, tools=None if args.tools == "none" else args.tools,
                        search_provider=search_provider, think_default=model_think_default(meta))
        schedulers.append(Scheduler(engine, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                                    max_waiting=args.max_queue, name=f"replica-{i}"))
    tag = args.model_tag or f"d{meta['model_config']['n_layer']}"
    model_name = args.model_name or f"nanochat-{args.source}-{tag}"
    pool = ReplicaPool(schedulers)
    pool.start()
    app = create_app(pool, tokenizer, model_name, model.config.sequence_len, temperature=args.temperature,
                     top_k=args.top_k, max_tokens=args.max_tokens, api_key=args.api_key, max_n=args.max_batch)
    print(f"Serving {model_name} on {len(devices)} replica(s): http://{args.host}:{args.port}/ "
          f"(OpenAI API at /v1)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        pool.stop()


if __name__ == "__main__":
    main()
