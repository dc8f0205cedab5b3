#!/usr/bin/env python
"""Benchmark: the corpus stage at scale, on a synthetic corpus in ncbi/pubmed's nested schema.

A benchmark, not a test. Writes (once, seeded, reused when present) N documents as Parquet shards
of 100,000 documents in ncbi/pubmed's schema (``MedlineCitation.Article.Abstract.AbstractText``,
``ArticleTitle``, ``PMID``, nested structs), each abstract made of sentences sampled from
``--source`` (the shared PubMed abstracts). Then, each phase in a fresh child process (so that its
peak RSS is its own) and with an empty tokenization cache:

  (a) tokenization alone: the abstracts read shard by shard with pyarrow and tokenized with the
      same tokenizer and the same batch encoder, ids dropped (the floor for any corpus stage);
  (b) the product's corpus stage (``token_distillation.corpus.scan_corpus`` with a
      ``SnippetMiner``): stream with ``datasets``, tokenize, write the cache segments, mine the
      ``--num_tokens`` tokens of ``--tokens`` (25 training + 5 held-out snippets each), once with
      early stop switched off (the whole corpus) and once with it on.

Prints one line per phase (wall time, documents/s, documents read, peak RSS, ratio to (a)) and a
JSON summary (``--out`` writes it too).

Example:
  python scripts/benchmark_corpus.py --num_docs 100000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARD_DOCS = 100_000


def _sentences(source: Path) -> list[str]:
    out = []
    with open(source, encoding="utf-8") as fh:
        for line in fh:
            text = json.loads(line).get("text") or ""
            out.extend(s.strip() + "." for s in text.split(". ") if len(s.strip()) > 20)
    return out


def write_corpus(out_dir: Path, num_docs: int, source: Path, seed: int = 0) -> list[Path]:
    """Write ``num_docs`` synthetic abstracts in ncbi/pubmed's schema as shards of
    :data:`SHARD_DOCS` documents (``part-00000.parquet`` ...); an existing complete set is reused.

    Each abstract has 5-12 sentences drawn (seeded) from ``source``'s abstracts; its title is one
    more sentence. Returns the shard paths.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = out_dir / f"complete-{num_docs}-{seed}"
    shards = [out_dir / f"part-{i:05d}.parquet" for i in range(-(-num_docs // SHARD_DOCS))]
    if done.exists() and all(p.exists() for p in shards):
        return shards
    out_dir.mkdir(parents=True, exist_ok=True)
    pool = _sentences(source)
    rng = np.random.default_rng(seed)
    for i, shard in enumerate(shards):
        n = min(SHARD_DOCS, num_docs - i * SHARD_DOCS)
        lengths = rng.integers(5, 13, size=n)
        picks = rng.integers(0, len(pool), size=int(lengths.sum()) + n)
        rows, k = [], 0
        for d in range(n):
            body = " ".join(pool[j] for j in picks[k: k + lengths[d]])
            title = pool[picks[k + lengths[d]]]
            k += lengths[d] + 1
            pmid = i * SHARD_DOCS + d + 1
            rows.append({"MedlineCitation": {"PMID": pmid, "Article": {"ArticleTitle": title,
                                                                       "Abstract": {"AbstractText": body}}},
                         "PubmedData": {"PublicationStatus": "ppublish"}})
        tmp = shard.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp, row_group_size=10_000)
        os.replace(tmp, shard)
    done.write_text("ok")
    return shards


def _tokenizer(model_path: str):
    from token_distillation.models import default_cache_root, load_tokenizer, resolve_model_source

    return load_tokenizer(resolve_model_source(model_path), default_cache_root())


def phase_tokenize(args) -> dict:
    """(a): read the abstracts with pyarrow, tokenize them in batches, drop the ids."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from token_distillation.corpus import resolved_num_proc, tokenize_batch

    tok = _tokenizer(args.model_path)
    t0 = time.perf_counter()
    docs = tokens = 0
    for shard in sorted(Path(args.corpus_dir).glob("part-*.parquet")):
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=16_384, columns=["MedlineCitation"]):
            col = batch.column(0)
            for p in ("Article", "Abstract", "AbstractText"):
                col = pc.struct_field(col, p)
            ids, _ = tokenize_batch(tok, col.fill_null("").to_pylist(), resolved_num_proc(args.num_proc))
            docs += len(col)
            tokens += len(ids)
    return {"seconds": time.perf_counter() - t0, "docs_read": docs, "tokens": tokens}


def phase_scan(args, early_stop: bool) -> dict:
    """(b): the product's corpus stage with 500 tokens, early stop on or off."""
    from token_distillation.config import CorpusConfig
    from token_distillation.corpus import scan_corpus
    from token_distillation.snippets import SnippetMiner
    from token_distillation.tokenization import NewToken, bos_prefix

    tok = _tokenizer(args.model_path)
    records = [json.loads(x) for x in open(args.tokens, encoding="utf-8")][: args.num_tokens]
    tokens = [NewToken(r["token"], tuple(r["subtoken_ids"])) for r in records]
    cfg = CorpusConfig(dataset_path=str(args.corpus_dir), num_proc=args.num_proc)
    miner = SnippetMiner(tokens, 50, 25, 5, cfg.heldout_fraction, bos_prefix(tok), 42)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as cache:
        t0 = time.perf_counter()
        res = scan_corpus(cfg, tok, Path(cache), consumer=miner, early_stop=early_stop)
        seconds = time.perf_counter() - t0
    r = miner.result()
    return {"seconds": seconds, "docs_read": res.docs_read, "tokens": res.corpus.num_tokens,
            "stop_reason": res.stop_reason, "docs_needed_by_rarest_token": miner.docs_needed, "tokens_with_25_train_snippets": sum(c >= 25 for c in r.train_counts),
            "tokens_with_5_heldout_snippets": sum(c >= 5 for c in r.heldout_counts)}


def _child(args, phase: str) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--corpus_dir", str(args.corpus_dir), "--model_path",
           args.model_path, "--tokens", str(args.tokens), "--num_tokens", str(args.num_tokens), "--num_proc",
           str(args.num_proc), "--work_dir", str(args.work_dir)]
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_docs", type=int, default=100_000)
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "pubmed_abstracts" /
                    "abstracts.jsonl")
    ap.add_argument("--work_dir", type=Path, default=Path(tempfile.gettempdir()) / "td_benchmark_corpus")
    ap.add_argument("--model_path", default="smollm2-135m")
    ap.add_argument("--tokens", type=Path, default=ROOT / "new_tokens" / "pubmed_frequency_smollm2_top500.jsonl")
    ap.add_argument("--num_tokens", type=int, default=500)
    ap.add_argument("--num_proc", type=int, default=0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--phase", choices=["tokenize", "scan_full", "scan_early"], help=argparse.SUPPRESS)
    ap.add_argument("--corpus_dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.phase:  # a child: one phase, its own peak RSS
        res = phase_tokenize(args) if args.phase == "tokenize" else phase_scan(args, args.phase == "scan_early")
        res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    from token_distillation.config import ConfigError

    if args.num_docs < 1:
        raise ConfigError("--num_docs must be >= 1")
    if not args.source.is_file():
        raise ConfigError(f"--source {args.source}: file not found; pass the shared PubMed abstracts (JSON Lines)")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.corpus_dir = args.work_dir / f"pubmed_schema_{args.num_docs}"
    t0 = time.perf_counter()
    write_corpus(args.corpus_dir, args.num_docs, args.source)
    summary = {"num_docs": args.num_docs, "corpus_write_seconds": time.perf_counter() - t0,
               "num_proc": args.num_proc, "cpus": len(os.sched_getaffinity(0)), "phases": {}}
    for name in ("tokenize", "scan_full", "scan_early"):
        r = _child(args, name)
        r["docs_per_s"] = r["docs_read"] / r["seconds"]
        summary["phases"][name] = r
    base = summary["phases"]["tokenize"]["seconds"]
    for name, r in summary["phases"].items():
        r["ratio_to_tokenize"] = r["seconds"] / base
        print(f"{name:11s} {r['seconds']:8.1f} s  {r['docs_per_s']:9.0f} docs/s  {r['docs_read']:9d} docs read  "
              f"peak RSS {r['peak_rss_mib']:7.0f} MiB  ratio to (a) {r['ratio_to_tokenize']:.2f}"
              + (f"  stop: {r['stop_reason']}" if "stop_reason" in r else "")
              + (f" (rarest token done at document {r['docs_needed_by_rarest_token']})"
                 if r.get("docs_needed_by_rarest_token") else ""), file=sys.stderr)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.out)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from token_distillation.cli import exit_on_user_error

    exit_on_user_error(main)()
