"""Speed and BLEU of one pair served five ways, measured side by side in one run.

    .venv/bin/python -m research.bench.export --work work/demo --pair en-de   # after make demo

Variants, all on the same test sentences of `--pair`, beam 5 (paths from the demo's layout under
`--work`, each overridable):

  full         the task-MoE checkpoint (checkpoints/checkpoint_last.pt), fairseq-generate + plugin
  pruned       taskmoe-prune's checkpoint (pruned.PAIR.pt), fairseq-generate + plugin
  exported     taskmoe-export --format fairseq (export.PAIR.transformer.pt), stock
               fairseq-generate: no --user-dir, --task translation_multi_simple_epoch
  ct2-float32  taskmoe-export --format ctranslate2 --quantization float32 (export.PAIR.ct2-float32)
  ct2-int8     the same, int8 (export.PAIR.ct2, as the demo writes it)

Missing exports are made from the pruned checkpoint with taskmoe-export (which writes atomically).

Speed: sentences/s and target tokens/s of generation only, model loading excluded. fairseq-generate
reports it itself ("Translated N sentences (T tokens) in S s"; its input is already binarized, T
counts each hypothesis with its forced language token and </s>). For CTranslate2 only
`translate_batch` is timed, on inputs SentencePiece-encoded beforehand (CT2Translator.
translate_tokens: language-token source prefix and target prefix from the export's convention),
and its tokens are counted as fairseq counts them. Both batch alike: CTranslate2's max_batch_size
with batch_type="tokens" equals fairseq's --max-tokens (8000); both sort by length (fairseq with
--required-batch-size-multiple 1, else it drops a last batch that is not a multiple of 8). Both use
`--threads` intra-op threads (default: torch's default here, i.e. what fairseq-generate would use;
fairseq-generate gets it as OMP_NUM_THREADS). Rounds are interleaved (round r runs every variant;
every run loads its model afresh) and medians reported, with ratios to the pruned checkpoint.

Quality: sacreBLEU of the detokenized output against text/test.TGT, and how many hypotheses equal
the pruned checkpoint's. CTranslate2 output is detokenized by fairseq-generate's own
--post-process sentencepiece rule, target-language token dropped, so strings compare exactly.
Expected: exported identical; ct2-float32 identical but for a few beam near-ties (CTranslate2
scores without the forced prefix token's log-probability, and its kernels round differently);
ct2-int8 within a BLEU tolerance. `--limit N` uses the first N test sentences (a binarized subset
in a temporary folder). JSON and markdown (headed by the command, date, machine and versions) are
written atomically; the table is printed.
"""

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from research.common import BIN, REPO, bleu, generate_command, parse_generate

MAX_TOKENS = 8000  # fairseq --max-tokens, and CTranslate2 max_batch_size in tokens
STOCK_TASK = "translation_multi_simple_epoch"  # = fairseq_taskmoe.deploy.export.STOCK_TASK
VARIANTS = ("full", "pruned", "exported", "ct2-float32", "ct2-int8")
_SPEED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in [\d.]+s "
                    r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m research.bench.export",
                                description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(REPO / "work" / "demo"),
                   help="the demo's folder (default: work/demo)")
    for name in ("full", "pruned", "exported", "data", "spm-model", "text-dir"):
        p.add_argument(f"--{name}", default=None, help="default: from --work")
    p.add_argument("--pair", default="en-de")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="first N test sentences only")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads of both engines "
                   "(default 0: torch's default here, what fairseq-generate uses)")
    p.add_argument("--out-json", default=str(REPO / "results" / "export_benchmark.json"))
    p.add_argument("--out-md", default=str(REPO / "results" / "export_benchmark.md"))
    return p.parse_args(argv)


def resolve_paths(args) -> dict:
    work, pair = Path(args.work).resolve(), args.pair
    given = lambda name, default: Path(getattr(args, name) or default).resolve()  # noqa: E731
    return {"full": given("full", work / "checkpoints" / "checkpoint_last.pt"),
            "pruned": given("pruned", work / f"pruned.{pair}.pt"),
            "exported": given("exported", work / f"export.{pair}.transformer.pt"),
            "ct2-float32": work / f"export.{pair}.ct2-float32",
            "ct2-int8": work / f"export.{pair}.ct2",
            "data": given("data", work / "multi30k" / "bin"),
            "spm": given("spm_model", work / "multi30k" / "spm.model"),
            "text": given("text_dir", work / "multi30k" / "text")}


