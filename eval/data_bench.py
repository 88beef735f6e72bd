"""The data path at scale, measured in one run: tokenizing on 1 core and on all of them against the
tokenizer's own batch encoding, peak memory of a 2-step ``train.py`` as the corpus grows, the token
store's bytes per token, the tokenizing CPU time of 1 and 2 processes on one machine, a streaming
resume's time to its first step at step 10 and at step 1,000, and the time to open a stream of 1,000
and 16,000 files.

    python eval/data_bench.py              # about 15 minutes on 2 cores; writes out/data_bench/
    python eval/data_bench.py --quick      # small sizes: checks that every figure comes from a real run

The corpus is generated: copies of the standard library's sources (the default corpus), one ``.txt``
file each, each copy headed by a comment line of its own, to ``--megabytes`` (the "1x" size) and to 4
and 16 times that. Every command runs in a fresh process with a fresh cache; its CPU time and peak RSS
are the operating system's (``getrusage`` of the process and its children).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Runs a command (its output to a log) and prints its wall time, the CPU time of its processes together
# and the largest peak RSS among them.
MEASURED = """
import json, resource, subprocess, sys, time
log, command = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
with open(log, "w") as out:
    code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": code, "wall": time.perf_counter() - start, "cpu": usage.ru_utime + usage.ru_stime,
                  "rss_mib": usage.ru_maxrss / 1024}))
"""
# The tokenizer's own batch encoding of a corpus held in memory: its bytes per second.
TOKENIZER_THROUGHPUT = """
import json, sys, time
from pathlib import Path
from transformers import AutoTokenizer
backend = AutoTokenizer.from_pretrained(sys.argv[1]).backend_tokenizer
files = sorted(Path(sys.argv[2]).iterdir())
texts = [f.read_text() for f in files]
batches, batch, size = [], [], 0
for text in texts:
    batch.append(text)
    size += len(text)
    if size >= 1 << 20:
        batches.append(batch)
        batch, size = [], 0
batches.append(batch)
start = time.perf_counter()
for batch in batches:
    backend.encode_batch_fast(batch, add_special_tokens=False)
