"""`beam run curate`: URL lists in, WebDataset shards and tables out.

Stages, cheapest first (each labelled, each with its rejects side output):

    Read -> UrlHygiene -> CaptionHygiene -> Reshuffle -> Crawl -> Decode
         -> Stage (bytes to staging files) -> Dedup -> [model stages]
         -> WriteShards -> index.parquet, rejects.parquet, report.json, report.html

Caption hygiene runs before the crawl because it needs no pixels: a row with
`IMG_4782.jpg` as its alt text costs no fetch. Everything that holds image
bytes (Crawl, Decode, Stage) fuses into one Beam stage with no shuffle inside;
see `stages/staging.py` for how the bytes reach the shard writers.
"""

from __future__ import annotations

import logging

import apache_beam as beam
import yaml
from apache_beam.io.filesystems import FileSystems
from pydantic import ValidationError

from pipelines import outputs
from pipelines.report import add_report
from pipelines.scoring import UNSELECTED_DIR, ModelStages
from schemas import CurateConfig
from stages.base import apply_filter
from stages.caption import CaptionHygieneDoFn
from stages.crawl import Crawl
from stages.dedup import Deduplicate
from stages.read import ReadUrlLists
from stages.resolution import DecodeDoFn
from stages.shards import SHARDS_DIR, TMP_DIR, WriteShards
from stages.staging import StageImagesDoFn, cleanup_after, staging_dir
from stages.url import UrlHygiene

LOG = logging.getLogger(__name__)


class ConfigError(ValueError):
    pass


def load_config(path: str | None, overrides: dict | None = None) -> CurateConfig:
    """Read a YAML config (every key optional) and apply CLI overrides
    (dotted keys, e.g. {"crawl.allow_private_network": True})."""
    data: dict = {}
    if path:
        try:
            with FileSystems.open(path, compression_type="uncompressed") as f:
                data = yaml.safe_load(f.read().decode("utf-8")) or {}
        except (OSError, beam.io.filesystem.BeamIOError) as err:
            raise ConfigError(f"{path}: cannot read config: {err}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return CurateConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from err


def _model_stages(config: CurateConfig) -> ModelStages | None:
    """The scoring/selection/recaption composite, when any of it is configured."""
    stages = ModelStages(config)
    return stages if stages.enabled else None


def build_curate(p: beam.Pipeline, input_pattern: str, output_dir: str, config: CurateConfig, run_config: dict):
    """Add the curate graph to `p`; returns the PCollection holding the Report."""
    records, read_rejects = p | "Read" >> ReadUrlLists(input_pattern, config.read)
    input_rows = (
        (records, read_rejects)
        | "InputRows" >> beam.Flatten()
        | "CountInputRows" >> beam.combiners.Count.Globally()
    )
    records, url_rejects = records | "UrlHygiene" >> UrlHygiene(config.url, config.decode)
    records, caption_rejects = apply_filter(records, "CaptionHygiene", CaptionHygieneDoFn(config.caption))
    # Input files are read one per worker; spread rows before the expensive part.
    records = records | "SpreadCrawl" >> beam.Reshuffle()
    fetched, crawl_rejects = records | "Crawl" >> Crawl(config.crawl)
    decoded, decode_rejects = apply_filter(fetched, "Decode", DecodeDoFn(config.decode))
    staged = decoded | "Stage" >> beam.ParDo(StageImagesDoFn(output_dir))
    kept, dedup_rejects = staged | "Dedup" >> Deduplicate(config.dedup)
    rejects = [read_rejects, url_rejects, caption_rejects, crawl_rejects, decode_rejects, dedup_rejects]

    model_stages = _model_stages(config)
    unselected_written = None
    if model_stages is not None:
        kept, model_rejects = kept | "Models" >> model_stages
        rejects.append(model_rejects)
        if model_stages.unselected is not None:
            # Samples the thresholds dropped stay in rejects.parquet; their
            # images are kept under DIR/unselected/ so `beam run select` can
            # loosen the thresholds later without crawling again. (Their rows are
            # already counted as select rejects, so a lost one is not counted twice.)
            unselected_written, _, _ = model_stages.unselected | "UnselectedShards" >> WriteShards(
                FileSystems.join(output_dir, UNSELECTED_DIR), config.shards, run_config
            )

    written, manifests, shard_rejects = kept | "Shards" >> WriteShards(output_dir, config.shards, run_config)
    rejects.append(shard_rejects)
    all_rejects = tuple(rejects) | "AllRejects" >> beam.Flatten()

    report = outputs.write_outputs(output_dir, input_rows, written, manifests, all_rejects)
    # report.html reads sampled images back from the staging files: before cleanup.
    html_written = add_report(output_dir, report, written, all_rejects, staged)
    done = [html_written | "ReportDone" >> beam.Map(lambda _: None)]
    temporary = [staging_dir(output_dir), FileSystems.join(output_dir, SHARDS_DIR, TMP_DIR)]
    if unselected_written is not None:
        done.append(unselected_written | "UnselectedDone" >> beam.Map(lambda _: None))
        temporary.append(FileSystems.join(output_dir, UNSELECTED_DIR, SHARDS_DIR, TMP_DIR))
    cleanup_after(tuple(done) | "AllDone" >> beam.Flatten(), temporary)
    return report
