"""
Compression of our tokenizer (bytes per token, higher is better) on several kinds of text, next to GPT-2's and
GPT-4's (tiktoken "gpt2" / "cl100k_base") when those can be loaded (they are downloaded on first use; offline
they are skipped with a note). Prints a table and writes the "Tokenizer evaluation" report section.

    python -m scripts.tok_eval
    python -m scripts.tok_eval --data-dir /path/to/my/text   # also measure the first train/val batch of DIR
"""

import argparse
import sys

from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer

PROSE = """\
The old lighthouse keeper climbed the spiral stairs every evening at dusk, counting the one hundred and
twelve steps out of habit rather than necessity. From the gallery he could see the fishing boats returning
to the harbour, their lamps flickering like a loose string of pearls. In winter the storms came quickly:
the barometer would fall, the gulls would vanish inland, and by midnight waves were breaking over the
breakwater with a sound like distant artillery. He kept a logbook of every ship that passed, written in a
careful hand, and on quiet nights he read it back to himself the way other people reread old letters.
"""

CODE = '''\
import heapq
from dataclasses import dataclass, field


@dataclass(order=True)
class Job:
    priority: int
    name: str = field(compare=False)
    retries: int = field(default=0, compare=False)


def run_jobs(jobs, max_retries=3):
    """Run jobs by priority; failed jobs are retried with a lower priority."""
    queue = list(jobs)
    heapq.heapify(queue)
    done, failed = [], []
    while queue:
        job = heapq.heappop(queue)
        try:
            result = execute(job.name)
        except RuntimeError as exc:
            if job.retries < max_retries:
                heapq.heappush(queue, Job(job.priority + 10, job.name, job.retries + 1))
            else:
                failed.append((job.name, str(exc)))
            continue
        done.append((job.name, result))
    return done, failed
'''

MATH = r"""\
\begin{lemma}
Let $f:[a,b]\to\mathbb{R}$ be continuous and differentiable on $(a,b)$. Then there exists $c\in(a,b)$ with
\[
  f'(c) = \frac{f(b)-f(a)}{b-a}.
\]
\end{lemma}
\begin{proof}
Define $g(x) = f(x) - \frac{f(b)-f(a)}{b-a}(x-a)$. Then $g(a)=g(b)=f(a)$, so by Rolle's theorem some
$c$ satisfies $g'(c)=0$, i.e. $f'(c) = \frac{f(b)-f(a)}{b-a}$. For example, with $f(x)=x^2$ on $[0,2]$ we get
$2c = \frac{4-0}{2-0} = 2$, hence $c=1$. Similarly $\int_0^1 x^n\,dx = \frac{1}{n+1}$ and
$\sum_{k=0}^{\infty} \frac{x^k}{k!} = e^x$ for all $x\in\mathbb{R}$.
\end{proof}
"""

SCIENCE = """\
Mitochondria generate most of the cell's ATP through oxidative phosphorylation. Electrons from NADH and
FADH₂ pass along complexes I–IV of the inner membrane, pumping protons into the intermembrane space; the
resulting electrochemical gradient (Δψ ≈ 150–180 mV) drives ATP synthase, whose F₀ rotor turns roughly
8–10 protons per revolution. Reactive oxygen species such as O₂•⁻ and H₂O₂ are by-products, kept in check by
superoxide dismutase and glutathione peroxidase.
"""

KOREAN = """\
서울의 봄은 짧지만 화려하다. 사월이 되면 여의도 윤중로를 따라 벚꽃이 피고, 주말마다 수많은 사람들이
강변으로 나와 산책을 즐긴다. 오래된 골목의 작은 식당들은 점심시간이면 직장인들로 붐비고, 저녁에는
친구들과 함께 따뜻한 국밥 한 그릇을 나누는 모습을 쉽게 볼 수 있다. 기술과 전통이 공존하는 이 도시는
매일 새로운 이야기를 만들어 낸다.
"""

CHINESE_JAPANESE = """\
机器学习是人工智能的一个分支，它使计算机能够在没有明确编程的情况下从数据中学习。近年来，大型语言模型
在翻译、摘要和问答等任务上取得了显著进展。
東京の朝は早い。通勤電車は六時過ぎから混み始め、駅のホームには缶コーヒーを手にした会社員が並ぶ。
昼休みには公園のベンチで弁当を広げる人の姿も見られる。
"""

SAMPLE_TEXTS = [
    ("prose", PROSE),
    ("code", CODE),
    ("math", MATH),
    ("science", SCIENCE),
    ("korean", KOREAN),
    ("zh-ja", CHINESE_JAPANESE),
]