def export_commands(paths: dict, pair: str) -> dict:
    """{output: taskmoe-export command} for every export, from the pruned checkpoint."""
    ct2 = ["--format", "ctranslate2", "--data", paths["data"], "--spm-model", paths["spm"]]
    base = [BIN / "taskmoe-export", paths["pruned"], "--lang-pair", pair]
    return {paths["exported"]: [*base, "--format", "fairseq", "--output", paths["exported"]],
            **{paths[f"ct2-{q}"]: [*base, *ct2, "--quantization", q, "--output", paths[f"ct2-{q}"]]
               for q in ("float32", "int8")}}


def subset_data(data: Path, pair: str, limit: int, out: Path) -> Path:
    """A data folder with the first `limit` test sentences of `pair` (same binarized tokens) and
    links to the dictionaries."""
    from fairseq.data import Dictionary, data_utils, indexed_dataset

    for f in data.glob("*.txt"):
        (out / f.name).symlink_to(f.resolve())
    for lang in pair.split("-"):
        prefix = f"test.{pair}.{lang}"
        dictionary = Dictionary.load(str(data / f"dict.{lang}.txt"))
        full = data_utils.load_indexed_dataset(str(data / prefix), dictionary)
        builder = indexed_dataset.make_builder(str(out / f"{prefix}.bin"), impl="mmap",
                                               vocab_size=len(dictionary))
        for i in range(min(limit, len(full))):
            builder.add_item(full[i])
        builder.finalize(str(out / f"{prefix}.idx"))
    return out


def stock_command(cmd: list) -> list:
    """The plugin's fairseq-generate command for stock fairseq: no --user-dir, stock task."""
    cmd = [str(c) for c in cmd]
    i = cmd.index("--user-dir")
    cmd = cmd[:i] + cmd[i + 2:]
    cmd[cmd.index("--task") + 1] = STOCK_TASK
    return cmd


def fairseq_speed(text: str) -> dict:
    """fairseq-generate's "Translated ..." line -> sentences, tokens and the two rates."""
    m = _SPEED.search(text)
    if not m:
        raise ValueError("no 'Translated ... sentences/s ... tokens/s' line in the output")
    n, t, sps, tps = (float(g.replace(",", "")) for g in m.groups())
    return {"sentences": int(n), "tokens": int(t), "sentences_per_s": sps, "tokens_per_s": tps}


def run_fairseq(cmd: list, threads: int):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore",
                                   OMP_NUM_THREADS=str(threads)))
    if proc.returncode != 0:
        sys.exit(f"fairseq-generate failed:\n{proc.stderr[-3000:]}")
    return parse_generate(proc.stdout + proc.stderr)[0], fairseq_speed(proc.stderr + proc.stdout)


def ct2_output(mt, pieces: list, beam: int):
    """Timed translate_tokens on pre-encoded pieces -> (hypotheses by id, speed)."""
    from fairseq.data.data_utils import post_process

    start = time.perf_counter()
    out = mt.translate_tokens(pieces, beam=beam, max_batch_size=MAX_TOKENS, batch_type="tokens")
    seconds = time.perf_counter() - start
    target_tok = mt.convention["lang_tok_format"].format(mt.target_lang)
    # as fairseq counts: the forced prefix, the pieces and </s>
    tokens = sum(len(h) + len(mt.convention["target_prefix"]) + 1 for h in out)
    hyps = {i: post_process(" ".join(p for p in h if p != target_tok), "sentencepiece")
            for i, h in enumerate(out)}
    return hyps, {"sentences": len(out), "tokens": tokens,
                  "sentences_per_s": len(out) / seconds, "tokens_per_s": tokens / seconds}


def run_ct2(model_dir: Path, pieces: list, beam: int, threads: int):
    from fairseq_taskmoe.ct2 import load_ct2_translator

    return ct2_output(load_ct2_translator(model_dir, intra_threads=threads), pieces, beam)


def summarize(runs: dict, hyps: dict, ref: Path, sizes: dict) -> dict:
    """Per variant: the runs, medians, ratios to pruned, BLEU, agreement with pruned."""
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("sentences_per_s",
                                                                  "tokens_per_s")}
           for v, rs in runs.items()}
    out = {}
    for v in runs:
        differ = sorted(i for i, h in hyps[v].items() if hyps["pruned"].get(i) != h)
        out[v] = {"bytes": sizes[v], "runs": runs[v],
                  **{f"median_{k}": x for k, x in med[v].items()},
                  **{f"{k}_vs_pruned": med[v][k] / med["pruned"][k] for k in med[v]},
                  "bleu": bleu(hyps[v], ref), "sentences": len(hyps[v]),
                  "identical_to_pruned": len(hyps[v]) - len(differ), "differ_from_pruned": differ}
    return out


