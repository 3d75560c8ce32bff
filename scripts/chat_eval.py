"""
Evaluate a chat model on the ChatCORE tasks.

    python -m scripts.chat_eval -i sft                     # all six tasks, ChatCORE at the end
    python -m scripts.chat_eval -i sft -a "ARC-Easy|GSM8K" -x 100
    torchrun --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Categorical tasks (ARC, MMLU) are scored by one batched forward: the logits at the last prompt position,
restricted to the answer letters, argmax. Generative tasks (GSM8K, HumanEval, SpellingBee) sample through the
Engine and pass if any of the -n samples passes (pass@k). ChatCORE = mean centered accuracy over the six tasks.
The evaluation itself lives in nanochat/chat_eval.py (chat_sft runs it during training too).


--think on|off (default: the model's, chat_sft --think-default) prefills the think block of generative answers;
a sample is graded on its answer after </think>, and one whose think never closed within -m tokens has no answer
(a miss). Categorical tasks read the letter from one forward, so with a think mode they get the empty (off) block
before the letter, as the model was trained to answer right after it.
"""

import argparse
import time

from nanochat.chat_eval import ALL_TASKS, chatcore, run_chat_eval
from nanochat.chat_format import model_think_default
from nanochat.checkpoint_manager import load_model
from nanochat.common import compute_init, compute_cleanup, print0
from nanochat.engine import Engine
from nanochat.report import get_report


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a chat model on ARC/MMLU/GSM8K/HumanEval/SpellingBee.")
    parser.add_argument("-i", "--source", required=True, help="checkpoint kind: base|sft|rl|dpo")
    parser.add_argument("-a", "--task-name", default=None,
                        help=f"'|'-separated tasks (default all: {'|'.join(ALL_TASKS)}; also Arithmetic)")
    parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature (generative)")
    parser.add_argument("-m", "--max-new-tokens", type=int, default=512, help="tokens per generative answer")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help="samples per problem (pass@n)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="top-k for sampling")
    parser.add_argument("-b", "--batch-size", type=int, default=8, help="batch size for categorical tasks")
    parser.add_argument("-g", "--model-tag", default=None, help="model tag (default: the largest d<N>)")
    parser.add_argument("-s", "--step", type=int, default=None, help="step (default: the last one)")
    parser.add_argument("-x", "--max-problems", type=int, default=None, help="cap problems per task")
    parser.add_argument("--think", default=None, choices=["on", "off"],
                        help="think mode of generative answers (default: the model's); graded after </think>")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    args = parser.parse_args(argv)

    _, rank, _, _, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer, think_default=model_think_default(meta))
    if engine.think_mode(args.think) == "on":
        print0("NOTE: categorical tasks (ARC, MMLU) are read from one forward: they get an empty think block")

    task_names = args.task_name.split("|") if args.task_name else ALL_TASKS
    results = {}
    for name in task_names:
        t0 = time.time()
        acc = run_chat_eval(name, model, tokenizer, engine, batch_size=args.batch_size,
                            num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, max_problems=args.max_problems,
                            think=args.think)
        results[name] = acc
        print0(f"{name}: {acc:.2%} ({time.time() - t0:.1f}s)")

    report_data = [vars(args), results]
    metric = chatcore(results)
    if metric is not None:
        report_data.append({"ChatCORE metric": metric})
        print0(f"ChatCORE metric: {metric:.4f}")
    if rank == 0:
        get_report().log(section=f"Chat evaluation {args.source}", data=report_data)
    compute_cleanup()
    return results


if __name__ == "__main__":
    main()
