"""Extraction speed per core: pages/s and pairs/s, selectolax against lxml.

    nice -n 10 python -m benchmarks.extract_bench [--seconds 60] [--aux-seconds S] [--files 4] [--pages 150]
    python -m benchmarks.extract_bench --quick      # 5 s per side: a smoke run, not a result

Generated WARC files (`pipelines.testing.warcgen.realistic_page`: 20-200 KiB
of HTML per page, log-uniform, 5-40 image tags of every kind the rules handle)
are extracted by the real core (`stages.core.extract.extract_file`: warcio,
charset decoding, parsing, the image rules, the opt-out check) in this
process, so the figures are per core. Every figure is measured in this run:

1. **Parser**: the whole core with `images.parser: selectolax` (A) and `lxml`
   (B), in the order A B B A, each side looping over the corpus for at least
   `--seconds` of CPU time. Rates are per CPU second (`time.process_time`), so
   other load on the machine slows the wall clock but not the figure; the
   spread is the min..max of each side's two runs. The ratio A/B is the
   parser choice. Both parsers must give the same pairs (checked).
1b. **Parser step alone**: the same two parsers on the decoded pages (parse
   and collect the <img> tags), A B B A: the part of (1) the parser decides.
2. **WARC reading share**: warcio iteration + payload read + charset decoding
   alone (no HTML parsing), same corpus, same rules; and, when FastWARC is
   installed (not a dependency), its iteration + payload read, for the
   warcio/FastWARC choice (both ordered A B B A).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

from pipelines.testing import warcgen
from schemas.extract import ExtractConfig, ImagePair
from stages.core import extract as core
from stages.core import html_images, warc

MIN_PAGE = 20 * 1024
MAX_PAGE = 200 * 1024


def build_corpus(root: Path, files: int, pages: int, seed: int = 0) -> tuple[list[str], int]:
    """`files` .warc.gz files of `pages` pages each (plus a request record per
    page, as in Common Crawl); returns (paths, HTML bytes in all)."""
    rng = random.Random(seed)
    paths, total = [], 0
    for f in range(files):
        records = []
        for p in range(pages):
            size = int(math.exp(rng.uniform(math.log(MIN_PAGE), math.log(MAX_PAGE))))
            html, _ = warcgen.realistic_page(rng, size)
            body = html.encode()
            total += len(body)
            url = f"http://site{f}.test/page/{p}.html"
            records += [warcgen.request(url), warcgen.response(url, body)]
        path = root / f"bench-{f:03d}.warc.gz"
        warcgen.write_warc(path, records)
        paths.append(str(path))
    return paths, total


def _open(path: str):
    return open(path, "rb")


def run_core(paths: list[str], parser: str, min_cpu_s: float) -> dict:
    """Loop the corpus through the core until `min_cpu_s` of CPU time."""
    config = ExtractConfig.model_validate({"images": {"parser": parser}})
    pages = pairs = html_bytes = loops = 0
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    while True:
        for ordinal, path in enumerate(paths):
            counts = core.FileCounts()
            for item in core.extract_file(path, ordinal, _open, config, counts):
                pairs += isinstance(item, ImagePair)
            pages += counts["pages"]
        loops += 1
        cpu = time.process_time() - start_cpu
        if cpu >= min_cpu_s:
            break
    return {"cpu_s": cpu, "wall_s": time.perf_counter() - start_wall, "pages": pages, "pairs": pairs, "loops": loops}


def decoded_pages(paths: list[str]) -> list[str]:
    config = ExtractConfig().records
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out += [item.text for item in warc.iter_warc(f, path, config) if isinstance(item, warc.HtmlPage)]
    return out


def run_parse_only(pages: list[str], parser: str, min_cpu_s: float) -> dict:
    """The parser step alone (`html_images.PARSERS[parser]`: parse and collect
    the <img> tags with their <picture> sources and <figcaption>)."""
    parse = html_images.PARSERS[parser]
    n = images = loops = 0
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    while True:
        for text in pages:
            images += len(parse(text).images)
            n += 1
        loops += 1
        cpu = time.process_time() - start_cpu
        if cpu >= min_cpu_s:
            break
    return {"cpu_s": cpu, "wall_s": time.perf_counter() - start_wall, "pages": n, "pairs": images, "loops": loops}


def run_read_only(paths: list[str], reader: str, min_cpu_s: float) -> dict:
    config = ExtractConfig().records
    pages = loops = 0
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    while True:
        for path in paths:
            with open(path, "rb") as f:
                if reader == "warcio":
                    pages += sum(isinstance(item, warc.HtmlPage) for item in warc.iter_warc(f, path, config))
                else:
                    pages += _fastwarc_pages(f, config)
        loops += 1
        cpu = time.process_time() - start_cpu
        if cpu >= min_cpu_s:
            break
    return {"cpu_s": cpu, "wall_s": time.perf_counter() - start_wall, "pages": pages, "pairs": 0, "loops": loops}


def _fastwarc_pages(f, config) -> int:
    """FastWARC iteration with the same payload read and decoding as warcio's path."""
    from fastwarc import ArchiveIterator, WarcRecordType

    n = 0
    for record in ArchiveIterator(f, record_types=WarcRecordType.response):
        content_type = record.http_headers.get("Content-Type") if record.http_headers is not None else None
        body = record.reader.read(config.max_page_bytes)
        if warc.is_html(content_type, body, config) and warc.decode_html(body, content_type, config) is not None:
            n += 1
    return n