seconds = time.perf_counter() - start
print(json.dumps({"bytes_per_s": sum(f.stat().st_size for f in files) / seconds}))
"""
# Opens a stream of local files (kangpt.data.load_splits, streaming) and prints the seconds it took.
OPEN_STREAM = """
import sys, time
from kangpt.data import load_splits
start = time.perf_counter()
load_splits(sys.argv[1], streaming=True)
print(time.perf_counter() - start)
"""


@dataclass
class Measured:
    """What one command took: wall seconds, CPU seconds (its processes together), peak RSS (MiB, of the
    largest of its processes)."""

    wall: float
    cpu: float
    rss_mib: float


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "out" / "data_bench"),
                        help="work folder (default out/data_bench)")
    parser.add_argument("--megabytes", type=float, default=80.0,
                        help="the 1x corpus, in MB of text (default 80)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for the tests")
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes.full(args.megabytes)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    results = run_all(out, sizes)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report = table(results)
    (out / "results.md").write_text(report + "\n")
    print(report)
    return 0


@dataclass
class Sizes:
    megabytes: float  # the 1x corpus
    scales: tuple[int, ...]  # corpus sizes of the memory curve, in multiples of it
    resume_steps: tuple[int, int]
    files: tuple[int, int]  # stream-opening sizes

    @classmethod
    def full(cls, megabytes: float) -> Sizes:
        return cls(megabytes, (1, 4, 16), (10, 1000), (1000, 16000))

    @classmethod
    def quick(cls) -> Sizes:
        return cls(0.5, (1, 4), (2, 20), (50, 200))


def run_all(out: Path, sizes: Sizes) -> dict:
    """Every measurement, in order (one at a time: the machine's cores are part of what is measured)."""
    corpora = {scale: make_corpus(out / f"corpus-{scale}x", sizes.megabytes * scale)
               for scale in sizes.scales}
    results = {"sizes": asdict(sizes), "corpus_bytes": {f"{s}x": corpus_bytes(c) for s, c in corpora.items()},
               "cores": os.cpu_count()}
    results["tokenizing"] = tokenizing(out / "tokenizing", corpora[1])
    results["memory"] = memory_curve(out / "memory", corpora)
    largest = max(corpora)
    store = only_store(out / "memory" / f"{largest}x" / "cache")
    info = json.loads((store / "store.json").read_text())
    results["store"] = {"tokens": sum(info["tokens"].values()), "bin_bytes": sum(
        (store / f"{split}.bin").stat().st_size for split in info["tokens"]),
        "all_bytes": sum(f.stat().st_size for f in store.iterdir())}
    results["processes"] = processes(out / "processes", corpora[1])
    results["stream_resume"] = stream_resume(out / "resume", corpora[1], sizes.resume_steps)
    results["open_stream"] = open_stream(out / "open", sizes.files)
    return results


def make_corpus(folder: Path, megabytes: float) -> Path:
    """``.txt`` files of standard-library sources (each copy headed by its own comment line), to
    ``megabytes`` of text."""
    from kangpt.data import stdlib_documents

    folder.mkdir(parents=True)
    target, written, copy = megabytes * 1e6, 0, 0
    while written < target:
        for i, doc in enumerate(stdlib_documents()):
            text = f"# copy {copy} of source {i}\n{doc}"
            (folder / f"{copy:04d}-{i:04d}.txt").write_text(text)
            written += len(text.encode())
            if written >= target:
                break
        copy += 1
    return folder


def corpus_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def measured(command: list[str], env: dict, log: Path) -> Measured:
    """Run ``command`` in a fresh process, its output to ``log``; what it took (a failure stops the
    benchmark with the end of its log)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-c", MEASURED, str(log), *command], env=env, cwd=ROOT,
                            capture_output=True, text=True, check=True)
    record = json.loads(result.stdout)
    if record["code"] != 0:
        raise SystemExit(f"failed ({record['code']}): {' '.join(command)}\n{log.read_text()[-3000:]}")
    return Measured(record["wall"], record["cpu"], record["rss_mib"])


def environment(cache: Path, **extra) -> dict:
    """Offline, a cache of its own, tokenizers free to use every core."""
    env = {**os.environ, "KANGPT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(cache / "hf-datasets"), **extra}
    env.pop("TOKENIZERS_PARALLELISM", None)
    return env


def kangpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "kangpt.commands", *args]


def only_store(cache: Path) -> Path:
    """The one token store in a cache."""
    (store,) = [p for p in (cache / "tokens").iterdir() if p.is_dir()]
    return store


def tokenizing(work: Path, corpus: Path) -> dict:
    """Bytes per second of building the store on 1 core and on all, and of the tokenizer's own batch
    encoding on 1 core and on all (the same text, read into memory first)."""
    cache = work / "cache"
    env = environment(cache)
    prepare = kangpt("prepare", f"--data.dataset={corpus}")
    measured(prepare, env, work / "bpe.log")  # trains and caches the BPE (and builds a first store)
    size = corpus_bytes(corpus)
    result = {}
    for cores, pin in (("1 core", ["taskset", "-c", "0"]), ("all cores", [])):
        shutil.rmtree(cache / "tokens")
        measured([*pin, *prepare], env, work / f"store-{cores}.log")
        seconds = json.loads((only_store(cache) / "store.json").read_text())["seconds"]
        result[f"store, {cores}"] = size / seconds
        bpe = next((cache / "tokenizers").iterdir())
        own = subprocess.run([*pin, sys.executable, "-c", TOKENIZER_THROUGHPUT, str(bpe), str(corpus)],
                             env=env, capture_output=True, text=True, check=True)
        result[f"tokenizer's own, {cores}"] = json.loads(own.stdout)["bytes_per_s"]
    return result


def memory_curve(work: Path, corpora: dict[int, Path]) -> dict:
    """A 2-step ``train.py`` on each corpus with a fresh cache (so it builds the store), then again (the
    store found): wall time and peak RSS."""
    result = {}
    for scale, corpus in corpora.items():
        cache = work / f"{scale}x" / "cache"
        env = environment(cache)
        for run in ("first", "again"):
            command = [sys.executable, "train.py", f"--data.dataset={corpus}", "--train.max_steps=2",
                       "--train.eval_blocks=16", "--train.sample_prompt=null",
                       f"--train.out_dir={work / f'{scale}x' / run}"]
            result[f"{scale}x, {run}"] = asdict(measured(command, env, work / f"{scale}x-{run}.log"))
    return result


def processes(work: Path, corpus: Path) -> dict:
    """Tokenizing CPU time of a 2-step run by 1 process and by 2 on this machine: the CPU time of the run
    that builds the store less that of the same run finding it (the BPE cached for both)."""
    cache = work / "cache"
    # The BPE of train.py's runs (configs/default.yaml), trained and cached before anything is measured.
    default = str(ROOT / "configs" / "default.yaml")
    measured(kangpt("prepare", default, f"--data.dataset={corpus}"), environment(cache), work / "bpe.log")
    result = {}
    launchers = {"1 process": [sys.executable],
                 "2 processes": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                                 "--master-port=29561"]}
    for name, launcher in launchers.items():
        env = environment(cache, ACCELERATE_USE_CPU="1")
        times = {}
        for run in ("builds", "finds"):
            if run == "builds":
                shutil.rmtree(cache / "tokens")
            command = [*launcher, "train.py", f"--data.dataset={corpus}", "--train.max_steps=2",
                       "--train.eval_blocks=16", "--train.sample_prompt=null", "--train.batch_size=8",
                       f"--train.out_dir={work / name.replace(' ', '-') / run}"]
            times[run] = measured(command, env, work / f"{name.replace(' ', '-')}-{run}.log").cpu
        result[name] = {"cpu_builds": times["builds"], "cpu_finds": times["finds"],
                        "tokenizing_cpu": times["builds"] - times["finds"]}
    return result


def stream_resume(work: Path, corpus: Path, steps: tuple[int, int]) -> dict:
    """Seconds from launch to the first training step of a streamed run resumed at each of ``steps``."""
    cache = work / "cache"
    env = environment(cache)
    common = [f"--data.dataset={corpus}", "--data.streaming=true", "--model.n_layer=2", "--model.n_embd=64",
              "--model.n_head=2", "--train.batch_size=8", "--train.eval_interval=100000",
              "--train.eval_blocks=4", "--train.log_interval=1", "--train.save_interval=0",
              "--train.sample_prompt=null", "--train.warmup_steps=1"]
    result = {}
    for step in steps:
        out = work / f"step-{step}"
        measured([sys.executable, "train.py", *common, f"--train.max_steps={step}", f"--train.out_dir={out}"],
                 env, work / f"train-{step}.log")
        command = [sys.executable, "train.py", *common, f"--train.max_steps={step + 1}",
                   f"--train.out_dir={out}", "--train.resume=auto"]
        started = time.perf_counter()
        with open(work / f"resume-{step}.log", "w") as log:
            process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
            first = None
            while process.poll() is None or first is None:
                if first is None and f'"step": {step + 1}, "loss"' in (out / "metrics.jsonl").read_text():
                    first = time.perf_counter() - started
                if process.poll() is not None and first is None:
                    raise SystemExit(f"the resumed run at step {step} ended without a step: {log.name}")
                time.sleep(0.02)
        result[f"step {step}"] = first
    return result


def open_stream(work: Path, counts: tuple[int, int]) -> dict:
    """Seconds to open a stream of that many one-document ``.txt`` files (median of 3 fresh processes)."""
    env = environment(work / "cache")
    result = {}
    for count in counts:
        folder = work / f"{count}-files"
        folder.mkdir(parents=True)
        for i in range(count):
            (folder / f"{i:06d}.txt").write_text(f"document {i}\n")
        seconds = [float(subprocess.run([sys.executable, "-c", OPEN_STREAM, str(folder)], env=env, cwd=ROOT,
                                        capture_output=True, text=True, check=True).stdout) for _ in range(3)]
        result[f"{count} files"] = statistics.median(seconds)
    return result


def table(results: dict) -> str:
    """The README's figures, as markdown."""
    mb = {k: v / 1e6 for k, v in results["corpus_bytes"].items()}
    tok = results["tokenizing"]
    sizes = ", ".join(f"{k} {v:,.0f} MB" for k, v in mb.items())
    lines = [f"Corpus sizes: {sizes}; {results['cores']} cores.", "",
             "| tokenizing (MB of text per second) | 1 core | all cores | all / 1 |", "|---|---:|---:|---:|"]
    for what in ("store", "tokenizer's own"):
        one, every = tok[f"{what}, 1 core"] / 1e6, tok[f"{what}, all cores"] / 1e6
        lines.append(f"| {what} | {one:.2f} | {every:.2f} | {every / one:.2f}x |")
    own = tok["tokenizer's own, all cores"]
    lines.append(f"| store / tokenizer's own | | {tok['store, all cores'] / own:.2f}x | |")
    lines += ["", "| 2-step train.py | wall (s) | peak RSS (MiB) |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['wall']:.1f} | {v['rss_mib']:,.0f} |" for k, v in results["memory"].items()]
    store = results["store"]
    lines += ["", f"Store: {store['bin_bytes'] / store['tokens']:.3f} bytes per token in its token files, "
                  f"{store['all_bytes'] / store['tokens']:.3f} with everything else."]
    proc = results["processes"]
    ratio = proc["2 processes"]["tokenizing_cpu"] / proc["1 process"]["tokenizing_cpu"]
    lines += ["", "| processes on one machine | CPU s, building | CPU s, finding | tokenizing CPU s |",
              "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['cpu_builds']:.1f} | {v['cpu_finds']:.1f} | {v['tokenizing_cpu']:.1f} |"
              for k, v in proc.items()]
    lines.append(f"| 2 / 1 | | | {ratio:.2f}x |")
    resume = results["stream_resume"]
    values = list(resume.values())
    lines += ["", "| streaming resume | seconds to the first step |", "|---|---:|"]
    lines += [f"| at {k} | {v:.2f} |" for k, v in resume.items()]
    lines.append(f"| ratio | {values[1] / values[0]:.2f}x |")
    opened = results["open_stream"]
    values = list(opened.values())
    lines += ["", "| opening a stream of | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in opened.items()]
    lines.append(f"| ratio | {values[1] / values[0]:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
