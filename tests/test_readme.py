"""The README's config example must stay a valid config."""

from pathlib import Path

import yaml

from schemas import CurateConfig

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_config_example_validates():
    block = README.read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    config = CurateConfig.model_validate(yaml.safe_load(block))
    assert config.select.thresholds() == {"min_clip_similarity": 0.28, "max_nsfw_score": 0.5}
    assert config.recaption is not None and config.shards.caption_source == "synthetic"