BASELINES = [("GPT-2", "gpt2"), ("GPT-4", "cl100k_base")]


def data_texts(data_dir):
    """The first train and val batch of the pretraining data (or DIR), when there is any."""
    texts = []
    try:
        for split in ("train", "val"):
            batch = next(parquets_iter_batched(split, data_dir=data_dir), None)
            if batch:
                texts.append((f"data-{split}", "\n".join(batch)))
    except Exception as e:  # no data downloaded yet: the fixed texts still say a lot
        print(f"Note: skipping the train/val data texts ({type(e).__name__}: {e})")
    return texts


def measure(tokenizer, texts):
    results = {}
    for name, text in texts:
        ids = tokenizer.encode(text)
        if tokenizer.decode(ids) != text:
            raise RuntimeError(f"round trip failed on the {name!r} text")
        num_bytes = len(text.encode("utf-8"))
        results[name] = {"bytes": num_bytes, "tokens": len(ids), "ratio": num_bytes / max(len(ids), 1)}
    return results


def format_table(texts, results, vocab_sizes, color=False):
    """One row per text: bytes, then tokens and bytes/token per tokenizer; baselines show ours' % fewer tokens."""
    green, red, reset = ("\033[92m", "\033[91m", "\033[0m") if color else ("", "", "")
    names = list(results)  # "Ours" first
    header = f"{'text':<12} {'bytes':>8}" + "".join(f" {n + ' tok':>12} {'b/tok':>6}" for n in names)
    header += "".join(f" {'vs ' + n:>10}" for n in names[1:])
    lines = [header, "-" * len(header)]
    for name, _ in texts:
        row = f"{name:<12} {results[names[0]][name]['bytes']:>8}"
        for n in names:
            row += f" {results[n][name]['tokens']:>12} {results[n][name]['ratio']:>6.2f}"
        for n in names[1:]:
            theirs, ours = results[n][name]["tokens"], results[names[0]][name]["tokens"]
            diff = 100.0 * (theirs - ours) / theirs  # positive: we need fewer tokens
            row += f" {green if diff > 0 else red if diff < 0 else ''}{diff:>+9.1f}%{reset}"
        lines.append(row)
    lines.append("vocab sizes: " + ", ".join(f"{n} {vocab_sizes[n]:,}" for n in names))
    return "\n".join(lines)


def markdown_table(texts, results):
    names = list(results)
    lines = ["| text | bytes | " + " | ".join(f"{n} tokens | {n} bytes/token" for n in names) + " |",
             "|" + "---|" * (2 + 2 * len(names))]
    for name, _ in texts:
        cells = [name, str(results[names[0]][name]["bytes"])]
        for n in names:
            cells += [str(results[n][name]["tokens"]), f"{results[n][name]['ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Compression (bytes/token) of our tokenizer vs GPT-2 / GPT-4 on sample texts.")
    parser.add_argument("--data-dir", type=str, default=None,
                        help="also measure the first train/val batch of this folder (default: the pretraining data, if any)")
    args = parser.parse_args(argv)

    texts = SAMPLE_TEXTS + data_texts(args.data_dir)
    tokenizers = {"Ours": get_tokenizer()}
    notes = []
    for label, tiktoken_name in BASELINES:
        try:
            tokenizers[label] = RustBPETokenizer.from_pretrained(tiktoken_name)
        except RuntimeError as e:
            reason = type(e.__cause__).__name__ if e.__cause__ is not None else str(e)
            notes.append(f"{label} ({tiktoken_name}) not compared: tiktoken could not load it ({reason}; offline? "
                         f"set TIKTOKEN_CACHE_DIR to a folder holding its files).")

    results = {name: measure(tok, texts) for name, tok in tokenizers.items()}
    vocab_sizes = {name: tok.get_vocab_size() for name, tok in tokenizers.items()}
    print()
    print(format_table(texts, results, vocab_sizes, color=sys.stdout.isatty()))
    for note in notes:
        print(note)

    get_report().log(section="Tokenizer evaluation", data=[
        {f"vocab size {n}": v for n, v in vocab_sizes.items()},
        "Compression (bytes per token, higher is better):\n\n" + markdown_table(texts, results) + "\n\n",
        "".join(f"{note}\n\n" for note in notes),
        {f"bytes/token {name}": round(results["Ours"][name]["ratio"], 4) for name, _ in texts},
    ])
    return results


if __name__ == "__main__":
    main()
