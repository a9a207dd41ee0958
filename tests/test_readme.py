"""The README's config example must stay a valid config."""

from pathlib import Path

import yaml

from schemas import CurateConfig

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_config_example_validates():
    blocks = [part.split("```", 1)[0] for part in README.read_text().split("```yaml\n")[1:]]
    for block in blocks:  # every YAML example in the README is a valid curate config
        CurateConfig.model_validate(yaml.safe_load(block))
    [block] = [b for b in blocks if "recaption" in b]
    config = CurateConfig.model_validate(yaml.safe_load(block))
    assert config.select.thresholds() == {"min_clip_similarity": 0.28, "max_nsfw_score": 0.5}
    assert config.recaption is not None and config.shards.caption_source == "synthetic"