def abba(label_a: str, run_a, label_b: str, run_b) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {label_a: [], label_b: []}
    for label, fn in ((label_a, run_a), (label_b, run_b), (label_b, run_b), (label_a, run_a)):
        result = fn()
        runs[label].append(result)
        print(f"  {label:<22} {result['pages'] / result['cpu_s']:8.1f} pages/cpu-s  {result['pairs'] / result['cpu_s']:9.1f} pairs/cpu-s"
              f"  ({result['cpu_s']:.1f} cpu-s, {result['wall_s']:.1f} wall-s, {result['loops']} loop(s))", flush=True)
    return runs


def summary(runs: dict[str, list[dict]], key: str) -> dict[str, tuple[float, float, float]]:
    """label -> (mean, min, max) of `key` per CPU second over the runs."""
    out = {}
    for label, results in runs.items():
        rates = [r[key] / r["cpu_s"] for r in results]
        out[label] = (statistics.mean(rates), min(rates), max(rates))
    return out


def check_same_pairs(paths: list[str]) -> int:
    """Both parsers give the same pairs on the whole corpus; returns how many."""
    def pairs(parser):
        config = ExtractConfig.model_validate({"images": {"parser": parser}})
        return [
            item.model_dump() for i, p in enumerate(paths) for item in core.extract_file(p, i, _open, config, core.FileCounts())
        ]

    a, b = pairs("selectolax"), pairs("lxml")
    if a != b:
        diff = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) if len(a) == len(b) else f"{len(a)} vs {len(b)} items"
        raise SystemExit(f"selectolax and lxml disagree (first difference: item {diff})")
    return sum(1 for item in a if "caption" in item)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="CPU seconds per side and run (>= 60 for a steady-state result).")
    parser.add_argument("--aux-seconds", type=float, default=None,
                        help="CPU seconds per run for tables 1b and 2 (default: --seconds); below 60 they are marked short.")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--pages", type=int, default=150, help="Pages per WARC file.")
    parser.add_argument("--quick", action="store_true", help="5 s per side and a small corpus: a smoke run only.")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.files, args.pages = 5.0, 2, 40
    aux_seconds = args.seconds if args.aux_seconds is None or args.quick else args.aux_seconds

    with tempfile.TemporaryDirectory() as tmp:
        paths, html_bytes = build_corpus(Path(tmp), args.files, args.pages)
        n_pages = args.files * args.pages
        warc_bytes = sum(Path(p).stat().st_size for p in paths)
        print(f"corpus: {args.files} WARC files, {n_pages} pages, {html_bytes / 2**20:.1f} MiB of HTML "
              f"(mean {html_bytes / n_pages / 1024:.0f} KiB/page), {warc_bytes / 2**20:.1f} MiB gzipped")
        n_pairs = check_same_pairs(paths)
        print(f"check: selectolax and lxml give the same {n_pairs} pairs on the corpus")
        def steadiness(seconds: float) -> str:
            return "steady state" if seconds >= 60 else f"SHORT RUN ({seconds:.0f} cpu-s per run): not a steady-state figure"

        steady = steadiness(args.seconds)
        print(f"\n1. whole core, parser A=selectolax vs B=lxml, A B B A, >= {args.seconds:.0f} cpu-s per run ({steady})")
        runs = abba("selectolax", lambda: run_core(paths, "selectolax", args.seconds),
                    "lxml", lambda: run_core(paths, "lxml", args.seconds))
        pages, pairs = summary(runs, "pages"), summary(runs, "pairs")
        for label in runs:
            mean, low, high = pages[label]
            print(f"  {label:<10} pages/s per core {mean:7.1f} (spread {low:.1f}..{high:.1f}); "
                  f"pairs/s per core {pairs[label][0]:8.1f} (spread {pairs[label][1]:.1f}..{pairs[label][2]:.1f}); "
                  f"HTML MiB/s per core {mean * html_bytes / n_pages / 2**20:5.2f}")
        print(f"  ratio selectolax/lxml: {pages['selectolax'][0] / pages['lxml'][0]:.2f}x "
              f"(worst case {pages['selectolax'][1] / pages['lxml'][2]:.2f}x)")

        texts = decoded_pages(paths)
        print(f"\n1b. the parser step alone (parse + collect <img> tags; 'pairs' column = img tags), A B B A ({steadiness(aux_seconds)})")
        parse_runs = abba("selectolax", lambda: run_parse_only(texts, "selectolax", aux_seconds),
                          "lxml", lambda: run_parse_only(texts, "lxml", aux_seconds))
        parse_pages = summary(parse_runs, "pages")
        for label, (mean, low, high) in parse_pages.items():
            print(f"  {label:<10} pages/s per core {mean:8.1f} (spread {low:.1f}..{high:.1f})")
        print(f"  ratio selectolax/lxml (parser step): {parse_pages['selectolax'][0] / parse_pages['lxml'][0]:.2f}x "
              f"(worst case {parse_pages['selectolax'][1] / parse_pages['lxml'][2]:.2f}x)")

        print(f"\n2. reading only (iterate + read payload + decode), A=warcio vs B=fastwarc, A B B A ({steadiness(aux_seconds)})")
        try:
            import fastwarc  # noqa: F401
        except ImportError:
            print("  fastwarc not installed: warcio only")
            read = {"warcio": [run_read_only(paths, "warcio", aux_seconds) for _ in range(2)]}
        else:
            read = abba("warcio", lambda: run_read_only(paths, "warcio", aux_seconds),
                        "fastwarc", lambda: run_read_only(paths, "fastwarc", aux_seconds))
        read_pages = summary(read, "pages")
        for label, (mean, low, high) in read_pages.items():
            print(f"  {label:<10} pages/s per core {mean:8.1f} (spread {low:.1f}..{high:.1f})")
        share = pages["selectolax"][0] / read_pages["warcio"][0]
        print(f"  warcio reading is {100 * share:.0f}% of the whole core's CPU time with selectolax")
        if "fastwarc" in read_pages:
            # Whole-core time per page if FastWARC replaced warcio's share.
            t_core, t_warcio, t_fast = (1 / pages["selectolax"][0], 1 / read_pages["warcio"][0], 1 / read_pages["fastwarc"][0])
            print(f"  with FastWARC the whole core would gain at most {t_core / (t_core - t_warcio + t_fast):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