def table(results: dict) -> str:
    lines = ["| variant | size MB | sentences/s | target tokens/s | runs (tok/s) | vs pruned "
             "(sent/s, tok/s) | BLEU | identical to pruned |", "|---" * 8 + "|"]
    for v, r in results.items():
        runs = ", ".join(f"{x['tokens_per_s']:,.0f}" for x in r["runs"])
        lines.append(
            f"| {v} | {r['bytes'] / 1e6:.1f} | {r['median_sentences_per_s']:,.1f} | "
            f"{r['median_tokens_per_s']:,.0f} | {runs} | {r['sentences_per_s_vs_pruned']:.2f}, "
            f"{r['tokens_per_s_vs_pruned']:.2f} | {r['bleu']:.2f} | "
            f"{r['identical_to_pruned']} of {r['sentences']} |")
    return "\n".join(lines)


def environment(threads: int) -> dict:
    import ctranslate2
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU")
    return {"date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{cpu}, {os.cpu_count()} logical CPUs", "threads": threads,
            "torch": torch.__version__, "ctranslate2": ctranslate2.__version__}


def byte_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def main(argv=None):
    import sentencepiece
    import torch

    from fairseq_taskmoe.atomic import write_text_atomically

    args = parse_args(argv)
    paths = resolve_paths(args)
    for out, cmd in export_commands(paths, args.pair).items():
        if not out.exists():
            print(f"[bench] export {out} ...", flush=True)
            subprocess.run([str(c) for c in cmd], check=True, cwd=REPO,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"))
    threads = args.threads or torch.get_num_threads()
    src, tgt = args.pair.split("-")
    sources = (paths["text"] / f"test.{src}").read_text().splitlines()[:args.limit]
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(paths["spm"])).encode(
        sources, out_type=str)
    runs, hyps = {v: [] for v in VARIANTS}, {}
    with tempfile.TemporaryDirectory(prefix="bench_export.") as tmp:
        data = (subset_data(paths["data"], args.pair, args.limit, Path(tmp)) if args.limit
                else paths["data"])
        # --required-batch-size-multiple 1: fairseq's default 8 drops a last batch that is not a
        # multiple of 8 (fairseq issue #5036); harmless on CPU, and CTranslate2 has no such rule
        plugin = {v: [*generate_command(data, paths[v], args.pair, beam=args.beam,
                                        max_tokens=MAX_TOKENS), "--required-batch-size-multiple", 1]
                  for v in ("full", "pruned", "exported")}
        commands = {**plugin, "exported": stock_command(plugin["exported"])}
        for r in range(args.repeats):
            for v in VARIANTS:
                hyps[v], speed = (run_fairseq(commands[v], threads) if v in commands
                                  else run_ct2(paths[v], pieces, args.beam, threads))
                if len(hyps[v]) != len(sources):
                    sys.exit(f"{v} translated {len(hyps[v])} of {len(sources)} sentences")
                runs[v].append(speed)
                print(f"[bench] round {r + 1}: {v}: {speed['sentences_per_s']:,.1f} sentences/s, "
                      f"{speed['tokens_per_s']:,.0f} tokens/s", flush=True)
    results = summarize(runs, hyps, paths["text"] / f"test.{tgt}",
                        {v: byte_size(paths[v]) for v in VARIANTS})
    command = ".venv/bin/python -m research.bench.export " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    report = {"command": command, **environment(threads), "pair": args.pair, "beam": args.beam,
              "max_tokens": MAX_TOKENS, "repeats": args.repeats, "sentences": len(sources),
              "paths": {k: str(p) for k, p in paths.items()}, "variants": results}
    md = (f"Command: `{command}`\n\n{report['date']}; {report['machine']}; {threads} intra-op "
          f"threads per engine; torch {report['torch']}, CTranslate2 {report['ctranslate2']}. "
          f"Multi30k test {args.pair}, {len(sources)} sentences, beam {args.beam}, batches of "
          f"{MAX_TOKENS} tokens; medians of {args.repeats} interleaved rounds; generation only "
          "(model loading and SentencePiece excluded); BLEU: detokenized sacreBLEU.\n\n"
          f"{table(results)}\n")
    for path, text in ((args.out_json, json.dumps(report, indent=2) + "\n"), (args.out_md, md)):
        write_text_atomically(path, text)
    print(md)


if __name__ == "__main__":
    main()
